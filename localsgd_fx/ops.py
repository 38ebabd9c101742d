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

The update is the vector-Jacobian product of ``W ↦ layer(x, W)`` (``torch.func.vjp``, which works
under the prefix's ``no_grad``) pulled back at the rule's cotangent: one mechanism for every layer kind
the functionals below cover, so no rule has per-kind code. GEMM count per local layer and step:

- eager (the usual CPU step, and the steps a CUDA graph records): one full-batch forward, and the pullback
  torch.func derives for the layer, traced once per geometry, shapes and dtype with its dead forward removed
  (:func:`_traced_pullback`): one forward GEMM, one update GEMM on the sample, no ``torch.func`` overhead per
  call (it cost an eager CPU step ~20 % at f = 0.25; docs/RESULTS.md, "The local update through torch.func").
- compiled (dynamo traces ``vjp``): ``sample_fraction == 1``: the layer output *is* the ``vjp`` call's output;
  ``< 1`` (``k = ceil(f·N)`` rows): the forward is split, ``vjp`` over the first ``k`` rows and a plain
  forward over the rest, then concatenated (one forward GEMM's worth in two calls, plus one copy).
- fp16: the update GEMM sums ``N·H·W`` products into fp16 (max 65504), so both operands are scaled by
  ``~count**-0.5`` (a power of two): the pullback runs from its own forward over ``x[:k]·s`` and the
  layer output comes from a plain forward, ``f`` forward GEMMs more (only in fp16).

Under autocast the forward and the pullback run in the autocast dtype; the new weight is written in the
weight's own dtype (fp32 master weights).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.node import has_side_effect

from .rules import Pullback, get_rule

__all__ = ["local_update", "layer_forward", "sample_count", "LOCAL_UPDATE"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CONV_T = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


def layer_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, output_padding: list[int] | None = None) -> Tensor:
    """The layer call: linear (2-d weight), conv, or transposed conv (``output_padding`` given)."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    if output_padding is not None:
        return _CONV_T[weight.dim()](x, weight, bias, stride, padding, output_padding, groups, dilation)
    return _CONV[weight.dim()](x, weight, bias, stride, padding, dilation, groups)


def _filter_major(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """``weight`` with output channels first. A transposed conv stores ``(C_in, C_out/g, *k)``: permute it
    to ``(C_out, C_in/g, *k)``; the same permutation maps it back. Others are already filter-major."""
    if not transposed:
        return weight
    return weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1)


def sample_count(batch: int, sample_fraction: float) -> int:
    """Rows of the batch the update uses: ``ceil(fraction · batch)``, at least one (0 for an empty batch)."""
    return min(batch, max(1, -int(-sample_fraction * batch // 1))) if batch else 0


def _fp16_scale(count: int) -> float:
    """A power of two near ``count**-0.5`` (exact to apply)."""
    return 2.0 ** -round(0.5 * math.log2(max(count, 1)))


@has_side_effect   # it updates the weight: FX's dead-code elimination must keep it even if y is unused
def local_update(x: Tensor, weight: Tensor, bias: Tensor | None, lr: Tensor, rule: str, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, sample_fraction: float,
                 nonfinite: Tensor | None, layer_index: int, output_padding: list[int] | None = None) -> Tensor:
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
        output_padding: a transposed conv's (None: not transposed).

    Returns:
        The layer output computed with the weight as it was.
    """
    local_rule = get_rule(rule)
    keep = sample_count(x.shape[0], sample_fraction)
    if not local_rule.updates or keep == 0:     # freeze, or an empty batch: nothing to learn from
        return layer_forward(x, weight, bias, stride, padding, dilation, groups, output_padding)
    hooks = [] if torch.compiler.is_compiling() else _pop_saved_tensor_hooks()
    try:
        return _update(x, weight, bias, lr, local_rule, stride, padding, dilation, groups, keep, nonfinite,
                       layer_index, output_padding)
    finally:
        for pack, unpack in reversed(hooks):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def _pop_saved_tensor_hooks() -> list:
    """Take the active saved-tensor hooks off their stack (``torch.func.vjp`` refuses to run under any).

    What ``vjp`` saves is the local layer's own input for its pullback, freed when the op returns and
    never part of the step's backward, so hooks that meter or offload saved activations have nothing to
    see there. (Compiled graphs trace ``vjp`` away, so this only runs eagerly.)
    """
    hooks = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    return hooks


def _update(x: Tensor, weight: Tensor, bias: Tensor | None, lr: Tensor, local_rule, stride: list[int],
            padding: list[int], dilation: list[int], groups: int, keep: int, nonfinite: Tensor | None,
            layer_index: int, output_padding: list[int] | None) -> Tensor:
    """The body of :func:`local_update` for a rule that updates, on ``keep > 0`` sample rows."""
    transposed = output_padding is not None

    def forward(inp: Tensor, w: Tensor) -> Tensor:
        return layer_forward(inp, w, bias, stride, padding, dilation, groups, output_padding)

    xs, scale = (x if keep == x.shape[0] else x[:keep]), 1.0
    if not torch.compiler.is_compiling() and not _runs_in_fp16(x, weight):
        # eager: one full forward, and the pullback torch.func derives for this layer and shape, traced once
        # (its forward is dead code there, so only the update GEMM runs)
        y = forward(x, weight)
        ys = y[:keep]
        traced = _traced_pullback(xs, ys, weight, stride, padding, dilation, groups, output_padding)
        weight_c = weight.to(ys.dtype)
        xs_c = xs.to(ys.dtype)

        def pull(p: Tensor) -> tuple[Tensor]:
            return (traced(xs_c, p, weight_c),)
    elif _runs_in_fp16(x, weight):
        # both GEMM operands scaled by ~count**-0.5: a separate forward of the sample feeds the pullback
        y = forward(x, weight)
        scale = _fp16_scale(y[:keep].numel() // (y.shape[-1] if weight.dim() == 2 else max(y.shape[1], 1)))
        _, pull = torch.func.vjp(lambda w: forward(xs * scale, w), weight)
        ys = y[:keep]
    elif keep == x.shape[0]:
        y, pull = torch.func.vjp(lambda w: forward(x, w), weight)    # the output and its pullback: one forward
        ys = y
    else:
        # one forward GEMM in two calls: the sample rows through vjp, the rest plainly; the cat is one copy of y
        ys, pull = torch.func.vjp(lambda w: forward(xs, w), weight)
        y = torch.cat([ys, forward(x[keep:], weight)])
    # rules see output channels at dimension 1: a linear layer's leading dimensions become rows
    y_rule = ys.reshape(-1, ys.shape[-1]) if weight.dim() == 2 else ys
    pullback = Pullback(lambda p: _filter_major(pull(p.reshape(ys.shape))[0], groups, transposed).to(weight.dtype),
                        y_rule, weight.dim(), scale)
    old = _filter_major(weight, groups, transposed)
    new = local_rule.new_weight(old, y_rule, pullback, lr)
    if new is None:
        return y
    new = _filter_major(new.to(weight.dtype), groups, transposed)
    if nonfinite is None:
        weight.copy_(new)
        return y
    # the guard in 5 small kernels (isfinite().all() alone takes 5: on a GPU step each counts): a sum is finite
    # exactly when every term is (short of overflowing fp32, far beyond any weight), and s - s is 0 for a finite
    # s, NaN for an infinite or NaN one
    total = new.sum(dtype=torch.float32)
    refused = (total - total).ne(0)
    nonfinite.select(0, layer_index).add_(refused)
    torch.where(refused, weight, new, out=weight)
    return y


_PULLBACKS: dict[tuple, torch.fx.GraphModule] = {}


def _traced_pullback(xs: Tensor, ys: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, output_padding: list[int] | None) -> torch.fx.GraphModule:
    """``(x, p, w) -> (∂ layer(x, W)/∂W at w)ᵀ p``: ``torch.func.vjp``'s pullback of the layer, traced once per layer
    geometry, shapes and dtype (on fake tensors: nothing runs) with the dead forward removed. Called eagerly, it
    is the one weight-gradient kernel, without the ~165 us of ``torch.func`` per call or a forward of the sample.
    The inputs come in the cotangent's dtype (the autocast dtype of the forward), so autocast is not traced."""
    key = (tuple(xs.shape), tuple(ys.shape), tuple(weight.shape), ys.dtype, xs.device, tuple(stride), tuple(padding),
           tuple(dilation), groups, None if output_padding is None else tuple(output_padding))
    traced = _PULLBACKS.get(key)
    if traced is None:
        from torch.fx.experimental.proxy_tensor import make_fx

        def pullback(x_: Tensor, p: Tensor, w: Tensor) -> Tensor:
            _, pull = torch.func.vjp(
                lambda w2: layer_forward(x_, w2, None, stride, padding, dilation, groups, output_padding), w)
            return pull(p)[0]

        dtype = ys.dtype
        with torch.autocast(xs.device.type, enabled=False):
            traced = make_fx(pullback, tracing_mode="fake")(xs.to(dtype), ys, weight.to(dtype))
        traced.graph.eliminate_dead_code()
        traced.recompile()
        _PULLBACKS[key] = traced
    return traced


def _runs_in_fp16(x: Tensor, weight: Tensor) -> bool:
    """Whether the layer's GEMMs run in fp16 (its tensors, or fp16 autocast on their device): dtype facts
    only, never tensor values, so compiling and CUDA graphs see a constant."""
    if torch.float16 in (x.dtype, weight.dtype):
        return True
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


#: The callable the rewritten graph's fused nodes call (``node.target``).
LOCAL_UPDATE = local_update
