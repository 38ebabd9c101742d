"""What autograd saves for backward, recorded with ``torch.autograd.graph.saved_tensors_hooks``."""
from __future__ import annotations

import torch
import torch.fx as fx


class NodeRecorder(fx.Interpreter):
    """Runs a GraphModule and keeps every node's output alive (so storages cannot be reused)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.outputs: dict[str, object] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.outputs[n.name] = out
        return out


def _storages(value) -> set[int]:
    found = set()
    for t in torch.utils._pytree.tree_leaves(value):
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            found.add(t.untyped_storage().data_ptr())
    return found


def run_recording_saved(gm: fx.GraphModule, *args):
    """Run ``gm`` through :class:`NodeRecorder` while recording the tensors saved for backward.

    Returns (output, recorder, saved tensors)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    rec = NodeRecorder(gm)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = rec.run(*args)
    return out, rec, saved


def saved_bytes(saved) -> int:
    """Bytes of the distinct storages among the saved tensors."""
    seen: dict[int, int] = {}
    for t in saved:
        if t.numel() > 0:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def check_nothing_saved_from_prefix(gm: fx.GraphModule, rec: NodeRecorder, saved, forbidden_tensors=()) -> None:
    """No saved tensor shares storage with a prefix node's output except the crossing tensors,
    and none shares storage with ``forbidden_tensors`` (e.g. local layer weights)."""
    part = gm.meta["localsgd_partition"]
    prefix_st = set().union(*[_storages(rec.outputs[n]) for n in part.prefix]) if part.prefix else set()
    crossing_st = set().union(*[_storages(rec.outputs[n]) for n in part.crossing]) if part.crossing else set()
    forbidden = set().union(*[_storages(t) for t in forbidden_tensors]) if forbidden_tensors else set()
    bad = []
    for t in saved:
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if (ptr in prefix_st and ptr not in crossing_st) or ptr in forbidden:
            owners = [n for n in part.prefix if ptr in _storages(rec.outputs[n])]
            bad.append((tuple(t.shape), owners))
    assert not bad, f"tensors of the prefix saved for backward: {bad}"
