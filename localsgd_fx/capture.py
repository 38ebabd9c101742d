"""One training step, the same code in every loop: eager anywhere, and on a GPU recorded once per ``t``.

:class:`TrainStep` owns a whole training step of a :class:`~localsgd_fx.api.LocalSGDModule`: the forward
(local updates included), the loss, the backward, the optimizer step and ``observe_loss``. The trainer,
``bench step`` and the tests all call it, so the step is written once.

With ``capture=True`` on a CUDA device it is PyTorch's *whole-network capture*: for each transition
``t`` it runs ``WARMUP`` ordinary steps on a side stream (real batches: they train), then records the
next step into a ``torch.cuda.CUDAGraph`` and from then on replays it, copying each batch into the
graph's static inputs. Re-emitting the graph of a new ``t`` therefore costs a few eager steps and one
recording, not a compile. The graph of a ``t`` the schedule can never return to is freed.

What makes a replay correct (everything the step reads is a device tensor, nothing reads the host):

- the learning rate is a 0-dim device tensor in the optimizer (``SGD(fused=True)`` or Adam/AdamW with
  ``capturable=True``), which an LR scheduler fills in place before each replay; a Python float would be
  baked into the graph. Momentum buffers exist before recording (the warm-up steps make them);
- gradients are set to ``None`` before recording, so the recorded backward writes them afresh; local
  and frozen layers never get one;
- weak supervision, the non-finite guard, BatchNorm statistics and the gradient-norm signal are tensor
  ops, recorded with the step;
- autocast runs inside the recording with ``cache_enabled=False``.

Falls back to the eager step (and says why, once) for: a CPU, a batch of another size than the
recorded one (a partial last batch), fp16 with a ``GradScaler`` (its inf check reads the host), a
data-parallel wrapper, and an optimizer whose settings change after a recording (momentum cycled by
``OneCycleLR``, a weight decay set by hand, a learning rate replaced by a float): a replay would go on
with the recorded values. An optimizer whose step cannot be recorded is refused with one line.

The device-specific part (a side stream for the warm-up, recording, replay) is one small object,
:class:`CudaGraphs`; the tests hand :class:`TrainStep` a CPU stand-in with the same semantics (ops replayed
on the same tensors, Python values baked in), so everything around the recording is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from passes.errors import LocalSGDError

__all__ = ["CudaGraphs", "TrainStep", "check_capturable", "recorder_for"]


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, with one line naming those that can, an optimizer whose step cannot be recorded in a CUDA graph."""
    groups = optimizer.param_groups
    lr_tensor = all(isinstance(g["lr"], Tensor) for g in groups)
    if isinstance(optimizer, torch.optim.SGD) and all(g.get("fused") for g in groups) and lr_tensor:
        return
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(g.get("capturable") for g in groups):
        return
    raise LocalSGDError(
        f"{type(optimizer).__name__} (as configured) cannot be recorded in a CUDA graph: its step reads the "
        "learning rate or its state on the host. Use torch.optim.SGD(..., lr=torch.tensor(lr, device='cuda'), "
        "fused=True) or Adam/AdamW(..., capturable=True), or capture=False.")


class CudaGraphs:
    """How a CUDA device records a step: warm-up on a side stream, ``torch.cuda.graph``, replay."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def side_stream(self):
        """Warm-up steps run on a side stream, as PyTorch's whole-network capture recipe asks."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    #: Only this thread's unsafe calls break a recording: in "global" mode a DataLoader's pin-memory thread
    #: allocating pinned memory meanwhile breaks it, and the error then resurfaces in that thread's next batch
    CAPTURE_ERROR_MODE = "thread_local"

    def record(self, block: Callable[[], Any]) -> _CudaRecording:
        """Record ``block`` (nothing of it runs); the recording's ``outputs`` are what ``block`` returned."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=self.CAPTURE_ERROR_MODE):
            outputs = block()
        return _CudaRecording(graph, outputs)


def recorder_for(device: torch.device) -> CudaGraphs | None:
    """What records training steps on ``device``: CUDA graphs on a CUDA device, nothing elsewhere."""
    return CudaGraphs(device) if device.type == "cuda" else None


class _CudaRecording:
    __slots__ = ("graph", "outputs")

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any):
        self.graph, self.outputs = graph, outputs

    def replay(self) -> None:
        self.graph.replay()


class TrainStep:
    """``loss, output = step(x, y)``: one training step of ``model`` (see the module docstring).

    Args:
        model: the LoCal+SGD module.
        optimizer: its optimizer.
        loss_fn: ``loss_fn(output, target) -> scalar loss``.
        autocast_dtype: run forward and loss under autocast in this dtype (None: no autocast).
        scaler: a ``GradScaler`` for fp16 (steps with one run eagerly).
        capture: record the step per ``t`` as a CUDA graph where the device allows it.
        forward: what the eager step calls for the forward and ``observe_loss`` (default ``model``; a
            data-parallel wrapper of it, which is never recorded).
        log: where the one-line notes go (fallbacks).
        free_passed: free the recording of a ``t`` once a larger one is recorded (the schedule never moves back);
            a benchmark that moves ``t`` back and forth with ``force=True`` keeps them.
        recorder: what records and replays a step (default: :class:`CudaGraphs` on a CUDA device, none
            elsewhere); the tests pass a CPU stand-in.

    ``loss`` and ``output`` are device tensors; after a replay they are the graph's static outputs, valid
    until the next call, so read what you need from them (on the device) before calling again.
    """

    WARMUP = 3   # eager steps before a recording: cuBLAS/cuDNN workspaces and momentum buffers exist by then

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 *, autocast_dtype: torch.dtype | None = None, scaler: Any = None, capture: bool = True,
                 forward: nn.Module | None = None, log: Callable[[str], None] | None = None,
                 free_passed: bool = True, recorder: Any = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype, self.scaler = autocast_dtype, scaler
        self.forward = forward if forward is not None else model
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.device = next(model.parameters()).device
        self.recorder = recorder if recorder is not None else recorder_for(self.device)
        why_not = self._why_not_capture(capture)
        self.capture = why_not is None
        if capture and why_not is not None and self.recorder is not None:
            self.log(f"note: training steps run eagerly, not recorded as CUDA graphs: {why_not}")
        if self.capture:
            check_capturable(optimizer)
        self._graphs: dict[int, _Recorded] = {}
        self._warm: dict[int, int] = {}         # t -> eager steps taken at t so far
        self.account = model.graphs.account      # warm-up + recording seconds are reported with compile seconds
        self.free_passed = free_passed

    def _why_not_capture(self, capture: bool) -> str | None:
        if not capture:
            return "capture is off"
        if self.recorder is None:
            return "the model is not on a CUDA device"
        if self.scaler is not None:
            return "fp16 with a gradient scaler cannot be recorded (its overflow check reads the host); use bf16"
        if self.forward is not self.model:
            return "a data-parallel wrapper runs its reductions outside a recording"
        return None

    # ----------------------------------------------------------------------------- the step
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not (self.model.training and self.model.model.training):
            # eager, eval mode would train the user's own model with no local prefix; a replay, the train graph
            raise LocalSGDError("a training step of a model in eval mode: call model.train() before training steps "
                                "(to keep BatchNorm statistics fixed, set the BatchNorm modules to eval() instead)")
        if not self.capture:
            return self.eager(x, y)
        if self.model.follow_modes((x,)):    # traced again: every recording holds the old graph
            self._graphs.clear()
            self._warm.clear()
        t = self.model.transition
        recorded = self._graphs.get(t)
        if recorded is not None and recorded.fits(x, y):
            if (settings := _settings(self.optimizer)) != recorded.settings:
                return self._stop_recording(recorded.settings, settings, x, y)
            self.model.driver.step()          # the recorded forward does not count steps: count it here
            recorded.replay(x, y)
            return recorded.loss, recorded.output
        if recorded is not None:             # another batch size (a partial last batch): eager
            return self.eager(x, y)
        warm = self._warm.get(t, 0)
        if warm < self.WARMUP:
            start = time.perf_counter()
            self._warm[t] = warm + 1
            with self.recorder.side_stream():
                out = self.eager(x, y)
            self.account.capture_seconds += time.perf_counter() - start
            return out
        return self._record(t, x, y)

    def eager(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The step without a recording (also the CPU's step)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.forward(x)
            loss = self.loss_fn(output, y)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.forward.observe_loss(loss.detach())
        return loss.detach(), output.detach()

    def is_recorded(self, t: int) -> bool:
        """Whether steps at ``t`` replay a recording (for the batch size it was made with)."""
        return t in self._graphs

    # ---------------------------------------------------------------------------- recording
    def _record(self, t: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        start = time.perf_counter()
        if self.free_passed:
            self._free_unreachable(t)
        model, graph_module = self.model, self.model.graphs.graph(t)
        static_x, static_y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)   # the recorded backward writes the gradients afresh

        def block():
            with self._autocast(), torch.set_grad_enabled(True):
                output = graph_module(static_x)
                loss = self.loss_fn(output, static_y)
            loss.backward()
            self.optimizer.step()
            model.observe_loss(loss.detach())
            return loss.detach(), output.detach()

        try:
            recording = self.recorder.record(block)
        except RuntimeError as exc:
            # nothing of a failed recording ran on the device: train on, eagerly, and say so once
            self.capture = False
            self.log(f"note: recording the training step as a CUDA graph failed ({str(exc).splitlines()[0]}); "
                     "training steps run eagerly from here")
            self.optimizer.zero_grad(set_to_none=True)
            return self.eager(x, y)
        # nothing ran yet: this batch is a step too, so replay it once
        recorded = self._graphs[t] = _Recorded(recording, static_x, static_y, [p.grad for p in model.parameters()],
                                               _settings(self.optimizer))
        model.driver.step()
        recording.replay()
        self.account.captures += 1
        self.account.capture_seconds += time.perf_counter() - start
        return recorded.loss, recorded.output

    def _stop_recording(self, recorded: list[dict[str, Any]], now: list[dict[str, Any]], x: Tensor,
                        y: Tensor) -> tuple[Tensor, Tensor]:
        """The optimizer settings are ``now``, not the ``recorded`` ones a recording baked in: run eagerly."""
        changed = sorted({key for before, after in zip(recorded, now) for key in before
                          if key not in after or after[key] != before[key]} or {"param groups"})
        self.capture = False
        self._graphs.clear()
        self.log(f"note: the optimizer's {', '.join(changed)} changed after its step was recorded as a CUDA graph, "
                 "which keeps the values it was recorded with; training steps run eagerly from here (a learning "
                 "rate may change as a tensor filled in place, as torch's LR schedulers do)")
        return self.eager(x, y)

    def _free_unreachable(self, t: int) -> None:
        """``t`` only grows (a move backwards needs force=True): graphs of smaller ``t`` are dead weight."""
        for old in [k for k in self._graphs if k < t]:
            del self._graphs[old]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: autocast's weight-cast cache would hold casts made during a recording
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)


def _settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """What a recording of ``optimizer.step()`` bakes in: every setting of every group, a tensor by identity (its
    value is read on the device at each replay; another object would not be)."""
    return [{key: id(value) if isinstance(value, Tensor) else value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups]


class _Recorded:
    """One recorded step: the recording, its static inputs and outputs, the gradients it writes, and the optimizer
    settings it was made with."""

    __slots__ = ("recording", "x", "y", "loss", "output", "grads", "settings")

    def __init__(self, recording, x, y, grads, settings):
        self.recording, self.x, self.y = recording, x, y
        self.loss, self.output = recording.outputs
        self.grads = grads   # kept alive: the replays write into them
        self.settings = settings

    def fits(self, x: Tensor, y: Tensor) -> bool:
        return x.shape == self.x.shape and y.shape == self.y.shape and x.stride() == self.x.stride()

    def replay(self, x: Tensor, y: Tensor) -> None:
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.recording.replay()
