"""Prefix partition: which nodes run locally (under ``no_grad``) for a transition ``t``.

A compute node is in the prefix iff every input is in the prefix or is a source (placeholder,
get_attr), it is not a call of an SGD layer, and it is a local layer call, feeds one (work on the
input before the first layer: a flatten, an input BatchNorm) or depends on one.
The last clause (docs/DESIGN.md §1.2) is there so that ``t = 0`` leaves the graph untouched: parameterised
work that only depends on the inputs (an input BatchNorm, say) keeps training by SGD until a local
layer sits before it or reads it. The prefix is ancestor-closed over compute nodes, so it can run first.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.fx as fx

from .errors import LocalSGDError
from .layers import LayerOrder

__all__ = ["Partition", "partition", "check_transition", "cut_after", "trained_parameters", "SOURCE_OPS"]

SOURCE_OPS = ("placeholder", "get_attr")


@dataclass(frozen=True)
class Partition:
    """The two regions of a graph at transition ``transition``."""

    transition: int
    local_layers: tuple[str, ...]      # module names of layers 0..t-1
    prefix: frozenset[str]             # names of compute nodes that run under no_grad
    crossing: tuple[str, ...]          # prefix nodes used outside the prefix (detached there)
    outside_local_sites: tuple[str, ...]  # calls of a LOCAL layer outside the prefix (shared modules)
    #: parameters read in the prefix that are no local layer's weight or bias: they get no gradient
    frozen_parameters: tuple[str, ...] = ()

    def in_prefix(self, node: fx.Node) -> bool:
        return node.name in self.prefix


def check_transition(order: LayerOrder, transition: int) -> None:
    """Refuse a transition that is not an int in ``0..len(order)`` (the one range check of ``t``)."""
    if not isinstance(transition, int) or isinstance(transition, bool) or not 0 <= transition <= len(order):
        raise LocalSGDError(
            f"transition {transition!r} is out of range: this model has {len(order)} layers, so t must be an "
            f"int in 0..{len(order)} (t=0: plain SGD, t={len(order)}: every layer local)."
        )
    if transition > order.local_limit:
        raise LocalSGDError(
            f"transition {transition} would make layer {order.names[order.local_limit]!r} local, but it depends on "
            f"{', '.join(order.opaque)}, which stays on SGD (a conv/linear call of a computed weight, "
            "or a submodule kept "
            f"opaque); t must be at most {order.local_limit} (make that weight a parameter or an nn.Module layer, or "
            "that submodule traceable, to go further)."
        )


def partition(gm: fx.GraphModule, order: LayerOrder, transition: int) -> Partition:
    """Split ``gm`` into the local prefix and the SGD region for layers ``0..transition-1`` local.

    Args:
        gm: the traced module ``order`` was computed on.
        order: its :class:`~passes.layers.LayerOrder`.
        transition: ``t``, the first SGD layer.

    Returns:
        A :class:`Partition`.
    """
    check_transition(order, transition)
    local = {layer.name for layer in order.layers[:transition]}
    layer_of_site = order.site_to_layer()
    opaque = set(order.opaque)
    # nodes that feed a local layer call without passing an SGD layer (an input Flatten/BatchNorm/pool)
    feeds_local: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        layer = layer_of_site.get(node.name)
        if (layer is not None and layer.name in local) or (
                layer is None and node.name not in opaque and any(u in feeds_local for u in node.users)):
            feeds_local.add(node)
    prefix: set[fx.Node] = set()
    outside_local: list[str] = []
    for node in gm.graph.nodes:
        if node.op in SOURCE_OPS or node.op == "output":
            continue
        layer = layer_of_site.get(node.name)
        inputs_ok = all(i in prefix or i.op in SOURCE_OPS for i in node.all_input_nodes)
        if (layer is not None and layer.name not in local) or node.name in opaque:
            continue                                   # an SGD layer, or a call that must stay SGD (opaque)
        if inputs_ok and (layer is not None or node in feeds_local or any(i in prefix for i in node.all_input_nodes)):
            prefix.add(node)
        elif layer is not None:
            outside_local.append(node.name)
    crossing = tuple(n.name for n in gm.graph.nodes if n in prefix and any(u not in prefix for u in n.users))
    return Partition(transition=transition, local_layers=tuple(order.names[:transition]),
                     prefix=frozenset(n.name for n in prefix),
                     crossing=crossing, outside_local_sites=tuple(outside_local),
                     frozen_parameters=_frozen_parameters(gm, order, transition, prefix))


def _frozen_parameters(gm: fx.GraphModule, order: LayerOrder, transition: int, prefix: set[fx.Node]) -> tuple[str, ...]:
    """Parameters read by prefix nodes other than the local layers' weights and biases; warns about those
    read directly (a ``get_attr``) rather than through a module such as a BatchNorm."""
    own = {name for layer in order.layers[:transition] for name in (layer.weight, *_bias_names(gm, layer))}
    frozen: dict[str, None] = {}
    direct: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node in prefix and node.target not in {layer.name for layer in order.layers}:
            frozen.update((f"{node.target}.{n}", None) for n, p in gm.get_submodule(node.target).named_parameters()
                          if p.requires_grad)
        elif node.op == "get_attr" and node.target not in own and any(u in prefix for u in node.users):
            try:
                if not gm.get_parameter(node.target).requires_grad:
                    continue
            except AttributeError:   # a buffer or a constant
                continue
            frozen[node.target] = None
            direct.append(node.target)
    warned = gm.meta.setdefault("localsgd_warned", set())   # once per traced model
    for name in direct:
        if name not in warned:
            warned.add(name)
            warnings.warn(f"parameter {name!r} is read inside the local prefix (from t={transition} on) and is no "
                          "layer's weight: it gets no gradient there (frozen). Make it part of an nn.Module, or keep t "
                          "below the layer that reads it", UserWarning, stacklevel=3)
    return tuple(frozen)


def _bias_names(gm: fx.GraphModule, layer) -> tuple[str, ...]:
    """The bias parameters of a layer's calls (a module's ``.bias``; a functional call's bias ``get_attr``)."""
    names = []
    for node in gm.graph.nodes:
        if node.name in layer.call_sites:
            if node.op == "call_module":
                names.append(f"{node.target}.bias")
            else:
                bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
                if isinstance(bias, fx.Node) and bias.op == "get_attr":
                    names.append(bias.target)
    return tuple(names)


def cut_after(gm: fx.GraphModule, node_name: str) -> fx.GraphModule:
    """The graph of ``gm`` up to and including node ``node_name``, returning that node's value (dead code
    removed); it shares ``gm``'s submodules. The plasticity signal runs a probe batch through such a cut."""
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name == node_name:
            break
    else:
        raise LocalSGDError(f"no node {node_name!r} in the graph of {type(gm).__name__}")
    graph.output(env[node])
    cut = fx.GraphModule(gm, graph)
    cut.graph.eliminate_dead_code()
    cut.recompile()
    return cut


def trained_parameters(gm: fx.GraphModule, part: Partition | None) -> list:
    """The parameters of the traced ``gm`` that receive gradients when ``part`` runs (None: plain SGD).

    Parameters of modules called outside the local prefix, and parameters fetched by nodes outside it. The
    prefix runs under ``no_grad``, and a local layer called outside it uses a detached weight, so neither
    yields gradients. Each parameter once, in graph order.
    """
    no_grad = set(part.prefix) | set(part.outside_local_sites) if part is not None else set()
    found: dict[int, object] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.name not in no_grad:
            found.update((id(p), p) for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr" and any(user.name not in no_grad for user in node.users):
            try:
                p = gm.get_parameter(node.target)
            except AttributeError:   # a buffer or a constant
                continue
            found[id(p)] = p
    return [p for p in found.values() if p.requires_grad]
