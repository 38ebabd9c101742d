"""Where and how a step runs: the device, the compile modes, what compiling costs, and when it pays.

- :func:`resolve_device` — the one place that turns ``"auto"``/``"cpu"``/``"cuda"`` into a device.
- :data:`COMPILE_MODES` / :func:`compile_mode` — the one compile vocabulary (API, CLI, benchmarks):
  ``"off"`` eager; ``"on"`` ``torch.compile`` (inductor); ``"reduce-overhead"`` ``torch.compile`` with
  CUDA graphs (the whole forward and backward of a step replayed as one launch each); ``"auto"``
  compiles a transition's graph only when the measured saving pays for the compile (:class:`AutoCompile`);
  ``"capture"`` records whole training steps as CUDA graphs, no compiler (:mod:`localsgd_fx.capture`: the
  trainer's step, and ``model.capture_step`` for your own loop; ``auto`` in the trainer on a GPU uses it).
- :class:`CompileClock` — every second torch spends compiling (the forward when dynamo traces it, the
  backward when autograd first needs it, CUDA-graph recording) is charged to the account of the model that ran it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

__all__ = ["COMPILE_MODES", "DEVICES", "compile_mode", "resolve_device", "torch_compile", "compile_cache_hits",
           "CompileAccount", "CompileClock", "AutoCompile", "CompileDecision"]

COMPILE_MODES = ("auto", "off", "on", "reduce-overhead", "capture")
#: The device names :func:`resolve_device` takes.
DEVICES = ("auto", "cpu", "cuda")


def compile_mode(value: bool | str) -> str:
    """Normalise a compile setting: ``True`` -> ``"on"``, ``False`` -> ``"off"``, strings as in
    :data:`COMPILE_MODES`."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE_MODES))} (or True/False), got {value!r}")
    return value


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when torch sees a device, else the CPU; otherwise the named device (checked)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu (or auto)")
    return device


def torch_compile(fn: Callable, mode: str) -> Callable:
    """``torch.compile`` for one of our modes (``"on"`` / ``"reduce-overhead"``), shapes static.

    Static shapes: a graph is specialised to one batch size; other sizes (a partial last batch) run
    eager instead of compiling a second graph (see :class:`~localsgd_fx.api.LocalSGDModule`).
    """
    return torch.compile(fn, mode=None if mode == "on" else mode, dynamic=False)


# ------------------------------------------------------------------------------------ accounting
@dataclass
class CompileAccount:
    """What torch spent compiling (and recording CUDA graphs) for one model: the figures ``explain()``,
    the metrics and the summary report."""

    seconds: float = 0.0
    events: dict[str, int] = field(default_factory=dict)   # dynamo's trigger name -> count
    #: whole steps recorded as CUDA graphs (:class:`~localsgd_fx.capture.TrainStep`), and the seconds their
    #: warm-up steps and recordings took
    captures: int = 0
    capture_seconds: float = 0.0

    @property
    def graphs(self) -> int:
        """Forward graphs dynamo compiled (each one's backward compiles lazily and is not counted again)."""
        return self.events.get("DYNAMO", 0)


class CompileClock:
    """Charges torch's compile time to whichever :class:`CompileAccount` is :meth:`active` (a runner sets
    its model's account before its compiled graph runs; the lazy backward compile follows its forward, so it
    lands on the same account).

    Uses dynamo's compile callbacks, which bracket dynamo tracing, the lazily compiled backward and
    CUDA-graph recording.
    """

    _account: CompileAccount | None = None
    _started: float | None = None

    @classmethod
    def active(cls, account: CompileAccount) -> None:
        """Charge compiles from now on to ``account`` (registering the callbacks again if
        ``torch._dynamo.reset()`` cleared them)."""
        from torch._dynamo.callback import callback_handler
        if cls._start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(cls._start)
            callback_handler.register_end_callback(cls._end)
        cls._account = account

    @classmethod
    def _start(cls, *args: Any) -> None:
        cls._started = time.perf_counter()

    @classmethod
    def _end(cls, *args: Any) -> None:
        if cls._started is None or cls._account is None:
            return
        account, elapsed = cls._account, time.perf_counter() - cls._started
        cls._started = None
        trigger = getattr(getattr(args[0], "callback_trigger", None), "name", "DYNAMO") if args else "DYNAMO"
        account.seconds += elapsed
        account.events[trigger] = account.events.get(trigger, 0) + 1


def compile_cache_hits() -> int:
    """Graphs torch loaded from its compile caches (inductor's FX-graph cache, AOTAutograd's cache) so far
    in this process. The caches live in torch's per-user folder (``TORCHINDUCTOR_CACHE_DIR``), so a
    resumed or repeated run reuses what an earlier one compiled."""
    from torch._dynamo.utils import counters
    return counters["inductor"].get("fxgraph_cache_hit", 0) + counters["aot_autograd"].get("autograd_cache_hit", 0)


# ------------------------------------------------------------------------------- auto decision
@dataclass
class CompileDecision:
    """One choice of ``compile="auto"`` for a transition, with the figures it rests on."""

    epoch: int
    t: int
    choice: str                  # "compile", "eager" (does not pay), "fallback" (compiled, measured slower)
    eager_ms: float
    expected_steps: int
    expected_saving_s: float
    expected_compile_s: float
    compiled_ms: float | None = None
    compile_s: float | None = None

    def line(self) -> str:
        what = {"compile": "compiling", "eager": "staying eager", "fallback": "back to eager"}[self.choice]
        text = (f"compile auto, t={self.t}: {what} (eager step {self.eager_ms:.1f} ms, ~{self.expected_steps} more "
                f"steps at this t, expected saving {self.expected_saving_s:.1f} s "
                f"vs compile {self.expected_compile_s:.1f} s")
        if self.compiled_ms is not None:
            text += f"; measured: compiled step {self.compiled_ms:.1f} ms, compile {self.compile_s:.1f} s"
        return text + ")"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AutoCompile:
    """Decide per transition whether compiling its graph pays, from measurements of this run.

    For each ``t``: run eager, skip ``WARMUP`` steps, time ``WINDOW`` steps (one device sync at each
    end of the window, none in between), then compile iff::

        expected remaining steps at t  x  eager step  x  (1 - compiled/eager ratio)  >  compile seconds

    The ratio and the compile seconds start from priors and are replaced by the last measured values
    once a graph has been compiled. A compiled graph is timed the same way; if it is not faster
    than eager the transition goes back to eager for good. Undecided or "eager" transitions are
    re-examined at every epoch end (the longer ``t`` stays, the more steps are expected there).

    The policy is told numbers (the epoch, the steps expected at ``t``, the compile seconds spent so far)
    and answers with a choice; it holds no reference to a model.
    """

    WARMUP, WINDOW = 3, 10
    #: compiled/eager step ratio assumed before any measurement: CUDA graphs measured 0.38x (ResNet-20)
    #: to 0.69x (ResNet-50, bf16) of eager on an H100, so 0.7 is the cautious end; on a CPU nothing is
    #: assumed to be gained, so a CPU never compiles on priors alone.
    PRIOR_RATIO = {"cuda": 0.7, "cpu": 1.0}
    #: seconds to compile one transition's forward + backward before any measurement (H100, CUDA graphs
    #: included: ~15 s ResNet-20, ~40 s ResNet-50 at 64x64)
    PRIOR_COMPILE_S = 30.0
    MIN_GAIN = 0.98     # a compiled graph must be at least 2 % faster than eager to be kept

    #: what :meth:`before_step` answers in each phase of a transition
    _ANSWER = {"measure-eager": "eager", "eager": "eager", "wants-compile": "compile", "measure-compiled": "compiled",
               "compiled": "compiled"}

    def __init__(self, device_type: str, mode: str = "reduce-overhead"):
        self.mode = mode
        self.device_type = device_type
        self.ratio = self.PRIOR_RATIO.get(device_type, 1.0)
        self.compile_s = self.PRIOR_COMPILE_S
        self.decisions: list[CompileDecision] = []
        self._state: dict[int, _Transition] = {}

    def before_step(self, t: int, *, epoch: int, expected_steps: int, compile_seconds: float) -> str:
        """Advance ``t``'s measurement by one step; returns ``"eager"``, ``"compile"`` or ``"compiled"``.

        ``expected_steps``: training steps ``t`` is expected to run from here; ``compile_seconds``: the
        model's compile seconds so far (what a compile cost is read from)."""
        st = self._state.setdefault(t, _Transition())
        st.steps += 1
        if st.phase in ("measure-eager", "measure-compiled"):
            if st.steps == self.WARMUP + 1:
                self._sync()
                st.clock = time.perf_counter()
            elif st.steps == self.WARMUP + self.WINDOW + 1:
                self._sync()
                per_step = (time.perf_counter() - st.clock) / self.WINDOW
                if st.phase == "measure-eager":
                    st.eager_s = per_step
                    self._decide(t, st, epoch, expected_steps)
                else:
                    self._judge_compiled(t, st, epoch, per_step, compile_seconds - st.compile_seconds0)
        return self._ANSWER[st.phase]

    def compiled(self, t: int, compile_seconds: float) -> None:
        """``t``'s compiled graph was built; measure it from the next step on."""
        st = self._state[t]
        st.phase, st.steps, st.compile_seconds0 = "measure-compiled", 0, compile_seconds

    def reconsider(self, t: int, *, epoch: int, expected_steps: int) -> None:
        """At an epoch end: an eager ``t`` whose expected remaining steps grew may now pay."""
        st = self._state.get(t)
        if st is not None and st.phase == "eager" and st.eager_s and not st.fell_back:
            self._decide(t, st, epoch, expected_steps)

    def forget_graphs(self) -> None:
        """The compiled graphs were dropped (the model moved or changed dtype): every transition is measured
        again; what was learnt about ratios and compile costs is kept."""
        self._state.clear()

    def _sync(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def _decide(self, t: int, st: "_Transition", epoch: int, remaining: int) -> None:
        saving = remaining * st.eager_s * (1.0 - self.ratio)
        pays = saving > self.compile_s
        st.phase = "wants-compile" if pays else "eager"
        choice = "compile" if pays else "eager"
        if st.decision is None or st.decision.choice != choice:
            st.decision = CompileDecision(epoch + 1, t, choice, 1e3 * st.eager_s, remaining, saving, self.compile_s)
            self.decisions.append(st.decision)

    def _judge_compiled(self, t: int, st: "_Transition", epoch: int, per_step: float, compile_s: float) -> None:
        self.ratio = per_step / st.eager_s
        if compile_s > 0:
            self.compile_s = compile_s
        decision = st.decision
        decision.compiled_ms, decision.compile_s = 1e3 * per_step, compile_s
        if per_step < self.MIN_GAIN * st.eager_s:
            st.phase = "compiled"
            return
        st.phase, st.fell_back = "eager", True
        self.decisions.append(CompileDecision(epoch + 1, t, "fallback", 1e3 * st.eager_s, decision.expected_steps,
                                              decision.expected_saving_s, decision.expected_compile_s,
                                              1e3 * per_step, compile_s))


@dataclass
class _Transition:
    """What :class:`AutoCompile` knows of one transition."""

    phase: str = "measure-eager"     # -> "eager" | "wants-compile" -> "measure-compiled" -> "compiled" | "eager"
    steps: int = 0
    clock: float = 0.0
    eager_s: float | None = None
    compile_seconds0: float = 0.0
    fell_back: bool = False
    decision: CompileDecision | None = None
