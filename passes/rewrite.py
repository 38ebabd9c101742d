"""The local-update rewrite: emit a new GraphModule for transition ``t``.

In the emitted graph the prefix (see :mod:`passes.partition`) runs first with grad disabled, each
call of a LOCAL layer becomes one fused local-update node (forward with the current weight, then the
rule's in-place update), and the prefix tensors used by the SGD region are detached. Nothing of the
prefix is recorded by autograd, so nothing of it is saved for backward and back-propagation stops
at the junction. ``t = 0`` gives a copy of the original graph.

The fused op is passed in (:class:`LocalUpdateSpec`), so this pass stays free of training state;
``localsgd_fx.ops.local_update`` is the one the library uses: a plain function of torch ops, so
``torch.compile`` traces into it. Its output is the layer's output, so dead-code elimination keeps it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .errors import LocalSGDError
from .layers import LayerOrder, layer_call
from .partition import SOURCE_OPS, partition

__all__ = ["rewrite", "LocalUpdateSpec", "detach_crossing", "PARTITION_META", "ROLE_META"]

PARTITION_META = "localsgd_partition"
#: ``node.meta`` key naming what a node made by this pass does: ``"local_update"`` (a fused
#: local-update call), ``"crossing"`` (a prefix value detached for the SGD region) or
#: ``"grad_mode"`` (switching autograd off and back on around the prefix).
ROLE_META = "localsgd_role"


@dataclass(frozen=True)
class LocalUpdateSpec:
    """What a fused local-update node calls.

    ``op(x, weight, bias, lr, rule, stride, padding, dilation, groups, sample_fraction, nonfinite, layer_index)``
    returns the layer output computed with the weight as it was, and updates ``weight`` in place.
    ``lr`` is read from the attribute ``lr_attr`` of the emitted module (a 0-dim tensor, so a changing
    learning rate never changes the graph); ``nonfinite`` (per-layer counters of refused updates, or
    None for no guard) from ``nonfinite_attr``.
    """

    op: Callable
    lr: torch.Tensor
    rule: str
    sample_fraction: float = 1.0
    nonfinite: torch.Tensor | None = None
    lr_attr: str = "localsgd_lr"
    nonfinite_attr: str = "localsgd_nonfinite"


def detach_crossing(value):
    """Detach the tensors of a value that crosses from the prefix into the SGD region."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


torch.fx.wrap("detach_crossing")

def _functional(kind: str):
    """The torch.nn.functional of a layer kind (``conv_transpose2d`` -> ``F.conv_transpose2d``)."""
    return getattr(F, kind)


def rewrite(gm: fx.GraphModule, order: LayerOrder, transition: int, spec: LocalUpdateSpec) -> fx.GraphModule:
    """Emit the LoCal+SGD graph of ``gm`` for layers ``0..transition-1`` local.

    Args:
        gm: the traced model.
        order: its :class:`~passes.layers.LayerOrder`.
        transition: ``t``; ``0`` returns an equivalent copy.
        spec: the fused op and its constant arguments.

    Returns:
        A new ``GraphModule`` sharing ``gm``'s submodules and parameters; its partition is in
        ``.meta["localsgd_partition"]``.

    Example::

        >>> spec = LocalUpdateSpec(op=local_update, lr=torch.tensor(0.01), rule="hebbian")
        >>> new = rewrite(gm, find_layers(gm), 2, spec)
        >>> print(new.code)   # conv calls of layers 0, 1 are now local_update nodes
    """
    part = partition(gm, order, transition)
    layer_of_site = order.site_to_layer()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}
    shared: dict[str, fx.Node | None] = {}   # get_attr nodes of the rate and the guard, made at the first local call

    def get_attr(target: str, value=None) -> fx.Node:
        attrs[target] = _fetch(gm, target) if value is None else value
        return graph.get_attr(target)

    def emit_layer_call(node: fx.Node, local: bool) -> fx.Node:
        layer = layer_of_site[node.name]
        call = layer_call(gm, node)
        if call is None:
            raise LocalSGDError(f"layer call with unexpected arguments: {node.format_node()}")
        x = env[call.x]
        if call.pad is not None:
            x = graph.call_function(F.pad, (x, call.pad[0]), {"mode": call.pad[1]})
        weight = get_attr(call.weight)
        bias = get_attr(call.bias) if isinstance(call.bias, str) else None if call.bias is None else env[call.bias]
        if local:
            if not shared:
                shared["lr"] = get_attr(spec.lr_attr, spec.lr)
                shared["nonfinite"] = None if spec.nonfinite is None else get_attr(spec.nonfinite_attr, spec.nonfinite)
            args = (x, weight, bias, shared["lr"], spec.rule, call.stride, call.padding, call.dilation, call.groups,
                    spec.sample_fraction, shared["nonfinite"], layer.index)
            kwargs = {} if not call.transposed else {"output_padding": call.output_padding}
            return graph.create_node("call_function", spec.op, args, kwargs, name=node.name)
        # a LOCAL (shared) layer called outside the prefix: the weight is a constant there
        weight = graph.call_method("detach", (weight,))
        if isinstance(call.bias, str) or (isinstance(call.bias, fx.Node) and call.bias.op == "get_attr"):
            bias = graph.call_method("detach", (bias,))   # the layer's own bias is a constant too
        if call.kind == "linear":
            conv_args = ()
        elif call.transposed:
            conv_args = (call.stride, call.padding, call.output_padding, call.groups, call.dilation)
        else:
            conv_args = (call.stride, call.padding, call.dilation, call.groups)
        return graph.create_node("call_function", _functional(call.kind), (x, weight, bias, *conv_args), name=node.name)

    def copy(node: fx.Node, lookup) -> fx.Node:
        if node.op in ("call_module", "get_attr"):
            attrs[node.target] = gm.get_submodule(node.target) if node.op == "call_module" else _fetch(gm, node.target)
        return graph.node_copy(node, lookup)

    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op in SOURCE_OPS:
            env[node] = copy(node, env.__getitem__)

    if part.prefix:
        grad_was_enabled = graph.call_function(torch.is_grad_enabled, ())
        grad_was_enabled.meta[ROLE_META] = "grad_mode"
        graph.call_function(torch._C._set_grad_enabled, (False,)).meta[ROLE_META] = "grad_mode"
        for node in nodes:
            if node.name in part.prefix:
                env[node] = emit_layer_call(node, True) if node.name in layer_of_site else copy(node, env.__getitem__)
                if node.name in layer_of_site:
                    env[node].meta[ROLE_META] = "local_update"
        graph.call_function(torch._C._set_grad_enabled, (grad_was_enabled,)).meta[ROLE_META] = "grad_mode"
        for node in nodes:
            if node.name in part.crossing:
                env[node] = graph.create_node("call_function", detach_crossing, (env[node],),
                                              name=f"{node.name}_detached")
                env[node].meta[ROLE_META] = "crossing"

    outside_local = set(part.outside_local_sites)
    for node in nodes:
        if node.op in SOURCE_OPS or node.name in part.prefix:
            continue
        env[node] = emit_layer_call(node, False) if node.name in outside_local else copy(node, env.__getitem__)

    new = fx.GraphModule(attrs, graph, class_name=f"{type(gm).__name__}_t{transition}")
    new.meta[PARTITION_META] = part
    graph.lint()
    return new


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for item in target.split("."):
        obj = getattr(obj, item)
    return obj
