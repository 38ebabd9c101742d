"""A CPU stand-in for CUDA graphs, so the recorded training step's logic is tested where no GPU is.

A CUDA graph records the kernels a block of code launches and replays them on the same memory: every
Python value the code computed while it was recorded (a learning rate as a float, a step counter) is
baked in, tensors are read and written where they were, and nothing of the recording itself runs.
:class:`OpRecorder` reproduces those semantics one level up, with aten ops: a ``TorchDispatchMode`` logs
every op the block runs (forward, the autograd engine's backward, the optimizer's fused step) with its
arguments as they were, and a replay calls the same ops on the same tensor objects, writing each result
into the tensor the recording produced (its "static address"). Tensors that existed before the recording
and that it touched are restored afterwards, and so is the random number generator, so, as on a GPU,
recording changes nothing; the first replay runs the step, and random ops draw anew at each replay. A host
read inside the recording (``.item()``, ``bool(t)``, ...) raises, as capture does, and so does a tensor made
from host data (``torch.tensor(0.5, device=x.device)``: on a GPU a host-to-device copy, which capture
refuses), a tensor made with no device named (``torch.zeros(n)``: a CPU tensor in a GPU step) or an op that
sizes its output by tensor values (``x[mask]``, ``unique``: the size is read on the host).

What it cannot show: CUDA-only failures (an op that is not capturable, the allocator's private pool,
stream ordering). The CUDA-marked tests cover those on a GPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["OpRecorder"]

aten = torch.ops.aten
# what capture refuses, by op: the reason is the error's words
REFUSED = {
    # a tensor's value read on the host (a device-to-host sync on CUDA)
    **dict.fromkeys([aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
                     aten.equal.default], "reads a tensor on the host"),
    # an output sized by tensor values: on CUDA the size is read on the host
    **dict.fromkeys([aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                     aten.unique_consecutive.default, aten.repeat_interleave.Tensor],
                    "sizes its output by tensor values (a host read)"),
    # torch.tensor / as_tensor / from_numpy of host data: on CUDA a host-to-device copy (the value baked in anyway)
    **dict.fromkeys([aten.lift_fresh.default, aten.lift_fresh_copy.default], "makes a tensor from host data"),
}
# indexing with a boolean mask (``x[mask]``, ``x[mask] = v``) runs a nonzero inside the op
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _why_capture_refuses(func, args) -> str | None:
    if func in MASK_INDEXED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return REFUSED[aten.masked_select.default]
    return REFUSED.get(func)


def _tensors(tree) -> list[torch.Tensor]:
    return [a for a in tree_flatten(tree)[0] if isinstance(a, torch.Tensor)]


class _Log(TorchDispatchMode):
    """Runs and logs every op; snapshots each pre-existing tensor before the recording first touches it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.made: set[int] = set()              # ids of tensors the recording produced (kept alive in ops)
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id -> (tensor, value before)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (why := _why_capture_refuses(func, args)) is not None:
            raise RuntimeError(f"emulated CUDA graph capture: {func} {why}")
        # every tensor the op touches, not only those its schema marks as written: some schemas under-report
        # (native_batch_norm updates its running statistics with no "!" on them)
        for tensor in _tensors((args, kwargs)):
            if id(tensor) in self.made or id(tensor) in self.saved or torch._debug_has_internal_overlap(tensor):
                continue                         # an expanded view cannot be written back: its base is
            self.saved[id(tensor)] = (tensor, tensor.detach().clone())
        out = func(*args, **kwargs)
        fresh = [i for i, ret in enumerate(func._schema.returns) if ret.alias_info is None]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for i in fresh:
            for tensor in _tensors(outs[i] if i < len(outs) else None):
                self.made.add(id(tensor))
        self.ops.append((func, args, kwargs, outs, fresh))
        return out


class _NoDeviceNamed(TorchFunctionMode):
    """Refuses a tensor made with no device named (``torch.zeros(n)``): in a GPU step it is a CPU tensor, which
    fails the step or copies to the device inside the recording, where capture refuses it."""

    FACTORIES = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            raise RuntimeError(f"emulated CUDA graph capture: torch.{func.__name__} names no device")
        return func(*args, **kwargs)


class _Recording:
    """One recorded block: ``replay()`` runs its ops again on the same tensors; ``outputs`` are static."""

    def __init__(self, ops, outputs, recorder):
        self.ops, self.outputs, self.recorder = ops, outputs, recorder

    def replay(self) -> None:
        self.recorder.replays += 1
        with torch.no_grad():
            for func, args, kwargs, outs, fresh in self.ops:
                new = func(*args, **kwargs)
                new = new if isinstance(new, (tuple, list)) else (new,)
                for i in fresh:                  # results land where the recording's results live
                    for static, value in zip(_tensors(outs[i]), _tensors(new[i])):
                        static.copy_(value)


class OpRecorder:
    """Records like ``torch.cuda.graph`` on any device (see the module docstring); counts recordings and replays."""

    def __init__(self):
        self.recordings = self.replays = 0

    @contextlib.contextmanager
    def side_stream(self):
        yield                                    # one CPU stream: the warm-up runs where everything runs

    def synchronize(self) -> None:
        pass

    def record(self, block: Callable[[], object]) -> _Recording:
        log, rng = _Log(), torch.get_rng_state()
        try:
            with log, _NoDeviceNamed():
                outputs = block()
        finally:
            with torch.no_grad():                # as on a GPU, the recording itself changed nothing
                for tensor, before in reversed(log.saved.values()):   # a tensor's first snapshot restores last
                    tensor.copy_(before)
            torch.set_rng_state(rng)             # random ops (dropout) draw afresh at each replay, as on a GPU
        self.recordings += 1
        return _Recording(log.ops, outputs, self)
