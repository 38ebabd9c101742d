"""``compile_localsgd``: trace a model, order its layers, and run it with a local prefix.

The returned :class:`LocalSGDModule` runs the graph emitted for the current transition ``t`` (a
:class:`~localsgd_fx.graphs.GraphCache` emits and caches one per ``t``), lets a
:class:`~localsgd_fx.driver.ScheduleDriver` move ``t``, and keeps the schedule and weak-supervision state
in its ``state_dict`` so that training resumes exactly.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from passes.errors import LocalSGDError
from passes.inspection import LAYER_COLUMNS, layer_rows
from passes.layers import LayerOrder, find_layers, weight_of
from passes.rewrite import LocalUpdateSpec
from passes.trace import OPAQUE_META, mode_watch, modes_changed, retrace, trace

from .capture import TrainStep
from .cost import speed_bound
from .driver import ScheduleDriver
from .graphs import GraphCache
from .metrics import format_table
from .ops import LOCAL_UPDATE
from .rules import LocalRule, make_rule
from .runtime import compile_mode
from .schedules import (
    DEFAULT_SCHEDULE,
    PLASTICITY_DEFAULT_PROBE_SIZE,
    Budget,
    Dynamic,
    PolicySchedule,
    Schedule,
    make_schedule,
)
from .signals import SignalMeter, UpdateNorms
from .supervision import WeakSupervision

__all__ = ["LocalSGDModule", "compile_localsgd", "DEFAULT_RULE", "DEFAULT_LOCAL_LR", "DEFAULT_SAMPLE_FRACTION"]

#: What the local prefix does by default: nothing (it is frozen). On 7 of 8 measured pairs of runs a
#: frozen prefix was at least as accurate as a Hebbian one on the same schedule (the 8th within the
#: seed spread), and it is faster (no update GEMM): docs/RESULTS.md, "Local rule or freeze".
#: ``rule="hebbian"`` is the paper's rule.
DEFAULT_RULE = "freeze"
# from benchmarks/sweep_defaults.py --stage lr: 1e-3 cost 5.5 pp, 1e-4 0.25 pp (docs/RESULTS.md)
DEFAULT_LOCAL_LR = 1e-4
#: Each local update is computed from this fraction of the batch. A quarter makes the update GEMM
#: 4x cheaper at no measured accuracy cost, since the update is small anyway (docs/RESULTS.md,
#: "Pushing the dynamic schedule": 1.34x at -0.40 pp vs 1.19x at -0.50 pp with the full batch).
DEFAULT_SAMPLE_FRACTION = 0.25
STATE_VERSION = 1


def _driven(name: str, doc: str) -> property:
    """A module attribute that is the driver's ``name``."""
    return property(lambda self: getattr(self.driver, name), lambda self, value: setattr(self.driver, name, value),
                    doc=doc)

class LocalSGDModule(nn.Module):
    """A model whose layers ``0..t-1`` learn with a local rule during the forward pass.

    Build it with :func:`compile_localsgd`. Calling it in train mode runs the rewritten graph of
    the current ``t`` (local layers update their weights as a side effect); in eval mode it runs the
    user's own model. Parameters are the model's own objects; the model is the child ``model``.

    Three parts, each with one job: :attr:`graphs` (a :class:`~localsgd_fx.graphs.GraphCache`: the emitted
    graph and the runner of each ``t``, compile accounting), :attr:`driver` (a
    :class:`~localsgd_fx.driver.ScheduleDriver`: epochs, steps, the schedule's decisions, history) and this
    thin module over both (the rule's rate and guard, the boundary signals, inspection, state).
    """

    def __init__(self, model: nn.Module, traced: fx.GraphModule, order: LayerOrder, *, rule: LocalRule,
                 schedule: Schedule, supervision: WeakSupervision, compile: bool | str, max_local: int,
                 sample_fraction: float, check_finite: bool, total_epochs: int | None, inplace: bool = False):
        super().__init__()
        self.model = model
        self.supervision = supervision
        self.rule = rule
        self.max_local, self.sample_fraction, self.check_finite = max_local, sample_fraction, check_finite
        self.total_epochs, self.inplace = total_epochs, inplace
        # device-side guard: refused (non-finite) updates per layer, read once per epoch. Made on the model's
        # device, as is the local rate: a model moved to CUDA before compile_localsgd needs no second .to()
        device = next(model.parameters(), torch.empty(0)).device
        self.register_buffer("nonfinite_updates", torch.zeros(len(order), dtype=torch.int32, device=device),
                             persistent=False)
        supervision.to(device)
        self._flops_pending = order.layers[0].flops is None   # FLOPs are known for all layers or none
        # submodules whose traced code branched on their mode: a step checks their flags (a zoo ResNet has none)
        self.__dict__["_mode_watch"] = mode_watch(traced, model)
        # the transition layer's boundary signals, for the schedules that read them (docs/DESIGN.md §4.4)
        probe_size = getattr(schedule, "probe_size", PLASTICITY_DEFAULT_PROBE_SIZE)
        self.signals = SignalMeter(self, traced, order, schedule.signals, probe_size) if schedule.signals else None
        # plain attributes, not submodules: they share the model's modules
        self.__dict__["graphs"] = GraphCache(traced, order, self._update_spec, compile_mode(compile))
        self.__dict__["update_norms"] = (UpdateNorms(self._weight) if isinstance(schedule, _READS_UPDATE_NORMS)
                                         else None)
        self.__dict__["driver"] = ScheduleDriver(
            schedule, order, max_local, total_epochs,
            read_signals=self._read_signals if self.signals is not None else None,
            read_update_norms=self._read_update_norms if self.update_norms is not None else None,
            on_move=self._moved)      # bound methods, not closures: a deepcopy or pickle follows its own module
        self._moved(0)
        self._snapshot_sgd_weights()

    # ----------------------------------------------------------------------------- running
    def forward(self, *args, **kwargs):
        if self._flops_pending:
            self._measure_flops(args, kwargs)
        # the model's own flag too: with inplace=True users call model.eval(), which never reaches this wrapper
        if not (self.training and self.model.training):
            return self._user_forward(*args, **kwargs)
        self.follow_modes(args)
        driver = self.driver
        driver.step()
        runner = self.graphs.runner(driver.transition, epoch=driver.epoch, expected_steps=driver.expected_steps())
        # the rewritten graph switches grad mode off for the prefix; restore it even if an update raises
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            return runner(*args, **kwargs)

    def follow_modes(self, example_args: tuple = ()) -> bool:
        """Trace the model again if a submodule whose code branches on its mode has another mode than when it
        was traced (a fused BatchNorm set to ``eval()`` for fine-tuning, say); True if it did. The graphs of
        every ``t`` are emitted anew. ``example_args`` (a batch) count the FLOPs of the new graph."""
        if not any(m.training is not mode for m, mode in self._mode_watch):
            return False
        old = self.graphs.traced
        new = retrace(old, self.model)
        order = find_layers(new, example_args or None)
        if order.names != self.graphs.order.names:
            changed = ", ".join(modes_changed(old, self.model))
            raise LocalSGDError(f"the mode change of {changed} changes which layers the model calls "
                                f"({len(self.graphs.order)} layers before, {len(order)} now): LoCal+SGD cannot follow "
                                "it mid-run; set the modes before compile_localsgd")
        if order.layers[0].flops is None:      # keep the counts of the first trace
            order = self.graphs.order
        self.graphs.retarget(new)
        self.graphs.order = self.driver.order = order
        if self.signals is not None:
            self.signals.retarget(new, order)
        self.__dict__["_mode_watch"] = mode_watch(new, self.model)
        return True

    def _user_forward(self, *args, **kwargs):
        """Evaluation runs the user's own model, so it gives exactly the model's outputs whatever its code does
        with its mode (a traced graph holds the branches taken in train mode)."""
        if self.inplace:      # model.forward is this wrapper's: call the class's own
            return type(self.model).forward(self.model, *args, **kwargs)
        return self.model(*args, **kwargs)

    def capture_step(self, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                     autocast_dtype: torch.dtype | None = None, capture: bool = True) -> TrainStep:
        """A whole training step for your own loop: ``loss, output = step(x, y)`` runs forward (local updates
        included), ``loss_fn``, backward, ``optimizer.step()`` and :meth:`observe_loss`.

        On a CUDA device each ``t``'s step is recorded once as a CUDA graph after a few eager steps and then
        replayed (no compiler); elsewhere, and for batches of another size, it runs eagerly. The optimizer must
        be recordable: ``SGD(..., lr=torch.tensor(lr, device="cuda"), fused=True)`` or Adam/AdamW with
        ``capturable=True`` (see :mod:`localsgd_fx.capture`).
        """
        return TrainStep(self, optimizer, loss_fn, autocast_dtype=autocast_dtype, capture=capture)

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Feed the step's training loss to weak supervision (sets the next step's local rate).

        A rule without an update (freeze) reads no rate, so the step spends nothing on it."""
        if self.rule.updates:
            self.supervision.observe(loss)

    def check_updates(self) -> None:
        """Raise :class:`LocalSGDError` if local updates were refused as non-finite since the last check.

        Reads the device-side counters (one device-to-host copy); :meth:`end_epoch` calls it, call it
        more often to stop sooner. A refused update left its weight unchanged.
        """
        counts = self.nonfinite_updates.tolist()
        if not any(counts):
            return
        self.nonfinite_updates.zero_()
        order = self.graphs.order
        bad = ", ".join(f"layer {order.names[i]!r} ({n} step{'s' * (n != 1)})" for i, n in enumerate(counts) if n)
        advice = "Lower local_lr or check the inputs for inf/NaN"
        if self.rule.key != "hebbian":
            advice += ", or use rule='hebbian' (norm-preserving)"
        raise LocalSGDError(
            f"non-finite local updates were refused in epoch {self.epoch + 1} for {bad}: those weights kept their "
            f"previous values, but the SGD layers and BatchNorm statistics saw the same batches. {advice}.")

    # ---------------------------------------------------------------------------- schedule
    def end_epoch(self, mean_lr: float | None = None) -> int:
        """Run learning-mode selection at the end of an epoch; returns the (possibly new) ``t``.

        ``mean_lr``: the SGD learning rate averaged over the epoch's steps, for schedules that read it
        (``Dynamic(per_lr=True)``). Raises :class:`LocalSGDError` first if local updates were refused
        as non-finite this epoch.
        """
        if self.check_finite:
            self.check_updates()
        t = self.driver.end_epoch(mean_lr)
        self.graphs.reconsider(t, epoch=self.driver.epoch, expected_steps=self.driver.expected_steps())
        self._snapshot_sgd_weights()
        return t

    def maybe_decide(self) -> int:
        """Call once after every optimizer step; returns the (possibly new) ``t``.

        A schedule with ``decide_every = K`` (plasticity, gradnorm) takes a decision on every K-th call,
        reading its signals with one device-to-host copy; other schedules decide in :meth:`end_epoch`
        and this does nothing.
        """
        return self.driver.maybe_decide()

    def set_transition(self, t: int, *, force: bool = False) -> None:
        """Make layers ``0..t-1`` local. Moving backwards (``t`` smaller) or past ``max_local`` needs ``force=True``."""
        self.driver.set_transition(t, force=force)

    def _moved(self, t: int) -> None:
        if self.signals is not None:
            self.signals.follow(t)

    def _read_signals(self, t: int) -> dict[str, float | None]:
        return self.signals.read(t, self.model)

    def _read_update_norms(self, t: int) -> dict[int, float]:
        return self.update_norms.read(range(t, len(self.graphs.order)))

    def set_probe(self, *inputs: torch.Tensor) -> None:
        """Fix the probe batch of the plasticity signal: the first ``probe_size`` rows of these inputs (by
        default the wrapper keeps those of its first call)."""
        if self.signals is None or "plasticity" not in self.signals.names:
            raise LocalSGDError(f"set_probe is for a schedule that reads the plasticity signal; this one is "
                                f"{type(self.schedule).__name__}")
        self.signals.set_probe(*inputs)

    def expected_steps_at_transition(self) -> int:
        """How many more training steps the current ``t`` is expected to run (see
        :meth:`~localsgd_fx.driver.ScheduleDriver.expected_steps`)."""
        return self.driver.expected_steps()

    # what the driver owns, reached through the module (t moves only by set_transition)
    schedule = property(lambda self: self.driver.schedule, doc="The learning-mode selector.")
    transition = property(lambda self: self.driver.transition, doc="``t``: layers ``0..t-1`` are local.")
    epoch = _driven("epoch", "Epochs completed (``end_epoch`` calls).")
    history = _driven("history", "One record per decision: epoch, t before and after, the schedule's statistics.")
    steps_per_epoch = _driven("epoch_length", "Training steps in an epoch, when the caller knows (the trainer "
                                              "sets it before the first step); None: the longest epoch seen.")

    # ------------------------------------------------------------------------- inspection
    @property
    def layers(self) -> list[tuple[str, float | None]]:
        """``[(layer name, FLOP share), ...]`` in topological order."""
        order = self.graphs.order
        shares = order.flop_shares() or [None] * len(order)
        return list(zip(order.names, shares))

    @property
    def layer_order(self) -> LayerOrder:
        return self.graphs.order

    @property
    def local_fraction(self) -> float | None:
        """``p``: FLOP fraction of the layers that are local now (None before shapes are known)."""
        return self.graphs.order.local_fraction(self.transition)

    @property
    def speed_bound(self) -> float | None:
        """The GEMM model's step-speedup bound at the current ``t`` (docs/DESIGN.md §5)."""
        p = self.local_fraction
        return None if p is None else speed_bound(p, self.rule.gemms, self.sample_fraction)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten GraphModule of the current transition."""
        return self.graphs.graph(self.transition)

    def graph_for(self, t: int) -> fx.GraphModule:
        """The rewritten GraphModule for transition ``t`` (cached)."""
        return self.graphs.graph(t)

    compile_mode = property(lambda self: self.graphs.mode)
    compile_seconds = property(lambda self: self.graphs.account.seconds)
    compile_events = property(lambda self: self.graphs.account.events)

    @property
    def compile_count(self) -> int:
        """Graphs ``torch.compile`` built for this model (one per distinct ``t`` and batch size compiled)."""
        return self.graphs.account.graphs

    def is_compiled(self, t: int) -> bool:
        """Whether training steps at ``t`` run a compiled graph (now, for the batch size it was built for)."""
        return self.graphs.is_compiled(t)

    @property
    def compile_decisions(self) -> list:
        """The choices ``compile="auto"`` made, with their figures (:class:`~localsgd_fx.runtime.CompileDecision`)."""
        return self.graphs.decisions

    def stats(self) -> dict[str, Any]:
        """Per-epoch figures for logging: t, local FLOP fraction, schedule statistics, local rate."""
        return {"transition": self.transition, "local_fraction": self.local_fraction, "speed_bound": self.speed_bound,
                "local_lr": float(self.supervision.lr) if self.rule.updates else None,   # freeze: no rate
                "compile_count": self.compile_count,
                "compile_seconds": self.compile_seconds, "compiled": self.is_compiled(self.transition),
                **self.schedule.log_stats()}

    def explain(self, *, print_fn: Callable[[str], None] | None = print) -> str:
        """The per-layer map, the local FLOP fraction, the 3/(3-p) bound and compile figures."""
        p, bound, order = self.local_fraction, self.speed_bound, self.graphs.order
        text = "\n".join([
            f"{type(self.model).__name__}: {len(order)} layers, transition t={self.transition}, "
            f"rule={self.rule.key}, schedule={type(self.schedule).__name__}, epoch {self.epoch}",
            format_table(layer_rows(order, self.transition), LAYER_COLUMNS),
            *(f"kept opaque (its layers stay on SGD): {name!r}: {reason}"
              for name, reason in self.graphs.traced.meta.get(OPAQUE_META, {}).items()),
            f"local FLOP fraction p = {'?' if p is None else f'{p:.3f}'}; step-speedup bound "
            f"{'?' if bound is None else f'{bound:.3f}x'} (GEMM model)",
            *self._plan_lines(),
            f"compiled graphs: {self.compile_count} ({self.compile_seconds:.1f} s compiling: forward, backward and "
            f"CUDA-graph recording); compile={self.compile_mode!r}",
            *([f"recorded steps: {self.graphs.account.captures} ({self.graphs.account.capture_seconds:.2f} s of "
               "warm-up steps and recording)"] if self.graphs.account.captures else []),
            *(d.line() for d in self.compile_decisions),
        ])
        if print_fn is not None:
            print_fn(text)
        return text

    def _plan_lines(self) -> list[str]:
        """A planned schedule's moves, known before training (the budget schedule)."""
        if not isinstance(self.schedule, Budget) or not self.schedule.bound:
            return []
        order = self.graphs.order
        shares = order.flop_shares()
        plan, share = self.schedule.planned(shares)
        line = f"planned t per epoch: {plan} ({share:.3f} of the layer-FLOP-epochs local"
        if shares is None:     # FLOPs not measured yet: the plan assumed equal shares
            return [line + ", layers counted alike until the FLOPs are known)"]
        steps = sum(1.0 / speed_bound(order.local_fraction(t), self.rule.gemms, self.sample_fraction) for t in plan)
        return [line + f"; run-speedup bound {len(plan) / steps:.2f}x, GEMM model)"]

    # ----------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        start = self.update_norms.start if self.update_norms is not None else {}
        return {"version": STATE_VERSION, "layers": self.graphs.order.names, "shapes": self._layer_shapes(),
                **self.driver.state_dict(), "epoch_start": {i: w.clone() for i, w in start.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        order = self.graphs.order
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LocalSGDError(f"checkpoint LocalSGD state has version "
                                f"{getattr(state, 'get', lambda k: None)('version')!r}, "
                                f"this library reads version {STATE_VERSION}; it was written by another release.")
        if list(state["layers"]) != order.names:
            raise LocalSGDError("checkpoint was written for a model with other layers "
                                f"({len(state['layers'])} layers, first {state['layers'][:3]}) than this one "
                                f"({len(order)} layers, first {order.names[:3]}); build the same model.")
        if state.get("shapes") != self._layer_shapes():
            mismatch = next(f"{n}: checkpoint {a}, model {b}" for n, a, b in
                            zip(order.names, state.get("shapes") or [None] * len(order), self._layer_shapes())
                            if a != b)
            raise LocalSGDError(f"checkpoint layer shapes differ from this model's ({mismatch}); build the same model "
                                "with the same widths.")
        self.driver.load_state_dict(state)      # everything is checked: apply
        if self.update_norms is not None:
            device = self.supervision.lr.device
            self.update_norms.start = {int(i): w.to(device) for i, w in state["epoch_start"].items()}

    # ----------------------------------------------------------------------- internals
    def _update_spec(self) -> LocalUpdateSpec:
        """The fused node's constant arguments (read at each emission: ``.to()`` replaces the tensors)."""
        return LocalUpdateSpec(op=LOCAL_UPDATE, lr=self.supervision.lr, rule=self.rule.key,
                               sample_fraction=self.sample_fraction,
                               nonfinite=self.nonfinite_updates if self.check_finite else None)

    def _layer_shapes(self) -> list[list[int]]:
        return [list(self._weight(i).shape) for i in range(len(self.graphs.order))]

    def _weight(self, index: int) -> torch.Tensor:
        return weight_of(self.graphs.traced, self.graphs.order.layers[index])

    def _snapshot_sgd_weights(self) -> None:
        if self.update_norms is not None:
            self.update_norms.snapshot(range(self.transition, len(self.graphs.order)))

    def _measure_flops(self, args, kwargs) -> None:
        """Count FLOPs from the first call's inputs (one extra eval-mode forward, once)."""
        if kwargs:
            self._flops_pending = False
            warnings.warn("FLOP shares need positional inputs: pass example_inputs=(...) to compile_localsgd; "
                          "local_fraction and speed_bound stay unknown", stacklevel=3)
            return
        order = find_layers(self.graphs.traced, args)   # propagates shapes once
        self.graphs.order = self.driver.order = order
        self._flops_pending = False   # only now: a first call with bad inputs raises, and the next one measures

    def _apply(self, fn, recurse=True):
        # moving/casting may replace tensors (buffers always, the local rate among them): point the traced
        # graph's own attributes back at the model's, and drop emitted graphs holding stale references
        result = super()._apply(fn, recurse)
        traced = self.graphs.traced
        for name, _ in [*traced.named_parameters(remove_duplicate=False),
                        *traced.named_buffers(remove_duplicate=False)]:
            owner_name, _, attr = name.rpartition(".")
            owner = traced.get_submodule(owner_name)
            if attr in owner._parameters:
                owner._parameters[attr] = self.model.get_parameter(name)
            else:
                owner._buffers[attr] = self.model.get_buffer(name)
        self.graphs.retarget()
        return result


#: schedules that read the SGD layers' update norms at an epoch end (a user policy may read them too)
_READS_UPDATE_NORMS = (Dynamic, PolicySchedule)


def compile_localsgd(model: nn.Module, *, rule: str | LocalRule = DEFAULT_RULE,
                     schedule: str | Schedule | Callable = DEFAULT_SCHEDULE,
                     local_lr: float = DEFAULT_LOCAL_LR, weak_supervision: str = "sign",
                     example_inputs: tuple | None = None, compile: bool | str = "auto", max_local: int | None = None,
                     leaf_modules: Iterable[str | type] = (), inplace: bool = False, total_epochs: int | None = None,
                     sample_fraction: float = DEFAULT_SAMPLE_FRACTION, check_finite: bool = True,
                     strict: bool = False) -> LocalSGDModule:
    """Turn ``model`` into a LoCal+SGD module.

    Args:
        model: any ``torch.fx``-traceable module with ``nn.Conv{1,2,3}d`` / ``nn.Linear`` layers.
        rule: ``"freeze"`` (default: the prefix is not updated at all), ``"hebbian"`` (the paper's rule),
            ``"oja"``, ``"softhebb"``, or a :class:`~localsgd_fx.rules.LocalRule` instance. Freeze is the
            default because it was as accurate and faster in our measurements (docs/RESULTS.md).
        schedule: ``"budget"`` (default: a planned share of the run's layer-FLOP-epochs local, as late as the
            run allows; it needs ``total_epochs``), ``"dynamic"`` (the paper's Algorithm 1), ``"plasticity"``,
            ``"gradnorm"``, ``"quadratic"``/``"static"``,
            ``"linear"``, ``"exponential"``, ``"manual"`` (you call ``set_transition``), ``"sgd"``, a
            :class:`~localsgd_fx.schedules.Schedule`, or a callable ``policy(epoch, stats) -> t``. A schedule
            built with ``decide_every=K`` (plasticity, gradnorm) decides in :meth:`~LocalSGDModule.maybe_decide`.
        local_lr: ``η0`` of the local rule.
        weak_supervision: ``"sign"`` (default), ``"scale"`` or ``"off"``.
        example_inputs: a tuple of inputs used once for FLOP counts; without it they are taken
            from the first call.
        compile: ``"auto"`` (default: eager, and ``torch.compile`` with CUDA graphs for a transition only when
            the measured saving pays for the compile; a CPU expects no saving, so it stays eager),
            ``"on"``/``True`` (``torch.compile``), ``"reduce-overhead"`` (``torch.compile`` with CUDA graphs:
            one replay for the forward, local updates included, and one for the backward), ``"capture"``
            (eager forward; :meth:`~LocalSGDModule.capture_step` records whole steps as CUDA graphs) or
            ``"off"``/``False``.
        max_local: the most layers ever local (default: all but the last, the classifier).
        leaf_modules: submodule names or classes to keep opaque (untraceable parts; their layers stay SGD).
            A submodule that fails to trace is kept opaque anyway, with one warning naming it.
        strict: raise :class:`LocalSGDError` instead when a submodule fails to trace.
        inplace: also make ``model(...)`` itself run the LoCal+SGD forward.
        total_epochs: the run length (the epochs you train), needed by the budget schedule (the default) and the
            static ones.
        sample_fraction: compute each local update from this fraction of the batch (a random
            subset, at least one sample; 1.0 = the whole batch, deterministic).
        check_finite: refuse non-finite local updates: the weight keeps its value, a device-side counter
            records it, and :meth:`~LocalSGDModule.end_epoch` (or ``check_updates()``) raises
            :class:`LocalSGDError` naming the layers. No host sync in the step.

    Returns:
        A :class:`LocalSGDModule` sharing ``model``'s parameters.

    Example::

        >>> model = compile_localsgd(models_zoo.get_model("resnet20"), total_epochs=8)
        >>> loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); model.observe_loss(loss)
        >>> model.maybe_decide()   # after each step (only schedules deciding every K steps use it)
        >>> model.end_epoch()      # once per epoch
    """
    compile = compile_mode(compile)
    if not isinstance(sample_fraction, (int, float)) or not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction!r}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of inputs, e.g. (x,), got {type(example_inputs).__name__}")
    local_rule = make_rule(rule)
    sched = make_schedule(schedule)
    supervision = WeakSupervision(weak_supervision, base_lr=local_lr)
    traced = trace(model, leaf_modules=leaf_modules, strict=strict)
    order = find_layers(traced, example_inputs)
    n = len(order)
    limit = min(n - 1, order.local_limit)     # all n local: nothing left to back-propagate; limit: passes/layers.py
    max_local = limit if max_local is None else max_local
    if not isinstance(max_local, int) or not 0 <= max_local <= limit:
        raise ValueError(f"max_local must be an int in 0..{limit} (this model has {n} layers"
                         f"{'' if order.local_limit >= n - 1 else ', and layers after an opaque call stay SGD'}), "
                         f"got {max_local!r}")
    module = LocalSGDModule(model, traced, order, rule=local_rule, schedule=sched, supervision=supervision,
                            compile=compile, max_local=max_local, sample_fraction=float(sample_fraction),
                            check_finite=check_finite, total_epochs=total_epochs, inplace=inplace)
    if inplace:
        model.forward = module.forward
    return module
