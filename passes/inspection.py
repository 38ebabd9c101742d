"""Inspection: the rows of a per-layer table and a DOT rendering of a rewritten graph with its two regions."""
from __future__ import annotations

import torch.fx as fx

from .layers import LayerOrder
from .rewrite import PARTITION_META, ROLE_META

__all__ = ["LAYER_COLUMNS", "layer_rows", "to_dot", "REGION_COLOURS"]


#: The columns of :func:`layer_rows`.
LAYER_COLUMNS = ("#", "layer", "kind", "call sites", "mode", "FLOP share")


def layer_rows(order: LayerOrder, transition: int) -> list[tuple[str, ...]]:
    """One row of text cells per layer, in :data:`LAYER_COLUMNS` order: index, layer, kind, call sites,
    mode at ``transition`` (LOCAL/SGD), FLOP share."""
    shares = order.flop_shares()
    return [(str(layer.index), layer.name, layer.kind, ",".join(layer.call_sites),
             "LOCAL" if layer.index < transition else "SGD",
             "?" if shares is None else f"{100 * shares[layer.index]:.1f}%") for layer in order.layers]


REGION_COLOURS = {"local": "#9ecae1", "crossing": "#c6dbef", "sgd": "#fdae6b", "other": "#eeeeee"}


def to_dot(gm: fx.GraphModule, name: str = "localsgd") -> str:
    """DOT source of a rewritten graph: prefix nodes blue, SGD nodes orange, fused updates bold."""
    part = gm.meta.get(PARTITION_META)
    prefix = part.prefix if part else frozenset()
    lines = [f'digraph "{name}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    for node in gm.graph.nodes:
        role = node.meta.get(ROLE_META)   # set by the rewrite pass on the nodes it adds
        if node.op in ("placeholder", "get_attr", "output") or role == "grad_mode":
            region = "other"
        elif node.name in prefix:
            region = "local"
        elif role == "crossing":
            region = "crossing"
        else:
            region = "sgd"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        fused = role == "local_update"
        label = f"{node.name}\\n{node.op}: {target}".replace('"', "'")
        extra = ', penwidth=2.5' if fused else ""
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{REGION_COLOURS[region]}"{extra}];')
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)
