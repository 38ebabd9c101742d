"""The fused local-update op: the forward of a LOCAL layer and its in-place rule update, in one node.

Registered with ``torch.library.custom_op`` as ``localsgd_fx::local_update`` and declared to
mutate ``weight``: FX's dead-code elimination keeps it, and ``torch.compile`` treats it as an opaque
call with a known side effect instead of tracing into Python.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from passes.errors import LocalSGDError

from .rules import Geometry, get_rule

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def layer_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> Tensor:
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return _CONV[weight.dim()](x, weight, bias, stride, padding, dilation, groups)


@torch.library.custom_op("localsgd_fx::local_update", mutates_args=("weight",))
def local_update(x: Tensor, weight: Tensor, bias: Tensor | None, lr: Tensor, rule: str, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, sample_fraction: float,
                 check_finite: bool, layer: str) -> Tensor:
    """Forward with the current weight, then ``weight ← rule(weight, X, Y, lr)`` in place.

    Args:
        x: layer input (already padded if the layer pads in a non-zero mode).
        weight, bias: the layer's parameters; only ``weight`` is updated.
        lr: 0-dim tensor, the local learning rate of this step.
        rule: a key of :mod:`localsgd_fx.rules`.
        stride, padding, dilation, groups: conv geometry (empty lists / 1 for linear layers).
        sample_fraction: the update uses a random ``ceil(fraction · batch)`` samples (1.0: all).
        check_finite: refuse (raise, weight untouched) a non-finite new weight.
        layer: the layer's name, for error messages.

    Returns:
        The layer output computed with the weight as it was.
    """
    y = layer_forward(x, weight, bias, stride, padding, dilation, groups)
    local_rule = get_rule(rule)
    if local_rule.gemms == 0:
        return y
    xs, ys = x, y
    if sample_fraction < 1.0:
        keep = max(1, int(-(-sample_fraction * x.shape[0] // 1)))
        idx = torch.randperm(x.shape[0], device=x.device)[:keep]
        xs, ys = x.index_select(0, idx), y.index_select(0, idx)
    geometry = Geometry(xs, weight, stride, padding, dilation, groups)
    new = local_rule.new_weight(weight, geometry.flat_output(ys), geometry, lr)
    if new is None:
        return y
    if check_finite and not bool(torch.isfinite(new).all()):
        raise LocalSGDError(
            f"the {local_rule.name!r} update of layer {layer!r} is not finite (local lr {float(lr):.3g}); the "
            "weight was left unchanged. Lower local_lr, check the inputs for inf/NaN, or use rule='hebbian' "
            "(norm-preserving)."
        )
    weight.copy_(new)
    return y


@local_update.register_fake
def _(x, weight, bias, lr, rule, stride, padding, dilation, groups, sample_fraction, check_finite, layer):
    return layer_forward(x, weight, bias, stride, padding, dilation, groups)


LOCAL_UPDATE = torch.ops.localsgd_fx.local_update.default
