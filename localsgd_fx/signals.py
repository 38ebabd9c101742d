"""The device-side measurements behind the signal schedules (docs/DESIGN.md §4.4).

:class:`SignalMeter` measures, for the transition layer ``t``, what a schedule names in its
``signals``:

- ``"plasticity"`` (Egeria): an eval-mode forward of a fixed probe batch through the graph cut
  right after layer ``t``; the output is standardised per channel (what a following BatchNorm
  sees, so a pure rescaling of the weights is no change) and compared with the previous check's:
  ``||z - z_prev|| / ||z_prev||``. It costs one small forward per decision and nothing per step.
- ``"grad_norm"`` (AutoFreeze): a hook after gradient accumulation adds ``||dL/dW_t||`` to a device
  tensor (non-finite norms are skipped); a decision reads the mean since the previous one. Per step
  this is two tensor ops and no host read.

:class:`UpdateNorms` measures what the dynamic schedule (Algorithm 1) reads at an epoch end: each SGD
layer's net update over the epoch, ``||W_end - W_start||``, from a snapshot taken at the epoch start,
for every SGD layer in one device-to-host copy.

Values are read with one device-to-host copy per decision (:meth:`SignalMeter.read`). The state
(probe, reference output, partial sums) is the meter's ``extra_state``, so a resumed run makes the
same decisions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from passes.errors import LocalSGDError
from passes.layers import LayerOrder, weight_of
from passes.partition import cut_after

from .schedules import PLASTICITY_DEFAULT_PROBE_SIZE

__all__ = ["SIGNALS", "SignalMeter", "UpdateNorms"]

SIGNALS = ("plasticity", "grad_norm")


class SignalMeter(nn.Module):
    """Measures the boundary signals ``names`` for a :class:`~localsgd_fx.api.LocalSGDModule`.

    Args:
        owner: the wrapper; the probe batch is taken from the first ``probe_size`` inputs of its
            first call unless :meth:`set_probe` was called.
        traced: the untouched traced graph (its submodules are the model's).
        order: the layer order.
        names: signals to measure, from :data:`SIGNALS`.
        probe_size: images in the probe batch.
    """

    def __init__(self, owner: nn.Module, traced: fx.GraphModule, order: LayerOrder, names: tuple[str, ...],
                 probe_size: int = PLASTICITY_DEFAULT_PROBE_SIZE):
        super().__init__()
        unknown = sorted(set(names) - set(SIGNALS))
        if unknown:
            raise ValueError(f"unknown schedule signal(s) {unknown}; measurable signals are {list(SIGNALS)}")
        self.names, self.probe_size = tuple(names), int(probe_size)
        # plain attributes: the graph and its modules belong to the wrapper
        self.__dict__["_traced"] = traced
        self.__dict__["_order"] = order
        self.__dict__["_prefixes"] = {}        # layer index -> graph cut after that layer
        self.__dict__["_hook"] = None          # the gradient-norm hook's handle
        self.__dict__["_capture"] = None       # the one-shot probe capture's handle
        self.probe: tuple[Tensor, ...] | None = None
        self.reference: Tensor | None = None   # standardised output of reference_layer at the last check
        self.reference_layer: int | None = None
        self.grad_sum: Tensor | None = None    # sum of ||grad|| of grad_layer's weight since the last check
        self.grad_steps: Tensor | None = None  # backward passes counted in grad_sum
        self.grad_layer: int | None = None
        #: data parallel: averages the stacked values over the replicas before they are read (set by
        #: LocalSGDDataParallel around a decision), so that every replica takes the same one
        self.__dict__["reduce"] = None
        if "plasticity" in self.names:
            self.__dict__["_capture"] = owner.register_forward_pre_hook(self._capture_probe)

    # ------------------------------------------------------------------------------ inputs
    def set_probe(self, *inputs: Tensor) -> None:
        """Use these inputs (their first ``probe_size`` rows) as the fixed probe batch from now on."""
        if not inputs or not all(isinstance(x, Tensor) for x in inputs):
            raise LocalSGDError("set_probe needs the model's positional input tensors, e.g. set_probe(x)")
        self.probe = tuple(x[:self.probe_size].detach().clone() for x in inputs)
        self.reference = self.reference_layer = None     # outputs of another probe are not comparable
        self._drop_capture()

    def _capture_probe(self, module: nn.Module, args: tuple) -> None:
        if self.probe is None and args and all(isinstance(a, Tensor) for a in args):
            self.probe = tuple(a[:self.probe_size].detach().clone() for a in args)
        self._drop_capture()

    def _drop_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self.__dict__["_capture"] = None

    def follow(self, t: int) -> None:
        """The transition is now ``t``: count gradient norms of layer ``t`` from here on."""
        if "grad_norm" in self.names and self.grad_layer != t:
            self._attach(t)

    def _attach(self, t: int, grad_sum: Tensor | None = None, grad_steps: Tensor | None = None) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.__dict__["_hook"] = None
        self.grad_layer = t
        if t >= len(self._order):
            return
        weight = self._weight(t)
        self.grad_sum = torch.zeros((), device=weight.device) if grad_sum is None else grad_sum.to(weight.device)
        self.grad_steps = (torch.zeros((), dtype=torch.long, device=weight.device) if grad_steps is None
                           else grad_steps.to(weight.device))
        self.__dict__["_hook"] = weight.register_post_accumulate_grad_hook(self._accumulate)

    @torch.no_grad()
    def _accumulate(self, weight: Tensor) -> None:
        grad = weight.grad
        norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        finite = torch.isfinite(norm)
        self.grad_sum += torch.where(finite, norm, torch.zeros_like(norm))
        self.grad_steps += finite

    # ------------------------------------------------------------------------------ reading
    @torch.no_grad()
    def read(self, t: int, model: nn.Module) -> dict[str, float | None]:
        """The signals of layer ``t`` since the previous call (``None`` where there is nothing to compare
        with yet); one device-to-host copy. ``model``'s train/eval flags are restored afterwards."""
        keys: list[str] = []
        parts: list[Tensor] = []
        if "plasticity" in self.names:
            change = self._plasticity(t, model)
            if change is not None:
                keys.append("plasticity")
                parts.append(change)
        grads = "grad_norm" in self.names and self.grad_layer == t and self.grad_sum is not None
        if grads:
            keys += ["grad_sum", "grad_steps"]
            parts += [self.grad_sum, self.grad_steps.float()]
        values = torch.stack(parts) if parts else None
        if values is not None and self.reduce is not None:
            values = self.reduce(values)
        host = dict(zip(keys, values.tolist())) if values is not None else {}   # the one host read
        out: dict[str, float | None] = {}
        if "plasticity" in self.names:
            out["plasticity"] = host.get("plasticity")
        if "grad_norm" in self.names:
            out["grad_norm"] = host["grad_sum"] / host["grad_steps"] if host.get("grad_steps") else None
            if grads:
                self.grad_sum.zero_()
                self.grad_steps.zero_()
            else:
                self.follow(t)
        return out

    def _plasticity(self, t: int, model: nn.Module) -> Tensor | None:
        if self.probe is None:
            raise LocalSGDError("the plasticity schedule needs a fixed probe batch and none was seen: call "
                                "model.set_probe(x) once with a batch of training inputs (the wrapper takes one "
                                "from its first call, but not when the model is called directly with inplace=True)")
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.autocast(self.probe[0].device.type, enabled=False):
                out = self._prefix(t)(*self.probe)
        finally:
            for m, mode in modes:
                m.training = mode
        z = _standardised(out, self._order.layers[t].kind == "linear")
        change = None
        if self.reference is not None and self.reference_layer == t:
            change = (torch.linalg.vector_norm(z - self.reference)
                      / torch.linalg.vector_norm(self.reference).clamp_min(1e-12))
        self.reference, self.reference_layer = z, t
        return change

    def _prefix(self, t: int) -> fx.GraphModule:
        """The traced graph cut after the first call of layer ``t`` (cached)."""
        gm = self._prefixes.get(t)
        if gm is None:
            gm = self._prefixes[t] = cut_after(self._traced, self._order.layers[t].call_sites[0])
        return gm

    def retarget(self, traced: fx.GraphModule, order: LayerOrder) -> None:
        """The model was traced again: cut probes from the new graph."""
        self.__dict__["_traced"], self.__dict__["_order"] = traced, order
        self._prefixes.clear()

    def _weight(self, t: int) -> Tensor:
        return weight_of(self._traced, self._order.layers[t])

    # ------------------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"probe": self.probe, "reference": self.reference, "reference_layer": self.reference_layer,
                "grad_sum": self.grad_sum, "grad_steps": self.grad_steps, "grad_layer": self.grad_layer}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self._weight(0).device

        def own(x: Tensor | None) -> Tensor | None:   # a copy: the state may be another live module's tensors
            return None if x is None else x.to(device, copy=True)

        self.probe = None if state["probe"] is None else tuple(own(x) for x in state["probe"])
        if self.probe is not None:
            self._drop_capture()
        self.reference, self.reference_layer = own(state["reference"]), state["reference_layer"]
        if state["grad_layer"] is not None:
            self._attach(state["grad_layer"], own(state["grad_sum"]), own(state["grad_steps"]))

    def _apply(self, fn, recurse=True):
        # the tensors are plain attributes (their shapes are known only once seen): move them too
        if self.probe is not None:
            self.probe = tuple(fn(x) for x in self.probe)
        for name in ("reference", "grad_sum", "grad_steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        self._prefixes.clear()
        result = super()._apply(fn, recurse)
        if self.grad_layer is not None:     # the weight may be a new tensor now: hook it again
            self._attach(self.grad_layer, self.grad_sum, self.grad_steps)
        return result


def _standardised(y: Tensor, linear: bool) -> Tensor:
    """``(channels, rest)``: each channel of ``y`` centred and scaled to unit norm over the batch and positions."""
    y = y.float()
    y = y.movedim(-1, 0) if linear else y.transpose(0, 1)
    y = y.reshape(y.shape[0], -1)
    y = y - y.mean(1, keepdim=True)
    return y / torch.linalg.vector_norm(y, dim=1, keepdim=True).clamp_min(1e-12)


class UpdateNorms:
    """``||W_end - W_start||`` per SGD layer over an epoch, for the schedules that read update norms.

    Args:
        weights: ``index -> weight`` of every layer (a callable: ``.to()`` may replace the tensors).
    """

    def __init__(self, weights):
        self.weights = weights
        self.start: dict[int, Tensor] = {}     # layer index -> weight at the start of the epoch

    def snapshot(self, layers: range) -> None:
        """Remember the weights of ``layers`` (the SGD layers at the epoch start)."""
        self.start = {i: self.weights(i).detach().clone() for i in layers}

    @torch.no_grad()
    def read(self, layers: range) -> dict[int, float]:
        """The norms of ``layers``' updates since the snapshot (0 for a layer without one); one host read."""
        known = [i for i in layers if i in self.start]
        # each norm in its weight's dtype (as a float() of it would be), gathered in float64 for one copy
        norms = (torch.stack([torch.linalg.vector_norm(self.weights(i).detach() - self.start[i]).double()
                              for i in known]).tolist() if known else [])
        values = dict(zip(known, norms))
        return {i: values.get(i, 0.0) for i in layers}
