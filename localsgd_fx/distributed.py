"""Data-parallel LoCal+SGD on ``torch.distributed``: :class:`LocalSGDDataParallel` and torchrun set-up.

Plain ``DistributedDataParallel`` keeps replicas identical by all-reducing gradients. A LoCal+SGD
replica also changes weights inside its forward pass (the local layers' rule update, computed from
its own shard of the batch), and the set of parameters that receive gradients shrinks whenever ``t``
moves. :class:`LocalSGDDataParallel` handles both:

* DDP reduces only the gradients that exist at the current ``t`` (:func:`sgd_parameters`); the
  local prefix is ignored by it. When ``t`` moves, DDP is built anew at the next forward: once per
  move, a bucket re-assignment (no weights are sent, only DDP's bucket layout, a few integers).
  ``find_unused_parameters=True`` would instead walk the autograd graph every step and still
  all-reduce the prefix's zero gradients.
* With the default rule, freeze, the prefix never changes: nothing below is communicated for it.
* The local layers' weights are averaged across ranks after every forward: one flat ``all_reduce``
  launched as the forward returns, so it runs during the backward, and applied when the step ends
  (:meth:`~LocalSGDDataParallel.observe_loss`). A local layer's weight has the size of the
  gradient it no longer sends, so a step never all-reduces more bytes than plain SGD
  (:func:`communication_per_step`).
* Weak supervision sees the loss averaged over ranks (one more ``all_reduce`` of one number,
  ordered on the device like any collective, so no host sync), and the weights are identical, so
  every schedule decision is the same on every rank.
* Buffers (BatchNorm statistics) are broadcast from rank 0 at every forward, as DDP does, and
  again at the end of each epoch so that evaluation and checkpoints see the same buffers everywhere.

Example (launched with ``torchrun --nproc_per_node 2 train.py``)::

    >>> dist.init_process_group("gloo")                                     # doctest: +SKIP
    >>> model = LocalSGDDataParallel(compile_localsgd(net, total_epochs=epochs))
    >>> loss = F.cross_entropy(model(x_shard), y_shard); opt.zero_grad(); loss.backward(); opt.step()
    >>> model.observe_loss(loss.detach())   # ends the step: local weights averaged, global loss observed
    >>> model.end_epoch()
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from passes.layers import weight_of
from passes.partition import trained_parameters
from passes.rewrite import PARTITION_META

from .api import LocalSGDModule

__all__ = ["LocalSGDDataParallel", "sgd_parameters", "local_weights", "communication_per_step",
           "replica_max_abs_diff", "process_group_from_env", "shutdown", "is_distributed", "world_size", "rank",
           "all_reduce_sum", "gather_objects"]

_DDP_HAS_INIT_SYNC = "init_sync" in inspect.signature(DDP.__init__).parameters   # torch >= 2.6


# ------------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def process_group_from_env(device: str = "auto") -> Iterator[bool]:
    """Run the body in the process group that ``torchrun``'s environment describes (``WORLD_SIZE`` > 1).

    Uses NCCL when ``device`` resolves to CUDA (each process on GPU ``LOCAL_RANK``), gloo otherwise.
    Yields whether it started a group; one it started is destroyed when the body succeeds (after a
    failure the process just exits: destroying a group while other ranks wait in a collective can
    hang, and torchrun stops the others).
    """
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized())
    if started:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    yield started
    if started:
        shutdown()


def shutdown() -> None:
    """Destroy the default process group after freeing the DDP reducers that still hold it.

    A reducer kept alive by a reference cycle would otherwise take the group's worker threads
    into interpreter shutdown, which aborts the process.
    """
    gc.collect()
    dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes, in place (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- what is synced
def sgd_parameters(lm: LocalSGDModule, t: int | None = None) -> list[nn.Parameter]:
    """The parameters that receive gradients at transition ``t`` (default: the current one); read off the
    traced graph and its partition (:func:`passes.partition.trained_parameters`)."""
    t = lm.transition if t is None else t
    return trained_parameters(lm.graph_for(0), lm.graph_for(t).meta.get(PARTITION_META) if t else None)


def local_weights(lm: LocalSGDModule, t: int | None = None) -> list[nn.Parameter]:
    """The weights the local rule updates at transition ``t``: those of layers ``0..t-1`` (none for freeze)."""
    if not lm.rule.updates:     # a frozen prefix never changes: nothing to average across processes
        return []
    t = lm.transition if t is None else t
    traced = lm.graph_for(0)
    return [weight_of(traced, layer) for layer in lm.layer_order.layers[:t]]


def communication_per_step(lm: LocalSGDModule, t: int | None = None) -> dict[str, int]:
    """Bytes one training step communicates at transition ``t``, per process.

    ``gradients``: DDP's gradient all-reduce; ``local_weights``: the average of the local layers'
    weights; ``loss``: the loss average for weak supervision; ``buffers``: DDP's broadcast of the
    buffers at each forward (from rank 0; the same at every ``t``). Plain SGD is ``t = 0``.
    """
    def nbytes(tensors: Iterable[torch.Tensor]) -> int:
        return sum(x.numel() * x.element_size() for x in tensors)
    return {"gradients": nbytes(sgd_parameters(lm, t)), "local_weights": nbytes(local_weights(lm, t)),
            "loss": torch.finfo(torch.float32).bits // 8 if lm.rule.updates else 0, "buffers": nbytes(lm.buffers())}


def replica_max_abs_diff(module: nn.Module, group: dist.ProcessGroup | None = None) -> float:
    """The largest ``|w - w_rank0|`` over all parameters and buffers of ``module`` and all ranks.

    Rank 0's values are broadcast (one flat tensor per dtype), each rank takes its largest
    difference, and an all-reduce MAX combines them. 0.0 in a single process. Between a training
    forward and the next buffer broadcast each rank has its own BatchNorm statistics (as under
    DDP): measure after :meth:`LocalSGDDataParallel.end_epoch`.
    """
    if not is_distributed():
        return 0.0
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers())]
    if not tensors:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for same in _by_dtype(tensors):
        mine = torch.cat([t.reshape(-1) for t in same]).double()   # exact for floats and ints below 2**53
        ref = mine.clone()
        dist.broadcast(ref, _rank0(group), group=group)
        worst = torch.maximum(worst, (mine - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst)


# ---------------------------------------------------------------------------------- the wrapper
class LocalSGDDataParallel(nn.Module):
    """``DistributedDataParallel`` for a :class:`~localsgd_fx.api.LocalSGDModule` whose replicas stay identical.

    Use it like the module it wraps: call it on this rank's shard of the batch, back-propagate,
    step the optimizer, then call :meth:`observe_loss` (it ends the step) and, once per epoch,
    :meth:`end_epoch`. Build the optimizer on ``wrapper.module.parameters()`` (or the model's own);
    save ``wrapper.module.state_dict()``.

    Args:
        module: the LoCal+SGD model, the same on every rank (rank 0's state is broadcast here).
        process_group: the group to train in (default: the global one).
        comm_hook: ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``; it is
            registered again whenever DDP is rebuilt after a move of ``t``.
        **ddp_kwargs: passed on to ``DistributedDataParallel`` (``device_ids`` defaults to the
            module's GPU).
    """

    def __init__(self, module: LocalSGDModule, *, process_group: dist.ProcessGroup | None = None,
                 comm_hook: tuple[Any, Callable] | None = None, **ddp_kwargs: Any):
        super().__init__()
        if not isinstance(module, LocalSGDModule):
            raise TypeError(f"LocalSGDDataParallel wraps a LocalSGDModule (from compile_localsgd), got "
                            f"{type(module).__name__}; use torch's DistributedDataParallel for other modules")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("LocalSGDDataParallel needs a process group: call torch.distributed."
                               "init_process_group() first (torchrun sets its environment)")
        self.module = module
        self.process_group, self.comm_hook = process_group, comm_hook
        self.world_size = dist.get_world_size(process_group)
        device = next(module.parameters()).device
        if device.type == "cuda":
            ddp_kwargs.setdefault("device_ids", [device.index])
        self.ddp_kwargs = ddp_kwargs
        self.rewraps = 0                    # DDP rebuilds after a move of t
        self.__dict__["ddp"] = None        # not a submodule: it shares this module's parameters
        self._pending: dist.Work | None = None
        self._wrap(first=True)

    # ------------------------------------------------------------------------------ the step
    def forward(self, *args, **kwargs):
        lm = self.module
        self.finish_step()                  # in case the previous step skipped observe_loss
        if not lm.training:                 # eval runs the user's own model: nothing changes, nothing to sync
            return lm(*args, **kwargs)
        if lm.transition != self._wrapped_t:
            self._wrap(first=False)
        if self.ddp is not None:
            out = self.ddp(*args, **kwargs)
        else:                               # every layer local: no gradient to reduce, buffers as DDP would
            self.sync_buffers()
            out = lm(*args, **kwargs)
        if self._flat is not None:          # the local update happened in the forward: average it
            with torch.no_grad():
                torch.cat(self._local_views, out=self._flat)
                self._flat.div_(self.world_size)
            self._pending = dist.all_reduce(self._flat, group=self.process_group, async_op=True)
        return out

    def finish_step(self) -> None:
        """Wait for the average of the local weights and write it into them.

        Called by :meth:`observe_loss`, :meth:`end_epoch` and the next forward; call it yourself
        before reading the local weights in between. Not before the backward: a local layer that
        is also called outside the prefix has its weight saved for it.
        """
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = None
        with torch.no_grad():
            torch._foreach_copy_(self._local_views, self._flat_parts)

    def observe_loss(self, loss: torch.Tensor | float) -> torch.Tensor | None:
        """End the step: apply the averaged local weights, feed weak supervision the loss averaged
        over ranks (returned; None for a rule without an update, freeze, which needs no loss)."""
        self.finish_step()
        if not self.module.rule.updates:   # no local rate to set: no all-reduce in the step
            return None
        lr = self.module.supervision.lr
        mean = torch.as_tensor(loss).detach().to(lr.device, torch.float32).reshape(1).clone()
        dist.all_reduce(mean, group=self.process_group)
        mean.div_(self.world_size)
        self.module.observe_loss(mean)
        return mean.reshape(())

    def end_epoch(self, mean_lr: float | None = None) -> int:
        """Learning-mode selection on identical replicas (rank 0's buffers); returns the new ``t``.

        DDP is rebuilt at the next forward if ``t`` moved.
        """
        self.finish_step()
        self.sync_buffers()
        with self._signals_on_replicas(epoch_end=True):
            return self.module.end_epoch(mean_lr)

    def maybe_decide(self) -> int:
        """:meth:`LocalSGDModule.maybe_decide <localsgd_fx.api.LocalSGDModule.maybe_decide>` on identical
        replicas: call it after every step, on every rank."""
        lm = self.module
        if not lm.schedule.due():
            return lm.transition
        self.finish_step()
        self.sync_buffers()
        with self._signals_on_replicas():
            return lm.driver.decide()

    @contextlib.contextmanager
    def _signals_on_replicas(self, epoch_end: bool = False) -> Iterator[None]:
        """The boundary signals as one replica: rank 0's probe batch, values averaged over ranks (each rank's
        gradient norms are its own), and at an epoch end the partial gradient sums too, so that every rank's
        signal state, and the checkpoint written from rank 0's, is the same."""
        meter = self.module.signals
        if meter is None:
            yield
            return
        if meter.probe is not None:
            meter.probe = tuple(self._rank0_rows(x) for x in meter.probe)
        if epoch_end and meter.grad_sum is not None:
            meter.grad_sum = self._average(meter.grad_sum)
            meter.grad_steps = self._average(meter.grad_steps.double()).round().to(meter.grad_steps.dtype)
        meter.reduce = self._average
        try:
            yield
        finally:
            meter.reduce = None

    def _average(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, group=self.process_group)
        return values.div_(self.world_size)

    def _rank0_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x``, cut to the fewest rows any rank holds (shards differ by at most one row)."""
        rows = torch.tensor([x.shape[0]], device=x.device)
        dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=self.process_group)
        x = x[:int(rows)].contiguous()
        dist.broadcast(x, _rank0(self.process_group), group=self.process_group)
        return x

    # --------------------------------------------------------------------------- inspection
    def sync_buffers(self) -> None:
        """Overwrite every rank's buffers with rank 0's."""
        _broadcast_([b.detach() for b in self.module.buffers()], self.process_group)

    def replica_max_abs_diff(self) -> float:
        """See :func:`replica_max_abs_diff` (collective: call it on every rank)."""
        self.finish_step()
        return replica_max_abs_diff(self.module, self.process_group)

    def communication_per_step(self) -> dict[str, int]:
        """See :func:`communication_per_step`, at the current ``t``."""
        return communication_per_step(self.module)

    # ----------------------------------------------------------------------------- internals
    def _wrap(self, *, first: bool) -> None:
        """(Re)build DDP over the parameters that get gradients at the current ``t``."""
        lm, t = self.module, self.module.transition
        old = self.ddp
        if old is not None:
            old._remove_autograd_hooks()        # else the old reducer would still fire in backward
        self.__dict__["ddp"] = None
        grads = {id(p) for p in sgd_parameters(lm, t)}
        named = list(lm.named_parameters())
        ignored = [name for name, p in named if id(p) not in grads]
        for _, p in named:
            p.__dict__.pop("_ddp_ignored", None)   # DDP sets this flag on ignored params but never clears it
        DDP._set_params_and_buffers_to_ignore_for_model(lm, ignored)
        if grads:
            kwargs = dict(self.ddp_kwargs)
            if not first and _DDP_HAS_INIT_SYNC:
                kwargs["init_sync"] = False     # replicas are identical already: no broadcast at a move
            ddp = DDP(lm, process_group=self.process_group, **kwargs)
            if self.comm_hook is not None:
                ddp.register_comm_hook(*self.comm_hook)
            self.__dict__["ddp"] = ddp
        if first:   # start from rank 0's state; DDP's own first broadcast skips what it ignores
            rest = ([p for _, p in named if id(p) not in grads] if self.ddp is not None
                    else [*lm.parameters(), *lm.buffers()])
            _broadcast_([x.detach() for x in rest], self.process_group)
        else:
            self.rewraps += 1
        weights = local_weights(lm, t)
        self._local_views = [w.detach().view(-1) for w in weights]
        self._flat = torch.empty(sum(w.numel() for w in weights), dtype=weights[0].dtype,
                                 device=weights[0].device) if weights else None
        self._flat_parts = list(self._flat.split([w.numel() for w in weights])) if weights else []
        self._wrapped_t = t


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _rank0(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


@torch.no_grad()
def _broadcast_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Overwrite ``tensors`` with rank 0's values: one flat broadcast per dtype and device."""
    for same in _by_dtype(tensors):
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, _rank0(group), group=group)
        torch._foreach_copy_(same, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in same]), same)])
