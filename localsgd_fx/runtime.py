"""Where and how a step runs: the device, the compile modes, what compiling costs, and when it pays.

- :func:`resolve_device` — the one place that turns ``"auto"``/``"cpu"``/``"cuda"`` into a device.
- :data:`COMPILE_MODES` / :func:`compile_mode` — the one compile vocabulary (API, CLI, benchmarks):
  ``"off"`` eager; ``"on"`` ``torch.compile`` (inductor); ``"reduce-overhead"`` ``torch.compile`` with
  CUDA graphs (the whole forward and backward of a step replayed as one launch each); ``"auto"``
  compiles a transition's graph only when the measured saving pays for the compile (:class:`AutoCompile`).
- :class:`CompileClock` — every second torch spends compiling (the forward when dynamo traces it, the
  backward when autograd first needs it, CUDA-graph recording) is charged to the module that triggered it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

__all__ = ["COMPILE_MODES", "compile_mode", "resolve_device", "torch_compile", "compile_cache_hits", "CompileClock",
           "AutoCompile", "CompileDecision"]

COMPILE_MODES = ("auto", "off", "on", "reduce-overhead")


def compile_mode(value: bool | str) -> str:
    """Normalise a compile setting: ``True`` -> ``"on"``, ``False`` -> ``"off"``, strings as in :data:`COMPILE_MODES`."""
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
class CompileClock:
    """Charges torch's compile time to whoever is :meth:`active` (a module sets itself before its
    compiled graph runs; the lazy backward compile follows its forward, so it lands on the same owner).

    Uses dynamo's compile callbacks, which bracket dynamo tracing, the lazily compiled backward and
    CUDA-graph recording. ``owner.compile_seconds`` (float) and ``owner.compile_events`` (dict:
    trigger name -> count) are incremented.
    """

    _owner: Any = None
    _started: float | None = None

    @classmethod
    def active(cls, owner: Any) -> None:
        """Charge compiles from now on to ``owner`` (registering the callbacks again if
        ``torch._dynamo.reset()`` cleared them)."""
        from torch._dynamo.callback import callback_handler
        if cls._start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(cls._start)
            callback_handler.register_end_callback(cls._end)
        cls._owner = owner

    @classmethod
    def _start(cls, *args: Any) -> None:
        cls._started = time.perf_counter()

    @classmethod
    def _end(cls, *args: Any) -> None:
        if cls._started is None or cls._owner is None:
            return
        owner, elapsed = cls._owner, time.perf_counter() - cls._started
        cls._started = None
        trigger = getattr(getattr(args[0], "callback_trigger", None), "name", "DYNAMO") if args else "DYNAMO"
        owner.compile_seconds += elapsed
        owner.compile_events[trigger] = owner.compile_events.get(trigger, 0) + 1


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
                f"steps at this t, expected saving {self.expected_saving_s:.1f} s vs compile {self.expected_compile_s:.1f} s")
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
    """

    WARMUP, WINDOW = 3, 10
    #: compiled/eager step ratio assumed before any measurement: CUDA graphs measured 0.38x (ResNet-20)
    #: to 0.69x (ResNet-50, bf16) of eager on an H100, so 0.7 is the cautious end; on a CPU nothing is
    #: assumed to be gained.
    PRIOR_RATIO = {"cuda": 0.7, "cpu": 1.0}
    #: seconds to compile one transition's forward + backward before any measurement (H100, CUDA graphs
    #: included: ~15 s ResNet-20, ~40 s ResNet-50 at 64x64)
    PRIOR_COMPILE_S = 30.0
    MIN_GAIN = 0.98     # a compiled graph must be at least 2 % faster than eager to be kept

    def __init__(self, device_type: str, mode: str = "reduce-overhead"):
        self.mode = mode
        self.device_type = device_type
        self.ratio = self.PRIOR_RATIO.get(device_type, 1.0)
        self.compile_s = self.PRIOR_COMPILE_S
        self.decisions: list[CompileDecision] = []
        self._state: dict[int, dict[str, Any]] = {}

    # the module calls these -------------------------------------------------------------------
    def before_step(self, t: int, owner: Any) -> str:
        """Advance ``t``'s measurement by one step; returns ``"eager"``, ``"compile"`` or ``"compiled"``."""
        st = self._state.setdefault(t, {"phase": "eager", "steps": 0, "eager_s": None, "compiled_s": None})
        st["steps"] += 1
        phase = st["phase"]
        if phase in ("eager", "compiled-measure"):
            n = st["steps"]
            if n == self.WARMUP + 1:
                self._sync()
                st["clock"], st["seconds0"] = time.perf_counter(), owner.compile_seconds
            elif n == self.WARMUP + self.WINDOW + 1:
                self._sync()
                per_step = (time.perf_counter() - st["clock"]) / self.WINDOW
                if phase == "eager":
                    st["eager_s"] = per_step
                    self._decide(t, owner, st)
                else:
                    self._judge_compiled(t, owner, st, per_step)
        return {"eager": "eager", "final-eager": "eager", "wants-compile": "compile"}.get(st["phase"], "compiled")

    def compiled(self, t: int, owner: Any) -> None:
        """The module built ``t``'s compiled graph; measure it from the next step on."""
        st = self._state[t]
        st.update(phase="compiled-measure", steps=0, compile_seconds0=owner.compile_seconds)

    def reconsider(self, t: int, owner: Any) -> None:
        """At an epoch end: an eager ``t`` whose expected remaining steps grew may now pay."""
        st = self._state.get(t)
        if st is not None and st["phase"] == "final-eager" and st.get("eager_s") and not st.get("fell_back"):
            self._decide(t, owner, st)

    # internals --------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def _decide(self, t: int, owner: Any, st: dict[str, Any]) -> None:
        remaining = owner.expected_steps_at_transition()
        saving = remaining * st["eager_s"] * (1.0 - self.ratio)
        pays = saving > self.compile_s
        st["phase"] = "wants-compile" if pays else "final-eager"
        previous = st.get("decision")
        if previous is None or previous.choice != ("compile" if pays else "eager"):
            st["decision"] = CompileDecision(owner.epoch + 1, t, "compile" if pays else "eager", 1e3 * st["eager_s"],
                                             remaining, saving, self.compile_s)
            self.decisions.append(st["decision"])

    def _judge_compiled(self, t: int, owner: Any, st: dict[str, Any], per_step: float) -> None:
        compile_s = owner.compile_seconds - st["compile_seconds0"]
        self.ratio = per_step / st["eager_s"]
        if compile_s > 0:
            self.compile_s = compile_s
        decision = st["decision"]
        decision.compiled_ms, decision.compile_s = 1e3 * per_step, compile_s
        if per_step < self.MIN_GAIN * st["eager_s"]:
            st["phase"] = "compiled"
            return
        st["phase"], st["fell_back"] = "final-eager", True
        self.decisions.append(CompileDecision(owner.epoch + 1, t, "fallback", 1e3 * st["eager_s"], decision.expected_steps,
                                              decision.expected_saving_s, decision.expected_compile_s,
                                              1e3 * per_step, compile_s))

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "compile_s": self.compile_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ratio, cost = float(state.get("ratio", self.ratio)), float(state.get("compile_s", self.compile_s))
        if math.isfinite(ratio) and math.isfinite(cost):
            self.ratio, self.compile_s = ratio, cost
