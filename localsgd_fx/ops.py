"""The fused local-update node: the forward of a LOCAL layer and its in-place rule update, in one call.

``local_update`` is a plain Python function of torch ops, called by one node of the rewritten graph
per local layer call. Eager, it runs as written; under ``torch.compile`` dynamo traces into it, so
inductor generates the update's kernels (sampling, norms, scaling, the copy into the weight) together
with the rest of the step, and no Python runs per layer per step. (It used to be an opaque
``torch.library`` custom op: ~700 us of CPU per call on a GPU step, and invisible to autocast.)

Nothing in it reads a tensor on the host, so a step never waits for the device:

- the batch sample is a slice (the first ``ceil(f·N)`` rows: batches are shuffled already, so a
  slice is as random as a permutation and costs nothing);
- the non-finite guard is device-side: a non-finite new weight is replaced by the old one with
  ``torch.where`` and counted in a per-layer counter tensor, which :class:`~localsgd_fx.api.LocalSGDModule`
  reads once per epoch (``end_epoch``) or when asked (``check_updates``).

Under autocast the forward runs in the autocast dtype; the update GEMM runs in the dtype of the
layer output, and the new weight is written in the weight's own dtype (fp32 master weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.node import has_side_effect

from .rules import Geometry, get_rule

__all__ = ["local_update", "layer_forward", "sample_count", "LOCAL_UPDATE"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def layer_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> Tensor:
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return _CONV[weight.dim()](x, weight, bias, stride, padding, dilation, groups)


def sample_count(batch: int, sample_fraction: float) -> int:
    """Rows of the batch the update uses: ``ceil(fraction · batch)``, at least one (0 for an empty batch)."""
    return min(batch, max(1, -int(-sample_fraction * batch // 1))) if batch else 0


@has_side_effect   # it updates the weight: FX's dead-code elimination must keep it even if y is unused
def local_update(x: Tensor, weight: Tensor, bias: Tensor | None, lr: Tensor, rule: str, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, sample_fraction: float,
                 nonfinite: Tensor | None, layer_index: int) -> Tensor:
    """Forward with the current weight, then ``weight ← rule(weight, X, Y, lr)`` in place.

    Args:
        x: layer input (already padded if the layer pads in a non-zero mode).
        weight, bias: the layer's parameters; only ``weight`` is updated.
        lr: 0-dim tensor, the local learning rate of this step.
        rule: a key of :mod:`localsgd_fx.rules`.
        stride, padding, dilation, groups: conv geometry (empty lists / 1 for linear layers).
        sample_fraction: the update uses the first ``ceil(fraction · batch)`` rows (1.0: all).
        nonfinite: per-layer int counters, or None for no guard. With a guard, a non-finite new
            weight is not applied (the weight keeps its value) and ``nonfinite[layer_index]`` grows by one.
        layer_index: the layer's position in the topological order (indexes ``nonfinite``).

    Returns:
        The layer output computed with the weight as it was.
    """
    y = layer_forward(x, weight, bias, stride, padding, dilation, groups)
    local_rule = get_rule(rule)
    keep = sample_count(x.shape[0], sample_fraction)
    if not local_rule.updates or keep == 0:     # freeze, or an empty batch: nothing to learn from
        return y
    xs, ys = (x, y) if keep == x.shape[0] else (x[:keep], y[:keep])
    geometry = Geometry(xs, weight, stride, padding, dilation, groups)
    new = local_rule.new_weight(weight, geometry.flat_output(ys), geometry, lr)
    if new is None:
        return y
    new = new.to(weight.dtype)
    if nonfinite is not None:
        finite = torch.isfinite(new).all()
        new = torch.where(finite, new, weight)
        nonfinite[layer_index] += (~finite).to(nonfinite.dtype)
    weight.copy_(new)
    return y


#: The callable the rewritten graph's fused nodes call (``node.target``).
LOCAL_UPDATE = local_update
