"""Inspection: a per-layer table and a DOT rendering of a rewritten graph with its two regions."""
from __future__ import annotations

import torch.fx as fx

from .layers import LayerOrder
from .rewrite import PARTITION_META


def speed_bound(p: float, gemms: int = 1, sample_fraction: float = 1.0) -> float:
    """docs/DESIGN.md §5: the GEMM-model step speedup when a FLOP fraction ``p`` is local.

    An SGD layer costs 3 GEMMs (forward, error, weight gradient); a local one ``1 + gemms·f``.
    ``3/(3-p)`` for a 1-GEMM rule, ``3/(3-2p)`` for ``freeze``.
    """
    return 3.0 / (3.0 - (2.0 - gemms * sample_fraction) * p)


def layer_table(order: LayerOrder, transition: int) -> str:
    """A fixed-width table: index, layer, kind, call sites, mode, FLOP share."""
    shares = order.flop_shares()
    rows = [("#", "layer", "kind", "call sites", "mode", "FLOP share")]
    for layer in order.layers:
        share = "?" if shares is None else f"{100 * shares[layer.index]:.1f}%"
        rows.append((str(layer.index), layer.name, layer.kind, ",".join(layer.call_sites),
                     "LOCAL" if layer.index < transition else "SGD", share))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


REGION_COLOURS = {"local": "#9ecae1", "crossing": "#c6dbef", "sgd": "#fdae6b", "other": "#eeeeee"}


def to_dot(gm: fx.GraphModule, name: str = "localsgd") -> str:
    """DOT source of a rewritten graph: prefix nodes blue, SGD nodes orange, fused updates bold."""
    part = gm.meta.get(PARTITION_META)
    prefix = part.prefix if part else frozenset()
    lines = [f'digraph "{name}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            region = "other"
        elif node.name in prefix:
            region = "local"
        elif node.name.endswith("_detached"):
            region = "crossing"
        elif "grad_enabled" in node.name:
            region = "other"
        else:
            region = "sgd"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        fused = "local_update" in str(node.target)
        label = f"{node.name}\\n{node.op}: {target}".replace('"', "'")
        extra = ', penwidth=2.5' if fused else ""
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{REGION_COLOURS[region]}"{extra}];')
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)
