"""Learning-mode selection: which layers are LOCAL and which are SGD (docs/DESIGN.md §4).

A *schedule* (selector) is asked at the end of every epoch (or, if it has ``decide_every``, every that many
training steps) for the next transition layer ``t``: layers ``0..t-1`` are updated with the local rule, layers
``t..N-1`` with SGD. Every schedule obeys the paper's constraints, enforced once, in :meth:`Schedule.select`:
training starts at ``t = 0`` (plain SGD); ``t`` never decreases (each layer switches at most once, SGD -> LOCAL);
``t`` never exceeds ``max_local`` (by default ``N - 1``: the classifier stays on SGD). A schedule only implements
:meth:`Schedule.propose` (its raw wish), which :meth:`Schedule.select` clips to ``[stats.transition, max_local]``.

Provided: :class:`Static` (a closed-form function of the epoch), :class:`Dynamic` (the paper's Algorithm 1, on the
per-layer SGD update norms), :class:`Plasticity` (Egeria: the transition layer's output on a probe batch settled)
and :class:`GradNorm` (AutoFreeze: its gradient norm stopped changing), both of which may decide every
``decide_every`` steps; :class:`PolicySchedule` (a user callable), :class:`PlainSGD` (always 0) and :class:`Manual`
(keeps ``t``; the user moves it). :func:`make_schedule` builds one from a shorthand, a callable or an instance.

Every schedule is a dataclass: its init fields are its options (validated by the ``check`` in their metadata, and
shown by the repr); fields made with :func:`state_field` are its decision state. :meth:`Schedule.state_dict`,
:meth:`Schedule.load_state_dict` and :meth:`Schedule.log_stats` are written once, from the fields.

``warmup_epochs`` (Dynamic and the signal schedules) counts completed epochs (``stats.epoch``); signals are recorded
from the start, moves wait for the warm-up. Dynamic judges the epoch that just ended, which must itself lie past the
warm-up (``stats.epoch > warmup_epochs``: first move at the end of epoch ``warmup_epochs + 1``); a signal schedule
judges the change since its previous check and may move once ``warmup_epochs`` epochs are complete
(``stats.epoch >= warmup_epochs``), its first check on a layer only setting a reference.

This module is pure Python (no torch) and depends on no other ``localsgd_fx`` module; all state is plain,
JSON-serialisable data, so that a resumed run makes the same decisions.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, ClassVar, Mapping

__all__ = ["DEFAULT_SCHEDULE", "EpochStats", "Schedule", "Static", "Dynamic", "Budget", "plan_budget", "Plasticity",
           "GradNorm", "PolicySchedule", "PlainSGD", "Manual", "make_schedule", "state_field", "SCHEDULE_NAMES"]

# ---------------------------------------------------------------------------------------------
# Defaults, in one visible place. They sit inside the paper's good range and are meant to be
# re-tuned from measurements (benchmarks/), so nothing else should hard-code them.
# ---------------------------------------------------------------------------------------------
#: The schedule a user gets without choosing one: the budget plan, whose accuracy cost held across depth and run
#: length in our measurements (docs/RESULTS.md, "Defaults that hold"), where Algorithm 1's did not.
DEFAULT_SCHEDULE: str = "budget"
#: Static: most layers ever local. A float is a fraction of the layers (capped at max_local);
#: 0.75 keeps the last quarter of the network on SGD even at the end of training.
STATIC_DEFAULT_C1: float = 0.75
#: Static: epoch at which local updates begin. A float in [0, 1) is a fraction of total_epochs,
#: so the default scales with the run length. 0.25 (a quarter of the epochs pure SGD) measured
#: +0.10 pp at 1.09x vs 0.1's -0.75 pp at 1.04x (benchmarks/sweep_defaults.py --stage static).
STATIC_DEFAULT_C2: float = 0.25
#: Static: steepness of the exponential profile (docs/DESIGN.md §4.1, k = 4).
STATIC_DEFAULT_K: float = 4.0
#: Dynamic: ALPHA - move when delta_E < alpha * running average (paper's good range: 0.1 - 0.5);
#: SHIFT - layers to move per decision (a float in (0, 1] is a fraction of the layers, at least 1;
#: the paper's good range is 10 - 15 %). Measured on two seeds (``localsgd bench tradeoff``,
#: docs/RESULTS.md): 0.3 / 10 % gave 1.18x at -0.22 pp; 0.5 / 15 % 1.27x at -0.94 pp, outside the
#: 0.5 pp budget, so the faster pair is a documented preset, not the default.
DYNAMIC_DEFAULT_ALPHA: float = 0.3
DYNAMIC_DEFAULT_SHIFT: float = 0.1
#: Dynamic: decay of the exponential running average (Algorithm 1 line 1).
DYNAMIC_DEFAULT_BETA: float = 0.9
#: Dynamic: no move while ``stats.epoch <= warmup_epochs``: the first move can come at the end of epoch 2.
DYNAMIC_DEFAULT_WARMUP_EPOCHS: int = 1
#: Plasticity and gradnorm: layers to move per decision (as Dynamic's SHIFT), and no move before
#: this many epochs are complete (their signals are still recorded).
SIGNAL_DEFAULT_SHIFT: float = 0.1
SIGNAL_DEFAULT_WARMUP_EPOCHS: int = 1
#: Plasticity: move when the probe output's change since the last check is below THRESHOLD times
#: its running average (decay BETA per check) on PATIENCE checks in a row; PROBE_SIZE images.
PLASTICITY_DEFAULT_THRESHOLD: float = 0.3
PLASTICITY_DEFAULT_BETA: float = 0.9
PLASTICITY_DEFAULT_PATIENCE: int = 1
PLASTICITY_DEFAULT_PROBE_SIZE: int = 64
#: GradNorm: move when the relative change of the mean gradient norm between checks stays below
#: THRESHOLD on PATIENCE checks in a row.
GRADNORM_DEFAULT_THRESHOLD: float = 0.1
GRADNORM_DEFAULT_PATIENCE: int = 2
#: Budget: BUDGET - the fraction of the run's layer-FLOP-epochs that are local; MAX_SHARE - the most of the layer
#: FLOPs the local prefix may hold (the deepest layers stay on SGD); START - no layer is local before this fraction
#: of the run. Measured on two seeds beside plain SGD (docs/RESULTS.md, "Defaults that hold"): 0.2 stayed within
#: 0.5 pp on ResNet-20 (8 and 20 epochs), ResNet-32, ResNet-56 and VGG-11-BN (1.17-1.24x); 0.25 was faster
#: (1.23-1.32x) but lost 0.60 pp on ResNet-56 and 0.95 pp on VGG-11-BN, so it is the faster preset, not the default.
BUDGET_DEFAULT_BUDGET: float = 0.2
BUDGET_DEFAULT_MAX_SHARE: float = 0.5
BUDGET_DEFAULT_START: float = 0.25

_STATIC_KINDS: tuple[str, ...] = ("linear", "quadratic", "exponential")


@dataclass
class EpochStats:
    """What the model wrapper knows at the end of an epoch, handed to a schedule.

    Args:
        epoch: epochs completed so far (1 after the first epoch).
        transition: the current transition layer ``t`` (layers ``< t`` are LOCAL).
        num_layers: ``N``, the number of conv/linear layers.
        max_local: the largest ``t`` allowed.
        update_norms: layer index -> ``delta_E = ||W_end(E) - W_start(E)||_2``, the norm of the
            layer's net SGD update over the epoch, for every SGD layer (index >= transition);
            empty for a decision taken inside an epoch.
        flop_shares: per-layer share of the layer FLOPs (sums to 1), or ``None``.
        signals: the signals named by the schedule's ``signals``, measured for the transition
            layer since the previous decision (``None``: nothing to compare with yet):
            ``"plasticity"`` - relative change of the layer's per-channel standardised output on
            the fixed probe batch; ``"grad_norm"`` - mean norm of the layer's weight gradient.
        mean_lr: the SGD learning rate averaged over the epoch's steps, when the caller gives it
            (``end_epoch(mean_lr=...)``; the trainer does); ``None`` otherwise.
    """

    epoch: int
    transition: int
    num_layers: int
    max_local: int
    update_norms: dict[int, float]
    flop_shares: list[float] | None = None
    signals: dict[str, float | None] = field(default_factory=dict)
    mean_lr: float | None = None


# ---------------------------------------------------------------------------------------------
# Options and state: argument checks (every message names the argument and its valid range),
# the field makers, and the conversion of saved state back to its declared types.
# ---------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    # bool is an int subclass, but True as "1 layer" is almost surely a mistake.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


Check = Callable[[str, Any], Any]   # (argument name, value) -> the value, normalised; raises ValueError


def _int(lo: int, what: str = "") -> Check:
    def check(name: str, value: Any) -> int:
        if not _is_int(value) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}{what}, got {value!r}")
        return int(value)
    return check


def _real(rng: str, ok: Callable[[float], bool]) -> Check:
    def check(name: str, value: Any) -> float:
        if not _is_real(value) or not math.isfinite(value) or not ok(float(value)):
            raise ValueError(f"{name} must be a float in {rng}, got {value!r}")
        return float(value)
    return check


def _optional(check: Check) -> Check:
    return lambda name, v: None if v is None else check(name, v)


def _int_or_fraction(lo: int, unit: str, rng: str, ok: Callable[[float], bool], of: str) -> Check:
    """An int ``>= lo`` (a count of ``unit``), or a float in ``rng`` (a fraction of ``of``)."""
    def check(name: str, v: Any) -> int | float:
        if _is_int(v):
            return _int(lo, f" ({unit}) or a float in {rng} (fraction of {of})")(name, v)
        return _real(f"{rng} (fraction of {of}) or an int >= {lo} ({unit})", ok)(name, v)
    return check


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


#: layers: an int >= 1, or a float in (0, 1], a fraction of the layers (Static's c1, every shift)
_LAYERS = _int_or_fraction(1, "layers", "(0, 1]", lambda v: 0.0 < v <= 1.0, "the layers")
_BETA = _real("[0, 1)", lambda v: 0.0 <= v < 1.0)
_PATIENCE = _int(1, " (checks in a row)")


def _choice(options: tuple[str, ...]) -> Check:
    def check(name: str, v: Any) -> Any:
        if v not in options:
            raise ValueError(f"{name} must be one of {list(options)}, got {v!r}")
        return v
    return check


def _layers(value: int | float, num_layers: int) -> int:
    """A count checked by ``_LAYERS`` resolved against the model: the int itself, or the floored fraction."""
    return value if isinstance(value, int) else math.floor(value * num_layers)


def _option(default: Any, check: Check, *, optional: bool = False, kw_only: bool = True) -> Any:
    """An option (init field): ``check`` validates it at construction and at ``load_state_dict``. ``optional``:
    a state dict may lack it (one written before it existed), and then gets the default."""
    return field(default=default, kw_only=kw_only, metadata={"check": check, "optional": optional})


def state_field(default: Any = None, *, factory: Callable[[], Any] | None = None, stats: bool = False) -> Any:
    """A decision-state field of a schedule: not an argument and not in the repr, saved by ``state_dict``.

    ``stats=True`` marks a ``dict[str, float]`` whose items :meth:`Schedule.log_stats` reports (a state dict
    may lack it: it is for logging only)."""
    kw = {"default_factory": factory} if factory is not None else {"default": default}
    return field(init=False, repr=False, metadata={"state": True, "stats": stats, "optional": stats}, **kw)


def _fields(obj: Any) -> tuple[Any, ...]:
    return fields(obj) if is_dataclass(obj) else ()


def _plain(value: Any) -> Any:
    """Saved form: dicts copied with str keys (JSON object keys are strings)."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


def _restore(hint: Any, value: Any, where: str) -> Any:
    """``value`` from a state dict (maybe after a JSON round trip) as the declared type ``hint``; else a
    ``ValueError`` that names ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: not (a is int and _is_int(value))):
            try:
                return _restore(arg, value, where)
            except ValueError:
                pass
    elif origin is dict and isinstance(value, Mapping):
        key_type, value_type = args
        if key_type is int and not all(_is_int(k) or (isinstance(k, str) and k.lstrip("-").isdigit()) for k in value):
            raise ValueError(f"{where} must map layer indices to values, got keys {sorted(map(str, value))}")
        return {key_type(k): _restore(value_type, v, f"{where}[{k!r}]") for k, v in value.items()}
    elif origin is list and isinstance(value, (list, tuple)):
        return [_restore(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif hint is dict and isinstance(value, Mapping) or hint is list and isinstance(value, (list, tuple)):
        return hint(value)
    elif hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    elif hint in (int, float) and (_is_int(value) if hint is int else _is_real(value)):
        return hint(value)
    elif hint not in (int, float, bool, str, dict, list) and origin not in (dict, list):
        return value   # a type this check does not model (Any, a class of the user's): taken as it is
    raise ValueError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


@functools.cache
def _saved(cls: type) -> dict[str, tuple[Any, Any]]:
    """What ``cls.state_dict`` saves: key -> (declared type, field or None): the bound values, the options
    and the state fields."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError:   # an annotation naming something out of reach: no type check
        hints = {}
    out: dict[str, tuple[Any, Any]] = {name: (int | None, None) for name in Schedule.BOUND}
    for f in _fields(cls):
        if f.init or f.metadata.get("state"):
            out[f.name] = (hints.get(f.name, Any), f)
    return out


# -- The base class ---------------------------------------------------------------------------
class Schedule(ABC):
    """Base class of the learning-mode selectors.

    Subclasses implement :meth:`propose`; the constraints (monotone, at most ``max_local``) are applied by
    :meth:`select`, once, for every schedule. A subclass that takes options or keeps state is a dataclass (as
    the provided ones: ``@dataclass(eq=False, repr=False, kw_only=True)``): options are init fields (a
    ``check(name, value)`` in a field's metadata validates it), state fields are made with :func:`state_field`;
    ``state_dict``, ``load_state_dict``, ``log_stats`` and the repr then come from the base.

    The model wrapper calls :meth:`bind` once (when it knows the number of layers) and :meth:`select` at every
    epoch end. :meth:`select` binds from the stats if :meth:`bind` was never called, so a schedule can also be
    driven by hand.

    Example::

        >>> class EveryOtherEpoch(Schedule):
        ...     def propose(self, stats):
        ...         return stats.epoch // 2
        >>> s = EveryOtherEpoch()
        >>> s.select(EpochStats(epoch=4, transition=0, num_layers=5, max_local=4, update_norms={}))
        2
    """

    #: Device-side signals this schedule reads from ``EpochStats.signals`` (measured by the model
    #: wrapper for the transition layer at each decision).
    signals: tuple[str, ...] = ()
    #: Decide every this many training steps instead of at epoch ends (``None``: epoch ends).
    decide_every: int | None = None
    #: The values :meth:`bind` resolves against the model (saved by :meth:`state_dict` for every schedule).
    BOUND: tuple[str, ...] = ("num_layers", "max_local", "total_epochs")
    num_layers: int | None = None
    max_local: int | None = None
    total_epochs: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.init and "check" in f.metadata:
                setattr(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    # -- binding -----------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` has resolved this schedule against a model."""
        return self.num_layers is not None

    def bind(self, num_layers: int, max_local: int, total_epochs: int | None = None) -> None:
        """Resolve fractions against the model (``num_layers`` = ``N`` >= 1 layers; the largest transition
        ``max_local`` in ``[0, N]``; the run length ``total_epochs``, if known: :class:`Static` needs it).

        Raises:
            ValueError: on an invalid argument, or one this schedule cannot work with.
        """
        num_layers = _int(1)("num_layers", num_layers)
        if not _is_int(max_local) or not 0 <= max_local <= num_layers:
            raise ValueError(f"max_local must be an int in [0, num_layers={num_layers}], got {max_local!r}")
        total_epochs = _optional(_int(1))("total_epochs", total_epochs)
        old = (self.num_layers, self.max_local, self.total_epochs)
        self.num_layers, self.max_local, self.total_epochs = num_layers, int(max_local), total_epochs
        try:
            self._resolve()
        except Exception:
            # Stay unbound on failure, so that a later select() retries instead of half-working.
            self.num_layers, self.max_local, self.total_epochs = old
            raise

    def _resolve(self) -> None:
        """Hook for subclasses: resolve fractions once the model is known."""

    def _bind_from(self, stats: EpochStats) -> None:
        """Bind from the stats if not bound yet (:meth:`propose` may be called directly)."""
        if not self.bound:
            self.bind(stats.num_layers, stats.max_local)

    # -- decisions ---------------------------------------------------------------------------
    @abstractmethod
    def propose(self, stats: EpochStats) -> int:
        """The schedule's raw wish for the next transition, a layer index, from the statistics of the epoch
        that just ended; :meth:`select` clips it to ``[stats.transition, max_local]``."""

    def select(self, stats: EpochStats) -> int:
        """The next transition layer: ``clip(propose(stats), stats.transition, max_local)``. The lower bound wins:
        a transition already past ``max_local`` (set by hand) is kept, since a layer never goes back to SGD.

        Example::

            >>> s = PlainSGD()
            >>> s.select(EpochStats(epoch=1, transition=2, num_layers=5, max_local=4,
            ...                     update_norms={}))
            2
        """
        if not self.bound:
            self.bind(stats.num_layers, stats.max_local, self.total_epochs)
        proposal = self.propose(stats)
        if not _is_int(proposal):
            raise TypeError(f"{type(self).__name__}.propose must return an int layer index, got "
                            f"{proposal!r} ({type(proposal).__name__})")
        return max(int(stats.transition), min(int(proposal), int(stats.max_local)))

    def due(self) -> bool:
        """Count one training step; whether a decision is due after it (never, for a schedule that
        decides at epoch ends only)."""
        return False

    # -- state, from the dataclass fields ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The full state (bound values, options, decision state) as JSON-able plain data: a dict that
        :meth:`load_state_dict` of a fresh instance of the same class turns into a schedule making the
        same decisions."""
        return {"type": type(self).__name__, **{key: _plain(getattr(self, key)) for key in _saved(type(self))}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict` (overrides constructor arguments).

        Args:
            state: a dict from :meth:`state_dict`, possibly after a JSON round trip.

        Raises:
            ValueError: if the state belongs to another schedule class, lacks a key, has an unknown one, or
                holds a value of the wrong type or outside an option's range (the message names the key);
                the schedule is then unchanged.
        """
        name = type(self).__name__
        kind = state.get("type") if isinstance(state, Mapping) else None
        if kind != name:
            raise ValueError(f"cannot load a {kind!r} schedule state into a {name} schedule")
        saved = _saved(type(self))
        unknown = sorted(set(state) - set(saved) - {"type"})
        if unknown and type(self).load_state_dict is Schedule.load_state_dict:   # else the override reads them
            raise ValueError(f"{name} state has unknown keys {unknown}; it takes {sorted(saved)}")
        values = {}
        for key, (hint, f) in saved.items():
            if key in state:
                values[key] = _restore(hint, state[key], f"{name} state key {key!r}")
            elif f is not None and f.metadata.get("optional"):
                values[key] = f.default if f.default_factory is MISSING else f.default_factory()
            else:
                raise ValueError(f"{name} state lacks key {key!r}")
        options = {key: values[key] for key, (_, f) in saved.items() if f is not None and f.init}
        try:   # the options pass the constructor's checks
            if options:
                type(self)(**options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name} state: {e}") from None
        for key, value in values.items():
            setattr(self, key, value)

    def log_stats(self) -> dict[str, float]:
        """Scalars describing the last decision, for logging: the items of the state fields marked
        ``stats`` (empty before the first decision)."""
        return {k: v for f in _fields(self) if f.metadata.get("stats")
                for k, v in getattr(self, f.name).items()}

    def __repr__(self) -> str:
        """``Name(positional, option=value, ...)``; an option that is ``False`` is left out."""
        shown = ((f, getattr(self, f.name)) for f in _fields(self) if f.init)
        args = ((f"{f.name}=" if f.kw_only else "") + repr(v) for f, v in shown if v is not False)
        return f"{type(self).__name__}({', '.join(args)})"


def _schedule(cls: type) -> type:
    """The dataclass form of a schedule: options keyword-only, identity equality, the base's repr."""
    return dataclass(eq=False, repr=False, kw_only=True)(cls)


@_schedule
class _Shifting(Schedule):
    """A schedule that moves ``t`` by ``shift`` layers: an int ``>= 1``, or a float in ``(0, 1]`` meaning a
    fraction of ``num_layers`` (floored, at least 1 layer), resolved at :meth:`bind` into ``shift_layers``."""

    shift_layers: int | None = state_field()

    def _resolve(self) -> None:
        assert self.num_layers is not None
        self.shift_layers = max(1, _layers(self.shift, self.num_layers))

    def _step(self, t: int, move: bool) -> int:
        assert self.shift_layers is not None
        return t + self.shift_layers if move else t


# -- Static -----------------------------------------------------------------------------------
@_schedule
class Static(Schedule):
    """Closed-form schedule of docs/DESIGN.md §4.1: ``t = floor(c1 * f(u))``.

    ``u = clip((E - c2) / (E_max - c2), 0, 1)`` with ``E = stats.epoch`` and
    ``E_max = total_epochs``; ``f(u) = u`` (linear), ``u**2`` (quadratic, the paper's preferred
    trade-off) or ``(exp(k*u) - 1) / (exp(k) - 1)`` (exponential). Linear and quadratic are
    computed in exact integer arithmetic, so hand-computed points hold with no rounding doubt.

    Args:
        kind: ``"linear"``, ``"quadratic"`` or ``"exponential"``.
        c1: the most layers ever local. An int ``>= 1`` is a number of layers; a float in
            ``(0, 1]`` is a fraction of ``num_layers`` (floored), capped at ``max_local``; an int
            above ``max_local`` is refused at :meth:`bind`. Note ``c1=1`` is one layer while
            ``c1=1.0`` is all of them.
        c2: the epoch at which local updates begin. An int ``>= 0`` is an epoch; a float in
            ``[0, 1)`` is a fraction of ``total_epochs`` (floored). Must resolve below
            ``total_epochs``.
        total_epochs: ``E_max``. If ``None``, taken from :meth:`bind`; when both are given
            the constructor's value wins (the user asked for it explicitly).
        k: steepness of the exponential profile, > 0.

    Example::

        >>> s = Static("linear", c1=4, c2=2, total_epochs=10)
        >>> s.bind(num_layers=6, max_local=5)
        >>> [s.propose(EpochStats(e, 0, 6, 5, {})) for e in (2, 4, 6, 10)]
        [0, 1, 2, 4]
    """

    kind: str = _option("quadratic", _choice(_STATIC_KINDS), kw_only=False)
    c1: int | float = _option(STATIC_DEFAULT_C1, _LAYERS)
    c2: int | float = _option(STATIC_DEFAULT_C2,
                              _int_or_fraction(0, "epoch", "[0, 1)", lambda v: 0.0 <= v < 1.0, "total_epochs"))
    total_epochs: int | None = _option(None, _optional(_int(1)))
    k: float = _option(STATIC_DEFAULT_K, _real("(0, inf)", lambda v: v > 0.0))
    c1_layers: int | None = state_field()   # resolved by bind()
    c2_epochs: int | None = state_field()
    last: dict[str, float] = state_field(factory=dict, stats=True)   # {"u", "f", "target"} of the last proposal

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_epochs is not None:
            self._check_c2(self.total_epochs)

    def _c2_epochs(self, total_epochs: int) -> int:
        return self.c2 if isinstance(self.c2, int) else math.floor(self.c2 * total_epochs)

    def _check_c2(self, total_epochs: int) -> None:
        if self._c2_epochs(total_epochs) >= total_epochs:
            raise ValueError(f"c2 must be below total_epochs: c2 is the epoch at which local updates begin, "
                             f"in [0, total_epochs={total_epochs}), got c2={self.c2!r}")

    def bind(self, num_layers: int, max_local: int, total_epochs: int | None = None) -> None:
        # The constructor's total_epochs wins over the wrapper's (explicit user choice).
        super().bind(num_layers, max_local, self.total_epochs or total_epochs)

    def _resolve(self) -> None:
        if self.total_epochs is None:
            raise ValueError("Static schedule needs the run length: pass total_epochs to Static(...) or to "
                             "compile_localsgd / bind (E_max in u = (E - c2) / (E_max - c2))")
        self._check_c2(self.total_epochs)
        assert self.num_layers is not None and self.max_local is not None
        if isinstance(self.c1, int) and self.c1 > self.max_local:   # a count the user wrote: never cut silently
            raise ValueError(
                f"c1={self.c1} layers is more than may turn local: max_local={self.max_local} of this model's "
                f"{self.num_layers} layers; pass c1 <= {self.max_local}, or a fraction in (0, 1]")
        self.c1_layers = min(_layers(self.c1, self.num_layers), self.max_local)
        self.c2_epochs = self._c2_epochs(self.total_epochs)

    def propose(self, stats: EpochStats) -> int:
        self._bind_from(stats)
        c1, c2, e_max = self.c1_layers, self.c2_epochs, self.total_epochs
        assert c1 is not None and c2 is not None and e_max is not None
        e = min(max(int(stats.epoch), c2), e_max)  # clip so that u is in [0, 1]
        num, den = e - c2, e_max - c2
        if self.kind == "linear":
            t = (c1 * num) // den
            f = num / den
        elif self.kind == "quadratic":
            t = (c1 * num * num) // (den * den)
            f = (num / den) ** 2
        else:
            u = num / den
            f = 1.0 if num == den else math.expm1(self.k * u) / math.expm1(self.k)
            # The tiny guard keeps floor() from losing a whole layer to rounding at exact points.
            t = min(c1, math.floor(c1 * f + 1e-9))
        self.last = {"u": num / den, "f": float(f), "target": float(t)}
        return int(t)


# -- Dynamic ----------------------------------------------------------------------------------
@_schedule
class Dynamic(_Shifting):
    """The paper's Algorithm 1: move the boundary when the transition layer stops learning.

    At every epoch end, for every SGD layer ``l`` (index >= transition) with its update norm
    ``delta_E[l]`` from ``stats.update_norms``:

    1. ``W̄[l] <- beta * W̄[l] + (1 - beta) * delta_E[l]`` (line 1, evaluated first);
    2. if ``delta_E[t] < alpha * W̄[t]`` for the transition layer ``t``, propose ``t + shift``
       (line 2); else keep ``t`` (line 4). The comparison is strict, as in the paper (an exact tie
       keeps ``t``), with one addition: ``delta_E[t] = 0`` always moves. A layer whose SGD update
       vanished has nothing left to learn by SGD, and with ``<`` alone a layer whose updates were
       all zero (``delta = W̄ = 0``, e.g. one that gets no gradient) would hold ``t`` for good.

    ``W̄[l]`` is initialised with the first ``delta`` seen for layer ``l`` (not zero: a zero
    start would bias the average low for ~1/(1-beta) = 10 epochs and delay the first move).
    Because the average is kept for every SGD layer, the new transition layer after a move
    already has a history. Layers that became LOCAL are no longer updated (their last entries
    are kept, for inspection).

    Args:
        alpha: threshold ratio, in ``(0, 1)``.
        shift: layers to move per decision: an int ``>= 1``, or a float in ``(0, 1]`` meaning
            a fraction of ``num_layers`` (floored, at least 1 layer).
        beta: decay of the running average, in ``[0, 1)``.
        warmup_epochs: no move at the ends of the first ``warmup_epochs`` epochs (``stats.epoch <=
            warmup_epochs``; history is still recorded), an int ``>= 0``.
        per_lr: compare ``delta_E / mean_lr_E`` instead of ``delta_E`` (``stats.mean_lr`` must be
            given). An SGD update scales with the learning rate, so without this the test also fires
            when the rate falls fast between epochs (short cosine runs) and hardly fires when it
            falls slowly (long runs); divided by the rate, it asks whether the layer settled.

    :meth:`log_stats`: ``{"delta", "running_avg", "threshold", "moved"}`` of the transition layer at the
    last decision (empty before the first one; frozen once ``t`` reached ``max_local``).

    Example::

        >>> s = Dynamic(alpha=0.5, shift=1, beta=0.5)
        >>> s.select(EpochStats(1, 0, 4, 3, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}))
        0
        >>> s.select(EpochStats(2, 0, 4, 3, {0: 0.1, 1: 1.0, 2: 1.0, 3: 1.0}))  # 0.1 < 0.5*0.55
        1
    """

    alpha: float = _option(DYNAMIC_DEFAULT_ALPHA, _real("(0, 1)", lambda v: 0.0 < v < 1.0))
    shift: int | float = _option(DYNAMIC_DEFAULT_SHIFT, _LAYERS)
    beta: float = _option(DYNAMIC_DEFAULT_BETA, _BETA)
    warmup_epochs: int = _option(DYNAMIC_DEFAULT_WARMUP_EPOCHS, _int(0))
    per_lr: bool = _option(False, _flag, optional=True)   # optional: states written before it existed lack it
    running_avg: dict[int, float] = state_field(factory=dict)
    last_delta: dict[int, float] = state_field(factory=dict)
    last: dict[str, float] = state_field(factory=dict, stats=True)

    def propose(self, stats: EpochStats) -> int:
        self._bind_from(stats)
        t = int(stats.transition)
        # Validate everything before touching the history, so a bad call leaves no trace.
        norms: dict[int, float] = {}
        for layer, delta in stats.update_norms.items():
            if int(layer) < t:
                continue  # LOCAL layers drop out of the history
            if not _is_real(delta) or not math.isfinite(delta) or delta < 0:
                raise ValueError(f"update norm of layer {layer} at epoch {stats.epoch} must be a finite "
                                 f"float >= 0, got {delta!r}")
            norms[int(layer)] = float(delta)
        if self.per_lr and norms:
            lr = stats.mean_lr
            if lr is None or not _is_real(lr) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(
                    f"Dynamic(per_lr=True) needs the epoch's mean SGD learning rate > 0: call "
                    f"end_epoch(mean_lr=...) (the trainer does); got mean_lr={lr!r} at epoch {stats.epoch}")
            norms = {layer: delta / lr for layer, delta in norms.items()}
        decide = t < stats.max_local  # at max_local there is nothing left to move
        if decide and t not in norms:
            raise ValueError(f"Dynamic schedule needs the update norm of the transition layer {t} at epoch "
                             f"{stats.epoch}; stats.update_norms has layers {sorted(stats.update_norms)}")
        # Line 1 for every SGD layer first, so that a future transition layer has a history.
        for layer, delta in sorted(norms.items()):
            prev = self.running_avg.get(layer)
            self.running_avg[layer] = delta if prev is None else self.beta * prev + (1.0 - self.beta) * delta
            self.last_delta[layer] = delta
        if not decide:
            return t
        delta, avg = self.last_delta[t], self.running_avg[t]
        threshold = self.alpha * avg
        move = stats.epoch > self.warmup_epochs and (delta < threshold or delta == 0.0)
        self.last = {"delta": delta, "running_avg": avg, "threshold": threshold, "moved": float(move)}
        return self._step(t, move)  # line 2 / line 4


# -- Budget ------------------------------------------------------------------------------------
def _prefix_shares(shares: list[float]) -> list[float]:
    """``[share of layers 0..t-1 for t in 0..N]``: the local FLOP share of every transition."""
    cum = [0.0]
    for share in shares:
        cum.append(cum[-1] + share)
    return cum


def plan_budget(shares: list[float], max_local: int, total_epochs: int, budget: float, max_share: float,
                start: float) -> list[int]:
    """The transition of every epoch (index 0 .. ``total_epochs - 1``) of a :class:`Budget` plan.

    ``t_cap`` is the longest prefix (at most ``max_local`` layers) holding at most ``max_share`` of the layer FLOPs;
    no epoch before ``ceil(start * total_epochs)`` (and never epoch 0) has a local layer. Epochs are filled from
    the last one backwards with ``t_cap`` while the local FLOP-epochs stay short of ``budget * total_epochs``;
    the epoch where the plan begins gets the smallest ``t`` that completes the budget. The plan never decreases.

    Example::

        >>> plan_budget([0.25] * 4, max_local=3, total_epochs=8, budget=0.2, max_share=0.5, start=0.25)
        [0, 0, 0, 0, 1, 2, 2, 2]
    """
    cum = _prefix_shares(shares)
    eps = 1e-9   # shares sum in floating point: a prefix of exactly max_share must count as inside it
    t_cap = max(t for t in range(max_local + 1) if cum[t] <= max_share + eps)
    first = max(1, math.ceil(start * total_epochs - eps))
    plan = [0] * total_epochs
    need = budget * total_epochs
    for epoch in range(total_epochs - 1, first - 1, -1):
        if need <= eps or t_cap == 0:
            break
        t = t_cap if need >= cum[t_cap] - eps else next(t for t in range(1, t_cap + 1) if cum[t] >= need - eps)
        plan[epoch] = t
        need -= cum[t]
    return plan


@_schedule
class Budget(Schedule):
    """A planned schedule: ``budget`` of the run's layer-FLOP-epochs local, spent as late as the run allows.

    At the first decision, knowing the layers' FLOP shares (``stats.flop_shares``; equal shares when the FLOPs are
    unknown) and the run length, it plans the transition of every epoch (:func:`plan_budget`): the local prefix
    never holds more than ``max_share`` of the layer FLOPs (the deepest layers, which settle last, stay on SGD),
    nothing turns local before ``start`` of the run, and the local FLOP-epochs are spent from the last epoch
    backwards, where the learning rate is low and the layers have settled. Every later decision reads the plan.

    The moves depend on nothing measured during training (not the update norms, not the learning-rate schedule):
    the same options give a deeper net the same share of its FLOPs local, at the same point of the run, and a
    long run the same share of its epochs. ``budget`` sets the speed: the GEMM model's step bound per epoch is
    ``3 / (3 - 2p)`` for freezing a FLOP share ``p`` (:func:`localsgd_fx.cost.speed_bound`); a budget the cap and
    ``start`` cannot hold is spent as far as they allow (``planned`` says how much).

    Args:
        budget: fraction of the layer-FLOP-epochs that are local over the run, in ``(0, 1)``.
        max_share: most of the layer FLOPs the local prefix may hold, in ``(0, 1]``.
        start: fraction of the run before which no layer is local, in ``[0, 1)``.
        total_epochs: the run length; if ``None``, taken from :meth:`bind` (the constructor's value wins).

    :meth:`log_stats`: ``{"planned"}``, the local FLOP-epoch fraction of the plan.

    Example::

        >>> s = Budget(budget=0.2, max_share=0.5, start=0.25, total_epochs=8)
        >>> stats = lambda e, t: EpochStats(e, t, 4, 3, {}, flop_shares=[0.25] * 4)
        >>> [s.select(stats(e, 0)) for e in range(1, 8)]   # the t of epochs 1 .. 7 (epoch 0 is plain SGD)
        [0, 0, 0, 1, 2, 2, 2]
    """

    budget: float = _option(BUDGET_DEFAULT_BUDGET, _real("(0, 1)", lambda v: 0.0 < v < 1.0))
    max_share: float = _option(BUDGET_DEFAULT_MAX_SHARE, _real("(0, 1]", lambda v: 0.0 < v <= 1.0))
    start: float = _option(BUDGET_DEFAULT_START, _real("[0, 1)", lambda v: 0.0 <= v < 1.0))
    total_epochs: int | None = _option(None, _optional(_int(1)))
    plan: list[int] | None = state_field()     # t of every epoch, made at the first decision
    last: dict[str, float] = state_field(factory=dict, stats=True)

    def bind(self, num_layers: int, max_local: int, total_epochs: int | None = None) -> None:
        super().bind(num_layers, max_local, self.total_epochs or total_epochs)   # the constructor's value wins

    def _resolve(self) -> None:
        if self.total_epochs is None:
            raise ValueError("the budget schedule (the default) plans every epoch of the run and needs its length: "
                             "pass total_epochs=<the epochs you train> to compile_localsgd (or Budget), or pick "
                             "schedule='dynamic', which decides from measurements")

    def planned(self, flop_shares: list[float] | None) -> tuple[list[int], float]:
        """The plan for these FLOP shares (equal shares for ``None``) and its local FLOP-epoch fraction, without
        changing the schedule (the plan in force, once made, is :attr:`plan`)."""
        assert self.num_layers is not None and self.max_local is not None and self.total_epochs is not None
        shares = list(flop_shares or [1.0 / self.num_layers] * self.num_layers)
        plan = self.plan or plan_budget(shares, self.max_local, self.total_epochs, self.budget, self.max_share,
                                        self.start)
        cum = _prefix_shares(shares)
        return plan, sum(cum[t] for t in plan) / self.total_epochs

    def propose(self, stats: EpochStats) -> int:
        self._bind_from(stats)
        assert self.total_epochs is not None
        if self.plan is None:
            self.plan, share = self.planned(stats.flop_shares)
            self.last = {"planned": share}
        # the epoch about to start is stats.epoch (0-based); past the run's end the last epoch's t holds
        return self.plan[min(int(stats.epoch), self.total_epochs - 1)]


# -- Signal schedules: plasticity (Egeria) and gradient-norm change (AutoFreeze) --------------
@_schedule
class _SignalSchedule(_Shifting):
    """Moves the boundary by ``shift`` when the transition layer's signal has settled on
    ``patience`` checks in a row; subclasses say what "settled" means (:meth:`_settled`).

    The history belongs to the current transition layer: after ``t`` moves, the new layer starts
    afresh (its first check only sets a reference). Decisions come at epoch ends, or every
    ``decide_every`` training steps (the model wrapper counts them with :meth:`due`).
    """

    signal: ClassVar[str] = ""
    shift: int | float = _option(SIGNAL_DEFAULT_SHIFT, _LAYERS)
    warmup_epochs: int = _option(SIGNAL_DEFAULT_WARMUP_EPOCHS, _int(0))
    patience: int = _option(PLASTICITY_DEFAULT_PATIENCE, _PATIENCE)
    decide_every: int | None = _option(
        None, _optional(_int(1, " (training steps between decisions) or None (at epoch ends)")))
    steps_since_decision: int = state_field(0)
    layer: int | None = state_field()     # the transition layer the history below belongs to
    checks: int = state_field(0)          # signal values seen for that layer
    settled_checks: int = state_field(0)  # of them, how many in a row were settled
    last: dict[str, float] = state_field(factory=dict, stats=True)

    def due(self) -> bool:
        if self.decide_every is None:
            return False
        self.steps_since_decision += 1
        if self.steps_since_decision < self.decide_every:
            return False
        self.steps_since_decision = 0
        return True

    def propose(self, stats: EpochStats) -> int:
        self._bind_from(stats)
        t = int(stats.transition)
        if t >= stats.max_local:
            return t      # nothing left to move
        value = stats.signals.get(self.signal)
        if value is not None and (not _is_real(value) or not math.isfinite(value) or value < 0):
            raise ValueError(f"signal {self.signal!r} of layer {t} at epoch {stats.epoch} must be a finite float "
                             f">= 0 or None, got {value!r}")
        if self.layer != t:
            self.layer, self.checks, self.settled_checks, self.last = t, 0, 0, {}
            self._restart()
        if value is None:
            return t
        self.checks += 1
        settled = self._settled(float(value))
        self.settled_checks = self.settled_checks + 1 if settled else 0
        move = stats.epoch >= self.warmup_epochs and self.settled_checks >= self.patience
        self.last.update(value=float(value), settled=float(settled), moved=float(move))
        return self._step(t, move)

    def _restart(self) -> None:
        """Forget the signal history (a new transition layer)."""

    def _settled(self, value: float) -> bool:
        raise NotImplementedError


@_schedule
class Plasticity(_SignalSchedule):
    """Representation plasticity (Egeria, EuroSys'23): move when the transition layer's output has settled.

    At each check the model wrapper reports ``c``, the relative change since the previous check of the transition
    layer's per-channel standardised output on a fixed probe batch (docs/DESIGN.md §4.4). Then
    ``W̄ <- beta * W̄ + (1 - beta) * c`` (``W̄`` starts at the first ``c``); the check is *settled* if
    ``c < threshold * W̄``, or ``c = 0``; after ``patience`` settled checks in a row, and once ``warmup_epochs``
    epochs are complete, propose ``t + shift``; else ``t``.

    Args:
        threshold: ratio to the running average, in ``(0, 1)``.
        beta: decay of the running average per check, in ``[0, 1)``.
        shift: layers per move: an int ``>= 1``, or a float in ``(0, 1]`` (fraction of the layers).
        warmup_epochs: no move before this many epochs are complete (``stats.epoch >= warmup_epochs``;
            checks are still recorded).
        patience: settled checks in a row needed to move, ``>= 1``.
        decide_every: check every this many training steps; ``None`` checks at epoch ends.
        probe_size: images in the probe batch (the first ones of the first training batch, or
            those given to ``LocalSGDModule.set_probe``).

    :meth:`log_stats`: ``{"value" (c), "running_avg", "threshold", "settled", "moved"}`` of the last check.

    Example::

        >>> s = Plasticity(threshold=0.5, beta=0.5, shift=1, warmup_epochs=0)
        >>> sig = lambda c: EpochStats(1, 0, 4, 3, {}, signals={"plasticity": c})
        >>> [s.select(sig(c)) for c in (None, 1.0, 0.8, 0.2)]   # 0.2 < 0.5 * (0.5*0.9 + 0.5*0.2)
        [0, 0, 0, 1]
    """

    signal: ClassVar[str] = "plasticity"
    signals = (signal,)
    threshold: float = _option(PLASTICITY_DEFAULT_THRESHOLD, _real("(0, 1)", lambda v: 0.0 < v < 1.0))
    beta: float = _option(PLASTICITY_DEFAULT_BETA, _BETA)
    probe_size: int = _option(PLASTICITY_DEFAULT_PROBE_SIZE, _int(1, " (images)"))
    running_avg: float | None = state_field()

    def _restart(self) -> None:
        self.running_avg = None

    def _settled(self, value: float) -> bool:
        prev = self.running_avg
        self.running_avg = value if prev is None else self.beta * prev + (1.0 - self.beta) * value
        self.last.update(running_avg=self.running_avg, threshold=self.threshold * self.running_avg)
        # an output that did not change at all has settled (else W̄ = c = 0 would hold t for good)
        return value < self.threshold * self.running_avg or value == 0.0


@_schedule
class GradNorm(_SignalSchedule):
    """Gradient-norm change rate (AutoFreeze): move when the transition layer's gradient norm stopped changing.

    The model wrapper reports ``G``, the mean of ``||dL/dW_t||`` over the steps since the previous check. With
    ``G'`` the previous check's mean, the check is *settled* if ``|G - G'| / G' < threshold``; after ``patience``
    settled checks in a row, and once ``warmup_epochs`` epochs are complete, propose ``t + shift``; else ``t``.

    Args:
        threshold: largest relative change that counts as settled, ``> 0``.
        shift, warmup_epochs, patience, decide_every: as :class:`Plasticity`.

    With fp16 loss scaling the norms carry the loss scale, so a change of scale reads as a change
    of the norm (it can only delay a move). :meth:`log_stats`: ``{"value" (G), "rate", "settled", "moved"}``
    of the last check.

    Example::

        >>> s = GradNorm(threshold=0.1, patience=2, shift=1, warmup_epochs=0)
        >>> sig = lambda g: EpochStats(1, 0, 4, 3, {}, signals={"grad_norm": g})
        >>> [s.select(sig(g)) for g in (2.0, 1.0, 0.95, 0.9)]   # rates 0.5, 0.05, 0.053
        [0, 0, 0, 1]
    """

    signal: ClassVar[str] = "grad_norm"
    signals = (signal,)
    patience: int = _option(GRADNORM_DEFAULT_PATIENCE, _PATIENCE)
    threshold: float = _option(GRADNORM_DEFAULT_THRESHOLD, _real("(0, inf)", lambda v: v > 0.0))
    previous: float | None = state_field()

    def _restart(self) -> None:
        self.previous = None

    def _settled(self, value: float) -> bool:
        prev, self.previous = self.previous, value
        if prev is None:
            return False
        # a layer whose gradient was and stays zero has settled; one that wakes up from zero has not
        rate = abs(value - prev) / prev if prev > 0 else (0.0 if value == 0 else math.inf)
        self.last.update(rate=rate)
        return rate < self.threshold


# -- Custom, baseline and manual --------------------------------------------------------------
def _callable(name: str, v: Any) -> Any:
    if not callable(v):
        raise TypeError(f"{name} must be callable as {name}(epoch, stats), got {v!r}")
    return v


@_schedule
class PolicySchedule(Schedule):
    """Wraps a user policy ``policy(epoch: int, stats: EpochStats) -> int``.

    The proposal is clipped by :meth:`Schedule.select` like any other. The state dict is empty:
    a stateful policy must save and restore its own state.

    Args:
        policy: the callable; called with ``stats.epoch`` and the stats.

    Example::

        >>> s = PolicySchedule(lambda epoch, stats: epoch - 1)
        >>> s.select(EpochStats(3, 0, 4, 3, {}))
        2
    """

    policy: Callable[[int, EpochStats], int] = field(kw_only=False, metadata={"check": _callable})

    def propose(self, stats: EpochStats) -> int:
        t = self.policy(stats.epoch, stats)
        if not _is_int(t):
            name = getattr(self.policy, "__qualname__", repr(self.policy))
            raise TypeError(f"schedule policy {name} must return an int transition layer, got {t!r} "
                            f"({type(t).__name__}) at epoch {stats.epoch}")
        return int(t)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class PlainSGD(Schedule):
    """Always proposes 0: plain SGD, the baseline (``t`` stays where it is, 0 unless set by hand).

    Example::

        >>> PlainSGD().select(EpochStats(5, 0, 4, 3, {}))
        0
    """

    def propose(self, stats: EpochStats) -> int:
        return 0


class Manual(Schedule):
    """Proposes the current ``t``: the user moves the transition by hand (``set_transition``).

    Example::

        >>> Manual().select(EpochStats(5, 2, 4, 3, {}))
        2
    """

    def propose(self, stats: EpochStats) -> int:
        return int(stats.transition)
def make_schedule(spec: Any, **kwargs: Any) -> Schedule:
    """Build a schedule from a shorthand, a callable or an instance.

    Shorthands (case-insensitive, :data:`SCHEDULE_NAMES`) and their defaults:
    ``"dynamic"`` -> ``Dynamic(alpha=0.3, shift=0.1, beta=0.9, warmup_epochs=1)`` (``DYNAMIC_DEFAULT_*``);
    ``"plasticity"`` -> :class:`Plasticity`, ``"gradnorm"`` -> :class:`GradNorm` (``PLASTICITY_DEFAULT_*``,
    ``GRADNORM_DEFAULT_*``, ``SIGNAL_DEFAULT_*``); ``"static"`` / ``"quadratic"``, ``"linear"``, ``"exponential"``
    -> ``Static(kind, c1=0.75, c2=0.25, k=4.0)`` (``STATIC_DEFAULT_*``: at most 75 % of the layers, capped at
    ``max_local``, become local, starting after 25 % of the epochs; they need ``total_epochs``, here or later
    through ``bind``); ``"sgd"`` / ``"none"`` (or ``None``) -> :class:`PlainSGD`; ``"manual"`` -> :class:`Manual`.

    Args:
        spec: a :class:`Schedule` instance (returned as is), a :class:`Schedule` subclass
            (instantiated with ``kwargs``), a callable ``policy(epoch, stats) -> int``
            (wrapped in :class:`PolicySchedule`), a shorthand string, or ``None``.
        **kwargs: constructor arguments for the shorthand's class.

    Returns:
        The schedule (not yet bound).

    Raises:
        ValueError: on an unknown shorthand, or kwargs that the spec cannot take.

    Example::

        >>> make_schedule("linear", c1=4, c2=0, total_epochs=8)
        Static('linear', c1=4, c2=0, total_epochs=8, k=4.0)
        >>> make_schedule("dynamic", alpha=0.2)
        Dynamic(alpha=0.2, shift=0.1, beta=0.9, warmup_epochs=1)
    """
    if isinstance(spec, Schedule):
        if kwargs:
            raise ValueError(f"schedule options {sorted(kwargs)} are only for a shorthand string; "
                             f"got a ready {type(spec).__name__} instance")
        return spec
    if isinstance(spec, type) and issubclass(spec, Schedule):
        return spec(**kwargs)
    if isinstance(spec, str) or spec is None:
        name = "none" if spec is None else spec.strip().lower()
        if name not in _SHORTHANDS:
            raise ValueError(f"unknown schedule {spec!r}; valid shorthands are {list(SCHEDULE_NAMES)}, "
                             f"or pass a Schedule instance or a callable policy(epoch, stats) -> int")
        make = _SHORTHANDS[name]
        if kwargs and make in (PlainSGD, Manual):
            raise ValueError(f"schedule {spec!r} takes no options, got {sorted(kwargs)}")
        return make(**kwargs)
    if callable(spec):
        if kwargs:
            raise ValueError(f"schedule options {sorted(kwargs)} cannot be passed to a policy")
        return PolicySchedule(spec)
    raise TypeError(f"schedule must be a Schedule, a callable policy(epoch, stats) -> int, or one of "
                    f"{list(SCHEDULE_NAMES)}; got {spec!r} ({type(spec).__name__})")


_SHORTHANDS: dict[str, Callable[..., Schedule]] = {
    "dynamic": Dynamic, "budget": Budget, "plasticity": Plasticity, "gradnorm": GradNorm,
    "static": functools.partial(Static, "quadratic"),
    **{kind: functools.partial(Static, kind) for kind in ("quadratic", "linear", "exponential")},
    "sgd": PlainSGD, "none": PlainSGD, "manual": Manual}
#: The string shorthands accepted by :func:`make_schedule`.
SCHEDULE_NAMES: tuple[str, ...] = tuple(_SHORTHANDS)
