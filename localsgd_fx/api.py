"""``compile_localsgd``: trace a model, order its layers, and run it with a local prefix.

The returned :class:`LocalSGDModule` re-emits its graph whenever the transition ``t`` moves
(rewritten and compiled graphs are cached by ``t``) and keeps the schedule and weak-supervision
state in its ``state_dict`` so that training resumes exactly.
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
from passes.partition import check_transition
from passes.rewrite import LocalUpdateSpec, rewrite
from passes.trace import trace

from .cost import speed_bound
from .metrics import format_table
from .ops import LOCAL_UPDATE
from .rules import LocalRule, make_rule
from .runtime import AutoCompile, CompileClock, compile_mode, torch_compile
from .schedules import PLASTICITY_DEFAULT_PROBE_SIZE, EpochStats, Manual, PlainSGD, Schedule, make_schedule
from .signals import SignalMeter
from .supervision import WeakSupervision

__all__ = ["LocalSGDModule", "compile_localsgd", "DEFAULT_RULE", "DEFAULT_LOCAL_LR", "DEFAULT_SAMPLE_FRACTION"]

#: What the local prefix does by default: nothing (it is frozen). On 7 of 8 measured pairs of runs a
#: frozen prefix was at least as accurate as a Hebbian one on the same schedule (the 8th within the
#: seed spread), and it is faster (no update GEMM): docs/RESULTS.md, "Local rule or freeze".
#: ``rule="hebbian"`` is the paper's rule.
DEFAULT_RULE = "freeze"
DEFAULT_LOCAL_LR = 1e-4   # from benchmarks/sweep_defaults.py --stage lr: 1e-3 cost 5.5 pp, 1e-4 0.25 pp (docs/RESULTS.md)
#: Each local update is computed from this fraction of the batch. A quarter makes the update GEMM
#: 4x cheaper at no measured accuracy cost, since the update is small anyway (docs/RESULTS.md,
#: "Pushing the dynamic schedule": 1.34x at -0.40 pp vs 1.19x at -0.50 pp with the full batch).
DEFAULT_SAMPLE_FRACTION = 0.25
STATE_VERSION = 1
_EVAL = "eval"   # runner key of eval mode: the untouched traced graph, always eager (see _build_runner)


class LocalSGDModule(nn.Module):
    """A model whose layers ``0..t-1`` learn with a local rule during the forward pass.

    Build it with :func:`compile_localsgd`. Calling it in train mode runs the rewritten graph of
    the current ``t`` (local layers update their weights as a side effect); in eval mode it runs the
    original graph. Parameters are the model's own objects; the model is the child ``model``.
    """

    def __init__(self, model: nn.Module, traced: fx.GraphModule, order: LayerOrder, *, rule: LocalRule,
                 schedule: Schedule, supervision: WeakSupervision, compile: bool | str, max_local: int,
                 sample_fraction: float, check_finite: bool, total_epochs: int | None):
        super().__init__()
        self.model = model
        self.supervision = supervision
        self.rule, self.schedule = rule, schedule
        self.compile_mode = compile_mode(compile)
        self.max_local, self.sample_fraction, self.check_finite = max_local, sample_fraction, check_finite
        self.total_epochs = total_epochs
        self.transition, self.epoch = 0, 0
        self.history: list[dict[str, Any]] = []
        # compile accounting (runtime.CompileClock adds to these): graphs compiled, seconds, events by trigger
        self.compile_count, self.compile_seconds, self.compile_events = 0, 0.0, {}
        self.auto_compile: AutoCompile | None = None     # made at the first train step under compile="auto"
        # step counts for the auto policy's estimate of the steps left at a transition
        self._steps_this_epoch, self._steps_per_epoch, self._epochs_at_transition = 0, 0, 0
        #: training steps in an epoch, when the caller knows (the trainer sets it); otherwise the longest
        #: epoch seen so far, which in the first epoch is only the steps taken yet
        self.steps_per_epoch: int | None = None
        # device-side guard: refused (non-finite) updates per layer, read once per epoch. Made on the model's
        # device, as is the local rate: a model moved to CUDA before compile_localsgd needs no second .to()
        device = next(model.parameters(), torch.empty(0)).device
        self.register_buffer("nonfinite_updates", torch.zeros(len(order), dtype=torch.int32, device=device),
                             persistent=False)
        supervision.to(device)
        # plain attributes, not submodules: they share the model's modules, and are rebuilt on demand
        self.__dict__["_traced"] = traced
        self.__dict__["_order"] = order
        self.__dict__["_graphs"] = {}       # t -> rewritten GraphModule
        self.__dict__["_runners"] = {}      # t or _EVAL -> callable (the graph, or a _Runner with its torch.compile)
        self.__dict__["_epoch_start"] = {}  # layer index -> weight at the start of the epoch
        self._flops_pending = order.layers[0].flops is None   # FLOPs are known for all layers or none
        schedule.bind(len(order), max_local, total_epochs)
        self._snapshot_sgd_weights()
        # the transition layer's boundary signals, for the schedules that read them (docs/DESIGN.md §4.3)
        probe_size = getattr(schedule, "probe_size", PLASTICITY_DEFAULT_PROBE_SIZE)
        self.signals = SignalMeter(self, traced, order, schedule.signals, probe_size) if schedule.signals else None
        if self.signals is not None:
            self.signals.follow(self.transition)

    # ----------------------------------------------------------------------------- running
    def forward(self, *args, **kwargs):
        if self._flops_pending:
            self._measure_flops(args, kwargs)
        # the model's own flag too: with inplace=True users call model.eval(), which never reaches this wrapper
        key = self.transition if self.training and self.model.training else _EVAL
        if key != _EVAL:
            self._steps_this_epoch += 1
            if self.compile_mode == "auto":
                self._auto_step(key)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._build_runner(key)
        # the rewritten graph switches grad mode off for the prefix; restore it even if an update raises
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            return runner(*args, **kwargs)

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
        bad = ", ".join(f"layer {self._order.names[i]!r} ({n} step{'s' * (n != 1)})" for i, n in enumerate(counts) if n)
        advice = "Lower local_lr or check the inputs for inf/NaN"
        if self.rule.key != "hebbian":
            advice += ", or use rule='hebbian' (norm-preserving)"
        raise LocalSGDError(
            f"non-finite local updates were refused in epoch {self.epoch + 1} for {bad}: those weights kept their "
            f"previous values, but the SGD layers and BatchNorm statistics saw the same batches. {advice}.")

    def expected_steps_at_transition(self) -> int:
        """How many more training steps the current ``t`` is expected to run (for ``compile="auto"``).

        The rest of this epoch, plus whole epochs: all that are left when the schedule cannot move ``t``
        any more, else as many as ``t`` has lasted already (a run that held ``t`` for k epochs is
        expected to hold it about k more), never past ``total_epochs``.
        """
        per_epoch = self.steps_per_epoch or max(self._steps_per_epoch, self._steps_this_epoch)
        left_this_epoch = max(0, per_epoch - self._steps_this_epoch)
        stuck = isinstance(self.schedule, (PlainSGD, Manual)) or self.transition >= self.max_local
        epochs_left = None if self.total_epochs is None else max(0, self.total_epochs - self.epoch - 1)
        if stuck:
            more = epochs_left if epochs_left is not None else max(1, self.epoch)
        else:
            more = self._epochs_at_transition if epochs_left is None else min(epochs_left, self._epochs_at_transition)
        return left_this_epoch + per_epoch * more

    def end_epoch(self, mean_lr: float | None = None) -> int:
        """Run learning-mode selection at the end of an epoch; returns the (possibly new) ``t``.

        ``mean_lr``: the SGD learning rate averaged over the epoch's steps, for schedules that read it
        (``Dynamic(per_lr=True)``). Raises :class:`LocalSGDError` first if local updates were refused
        as non-finite this epoch.
        """
        if self.check_finite:
            self.check_updates()
        norms = {}
        for layer in self._order.layers[self.transition:]:
            start = self._epoch_start.get(layer.index)
            weight = self._weight(layer.index)
            norms[layer.index] = float((weight.detach() - start).norm()) if start is not None else 0.0
        new_t = self.transition
        if self.schedule.decide_every is None:      # else it decides in maybe_decide
            stats = EpochStats(epoch=self.epoch + 1, transition=self.transition, num_layers=len(self._order),
                               max_local=self.max_local, update_norms=norms, flop_shares=self._order.flop_shares(),
                               signals=self._read_signals(), mean_lr=mean_lr)
            new_t = int(self.schedule.select(stats))
        self.epoch += 1
        before = self.transition
        if new_t != before:
            self.set_transition(new_t)
        self._steps_per_epoch = max(self._steps_per_epoch, self._steps_this_epoch)
        self._steps_this_epoch = 0
        self._epochs_at_transition = 0 if self.transition != before else self._epochs_at_transition + 1
        if self.auto_compile is not None:
            self.auto_compile.reconsider(self.transition, self)
        self._snapshot_sgd_weights()
        self.history.append({"epoch": self.epoch, "transition_before": before, "transition": self.transition,
                             "update_norm": norms.get(before), **self.schedule.log_stats()})
        return self.transition

    def maybe_decide(self) -> int:
        """Call once after every optimizer step; returns the (possibly new) ``t``.

        A schedule with ``decide_every = K`` (plasticity, gradnorm) takes a decision on every K-th call,
        reading its signals with one device-to-host copy; other schedules decide in :meth:`end_epoch`
        and this does nothing.
        """
        return self._decide() if self.schedule.due() else self.transition

    def _decide(self) -> int:
        """A decision inside the epoch (``maybe_decide`` found one due)."""
        stats = EpochStats(epoch=self.epoch, transition=self.transition, num_layers=len(self._order),
                           max_local=self.max_local, update_norms={}, flop_shares=self._order.flop_shares(),
                           signals=self._read_signals())
        before = self.transition
        new_t = int(self.schedule.select(stats))
        if new_t != before:
            self.set_transition(new_t)
            self._epochs_at_transition = 0
        self.history.append({"epoch": self.epoch + 1, "step": self._steps_this_epoch, "transition_before": before,
                             "transition": self.transition, **self.schedule.log_stats()})
        return self.transition

    def set_probe(self, *inputs: torch.Tensor) -> None:
        """Fix the probe batch of the plasticity signal: the first ``probe_size`` rows of these inputs (by
        default the wrapper keeps those of its first call)."""
        if self.signals is None or "plasticity" not in self.signals.names:
            raise LocalSGDError(f"set_probe is for a schedule that reads the plasticity signal; this one is "
                                f"{type(self.schedule).__name__}")
        self.signals.set_probe(*inputs)

    def _read_signals(self) -> dict[str, float | None]:
        if self.signals is None or self.transition >= self.max_local:   # nothing left to decide
            return {}
        return self.signals.read(self.transition, self.model)

    def set_transition(self, t: int, *, force: bool = False) -> None:
        """Make layers ``0..t-1`` local. Moving backwards (``t`` smaller) needs ``force=True``."""
        check_transition(self._order, t)
        if t < self.transition and not force:
            raise LocalSGDError(f"transition {t} < current {self.transition}: layers switch SGD -> LOCAL once and "
                                "never back. Pass force=True to move backwards anyway.")
        self.transition = t
        if self.signals is not None:
            self.signals.follow(t)

    # ------------------------------------------------------------------------- inspection
    @property
    def layers(self) -> list[tuple[str, float | None]]:
        """``[(layer name, FLOP share), ...]`` in topological order."""
        shares = self._order.flop_shares() or [None] * len(self._order)
        return list(zip(self._order.names, shares))

    @property
    def layer_order(self) -> LayerOrder:
        return self._order

    @property
    def local_fraction(self) -> float | None:
        """``p``: FLOP fraction of the layers that are local now (None before shapes are known)."""
        return self._order.local_fraction(self.transition)

    @property
    def speed_bound(self) -> float | None:
        """The GEMM model's step-speedup bound at the current ``t`` (docs/DESIGN.md §5)."""
        p = self.local_fraction
        return None if p is None else speed_bound(p, self.rule.gemms, self.sample_fraction)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten GraphModule of the current transition."""
        return self.graph_for(self.transition)

    def graph_for(self, t: int) -> fx.GraphModule:
        """The rewritten GraphModule for transition ``t`` (cached)."""
        if t not in self._graphs:
            spec = LocalUpdateSpec(op=LOCAL_UPDATE, lr=self.supervision.lr, rule=self.rule.key,
                                   sample_fraction=self.sample_fraction,
                                   nonfinite=self.nonfinite_updates if self.check_finite else None)
            self._graphs[t] = self._traced if t == 0 else rewrite(self._traced, self._order, t, spec)
        return self._graphs[t]

    def stats(self) -> dict[str, Any]:
        """Per-epoch figures for logging: t, local FLOP fraction, schedule statistics, local rate."""
        return {"transition": self.transition, "local_fraction": self.local_fraction, "speed_bound": self.speed_bound,
                "local_lr": float(self.supervision.lr) if self.rule.updates else None,   # freeze: no rate
                "compile_count": self.compile_count,
                "compile_seconds": self.compile_seconds, "compiled": self.is_compiled(self.transition),
                **self.schedule.log_stats()}

    def is_compiled(self, t: int) -> bool:
        """Whether training steps at ``t`` run a compiled graph (now, for the batch size it was built for)."""
        runner = self._runners.get(t)
        return isinstance(runner, _Runner) and runner.compiled is not None

    @property
    def compile_decisions(self) -> list:
        """The choices ``compile="auto"`` made, with their figures (:class:`~localsgd_fx.runtime.CompileDecision`)."""
        return list(self.auto_compile.decisions) if self.auto_compile is not None else []

    def explain(self, *, print_fn: Callable[[str], None] | None = print) -> str:
        """The per-layer map, the local FLOP fraction, the 3/(3-p) bound and compile figures."""
        p, bound = self.local_fraction, self.speed_bound
        text = "\n".join([
            f"{type(self.model).__name__}: {len(self._order)} layers, transition t={self.transition}, "
            f"rule={self.rule.key}, schedule={type(self.schedule).__name__}, epoch {self.epoch}",
            format_table(layer_rows(self._order, self.transition), LAYER_COLUMNS),
            f"local FLOP fraction p = {'?' if p is None else f'{p:.3f}'}; step-speedup bound "
            f"{'?' if bound is None else f'{bound:.3f}x'} (GEMM model)",
            f"compiled graphs: {self.compile_count} ({self.compile_seconds:.1f} s compiling: forward, backward and "
            f"CUDA-graph recording); compile={self.compile_mode!r}",
            *(d.line() for d in self.compile_decisions),
        ])
        if print_fn is not None:
            print_fn(text)
        return text

    # ----------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "layers": self._order.names, "shapes": self._layer_shapes(),
                "transition": self.transition,
                "epoch": self.epoch, "schedule": self.schedule.state_dict(), "history": list(self.history),
                "epoch_start": {i: w.clone() for i, w in self._epoch_start.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LocalSGDError(f"checkpoint LocalSGD state has version {getattr(state, 'get', lambda k: None)('version')!r}, "
                                f"this library reads version {STATE_VERSION}; it was written by another release.")
        if list(state["layers"]) != self._order.names:
            raise LocalSGDError("checkpoint was written for a model with other layers "
                                f"({len(state['layers'])} layers, first {state['layers'][:3]}) than this one "
                                f"({len(self._order)} layers, first {self._order.names[:3]}); build the same model.")
        if state.get("shapes") != self._layer_shapes():
            mismatch = next(f"{n}: checkpoint {a}, model {b}" for n, a, b in
                            zip(self._order.names, state.get("shapes") or [None] * len(self._order), self._layer_shapes())
                            if a != b)
            raise LocalSGDError(f"checkpoint layer shapes differ from this model's ({mismatch}); build the same model "
                                "with the same widths.")
        # everything is checked: apply (the schedule first, it validates its own state)
        self.schedule.load_state_dict(state["schedule"])
        self.set_transition(int(state["transition"]), force=True)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        device = self.supervision.lr.device
        self._epoch_start.clear()
        self._epoch_start.update({int(i): w.to(device) for i, w in state["epoch_start"].items()})

    # ----------------------------------------------------------------------- internals
    def _layer_shapes(self) -> list[list[int]]:
        return [list(self._weight(i).shape) for i in range(len(self._order))]

    def _weight(self, index: int) -> torch.Tensor:
        return weight_of(self._traced, self._order.layers[index])

    def _snapshot_sgd_weights(self) -> None:
        self._epoch_start.clear()
        for layer in self._order.layers[self.transition:]:
            self._epoch_start[layer.index] = self._weight(layer.index).detach().clone()

    def _measure_flops(self, args, kwargs) -> None:
        """Count FLOPs from the first call's inputs (one extra eval-mode forward, once)."""
        self._flops_pending = False
        if kwargs:
            warnings.warn("FLOP shares need positional inputs: pass example_inputs=(...) to compile_localsgd; "
                          "local_fraction and speed_bound stay unknown", stacklevel=3)
            return
        self.__dict__["_order"] = find_layers(self._traced, args)   # propagates shapes once

    def _device_type(self) -> str:
        return self.supervision.lr.device.type

    def _auto_step(self, t: int) -> None:
        """``compile="auto"``: let the policy time this step and switch ``t``'s runner when it decides."""
        if self.auto_compile is None:
            device = self._device_type()
            self.auto_compile = AutoCompile(device, "reduce-overhead" if device == "cuda" else "on")
        choice = self.auto_compile.before_step(t, self)
        if choice == "compile" and not self.is_compiled(t):
            self._build_runner(t, compile=self.auto_compile.mode)
            self.auto_compile.compiled(t, self)
        elif choice == "eager" and self.is_compiled(t):      # measured no faster than eager: drop it
            self._runners[t] = self.graph_for(t)

    def _build_runner(self, key: int | str, compile: str | None = None) -> Callable:
        """The callable for a runner key. Eval mode always runs the untouched graph eagerly: evaluation is a
        small share of a run, and compiling it would cost a graph per evaluation batch shape."""
        if key == _EVAL:
            self._runners[key] = self._traced
            return self._traced
        graph = self.graph_for(key)
        mode = compile or self.compile_mode
        if mode in ("off", "auto"):     # auto: eager until AutoCompile says compiling pays
            self._runners[key] = graph
            return graph
        self.compile_count += 1
        runner = self._runners[key] = _Runner(self, graph, torch_compile(graph, mode))
        return runner

    def _apply(self, fn, recurse=True):
        # moving/casting may replace tensors (buffers always, the local rate among them): point the traced
        # graph's own attributes back at the model's, and drop emitted graphs holding stale references
        result = super()._apply(fn, recurse)
        for name, _ in [*self._traced.named_parameters(remove_duplicate=False),
                        *self._traced.named_buffers(remove_duplicate=False)]:
            owner_name, _, attr = name.rpartition(".")
            owner = self._traced.get_submodule(owner_name)
            if attr in owner._parameters:
                owner._parameters[attr] = self.model.get_parameter(name)
            else:
                owner._buffers[attr] = self.model.get_buffer(name)
        self._graphs.clear()
        self._runners.clear()
        return result

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"], state["_runners"] = {}, {}   # compiled callables do not copy or pickle
        state["auto_compile"] = None
        return state


class _Runner:
    """A compiled graph, specialised to the batch size of its first call; other sizes (a partial last
    batch) run the eager graph rather than compile another one."""

    __slots__ = ("owner", "graph", "compiled", "batch")

    def __init__(self, owner: LocalSGDModule, graph: fx.GraphModule, compiled: Callable):
        self.owner, self.graph, self.compiled, self.batch = owner, graph, compiled, None

    def __call__(self, *args, **kwargs):
        size = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
        if self.batch is None:
            self.batch = size
        elif size != self.batch:
            return self.graph(*args, **kwargs)
        CompileClock.active(self.owner)    # compiles triggered from here on (this forward, its backward) are ours
        return self.compiled(*args, **kwargs)


def compile_localsgd(model: nn.Module, *, rule: str | LocalRule = DEFAULT_RULE, schedule: str | Schedule | Callable = "dynamic",
                     local_lr: float = DEFAULT_LOCAL_LR, weak_supervision: str = "sign",
                     example_inputs: tuple | None = None, compile: bool | str = "auto", max_local: int | None = None,
                     leaf_modules: Iterable[str | type] = (), inplace: bool = False, total_epochs: int | None = None,
                     sample_fraction: float = DEFAULT_SAMPLE_FRACTION, check_finite: bool = True) -> LocalSGDModule:
    """Turn ``model`` into a LoCal+SGD module.

    Args:
        model: any ``torch.fx``-traceable module with ``nn.Conv{1,2,3}d`` / ``nn.Linear`` layers.
        rule: ``"freeze"`` (default: the prefix is not updated at all), ``"hebbian"`` (the paper's rule),
            ``"oja"``, ``"softhebb"``, or a :class:`~localsgd_fx.rules.LocalRule` instance. Freeze is the
            default because it was as accurate and faster in our measurements (docs/RESULTS.md).
        schedule: ``"dynamic"`` (default), ``"plasticity"``, ``"gradnorm"``, ``"quadratic"``/``"static"``,
            ``"linear"``, ``"exponential"``, ``"manual"`` (you call ``set_transition``), ``"sgd"``, a
            :class:`~localsgd_fx.schedules.Schedule`, or a callable ``policy(epoch, stats) -> t``. A schedule
            built with ``decide_every=K`` (plasticity, gradnorm) decides in :meth:`~LocalSGDModule.maybe_decide`.
        local_lr: ``η0`` of the local rule.
        weak_supervision: ``"sign"`` (default), ``"scale"`` or ``"off"``.
        example_inputs: a tuple of inputs used once for FLOP counts; without it they are taken
            from the first call.
        compile: ``"auto"`` (default: eager, and ``torch.compile`` with CUDA graphs for a transition only when
            the measured saving pays for the compile; never on a CPU unless it measures a win),
            ``"on"``/``True`` (``torch.compile``), ``"reduce-overhead"`` (``torch.compile`` with CUDA graphs:
            one replay for the forward, local updates included, and one for the backward) or ``"off"``/``False``.
        max_local: the most layers ever local (default: all but the last, the classifier).
        leaf_modules: submodule names or classes to keep opaque (untraceable parts; their layers stay SGD).
        inplace: also make ``model(...)`` itself run the LoCal+SGD forward.
        total_epochs: the run length, needed by static schedules.
        sample_fraction: compute each local update from this fraction of the batch (a random
            subset, at least one sample; 1.0 = the whole batch, deterministic).
        check_finite: refuse non-finite local updates: the weight keeps its value, a device-side counter
            records it, and :meth:`~LocalSGDModule.end_epoch` (or ``check_updates()``) raises
            :class:`LocalSGDError` naming the layers. No host sync in the step.

    Returns:
        A :class:`LocalSGDModule` sharing ``model``'s parameters.

    Example::

        >>> model = compile_localsgd(models_zoo.get_model("resnet20"), schedule="dynamic")
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
    traced = trace(model, leaf_modules=leaf_modules)
    order = find_layers(traced, example_inputs)
    n = len(order)
    max_local = min(n - 1, order.local_limit) if max_local is None else max_local   # limit: see passes/layers.py
    if not isinstance(max_local, int) or not 0 <= max_local <= order.local_limit:
        raise ValueError(f"max_local must be an int in 0..{order.local_limit} (this model has {n} layers"
                         f"{'' if order.local_limit == n else ', and layers after an opaque call stay SGD'}), "
                         f"got {max_local!r}")
    module = LocalSGDModule(model, traced, order, rule=local_rule, schedule=sched, supervision=supervision,
                            compile=compile, max_local=max_local, sample_fraction=float(sample_fraction),
                            check_finite=check_finite, total_epochs=total_epochs)
    if inplace:
        model.forward = module.forward
    return module
