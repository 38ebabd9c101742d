"""Random CNNs for the property tests: a hypothesis strategy of CNN DAGs and the models it describes.

The strategy is weighted toward what is hard for the passes: residual blocks (a two-conv branch
added back onto its input) and concat blocks make branching DAGs the common case, and
:func:`transitions` draws ``t > 0`` nine times in ten. :func:`draw_statistics` measures both.
``cnn_specs(fused_bn=True)`` also draws :class:`BNAct` (BatchNorm fused with ReLU, branching on
``self.training``: FX traces through it and freezes the mode), at least one per net.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
GLOBAL_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
SIZES = {1: (8, 16), 2: (8, 12), 3: (4, 6)}
MAX_CHANNELS = 8
#: what one step of :func:`cnn_specs` adds; the blocks are listed twice to make branching common
STEP_KINDS = ("conv", "conv", "bn", "relu", "pool", "add", "cat",
              "residual", "residual", "concat", "concat")
#: with ``fused_bn=True``: the fused BatchNorm + ReLU too
FUSED_STEP_KINDS = (*STEP_KINDS, "bnact", "bnact")


class BNAct(nn.BatchNorm2d):
    """BatchNorm + ReLU in one module, as model libraries ship it: its own forward, so FX traces through
    it and evaluates ``self.training`` once. Any number of spatial dims (it skips the 2-d input check)."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.relu(x)


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
    # ("conv", src, ConvSpec) | ("bn"|"bnact"|"relu"|"maxpool"|"avgpool", src) | ("add"|"cat", a, b)
    ops: tuple
    hidden: int           # 0: one Linear head; > 0: Linear -> ReLU -> Linear
    num_classes: int
    seed: int


def _conv_out(size: int, k: int, s: int, p: int | str, d: int) -> int:
    if p == "same":
        return size
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _groups_and_out(draw, c_in: int, out_channels: int | None) -> tuple[int, int]:
    grouping = draw(st.sampled_from(["one", "one", "depthwise", "grouped"]))
    divisors = [g for g in range(2, c_in) if c_in % g == 0]
    if grouping == "depthwise" and 1 < c_in <= MAX_CHANNELS:
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
    return groups, out


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
    groups, out = _groups_and_out(draw, c_in, out_channels)
    return ConvSpec(out, k, s, p, d, groups, draw(st.booleans()), mode)


@st.composite
def _same_size_conv_spec(draw, c_in: int, size: tuple[int, ...], out_channels: int | None = None) -> ConvSpec:
    """A stride-1 conv whose output keeps the spatial size (branch bodies of residual/concat blocks)."""
    k = draw(st.sampled_from([3, 1, 3]))
    d = draw(st.sampled_from([1, 1, 2]))
    half = d * (k - 1) // 2
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    if mode == "reflect" and not all(half < n for n in size):
        mode = "zeros"
    p: int | str = "same" if mode == "zeros" and draw(st.booleans()) else half
    groups, out = _groups_and_out(draw, c_in, out_channels)
    return ConvSpec(out, k, 1, p, d, groups, draw(st.booleans()), mode)


def _spatial_after(spec: ConvSpec, size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_conv_out(n, spec.kernel, spec.stride, spec.padding, spec.dilation) for n in size)


@st.composite
def cnn_specs(draw, dims: int = 2, max_ops: int = 7, min_ops: int = 1, fused_bn: bool = False) -> NetSpec:
    """A random CNN DAG: convs (kernel/stride/padding/dilation/groups incl. depthwise, padding modes),
    BatchNorm, ReLU, max/avg pooling, residual adds (1x1 projections when shapes differ), channel
    concats, residual blocks (conv [-> BN] [-> ReLU] -> conv, added back onto the block's input) and
    concat blocks (a conv branch concatenated with its input), then global average pooling of every
    unused value and a Linear head. ``min_ops``/``max_ops`` count steps; a block is one step.
    ``fused_bn``: also draw :class:`BNAct` steps, and add one on the last value if none was drawn."""
    c0 = draw(st.integers(1, 3))
    size = tuple(draw(st.integers(*SIZES[dims])) for _ in range(dims))
    shapes: list[tuple[int, tuple[int, ...]]] = [(c0, size)]
    ops: list[tuple] = []

    def add_conv(src: int, spec: ConvSpec) -> int:
        ops.append(("conv", src, spec))
        shapes.append((spec.out_channels, _spatial_after(spec, shapes[src][1])))
        return len(shapes) - 1

    def add_op(op: tuple, shape: tuple[int, tuple[int, ...]]) -> int:
        ops.append(op)
        shapes.append(shape)
        return len(shapes) - 1

    for _ in range(draw(st.sampled_from(range(min_ops, max_ops + 1)))):
        kind = draw(st.sampled_from(FUSED_STEP_KINDS if fused_bn else STEP_KINDS))
        src = draw(st.integers(0, len(shapes) - 1))
        c, size_src = shapes[src]
        if kind == "residual":
            mid = draw(st.integers(1, MAX_CHANNELS))
            h = add_conv(src, draw(_same_size_conv_spec(c, size_src, out_channels=mid)))
            for extra in ("bn", "relu"):
                if draw(st.booleans()):
                    h = add_op((extra, h), shapes[h])
            h = add_conv(h, draw(_same_size_conv_spec(mid, size_src, out_channels=c)))
            add_op(("add", src, h), (c, size_src))
            continue
        if kind == "concat":
            if c >= 2 * MAX_CHANNELS:
                kind = "conv"
            else:
                out = draw(st.integers(1, min(MAX_CHANNELS, 2 * MAX_CHANNELS - c)))
                h = add_conv(src, draw(_same_size_conv_spec(c, size_src, out_channels=out)))
                first, second = (src, h) if draw(st.booleans()) else (h, src)
                add_op(("cat", first, second), (c + out, size_src))
                continue
        if kind == "pool":
            poolable = [i for i, (_, sz) in enumerate(shapes) if min(sz) >= 2]
            if not poolable:
                kind = "relu"
            else:
                src = draw(st.sampled_from(poolable))
                c, size_src = shapes[src]
                add_op((draw(st.sampled_from(["maxpool", "avgpool"])), src), (c, tuple(n // 2 for n in size_src)))
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
                        add_op(("cat", src, other), (c + shapes[other][0], size_src))
                        continue
                else:
                    if shapes[other][0] != c or shapes[other][1] != size_src:   # 1x1 projection shortcut
                        stride = 1 if shapes[other][1] == size_src else 2
                        other = add_conv(other, draw(_conv_spec(shapes[other][0], shapes[other][1], out_channels=c,
                                                                stride=stride, pointwise=True)))
                    add_op(("add", src, other), (c, size_src))
                    continue
        if kind == "conv":
            add_conv(src, draw(_conv_spec(c, size_src)))
        elif kind in ("bn", "bnact", "relu"):
            add_op((kind, src), (c, size_src))
    if not any(op[0] == "conv" for op in ops):
        last = len(shapes) - 1
        add_conv(last, draw(_conv_spec(shapes[last][0], shapes[last][1])))
    if fused_bn and not any(op[0] == "bnact" for op in ops):
        add_op(("bnact", len(shapes) - 1), shapes[-1])
    return NetSpec(dims=dims, in_channels=c0, size=size, batch=draw(st.integers(2, 3)), ops=tuple(ops),
                   hidden=draw(st.sampled_from([0, 0, 4])), num_classes=3, seed=draw(st.integers(0, 2**16)))


def transitions(n_layers: int) -> st.SearchStrategy[int]:
    """A transition ``t`` in ``0..n_layers``: ``t > 0`` (uniform) nine times in ten, else 0 (``t = 0``
    has its own tests; ``t > 0`` is where the rewrite does something)."""
    if n_layers == 0:
        return st.just(0)
    # t = 0 last: hypothesis favours the first element of a sampled_from (its "simplest" value)
    return st.sampled_from(range(10)).flatmap(
        lambda k: st.just(0) if k == 9 else st.sampled_from(range(1, n_layers + 1)))


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
            elif kind in ("bn", "bnact", "relu", "maxpool", "avgpool"):
                src = op[1]
                mods.append({"bn": lambda: BATCHNORM[d](channels[src]), "bnact": lambda: BNAct(channels[src]),
                             "relu": nn.ReLU,
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


def num_layers(spec: NetSpec) -> int:
    """Conv and Linear layers of the model of ``spec`` (counted from the spec, not by the library)."""
    return sum(op[0] == "conv" for op in spec.ops) + (2 if spec.hidden else 1)


def draw_statistics(n: int = 100, dims: int = 2) -> dict[str, float]:
    """Fractions over ``n`` derandomized draws of ``(cnn_specs(dims), transitions)``: nets with a
    residual add, with a concat, with either, with a single conv, and draws with ``t = 0``."""
    seen: list[tuple[NetSpec, int]] = []

    @settings(derandomize=True, max_examples=n, database=None, deadline=None, phases=[Phase.generate])
    @given(spec=cnn_specs(dims=dims), data=st.data())
    def collect(spec, data):
        seen.append((spec, data.draw(transitions(num_layers(spec)))))

    collect()
    kinds = [{op[0] for op in spec.ops} for spec, _ in seen]
    return {"draws": len(seen),
            "add": sum("add" in k for k in kinds) / len(seen),
            "cat": sum("cat" in k for k in kinds) / len(seen),
            "branching": sum(bool(k & {"add", "cat"}) for k in kinds) / len(seen),
            "single_conv": sum(sum(op[0] == "conv" for op in spec.ops) == 1 for spec, _ in seen) / len(seen),
            "t0": sum(t == 0 for _, t in seen) / len(seen),
            "mean_layers": sum(num_layers(spec) for spec, _ in seen) / len(seen)}
