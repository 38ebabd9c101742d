"""Layer discovery and topological ordering.

The learnable layers of LoCal+SGD are the call sites of a traced graph that are one GEMM of a weight
parameter: ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d`` and ``nn.Linear`` modules, and the
functional ``conv*d`` / ``conv_transpose*d`` / ``linear`` calls whose weight is a parameter (a
``get_attr`` of an ``nn.Parameter``; such a layer is named by the parameter, e.g. ``stem_w``). A
functional call whose weight is computed (weight standardisation, ``w * scale``) is not a layer: it
is *opaque*, warned about once, stays on SGD, and no layer after it may become local; so is a
subclass of those modules with its own ``forward``.
They are ordered by their depth in the data-flow DAG (the largest number of layers on any
path from an input), ties broken by graph order: a ResNet shortcut conv sits beside the first conv
of its block, not after the block as module-tree or graph order would put it. Every path into a
layer passes only through layers of smaller depth, so any prefix of this order is ancestor-closed.

A module (or parameter) called at several sites is *one* layer (one weight): it is ordered by its
earliest site and its FLOPs are summed over its sites.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import LocalSGDError

__all__ = ["Layer", "LayerOrder", "LayerCall", "find_layers", "layer_kind", "layer_call", "weight_of",
           "holds_hidden_layers", "propagate_shapes", "LAYER_TYPES", "FUNCTIONAL_LAYERS"]

LAYER_TYPES: dict[type, str] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d", nn.Linear: "linear",
                                nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
                                nn.ConvTranspose3d: "conv_transpose3d"}

#: Functional calls that are one GEMM of their ``weight`` argument, and their kinds. (FX records
#: ``F.conv2d`` as ``torch.conv2d``; both spellings are listed.)
FUNCTIONAL_LAYERS: dict[object, str] = {
    F.linear: "linear", torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
}
# positional parameters after (input, weight, bias), as torch.nn.functional names them
_CONV_PARAMS = ("stride", "padding", "dilation", "groups")
_CONV_T_PARAMS = ("stride", "padding", "output_padding", "groups", "dilation")


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
    """One learnable layer: a conv/linear module (or a weight parameter of functional calls) and the graph
    nodes that call it."""

    index: int
    name: str                     # qualified module name, or the weight parameter's for functional calls
    kind: str                     # conv1d / conv2d / conv3d / conv_transpose1d/2d/3d / linear
    call_sites: tuple[str, ...]   # node names, in graph order
    depth: int                    # layers on the longest input path to the first site
    flops: int | None             # forward FLOPs per sample over all sites (None: no example input)
    weight: str = ""              # the weight parameter's qualified name ("conv1.weight", "stem_w")


@dataclass(frozen=True)
class LayerCall:
    """One call site of a layer, normalised: what the rewrite emits and the FLOP count reads.

    ``x``, ``bias`` are graph values (a node, or None for no bias); ``pad`` is an explicit ``F.pad``
    ``(pad, mode)`` to put in front (non-zero padding modes, asymmetric ``"same"``), after which the
    call's own padding is symmetric zero padding. ``output_padding`` is None unless transposed.
    """

    kind: str
    x: fx.Node
    weight: str                   # qualified name of the weight parameter
    bias: object                  # fx.Node, a qualified name (str) of a module's bias, or None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    output_padding: list[int] | None = None
    pad: tuple | None = None

    @property
    def transposed(self) -> bool:
        return self.output_padding is not None


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

    #: Functional conv/linear calls with a computed weight (node names): they stay on SGD.
    opaque: tuple[str, ...] = ()
    #: Layers that may be local: the leading layers that depend on no opaque call (a prefix of the order).
    max_prefix: int | None = None

    @property
    def local_limit(self) -> int:
        """The largest transition whose prefix depends on no opaque call."""
        return len(self.layers) if self.max_prefix is None else self.max_prefix


def weight_of(gm: nn.Module, layer: Layer) -> nn.Parameter:
    """The weight parameter of ``layer`` in ``gm`` (a module layer's ``.weight``, or a functional call's)."""
    return gm.get_parameter(layer.weight)


def _numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise LocalSGDError(f"no shape for layer call value {node}")
    out = 1
    for size in meta.shape:
        out *= int(size)
    return out


def _site_flops(gm: fx.GraphModule, call: LayerCall, node: fx.Node, batch: int) -> int:
    """Forward FLOPs of one call per sample: 2 · MACs. A weight ``(A, *rest)`` does ``prod(rest)`` MACs per
    output element (conv, linear) or, transposed, per input element."""
    weight = gm.get_parameter(call.weight)
    macs_per_element = weight[0].numel()
    if node.meta.get("tensor_meta") is None:
        raise LocalSGDError(f"no output shape for layer call {node.format_node()}")
    elements = _numel(call.x) if call.transposed else _numel(node)
    return 2 * elements * macs_per_element // max(batch, 1)


def _as_list(value, dims: int) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _same_padding(stride, dilation, kernel, padding_mode, reversed_pads):
    """(padding, pad) for ``padding="same"``: symmetric when every total is even, else an explicit pad."""
    totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if all(t % 2 == 0 for t in totals):
        return [t // 2 for t in totals], None
    if reversed_pads is None:
        reversed_pads = tuple(v for t in reversed(totals) for v in (t // 2, t - t // 2))
    return [0] * len(kernel), (tuple(reversed_pads), padding_mode)


def layer_call(gm: fx.GraphModule, node: fx.Node) -> LayerCall | None:
    """The normalised :class:`LayerCall` of a layer module call or functional layer call; None if ``node`` is
    not one (for a functional call: its weight is not a parameter, or its arguments are not constants)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = layer_kind(module)
        if kind is None or len(node.args) != 1 or node.kwargs:
            return None
        return _module_call(node, node.target, module, kind)
    if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS:
        return None
    kind = FUNCTIONAL_LAYERS[node.target]
    names = ("input", "weight", "bias", *(() if kind == "linear" else
                                          _CONV_T_PARAMS if kind.startswith("conv_t") else _CONV_PARAMS))
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    bound = dict(zip(names, node.args), **node.kwargs)
    weight = bound.get("weight")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and _is_parameter(gm, weight.target)):
        return None
    x, bias = bound.get("input"), bound.get("bias")
    if not isinstance(x, fx.Node) or not (bias is None or isinstance(bias, fx.Node)):
        return None
    if kind == "linear":
        return LayerCall(kind, x, weight.target, bias, [], [], [], 1)
    dims = int(kind[-2])
    stride, dilation = _as_list(bound.get("stride", 1), dims), _as_list(bound.get("dilation", 1), dims)
    groups = bound.get("groups", 1)
    padding = bound.get("padding", 0)
    if stride is None or dilation is None or not isinstance(groups, int):
        return None
    pad = None
    if padding == "valid":
        padding = [0] * dims
    elif padding == "same" and not kind.startswith("conv_t"):
        kernel = gm.get_parameter(weight.target).shape[2:]
        padding, pad = _same_padding(stride, dilation, kernel, "constant", None)
    else:
        padding = _as_list(padding, dims)
    if padding is None:
        return None
    output_padding = None
    if kind.startswith("conv_t"):
        output_padding = _as_list(bound.get("output_padding", 0), dims)
        if output_padding is None:
            return None
    return LayerCall(kind, x, weight.target, bias, stride, padding, dilation, groups, output_padding, pad)


def _module_call(node: fx.Node, name: str, module: nn.Module, kind: str) -> LayerCall:
    """A module layer's call: its geometry with non-zero padding modes and asymmetric ``"same"`` made an
    explicit ``F.pad`` (the fused op's update GEMM needs symmetric zero padding)."""
    bias = f"{name}.bias" if module.bias is not None else None
    x = node.args[0]
    if isinstance(module, nn.Linear):
        return LayerCall(kind, x, f"{name}.weight", bias, [], [], [], 1)
    dims = len(module.kernel_size)
    stride, dilation = list(module.stride), list(module.dilation)
    output_padding = list(module.output_padding) if kind.startswith("conv_t") else None
    reversed_pads = getattr(module, "_reversed_padding_repeated_twice", None)
    padding, pad = list(module.padding) if not isinstance(module.padding, str) else None, None
    if module.padding_mode != "zeros":
        padding, pad = [0] * dims, (tuple(reversed_pads), module.padding_mode)
    elif module.padding == "valid":
        padding = [0] * dims
    elif module.padding == "same":
        padding, pad = _same_padding(stride, dilation, module.kernel_size, "constant", reversed_pads)
    return LayerCall(kind, x, f"{name}.weight", bias, stride, padding, dilation, module.groups, output_padding, pad)


def _is_parameter(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


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

    sites: dict[str, list[fx.Node]] = {}     # by weight parameter
    calls: dict[fx.Node, LayerCall] = {}
    names: dict[str, str] = {}                # weight -> layer name
    kinds: dict[str, str] = {}
    opaque: list[fx.Node] = []
    hidden: list[fx.Node] = []
    for node in nodes:
        call = layer_call(gm, node)
        if call is None:
            if (node.op == "call_function" and node.target in FUNCTIONAL_LAYERS) or (
                    node.op == "call_module" and isinstance(gm.get_submodule(node.target), tuple(LAYER_TYPES))):
                opaque.append(node)   # looks like a layer, computes something else: never silently frozen
            elif node.op == "call_module" and holds_hidden_layers(gm.get_submodule(node.target)):
                hidden.append(node)   # an opaque submodule holding layers (trace named it): SGD, bounds the prefix
            continue
        calls[node] = call
        sites.setdefault(call.weight, []).append(node)
        kinds.setdefault(call.weight, call.kind)
        if node.op == "call_module" or call.weight not in names:
            names[call.weight] = node.target if node.op == "call_module" else call.weight
    warned = gm.meta.setdefault("localsgd_warned", set())   # once per traced model, not per call of this pass
    # kept opaque by passes.trace (which named them already) or by the caller's leaf_modules: nothing to say
    said = set(gm.meta.get("localsgd_opaque", {}))
    asked = tuple(gm.meta.get("localsgd_leaf_modules", ()))
    said |= {spec for spec in asked if isinstance(spec, str)}
    asked_types = tuple(spec for spec in asked if isinstance(spec, type))

    def explained(node: fx.Node) -> bool:
        return node.op == "call_module" and (node.target in said or isinstance(gm.get_submodule(node.target),
                                                                                 asked_types))

    for node in opaque:
        if node.name not in warned and not explained(node):
            warned.add(node.name)
            what = (f"{node.target.__name__}(...)" if node.op == "call_function"
                    else f"self.{node.target}(...) ({type(gm.get_submodule(node.target)).__name__})")
            warnings.warn(f"{node.name} = {what}: its weight is not a parameter, its arguments are not constants or "
                          "its module has its own forward, so it is not a LoCal+SGD layer: it stays on SGD, and no "
                          "layer after it can become local", UserWarning, stacklevel=2)
    if not sites:
        raise LocalSGDError(
            f"{type(gm).__name__} has no nn.Conv1d/2d/3d or nn.Linear call (nor nn.ConvTranspose*d, nor a "
            "torch.nn.functional conv*d / linear of a weight parameter) in its traced graph, so there is nothing for "
            "LoCal+SGD to make local. Layers kept inside leaf_modules are not visible; use nn.Conv*d / nn.Linear "
            "modules."
        )

    # depth[n] = most layer calls on any path from an input to n (n itself excluded)
    depth: dict[fx.Node, int] = {}
    is_site = set(calls)
    for node in nx.lexicographical_topological_sort(dag, key=position.__getitem__):
        depth[node] = max((depth[i] + (i in is_site) for i in node.all_input_nodes), default=0)

    batch = None
    if example_inputs:
        first = example_inputs[0]
        batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    ordered = sorted(sites, key=lambda w: (min(depth[n] for n in sites[w]), position[sites[w][0]]))
    layers = []
    for index, weight in enumerate(ordered):
        flops = None if batch is None else sum(_site_flops(gm, calls[n], n, batch) for n in sites[weight])
        layers.append(Layer(index=index, name=names[weight], kind=kinds[weight],
                            call_sites=tuple(n.name for n in sites[weight]),
                            depth=min(depth[n] for n in sites[weight]), flops=flops, weight=weight))
    # the first layer that an opaque call reaches bounds every prefix (prefixes are ancestor-closed)
    max_prefix = None
    if opaque or hidden:
        after = set().union(*(nx.descendants(dag, n) for n in (*opaque, *hidden)))
        max_prefix = next((layer.index for layer in layers if any(
            n in after for n in sites[layer.weight])), len(layers))
    return LayerOrder(tuple(layers), opaque=tuple(n.name for n in (*opaque, *hidden)), max_prefix=max_prefix)
