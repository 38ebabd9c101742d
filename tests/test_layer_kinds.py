"""Layer kinds beyond nn.Conv*d / nn.Linear: transposed convs and functional calls of a weight parameter,
through the one torch.func.vjp mechanism of the fused op (docs/DESIGN.md §1.1, §2.1)."""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from helpers.hypothesis_profile import examples
from helpers.references import RefGeometry, RefTransposedGeometry, filter_major, ref_new_weight
from localsgd_fx import LocalSGDError, compile_localsgd
from localsgd_fx.ops import LOCAL_UPDATE
from passes.layers import find_layers, weight_of
from passes.trace import trace

pytestmark = pytest.mark.single_thread

CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}
RULES = st.sampled_from([("hebbian", 1.0), ("oja", 1.0), ("softhebb", 1.0), ("freeze", 1.0)])


# ------------------------------------------------------------------ transposed convs in the fused op
@st.composite
def transposed_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(dims))
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    dilation = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 1)) for _ in range(dims))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    # at least one output position: (size - 1)·s - 2·pad + d·(k - 1) + output_padding + 1 >= 1
    size = tuple(max(draw(st.integers(2, 5)), 1 - (-(2 * p - d * (k - 1) - o) // s))
                 for k, s, d, p, o in zip(kernel, stride, dilation, padding, output_padding))
    return dict(dims=dims, groups=groups, c_in=c_in, c_out=c_out, kernel=kernel, stride=stride, dilation=dilation,
                padding=padding, output_padding=output_padding, size=size, batch=draw(st.integers(1, 3)),
                bias=draw(st.booleans()))


@examples(60)
@given(case=transposed_cases(), rule=RULES, lr=st.sampled_from([0.05, -0.1]), fraction=st.sampled_from([1.0, 0.5]))
def test_transposed_conv_rules_match_reference(case, rule, lr, fraction):
    name, _ = rule
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, rule, lr, fraction)).encode()))
    x = torch.randn(case["batch"], case["c_in"], *case["size"], generator=gen, dtype=torch.float64)
    w = torch.randn(case["c_in"], case["c_out"] // case["groups"], *case["kernel"], generator=gen,
                    dtype=torch.float64) * 0.5
    b = torch.randn(case["c_out"], generator=gen, dtype=torch.float64) if case["bias"] else None
    w_old = w.clone()
    geo = [list(case[k]) for k in ("stride", "padding", "dilation")]
    y = LOCAL_UPDATE(x, w, b, torch.tensor(lr, dtype=torch.float64), name, *geo, case["groups"], fraction,
                     torch.zeros(1, dtype=torch.int32), 0, output_padding=list(case["output_padding"]))
    y_ref = CONV_T[case["dims"]](x, w_old, b, case["stride"], case["padding"], case["output_padding"], case["groups"],
                                 case["dilation"])
    assert_close(y, y_ref)
    keep = -int(-fraction * x.shape[0] // 1)
    geom = RefTransposedGeometry(x[:keep], w_old.shape, stride=case["stride"], padding=case["padding"],
                                 dilation=case["dilation"], output_padding=case["output_padding"],
                                 groups=case["groups"])
    old_f = filter_major(w_old, case["groups"])
    assert_close(geom.forward(old_f, b), geom.flat(y_ref[:keep]))       # the reference's columns are the layer's
    expected = ref_new_weight(name, old_f, geom, geom.flat(y_ref[:keep]), lr)
    assert_close(filter_major(w, case["groups"]) - old_f, expected - old_f, rtol=1e-7, atol=1e-12)


# --------------------------------------------------------------------- a functional conv of a parameter
class FunctionalStem(nn.Module):
    """``F.conv2d`` on its own parameter before an ``nn.Conv2d``, as hand-written models do."""

    def __init__(self):
        super().__init__()
        self.stem_w = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.stem_b = nn.Parameter(torch.randn(4) * 0.1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.stem_w, self.stem_b, padding=1))
        h = F.relu(self.bn(self.conv(h)))
        return self.head(h.mean((2, 3)))


def test_functional_conv_of_a_parameter_is_layer_zero_with_its_flops():
    x = torch.randn(2, 2, 6, 6)
    order = find_layers(trace(FunctionalStem()), (x,))
    assert order.names == ["stem_w", "conv", "head"]
    stem = order.layers[0]
    assert (stem.kind, stem.weight) == ("conv2d", "stem_w")
    assert stem.flops == 2 * 4 * 6 * 6 * (2 * 3 * 3)                 # per sample: 2·outputs·(C_in·k·k)
    assert order.layers[1].weight == "conv.weight"
    assert order.local_fraction(1) == pytest.approx(stem.flops / sum(layer.flops for layer in order.layers))


def test_functional_conv_gets_the_local_update_and_no_grad():
    torch.manual_seed(0)
    model = FunctionalStem().double()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.2, weak_supervision="off",
                          sample_fraction=1.0, compile="off")
    lm(x).sum().backward()                                            # t = 0: the SGD gradients of the original
    reference(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, msg=name)
    model.zero_grad(set_to_none=True)
    lm.set_transition(1)
    assert "stem_w" in lm.explain(print_fn=None)
    w_old = model.stem_w.detach().clone()
    lm(x).sum().backward()
    assert model.stem_w.grad is None and model.stem_b.grad is None and model.conv.weight.grad is not None
    y = F.conv2d(x, w_old, model.stem_b.detach(), padding=1)
    geom = RefGeometry(x, w_old.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
    assert_close(model.stem_w.detach(), ref_new_weight("hebbian", w_old, geom, geom.flat(y), 0.2))
    assert weight_of(lm.graph_for(0), lm.layer_order.layers[0]) is model.stem_w


# --------------------------------------------------------------------- a computed weight: opaque
class ScaledStem(FunctionalStem):
    def forward(self, x):
        h = F.relu(F.conv2d(x, self.stem_w * 2.0, padding=1))       # a computed weight: not a layer
        h = F.relu(self.bn(self.conv(h)))
        return self.head(h.mean((2, 3)))


def test_functional_conv_of_a_computed_weight_warns_and_stays_sgd():
    torch.manual_seed(0)
    model = ScaledStem()
    with pytest.warns(UserWarning, match="conv2d.*not a parameter.*stays on SGD"):
        lm = compile_localsgd(model, rule="hebbian", schedule="manual", compile="off")
    assert lm.layer_order.names == ["conv", "head"]
    assert lm.max_local == 0                                          # both layers read its output
    with pytest.raises(LocalSGDError, match="computed weight"):
        lm.set_transition(1)
    with pytest.raises(ValueError, match="max_local"), pytest.warns(UserWarning, match="stays on SGD"):
        compile_localsgd(model, max_local=1)
    lm(torch.randn(2, 2, 6, 6)).sum().backward()
    assert model.stem_w.grad is not None                              # on SGD: it trains


# --------------------------------------------------------------------- frozen non-layer parameters
class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head((self.conv(x) * self.scale).mean((2, 3)))


def test_a_parameter_read_in_the_prefix_is_named_and_warned_about():
    lm = compile_localsgd(Scaled(), schedule="manual", compile="off")
    lm.set_transition(1)
    with pytest.warns(UserWarning, match="'scale' is read inside the local prefix"):
        part = lm.graph_module.meta["localsgd_partition"]
    assert part.frozen_parameters == ("scale",)


# --------------------------------------------------------------------- ConvTranspose2d modules
class UpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.up(F.relu(self.down(x))))))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_conv_transpose_module_equivalence_and_local_update(fraction):
    torch.manual_seed(0)
    model = UpNet().double()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    lm = compile_localsgd(model, rule="oja", schedule="manual", local_lr=0.1, weak_supervision="off",
                          sample_fraction=fraction, compile="off", example_inputs=(x,))
    assert lm.layer_order.names == ["down", "up", "head"]
    assert lm.layer_order.layers[1].kind == "conv_transpose2d"
    assert lm.layer_order.layers[1].flops == 2 * 4 * 4 * 4 * (2 * 3 * 3)   # per input element: C_out/g·k·k
    out = lm(x)
    assert_close(out, reference(x))                                   # t = 0, train mode
    out.sum().backward()
    reference(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, msg=name)
    model.zero_grad(set_to_none=True)
    lm.set_transition(2)
    w_old = model.up.weight.detach().clone()
    # the input of `up`, from `down`'s weight before the step (it is local too and moves in this step)
    h = F.relu(F.conv2d(x, model.down.weight.detach(), model.down.bias.detach(), stride=2, padding=1))
    lm(x)
    keep = -int(-fraction * x.shape[0] // 1)
    y = F.conv_transpose2d(h[:keep], w_old, model.up.bias.detach(), 2, 1, 1, 2)
    geom = RefTransposedGeometry(h[:keep], w_old.shape, stride=(2, 2), padding=(1, 1), dilation=(1, 1),
                                 output_padding=(1, 1), groups=2)
    old_f = filter_major(w_old, 2)
    expected = ref_new_weight("oja", old_f, geom, geom.flat(y), 0.1)
    assert not torch.equal(model.up.weight.detach(), w_old)
    assert_close(filter_major(model.up.weight.detach(), 2), expected)


# --------------------------------------------------------------------- precision and compiling
def test_fp16_update_is_scaled_inside_the_gemm():
    """A plain fp16 sum over N·H·W positions overflows; the op scales both operands and stays finite and close."""
    torch.manual_seed(0)
    x = (torch.randn(64, 4, 32, 32) * 4 + 2).half()
    w = (torch.randn(4, 4, 3, 3) * 0.3).half()
    w64 = w.double()
    unscaled = torch.nn.grad.conv2d_weight(x, w.shape, F.conv2d(x, w, None, 1, 1), 1, 1)
    assert not torch.isfinite(unscaled).all()                         # the overflow the scaling is for
    guard = torch.zeros(1, dtype=torch.int32)
    LOCAL_UPDATE(x, w, None, torch.tensor(1e-2), "hebbian", [1, 1], [1, 1], [1, 1], 1, 1.0, guard, 0)
    assert guard.tolist() == [0] and w.dtype == torch.float16
    xd = x.double()
    geom = RefGeometry(xd, w64.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
    expected = ref_new_weight("hebbian", w64, geom, geom.flat(F.conv2d(xd, w64, None, 1, 1)), 1e-2)
    assert_close(w.double(), expected, rtol=0, atol=3e-3)
    assert not torch.equal(w.double(), w64)


class KindsNet(nn.Module):
    """A functional conv of a parameter, a grouped transposed conv and a linear head: every new kind."""

    def __init__(self):
        super().__init__()
        self.stem_w = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.3)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.stem_w, stride=2, padding=1))
        return self.head(F.relu(self.bn(self.up(h))).mean((2, 3)))


def test_compiled_step_with_new_kinds_matches_eager():
    torch.manual_seed(0)
    net = KindsNet()
    twin = copy.deepcopy(net)
    kwargs = dict(rule="softhebb", schedule="manual", local_lr=0.1, weak_supervision="off", sample_fraction=0.5)
    compiled = compile_localsgd(net, compile=True, **kwargs)
    eager = compile_localsgd(twin, compile=False, **kwargs)
    y = torch.randint(0, 3, (6,))
    for lm in (compiled, eager):
        lm.set_transition(2)
    for _ in range(2):
        x = torch.randn(6, 1, 8, 8)
        outs = [lm(x) for lm in (compiled, eager)]
        assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for out in outs:
            F.cross_entropy(out, y).backward()
    assert compiled.compile_events["DYNAMO"] == 1                     # one graph: no break in the fused op
    for name in ("stem_w", "up.weight", "head.weight"):
        assert_close(net.get_parameter(name).detach(), twin.get_parameter(name).detach(), rtol=1e-5, atol=1e-6)
    assert net.stem_w.grad is None and net.head.weight.grad is not None


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: not the plain GEMM of its weight."""

    def forward(self, x):
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        w = (self.weight - mean) / (std + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_layer_subclass_with_its_own_forward_after_a_local_layer_is_never_frozen():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), StandardisedConv(3, 3, 3), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 2))
    with pytest.warns(UserWarning, match="conv2d.*stays on SGD"):    # traced through: a conv of a computed weight
        lm = compile_localsgd(model, schedule="manual", compile="off")
    assert lm.layer_order.names == ["0", "4"] and lm.max_local == 1
    lm.set_transition(1)
    lm(torch.randn(2, 1, 8, 8)).sum().backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None   # SGD, outside the prefix
    assert "conv2d" not in lm.graph_module.meta["localsgd_partition"].prefix


class SizedUp(nn.Module):
    """A transposed conv called with ``output_size``: not the plain call the fused node emits."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.up(F.relu(self.down(x)), output_size=[8, 8]).mean((2, 3)))


def test_layer_module_called_with_extra_arguments_behind_a_local_layer_stays_sgd():
    model = SizedUp()
    with pytest.warns(UserWarning, match=r"self\.up\(\.\.\.\) \(ConvTranspose2d\).*stays on SGD"):
        lm = compile_localsgd(model, schedule="manual", compile="off")
    assert lm.layer_order.names == ["down", "head"] and lm.max_local == 1
    lm.set_transition(1)
    assert "up" not in lm.graph_module.meta["localsgd_partition"].prefix
    lm(torch.randn(2, 1, 8, 8)).sum().backward()
    assert model.down.weight.grad is None and model.up.weight.grad is not None


def test_the_eager_update_runs_torch_funcs_pullback_without_its_forward():
    """Eager, the pullback torch.func derives is traced once per layer geometry and shape with its forward removed:
    the update is the weight-gradient kernel alone, and the same graph serves the next call."""
    from localsgd_fx.ops import _PULLBACKS, _traced_pullback

    x, w = torch.randn(8, 3, 6, 6), torch.randn(4, 3, 3, 3)
    y = torch.nn.functional.conv2d(x, w, None, [1], [1])
    traced = _traced_pullback(x, y, w, [1, 1], [1, 1], [1, 1], 1, None)
    ops = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.convolution_backward.default in ops and torch.ops.aten.convolution.default not in ops
    assert _traced_pullback(x, y, w, [1, 1], [1, 1], [1, 1], 1, None) is traced and traced in _PULLBACKS.values()
    expected = torch.func.vjp(lambda v: torch.nn.functional.conv2d(x, v, None, [1], [1]), w)[1](y)[0]
    torch.testing.assert_close(traced(x, y, w), expected)
