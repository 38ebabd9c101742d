"""Shared test helpers: a hypothesis profile, a random-CNN generator and independent references.

Everything here is deliberately independent of the library's numerics: the local-rule references
use an explicit im2col (``torch.nn.functional.unfold`` for 2-d convs, strided slicing for 1-d/3-d),
the prefix oracle re-derives the partition rule of docs/DESIGN.md §1.2 with networkx on a plain
``torch.fx.symbolic_trace``, and saved-for-backward tensors are recorded with
``torch.autograd.graph.saved_tensors_hooks``.

Test modules import these helpers with ``from conftest import ...`` (``tests/`` has no
``__init__.py``, so pytest puts it on ``sys.path``).
"""
from __future__ import annotations

import copy
import gzip
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

# ------------------------------------------------------------------------------------ hypothesis
#: Deterministic, deadline-free settings for the property tests of these files (not loaded as the
#: global profile, so colleagues' hypothesis tests keep their own settings).
_SCALE = float(os.environ.get("LOCALSGD_HYPOTHESIS_SCALE", "1"))
FAST = settings(derandomize=True, deadline=None, max_examples=max(1, int(20 * _SCALE)), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
settings.register_profile("localsgd", FAST)


def examples(n: int) -> settings:
    """``FAST`` with ``n`` examples (scaled by ``LOCALSGD_HYPOTHESIS_SCALE``)."""
    return settings(FAST, max_examples=max(1, int(n * _SCALE)))


#: the modules these helpers serve (colleagues' test files keep their own thread settings)
OWN_MODULES = {"test_passes", "test_rules", "test_supervision", "test_api"}


@pytest.fixture(autouse=True)
def _deterministic(request):
    """Seed torch, run on one intra-op thread (tiny float64 kernels are much slower on two
    contended OpenMP threads than on one) and restore grad mode / dtype / threads afterwards."""
    own = request.node.module.__name__.rsplit(".", 1)[-1] in OWN_MODULES
    threads = torch.get_num_threads()
    if own:
        torch.manual_seed(0)
        torch.set_num_threads(1)
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    torch.set_grad_enabled(grad)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- random CNNs
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
GLOBAL_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
SIZES = {1: (8, 16), 2: (8, 12), 3: (4, 6)}
MAX_CHANNELS = 8


@dataclass(frozen=True)
class ConvSpec:
    out_channels: int
    kernel: int
    stride: int
    padding: int | str
    dilation: int
    groups: int
    bias: bool
    padding_mode: str


@dataclass(frozen=True)
class NetSpec:
    """A random CNN as plain data (hypothesis prints and shrinks it)."""

    dims: int
    in_channels: int
    size: tuple[int, ...]
    batch: int
    ops: tuple            # ("conv", src, ConvSpec) | ("bn"|"relu"|"maxpool"|"avgpool", src) | ("add"|"cat", a, b)
    hidden: int           # 0: one Linear head; > 0: Linear -> ReLU -> Linear
    num_classes: int
    seed: int


def _conv_out(size: int, k: int, s: int, p: int | str, d: int) -> int:
    if p == "same":
        return size
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def _conv_spec(draw, c_in: int, size: tuple[int, ...], out_channels: int | None = None, stride: int | None = None,
               pointwise: bool = False) -> ConvSpec:
    if pointwise:
        return ConvSpec(out_channels, 1, stride or 1, 0, 1, 1, draw(st.booleans()), "zeros")
    k = draw(st.sampled_from([1, 3, 3, 2]))
    s = draw(st.sampled_from([1, 1, 2])) if stride is None else stride
    d = draw(st.sampled_from([1, 1, 2]))
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "circular"]))
    if s == 1 and mode == "zeros" and draw(st.integers(0, 3)) == 0:
        p: int | str = "same"
    else:
        p = draw(st.integers(0, 2))
    ok = all(_conv_out(n, k, s, p, d) >= 1 for n in size)
    if mode == "reflect":
        ok = ok and all(p < n for n in size)
    if mode == "circular":
        ok = ok and all(p <= n for n in size)
    if not ok:
        k, p, d, mode = 1, 0, 1, "zeros"
    grouping = draw(st.sampled_from(["one", "one", "depthwise", "grouped"]))
    divisors = [g for g in range(2, c_in) if c_in % g == 0]
    if grouping == "depthwise" and c_in > 1 and c_in * 2 <= MAX_CHANNELS * 2:
        groups = c_in
        out = c_in * draw(st.sampled_from([1, 2])) if out_channels is None else None
    elif grouping == "grouped" and divisors:
        groups = draw(st.sampled_from(divisors))
        out = groups * draw(st.integers(1, 2)) if out_channels is None else None
    else:
        groups, out = 1, (draw(st.integers(1, 5)) if out_channels is None else None)
    if out_channels is not None:
        out = out_channels
        if out % groups:
            groups = 1
    return ConvSpec(out, k, s, p, d, groups, draw(st.booleans()), mode)


def _spatial_after(spec: ConvSpec, size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_conv_out(n, spec.kernel, spec.stride, spec.padding, spec.dilation) for n in size)


@st.composite
def cnn_specs(draw, dims: int = 2, max_ops: int = 7, min_ops: int = 1) -> NetSpec:
    """A random CNN DAG: convs (kernel/stride/padding/dilation/groups incl. depthwise, padding modes),
    BatchNorm, ReLU, max/avg pooling, residual adds (1x1 projections when shapes differ), channel
    concats and branches, then global average pooling of every unused value and a Linear head."""
    c0 = draw(st.integers(1, 3))
    size = tuple(draw(st.integers(*SIZES[dims])) for _ in range(dims))
    shapes: list[tuple[int, tuple[int, ...]]] = [(c0, size)]
    ops: list[tuple] = []

    def add_conv(src: int, spec: ConvSpec) -> int:
        ops.append(("conv", src, spec))
        shapes.append((spec.out_channels, _spatial_after(spec, shapes[src][1])))
        return len(shapes) - 1

    for _ in range(draw(st.integers(min_ops, max_ops))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "bn", "relu", "pool", "add", "cat"]))
        src = draw(st.integers(0, len(shapes) - 1))
        c, size_src = shapes[src]
        if kind == "pool":
            poolable = [i for i, (_, sz) in enumerate(shapes) if min(sz) >= 2]
            if not poolable:
                kind = "relu"
            else:
                src = draw(st.sampled_from(poolable))
                c, size_src = shapes[src]
                ops.append((draw(st.sampled_from(["maxpool", "avgpool"])), src))
                shapes.append((c, tuple(n // 2 for n in size_src)))
                continue
        if kind in ("add", "cat"):
            same = [i for i, (_, sz) in enumerate(shapes) if sz == size_src and i != src]
            halved = [i for i, (_, sz) in enumerate(shapes)
                      if kind == "add" and all(-(-m // 2) == n for m, n in zip(sz, size_src)) and sz != size_src]
            partners = same + halved
            if not partners:
                kind = "conv"
            else:
                other = draw(st.sampled_from(partners))
                if kind == "cat":
                    if c + shapes[other][0] > 2 * MAX_CHANNELS:
                        kind = "relu"
                    else:
                        ops.append(("cat", src, other))
                        shapes.append((c + shapes[other][0], size_src))
                        continue
                else:
                    if shapes[other][0] != c or shapes[other][1] != size_src:   # 1x1 projection shortcut
                        stride = 1 if shapes[other][1] == size_src else 2
                        other = add_conv(other, draw(_conv_spec(shapes[other][0], shapes[other][1], out_channels=c,
                                                                stride=stride, pointwise=True)))
                    ops.append(("add", src, other))
                    shapes.append((c, size_src))
                    continue
        if kind == "conv":
            add_conv(src, draw(_conv_spec(c, size_src)))
        elif kind in ("bn", "relu"):
            ops.append((kind, src))
            shapes.append((c, size_src))
    if not any(op[0] == "conv" for op in ops):
        last = len(shapes) - 1
        add_conv(last, draw(_conv_spec(shapes[last][0], shapes[last][1])))
    return NetSpec(dims=dims, in_channels=c0, size=size, batch=draw(st.integers(2, 3)), ops=tuple(ops),
                   hidden=draw(st.sampled_from([0, 0, 4])), num_classes=3, seed=draw(st.integers(0, 2**16)))


class RandomNet(nn.Module):
    """The module of a :class:`NetSpec`: a static plan walked by a traceable forward."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        d = spec.dims
        mods: list[nn.Module] = []
        plan: list[tuple] = []
        channels = [spec.in_channels]
        used: set[int] = set()
        for op in spec.ops:
            kind = op[0]
            if kind == "conv":
                _, src, cs = op
                mods.append(CONV[d](channels[src], cs.out_channels, cs.kernel, stride=cs.stride, padding=cs.padding,
                                    dilation=cs.dilation, groups=cs.groups, bias=cs.bias, padding_mode=cs.padding_mode))
                plan.append(("mod", len(mods) - 1, (src,)))
                channels.append(cs.out_channels)
            elif kind in ("bn", "relu", "maxpool", "avgpool"):
                src = op[1]
                mods.append({"bn": lambda: BATCHNORM[d](channels[src]), "relu": nn.ReLU,
                             "maxpool": lambda: MAXPOOL[d](2), "avgpool": lambda: AVGPOOL[d](2)}[kind]())
                plan.append(("mod", len(mods) - 1, (src,)))
                channels.append(channels[src])
            else:
                _, a, b = op
                plan.append((kind, None, (a, b)))
                channels.append(channels[a] + (channels[b] if kind == "cat" else 0))
            used.update(plan[-1][2])
        self.dims = d
        self.plan = tuple(plan)
        self.leaves = tuple(i for i in range(len(channels)) if i not in used)
        self.body = nn.ModuleList(mods)
        features = sum(channels[i] for i in self.leaves)
        self.hidden = spec.hidden
        if spec.hidden:
            self.fc1 = nn.Linear(features, spec.hidden)
            self.fc2 = nn.Linear(spec.hidden, spec.num_classes)
        else:
            self.fc = nn.Linear(features, spec.num_classes)

    def forward(self, x):
        vals = [x]
        for kind, index, ins in self.plan:
            if kind == "mod":
                vals.append(self.body[index](vals[ins[0]]))
            elif kind == "add":
                vals.append(vals[ins[0]] + vals[ins[1]])
            else:
                vals.append(torch.cat([vals[ins[0]], vals[ins[1]]], 1))
        feats = [torch.flatten(GLOBAL_POOL[self.dims](vals[i], 1), 1) for i in self.leaves]
        h = torch.cat(feats, 1) if len(feats) > 1 else feats[0]
        if self.hidden:
            return self.fc2(torch.relu(self.fc1(h)))
        return self.fc(h)


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def build(spec: NetSpec, dtype=torch.float64) -> tuple[nn.Module, torch.Tensor]:
    """The seeded model (train mode) and an input batch for ``spec``."""
    torch.manual_seed(spec.seed)
    model = RandomNet(spec)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    randomize_batchnorm(model, gen)
    model = model.to(dtype).train()
    x = torch.randn(spec.batch, spec.in_channels, *spec.size, generator=gen, dtype=dtype)
    return model, x


# ------------------------------------------------------------------ independent rule references
def explicit_padding(module: nn.Module, dims: int) -> list[tuple[int, int]]:
    """(left, right) zero/mode padding per spatial dim, as nn.Conv*d applies it."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * dims
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def pad_input(x: torch.Tensor, pads: list[tuple[int, int]], mode: str = "zeros") -> torch.Tensor:
    flat = [v for pair in reversed(pads) for v in pair]
    if not any(flat):
        return x
    return F.pad(x, flat) if mode == "zeros" else F.pad(x, flat, mode=mode)


def im2col(xp: torch.Tensor, kernel, stride, dilation, use_unfold: bool | None = None) -> torch.Tensor:
    """``(N, C·prod(K), L)`` columns of an already padded input, channel-major like the weight."""
    dims = xp.dim() - 2
    if use_unfold is None:
        use_unfold = dims == 2
    if use_unfold:
        return F.unfold(xp, tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))
    out = [(xp.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    patches = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        sl = [slice(None), slice(None)] + [slice(o * dl, o * dl + st * (n - 1) + 1, st)
                                           for o, dl, st, n in zip(offs, dilation, stride, out)]
        patches.append(xp[tuple(sl)])
    cols = torch.stack(patches, dim=2)                     # (N, C, prod K, *out)
    n, c = xp.shape[:2]
    return cols.reshape(n, c * math.prod(kernel), math.prod(out))


class RefGeometry:
    """Reference ``<P ⊗ X>`` and channel means for one layer call, from first principles."""

    def __init__(self, x: torch.Tensor, weight_shape, *, stride=(), pads=(), dilation=(), groups=1,
                 padding_mode="zeros", use_unfold: bool | None = None):
        self.weight_shape = tuple(weight_shape)
        self.linear = len(self.weight_shape) == 2
        if self.linear:
            self.cols = x.reshape(-1, x.shape[-1])           # (R, in)
        else:
            kernel = self.weight_shape[2:]
            xp = pad_input(x, list(pads), padding_mode)
            self.cols = im2col(xp, kernel, stride, dilation, use_unfold)   # (N, C·K, L)
            self.groups = groups

    def flat(self, y: torch.Tensor) -> torch.Tensor:
        """``(R, O)`` for linear, ``(N, O, L)`` for convs."""
        return y.reshape(-1, y.shape[-1]) if self.linear else y.reshape(y.shape[0], y.shape[1], -1)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer output ``(R, O)`` / ``(N, O, L)`` computed from the columns."""
        if self.linear:
            y = self.cols @ weight.t()
            return y if bias is None else y + bias
        o, g = weight.shape[0], self.groups
        ck = self.cols.shape[1] // g
        og = o // g
        outs = [torch.einsum("ok,nkl->nol", weight[i * og:(i + 1) * og].reshape(og, ck),
                             self.cols[:, i * ck:(i + 1) * ck]) for i in range(g)]
        y = torch.cat(outs, 1)
        return y if bias is None else y + bias.reshape(1, -1, 1)

    def correlate(self, post: torch.Tensor) -> torch.Tensor:
        """``<post ⊗ X>`` averaged over rows (linear) or batch x positions (conv); ``post`` flat."""
        if self.linear:
            return torch.einsum("ro,ri->oi", post, self.cols) / post.shape[0]
        n, o, l = post.shape
        g = self.groups
        ck, og = self.cols.shape[1] // g, o // g
        parts = [torch.einsum("nol,nkl->ok", post[:, i * og:(i + 1) * og], self.cols[:, i * ck:(i + 1) * ck])
                 for i in range(g)]
        return torch.cat(parts, 0).reshape(self.weight_shape) / (n * l)

    def channel_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Per-output-channel mean of a flat tensor, shaped to broadcast against the weight."""
        m = t.mean(0) if self.linear else t.mean((0, 2))
        return m.reshape(-1, *([1] * (len(self.weight_shape) - 1)))


def ref_new_weight(rule: str, weight: torch.Tensor, geom: RefGeometry, y: torch.Tensor, lr: float,
                   tau: float = 1.0) -> torch.Tensor:
    """docs/DESIGN.md §2 written out: the weight after one local step (``y`` flat, bias included)."""
    w = weight
    if rule == "freeze":
        return w.clone()
    if rule == "hebbian":
        new = w + lr * geom.correlate(y)
        old_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        new_norm = new.reshape(w.shape[0], -1).norm(dim=1)
        return new * (old_norm / new_norm).reshape(-1, *([1] * (w.dim() - 1)))
    if rule == "oja":
        return w + lr * (geom.correlate(y) - geom.channel_mean(y * y) * w)
    if rule == "softhebb":
        s = torch.softmax(y / tau, dim=1)
        return w + lr * (geom.correlate(s) - geom.channel_mean(s * y) * w)
    raise ValueError(rule)


def module_geometry(module: nn.Module, x: torch.Tensor, use_unfold: bool | None = None) -> RefGeometry:
    """The reference geometry of a call of ``module`` (conv padding mode and 'same' included)."""
    if isinstance(module, nn.Linear):
        return RefGeometry(x, module.weight.shape)
    dims = len(module.kernel_size)
    return RefGeometry(x, module.weight.shape, stride=module.stride, pads=explicit_padding(module, dims),
                       dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
                       use_unfold=use_unfold)


LAYER_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class CallRecorder:
    """Forward hooks recording the (input, output) of every call of the given modules."""

    def __init__(self, model: nn.Module, names):
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
        self.handles = []
        for name in names:
            def hook(mod, args, out, name=name):
                self.calls[name].append((args[0].detach().clone(), out.detach().clone()))
            self.handles.append(model.get_submodule(name).register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------- prefix oracle
def expected_prefix(model: nn.Module, local_layers, leaf_modules=()) -> tuple[set[str], set[str]]:
    """The prefix of docs/DESIGN.md §1.2, re-derived: a compute node is in the prefix iff it is not an SGD layer
    call, all its inputs are in the prefix or are sources, and it is a local layer call, an ancestor
    of one, or a descendant of either (the documented refinement that leaves t=0 untouched and keeps
    input-only branches that feed no local layer on SGD). Returns (prefix, crossing) node names."""
    gm = fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    dag = nx.DiGraph()
    dag.add_nodes_from(n.name for n in nodes)
    dag.add_edges_from((i.name, n.name) for n in nodes for i in n.all_input_nodes)
    local = set(local_layers)
    local_sites, sgd_sites = set(), set()
    for n in nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LAYER_CLASSES):
            (local_sites if n.target in local else sgd_sites).add(n.name)
    sources = {n.name for n in nodes if n.op in ("placeholder", "get_attr")}
    seeds = set(local_sites)
    for s in local_sites:
        seeds |= nx.ancestors(dag, s) - sources
    related = set(seeds)
    for s in seeds:
        related |= nx.descendants(dag, s)
    prefix: set[str] = set()
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output") or n.name in sgd_sites or n.name not in related:
            continue
        if all(i.name in prefix or i.op in ("placeholder", "get_attr") for i in n.all_input_nodes):
            prefix.add(n.name)
    crossing = {n.name for n in nodes if n.name in prefix and any(u.name not in prefix for u in n.users)}
    return prefix, crossing


def prefix_parameters(model: nn.Module, prefix: set[str]) -> set[str]:
    """Qualified names of the parameters used by prefix nodes of a plain symbolic trace."""
    gm = fx.symbolic_trace(model)
    names = set()
    for n in gm.graph.nodes:
        if n.name in prefix and n.op == "call_module":
            names |= {f"{n.target}.{p}" for p, _ in gm.get_submodule(n.target).named_parameters()}
        elif n.name in prefix and n.op == "get_attr":
            names.add(n.target)
    return names


# ----------------------------------------------------------------------- saved tensors
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


# --------------------------------------------------------------------------- misc
def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def deepcopy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ---------------------------------------------------------------- training data
def write_tiny_fmnist(folder: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-format IDX files of a learnable toy problem (class = position of a bright bar)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 230
        for kind, arr, magic in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            header = bytes([0, 0, 8, magic]) + np.array(arr.shape, dtype=">u4").tobytes()
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(write_tiny_fmnist(tmp_path_factory.mktemp("fmnist")))
