"""What runs at a transition ``t``: its emitted graph and the runner that executes it.

:class:`GraphCache` is the one owner of re-emission and of the forward runners of a model:

- ``"eager"``: the rewritten ``GraphModule`` of ``t`` itself;
- ``"compiled"``: ``torch.compile`` of it (:class:`CompiledRunner`), specialised to one batch size;
- whole training steps recorded as CUDA graphs (:class:`~localsgd_fx.capture.TrainStep`) take the eager
  graph of ``t`` from here and charge their recording time to the same account.

Under ``compile="auto"`` the cache asks :class:`~localsgd_fx.runtime.AutoCompile` before each training
step which runner ``t`` gets. Evaluation does not come here: it runs the user's own model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from passes.layers import LayerOrder
from passes.rewrite import LocalUpdateSpec, rewrite

from .runtime import AutoCompile, CompileAccount, CompileClock, torch_compile

__all__ = ["GraphCache", "CompiledRunner"]


class CompiledRunner:
    """A compiled graph, specialised to the batch size of its first call; other sizes (a partial last
    batch) run the eager graph rather than compile another one."""

    __slots__ = ("account", "graph", "compiled", "batch")

    def __init__(self, account: CompileAccount, graph: fx.GraphModule, compiled: Callable):
        self.account, self.graph, self.compiled, self.batch = account, graph, compiled, None

    def __call__(self, *args, **kwargs):
        size = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
        if self.batch is None:
            self.batch = size
        elif size != self.batch:
            return self.graph(*args, **kwargs)
        CompileClock.active(self.account)    # compiles triggered from here on (this forward, its backward) are ours
        return self.compiled(*args, **kwargs)


class GraphCache:
    """The emitted graph and the runner of every transition ``t`` of one traced model.

    Args:
        traced: the traced model (``t = 0``'s graph; its submodules and parameters are the model's).
        order: its layer order.
        spec: makes the fused node's constant arguments (read at each emission: the rate and the guard
            tensors may be replaced by ``.to()``).
        mode: one of :data:`~localsgd_fx.runtime.COMPILE_MODES`.
    """

    def __init__(self, traced: fx.GraphModule, order: LayerOrder, spec: Callable[[], LocalUpdateSpec], mode: str):
        self.traced, self.order, self.mode = traced, order, mode
        self.account = CompileAccount()
        self.policy: AutoCompile | None = None      # made at the first training step under mode="auto"
        self._spec = spec
        self._graphs: dict[int, fx.GraphModule] = {}
        self._runners: dict[int, Callable] = {}

    # ------------------------------------------------------------------------------ graphs
    def graph(self, t: int) -> fx.GraphModule:
        """The rewritten ``GraphModule`` of ``t`` (emitted once, then cached)."""
        graph = self._graphs.get(t)
        if graph is None:
            graph = self._graphs[t] = self.traced if t == 0 else rewrite(self.traced, self.order, t, self._spec())
        return graph

    # ----------------------------------------------------------------------------- runners
    def runner(self, t: int, *, epoch: int = 0, expected_steps: int = 0) -> Callable:
        """The callable of a training step's forward at ``t``. Under ``"auto"`` this is one step of the
        policy's measurement (``epoch`` and ``expected_steps`` are what it decides with)."""
        if self.mode == "auto":
            self._consult(t, epoch, expected_steps)
        runner = self._runners.get(t)
        if runner is None:
            runner = self._runners[t] = self._build(t, "off" if self.mode == "auto" else self.mode)
        return runner

    def is_compiled(self, t: int) -> bool:
        """Whether training steps at ``t`` run a compiled graph (for the batch size it was built for)."""
        return isinstance(self._runners.get(t), CompiledRunner)

    def reconsider(self, t: int, *, epoch: int, expected_steps: int) -> None:
        """At an epoch end, under ``"auto"``: ``t`` may have lasted long enough for a compile to pay now."""
        if self.policy is not None:
            self.policy.reconsider(t, epoch=epoch, expected_steps=expected_steps)

    @property
    def decisions(self) -> list:
        return list(self.policy.decisions) if self.policy is not None else []

    def retarget(self, traced: fx.GraphModule | None = None) -> None:
        """Forget every emitted graph and runner: the model's tensors were replaced (``.to()``), or it was
        traced again (``traced``). Compiling pays as before, so ``"auto"`` measures each ``t`` again."""
        if traced is not None:
            self.traced = traced
        self._graphs.clear()
        self._runners.clear()
        if self.policy is not None:
            self.policy.forget_graphs()

    def _consult(self, t: int, epoch: int, expected_steps: int) -> None:
        if self.policy is None:
            device = next(self.traced.parameters(), torch.empty(0)).device.type
            self.policy = AutoCompile(device, "reduce-overhead" if device == "cuda" else "on")
        choice = self.policy.before_step(t, epoch=epoch, expected_steps=expected_steps,
                                         compile_seconds=self.account.seconds)
        if choice == "compile" and not self.is_compiled(t):
            self._runners[t] = self._build(t, self.policy.mode)
            self.policy.compiled(t, self.account.seconds)
        elif choice == "eager" and self.is_compiled(t):      # measured no faster than eager: drop it
            self._runners[t] = self.graph(t)

    def _build(self, t: int, mode: str) -> Callable:
        graph = self.graph(t)
        if mode in ("off", "capture"):      # capture: the recorded step runs the eager graph
            return graph
        return CompiledRunner(self.account, graph, torch_compile(graph, mode))

    # --------------------------------------------------------------------------- copying
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_graphs"], state["_runners"] = {}, {}   # compiled callables do not copy or pickle
        state["policy"] = None
        return state
