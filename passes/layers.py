"""Layer discovery and topological ordering.

The learnable layers of LoCal+SGD are the ``Conv{1,2,3}d`` and ``Linear`` call sites of a traced
graph. They are ordered by their depth in the data-flow DAG (the largest number of layers on any
path from an input), ties broken by graph order: a ResNet shortcut conv sits beside the first conv
of its block, not after the block as module-tree or graph order would put it. Every path into a
layer passes only through layers of smaller depth, so any prefix of this order is ancestor-closed.

A module called at several sites is *one* layer (one weight): it is ordered by its earliest site
and its FLOPs are summed over its sites.
"""
from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import LocalSGDError

__all__ = ["Layer", "LayerOrder", "find_layers", "layer_kind", "holds_hidden_layers", "propagate_shapes", "LAYER_TYPES"]

LAYER_TYPES: dict[type, str] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d", nn.Linear: "linear"}


def layer_kind(module: nn.Module) -> str | None:
    """``"conv2d"`` etc. for a layer module, None otherwise.

    Subclasses count only if they keep the base class's ``forward``: a layer with its own forward
    (weight standardisation, say) is not the GEMM the local rule assumes, so it stays an opaque
    SGD module.
    """
    for cls, kind in LAYER_TYPES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return kind
    return None


def holds_hidden_layers(module: nn.Module) -> bool:
    """Whether a called module is not a layer itself but holds conv/linear modules the graph cannot see.

    An opaque submodule (a leaf module, or one :func:`~passes.trace.trace` kept opaque) or a
    conv/linear subclass with its own ``forward``: its layers train by SGD at every transition.
    """
    return layer_kind(module) is None and any(isinstance(m, tuple(LAYER_TYPES)) for m in module.modules())


@dataclass(frozen=True)
class Layer:
    """One learnable layer: a conv/linear module and the graph nodes that call it."""

    index: int
    name: str                     # qualified module name
    kind: str                     # conv1d / conv2d / conv3d / linear
    call_sites: tuple[str, ...]   # node names, in graph order
    depth: int                    # layers on the longest input path to the first site
    flops: int | None             # forward FLOPs per sample over all sites (None: no example input)


@dataclass(frozen=True)
class LayerOrder:
    """The ordered layers of a graph. ``layers[i].index == i``."""

    layers: tuple[Layer, ...]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def flop_shares(self) -> list[float] | None:
        """Each layer's fraction of the total layer FLOPs (None without shapes)."""
        if any(layer.flops is None for layer in self.layers):
            return None
        total = sum(layer.flops for layer in self.layers) or 1
        return [layer.flops / total for layer in self.layers]

    def local_fraction(self, transition: int) -> float | None:
        """``p``: the FLOP fraction of layers ``0..transition-1``."""
        shares = self.flop_shares()
        return None if shares is None else float(sum(shares[:transition]))

    def site_to_layer(self) -> dict[str, Layer]:
        return {site: layer for layer in self.layers for site in layer.call_sites}


def _site_flops(module: nn.Module, node: fx.Node, batch: int) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise LocalSGDError(f"no output shape for layer call {node.format_node()}")
    out_numel = 1
    for size in meta.shape:
        out_numel *= int(size)
    if isinstance(module, nn.Linear):
        macs_per_output = module.in_features
    else:
        macs_per_output = (module.in_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
    return 2 * out_numel * macs_per_output // max(batch, 1)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Fill ``node.meta["tensor_meta"]`` by running ``gm`` once, in eval mode and without grad.

    Eval mode keeps BatchNorm running statistics untouched; the training flags are restored. Code traced
    through in train mode (a fused BatchNorm + activation, drop path) is not switched by eval mode, so the
    buffers and the RNG state are restored too: measuring shapes changes nothing.
    """
    modes = {m: m.training for m in gm.modules()}
    buffers = [(b, b.clone()) for b in gm.buffers()]
    cuda = sorted({x.device.index or 0 for x in example_inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    gm.eval()
    printed = io.StringIO()   # ShapeProp prints a traceback before raising; the error below replaces it
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed), torch.random.fork_rng(cuda):
            ShapeProp(gm).propagate(*example_inputs)
        sys.stderr.write(printed.getvalue())   # warnings of a good run still reach the user
    except Exception as exc:  # noqa: BLE001 - ShapeProp wraps what the model raised
        cause = exc.__cause__ or exc
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise LocalSGDError(
            f"{type(gm).__name__} cannot run on the example inputs {shapes}: {str(cause).splitlines()[0]}; "
            "give inputs of the size the model expects (an image large enough for its strides and kernels)"
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def find_layers(gm: fx.GraphModule, example_inputs: tuple | None = None) -> LayerOrder:
    """Discover the conv/linear layers of ``gm`` and order them topologically.

    Args:
        gm: a traced module.
        example_inputs: optional inputs (a tuple) used once to propagate shapes for FLOP counts.

    Returns:
        A :class:`LayerOrder`.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)))
        >>> [l.name for l in find_layers(gm).layers]
        ['0', '2']
    """
    if example_inputs is not None:
        propagate_shapes(gm, tuple(example_inputs))
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((inp, node) for node in nodes for inp in node.all_input_nodes)

    sites: dict[str, list[fx.Node]] = {}
    kinds: dict[str, str] = {}
    for node in nodes:
        if node.op == "call_module":
            kind = layer_kind(gm.get_submodule(node.target))
            if kind is not None:
                sites.setdefault(node.target, []).append(node)
                kinds[node.target] = kind
    if not sites:
        raise LocalSGDError(
            f"{type(gm).__name__} has no nn.Conv1d/2d/3d or nn.Linear call in its traced graph, so there "
            "is nothing for LoCal+SGD to make local. Layers written with torch.nn.functional or kept "
            "inside leaf_modules are not visible; use nn.Conv*d / nn.Linear modules."
        )

    # depth[n] = most layer calls on any path from an input to n (n itself excluded)
    depth: dict[fx.Node, int] = {}
    is_site = {n for ns in sites.values() for n in ns}
    for node in nx.lexicographical_topological_sort(dag, key=position.__getitem__):
        depth[node] = max((depth[i] + (i in is_site) for i in node.all_input_nodes), default=0)

    batch = None
    if example_inputs:
        first = example_inputs[0]
        batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    ordered = sorted(sites, key=lambda name: (min(depth[n] for n in sites[name]), position[sites[name][0]]))
    layers = []
    for index, name in enumerate(ordered):
        module = gm.get_submodule(name)
        flops = None if batch is None else sum(_site_flops(module, n, batch) for n in sites[name])
        layers.append(Layer(index=index, name=name, kind=kinds[name], call_sites=tuple(n.name for n in sites[name]),
                            depth=min(depth[n] for n in sites[name]), flops=flops))
    return LayerOrder(tuple(layers))
