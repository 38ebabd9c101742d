"""Local rules and the fused op, against the independent im2col / einsum references of ``helpers.references``."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from helpers.hypothesis_profile import examples
from helpers.references import CallRecorder, RefGeometry, RefTransposedGeometry, filter_major, im2col, ref_new_weight
from localsgd_fx import LocalRule, LocalSGDError, compile_localsgd, list_rules, register_rule
from localsgd_fx.ops import LOCAL_UPDATE
from localsgd_fx.rules import Freeze, Hebbian, Oja, SoftHebb, get_rule, make_rule

pytestmark = pytest.mark.single_thread

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
GRAD_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
SIZE_RANGE = {1: (3, 12), 2: (3, 8), 3: (3, 5)}


@dataclass(frozen=True)
class ConvCase:
    dims: int
    batch: int
    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    size: tuple[int, ...]
    bias: bool


@st.composite
def conv_cases(draw, dims=None) -> ConvCase:
    dims = draw(st.sampled_from([1, 2, 3])) if dims is None else dims
    groups_kind = draw(st.sampled_from(["one", "grouped", "depthwise"]))
    if groups_kind == "depthwise":
        c_in = draw(st.integers(2, 4))
        groups, c_out = c_in, c_in * draw(st.integers(1, 2))
    elif groups_kind == "grouped":
        groups = draw(st.integers(2, 3))
        c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    else:
        groups, c_in, c_out = 1, draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kernel = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(dims))
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    dilation = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    lo, hi = SIZE_RANGE[dims]
    size = tuple(max(draw(st.integers(lo, hi)), d * (k - 1) + 1 - 2 * p)
                 for k, p, d in zip(kernel, padding, dilation))
    return ConvCase(dims, draw(st.integers(1, 3)), c_in, c_out, groups, kernel, stride, padding, dilation, size,
                    draw(st.booleans()))


RULE_SPECS = st.sampled_from([("hebbian", 1.0), ("oja", 1.0), ("softhebb", 1.0), ("softhebb", 0.25), ("freeze", 1.0)])


def rule_key(name: str, tau: float) -> str:
    return make_rule(SoftHebb(tau=tau)).key if name == "softhebb" and tau != 1.0 else name


def call_op(x, w, b, lr, key, stride=(), padding=(), dilation=(), groups=1, fraction=1.0, check=True, layer=0):
    guard = torch.zeros(layer + 1, dtype=torch.int32) if check else None
    return LOCAL_UPDATE(x, w, b, torch.tensor(lr, dtype=torch.float64), key, list(stride), list(padding),
                        list(dilation), groups, fraction, guard, layer)


def conv_tensors(case: ConvCase, gen: torch.Generator):
    x = torch.randn(case.batch, case.c_in, *case.size, generator=gen, dtype=torch.float64)
    w = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(case.c_out, generator=gen, dtype=torch.float64) if case.bias else None
    return x, w, b


# ------------------------------------------------------------------ the reference itself
@examples(60)
@given(case=conv_cases())
def test_reference_correlation_is_the_weight_gradient_gemm(case):
    """Sanity of the reference: <P ⊗ X>·count equals torch.nn.grad.conv*d_weight, the slicing
    im2col equals F.unfold in 2-d, and the reference forward equals F.conv*d."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x, w, b = conv_tensors(case, gen)
    geom = RefGeometry(x, w.shape, stride=case.stride, pads=[(p, p) for p in case.padding], dilation=case.dilation,
                       groups=case.groups)
    y = CONV_FN[case.dims](x, w, b, case.stride, case.padding, case.dilation, case.groups)
    assert_close(geom.forward(w, b), geom.flat(y))
    count = y.numel() // y.shape[1]
    expected = GRAD_WEIGHT[case.dims](x, w.shape, y, case.stride, case.padding, case.dilation, case.groups) / count
    assert_close(geom.correlate(geom.flat(y)), expected)
    if case.dims == 2:
        xp = F.pad(x, [p for p in reversed(case.padding) for _ in range(2)])
        assert_close(im2col(xp, case.kernel, case.stride, case.dilation, use_unfold=False),
                     im2col(xp, case.kernel, case.stride, case.dilation, use_unfold=True))


# ---------------------------------------------------------------------- rules via the op
@examples(150)
@given(case=conv_cases(), rule=RULE_SPECS, lr=st.sampled_from([0.05, 0.3, -0.1]))
def test_conv_rules_match_reference(case, rule, lr):
    name, tau = rule
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, rule, lr)).encode()))
    x, w, b = conv_tensors(case, gen)
    w_old = w.clone()
    b_old = None if b is None else b.clone()
    y = call_op(x, w, b, lr, rule_key(name, tau), case.stride, case.padding, case.dilation, case.groups)
    y_ref = CONV_FN[case.dims](x, w_old, b_old, case.stride, case.padding, case.dilation, case.groups)
    assert_close(y, y_ref)                     # forward with the weight as it was
    geom = RefGeometry(x, w_old.shape, stride=case.stride, pads=[(p, p) for p in case.padding],
                       dilation=case.dilation, groups=case.groups)
    expected = ref_new_weight(name, w_old, geom, geom.flat(y_ref), lr, tau=tau)
    assert_close(w - w_old, expected - w_old, rtol=1e-7, atol=1e-12)
    if b is not None:
        assert torch.equal(b, b_old)           # biases never move
    if name == "hebbian":
        assert_close(w.flatten(1).norm(dim=1), w_old.flatten(1).norm(dim=1))
    if name == "freeze":
        assert torch.equal(w, w_old)


@examples(80)
@given(rows=st.integers(1, 4), tokens=st.sampled_from([None, 1, 3]), f_in=st.integers(1, 6), f_out=st.integers(1, 5),
       bias=st.booleans(), rule=RULE_SPECS, lr=st.sampled_from([0.05, 0.3, -0.1]))
def test_linear_rules_match_reference(rows, tokens, f_in, f_out, bias, rule, lr):
    name, tau = rule
    gen = torch.Generator().manual_seed(rows * 1000 + f_in * 10 + f_out)
    shape = (rows, f_in) if tokens is None else (rows, tokens, f_in)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(f_out, f_in, generator=gen, dtype=torch.float64)
    b = torch.randn(f_out, generator=gen, dtype=torch.float64) if bias else None
    w_old = w.clone()
    y = call_op(x, w, b, lr, rule_key(name, tau))
    y_ref = torch.einsum("...i,oi->...o", x, w_old) + (0 if b is None else b)
    assert_close(y, y_ref)
    geom = RefGeometry(x, w_old.shape)
    expected = ref_new_weight(name, w_old, geom, geom.flat(y_ref), lr, tau=tau)
    assert_close(w - w_old, expected - w_old, rtol=1e-7, atol=1e-12)


def test_hebbian_by_hand_on_a_linear_neuron():
    """One neuron, one sample: ΔW = η·y·x, then rescaled back to |W|."""
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)            # norm 5
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = call_op(x, w, None, 1.0, "hebbian")
    assert y.item() == 3.0
    raw = torch.tensor([[3.0 + 3.0, 4.0]], dtype=torch.float64)       # W + 1·y·x
    assert_close(w, raw * 5.0 / raw.norm())
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    call_op(x, w, None, 0.5, "oja")                                    # y = 2; ΔW = y·x - y²·W = [4-4, 2]
    assert_close(w, torch.tensor([[1.0, 1.0]], dtype=torch.float64))


# -------------------------------------------------------------------------- sample_fraction
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("rule", ["oja", "hebbian", "softhebb"])
def test_sample_fraction_uses_ceil_f_n_samples(fraction, rule):
    gen = torch.Generator().manual_seed(3)
    n = 7
    x = torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    w_old = w.clone()
    state = torch.get_rng_state()
    y = call_op(x, w, None, 0.2, rule, (1, 1), (1, 1), (1, 1), 1, fraction=fraction)
    assert torch.equal(state, torch.get_rng_state())      # a slice, not a random draw: no RNG, no sort
    y_full = F.conv2d(x, w_old, None, 1, 1)
    assert_close(y, y_full)                               # the forward is always the full batch
    keep = math.ceil(fraction * n)
    idx = torch.arange(keep)                              # the first rows: batches come shuffled

    def expected_on(rows):
        geom = RefGeometry(x[rows], w_old.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
        return ref_new_weight(rule, w_old, geom, geom.flat(y_full[rows]), 0.2)

    assert_close(w, expected_on(idx), rtol=1e-7, atol=1e-12)
    # one sample more or less, or the full batch, gives a different weight
    for other in (torch.randperm(n, generator=torch.Generator().manual_seed(9))[:keep], torch.arange(n),
                  idx[:-1] if keep > 1 else None):
        if other is not None and set(other.tolist()) != set(idx.tolist()):
            assert not torch.allclose(w, expected_on(other))


def test_sample_fraction_one_is_the_full_batch_and_draws_no_random_numbers():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    w_old = w.clone()
    state = torch.get_rng_state()
    call_op(x, w, None, 0.1, "oja", fraction=1.0)
    assert torch.equal(state, torch.get_rng_state())
    geom = RefGeometry(x, w_old.shape)
    assert_close(w, ref_new_weight("oja", w_old, geom, x @ w_old.t(), 0.1))


def test_sample_fraction_through_compile_localsgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    lm = compile_localsgd(model, rule="oja", schedule="manual", local_lr=0.1, weak_supervision="off",
                          sample_fraction=0.25)
    lm.set_transition(1)
    w_old = model[0].weight.detach().clone()
    lm(x)
    idx = torch.arange(2)
    geom = RefGeometry(x[idx], w_old.shape)
    y = x[idx] @ w_old.t() + model[0].bias.detach()
    assert_close(model[0].weight.detach(), ref_new_weight("oja", w_old, geom, y, 0.1))
    for bad in (0.0, 1.5, -0.1, "half"):
        with pytest.raises(ValueError, match="sample_fraction"):
            compile_localsgd(model, sample_fraction=bad)


# ----------------------------------------------------------------------- long-run stability
@pytest.mark.parametrize("rule", ["hebbian", "oja", "softhebb", "freeze"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_weights_stay_finite_and_bounded_over_1000_steps(rule, layer):
    gen = torch.Generator().manual_seed(5)
    if layer == "linear":
        w = torch.randn(4, 8, generator=gen) * 0.3
        geometry = dict()
        make_x = lambda: torch.randn(16, 8, generator=gen)  # noqa: E731
    else:
        w = torch.randn(4, 2, 3, 3, generator=gen) * 0.3
        geometry = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        make_x = lambda: torch.randn(4, 2, 6, 6, generator=gen)  # noqa: E731
    w0 = w.clone()
    lr = torch.tensor(0.01)
    for _ in range(1000):
        LOCAL_UPDATE(make_x(), w, None, lr, rule, list(geometry.get("stride", ())), list(geometry.get("padding", ())),
                     list(geometry.get("dilation", ())), 1, 1.0, torch.zeros(1, dtype=torch.int32), 0)
    assert torch.isfinite(w).all()
    norms = w.flatten(1).norm(dim=1)
    if rule == "hebbian":
        assert_close(norms, w0.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    elif rule == "freeze":
        assert torch.equal(w, w0)
    else:
        assert norms.max() < 3.0, norms            # Oja-type decay keeps each filter near unit norm
        assert not torch.equal(w, w0)


# ------------------------------------------------------------------------- non-finite updates
@pytest.mark.parametrize("rule", ["hebbian", "oja", "softhebb"])
@pytest.mark.parametrize("bad", [[float("inf")], [float("-inf")], [float("nan")], [float("inf"), float("-inf")]],
                         ids=["inf", "-inf", "nan", "inf-and-minus-inf"])
def test_non_finite_update_is_refused_and_weight_untouched(rule, bad):
    x = torch.randn(2, 2, 5, 5)
    for i, value in enumerate(bad):                       # both signs at once: terms that could cancel in a sum
        x[i, 1, 2, 3] = value
    w = torch.randn(3, 2, 3, 3)
    w_old = w.clone()
    guard = torch.zeros(3, dtype=torch.int32)
    for _ in range(2):
        LOCAL_UPDATE(x, w, None, torch.tensor(0.1), rule, [1, 1], [0, 0], [1, 1], 1, 1.0, guard, 1)
    assert torch.equal(w, w_old)
    assert guard.tolist() == [0, 2, 0]                    # counted on the device, for the layer's index
    LOCAL_UPDATE(torch.randn(2, 2, 5, 5), w, None, torch.tensor(0.1), rule, [1, 1], [0, 0], [1, 1], 1, 1.0, guard, 1)
    assert not torch.equal(w, w_old) and guard.tolist() == [0, 2, 0]   # a finite update goes through
    # no guard (check_finite=False): the update goes through (the caller opted out)
    LOCAL_UPDATE(x, w, None, torch.tensor(0.1), rule, [1, 1], [0, 0], [1, 1], 1, 1.0, None, 1)
    assert not torch.isfinite(w).all()


def test_non_finite_update_through_compiled_module_names_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(1, 2, 3))
    model.add_module("act", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(2, 2))
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, sample_fraction=1.0)
    lm.set_transition(1)
    x = torch.randn(2, 1, 6, 6)
    x[1, 0, 0, 0] = float("inf")
    w_old = model.stem.weight.detach().clone()
    lm(x)                                                  # no host sync in the step: refused on the device
    assert torch.equal(model.stem.weight.detach(), w_old)
    assert torch.is_grad_enabled()
    lm(torch.randn(2, 1, 6, 6)).sum().backward()          # still usable
    assert not torch.equal(model.stem.weight.detach(), w_old)
    with pytest.raises(LocalSGDError, match="'stem' \\(1 step\\)") as info:
        lm.end_epoch()                                     # read once per epoch
    message = str(info.value)
    assert "non-finite" in message and "kept their previous values" in message
    assert "rule='hebbian'" not in message                 # already the norm-preserving rule: no such advice
    assert lm.epoch == 0                                   # the epoch did not end
    lm.end_epoch()                                         # the counters were read and reset
    assert lm.epoch == 1


def test_empty_batch_is_no_update_and_no_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, sample_fraction=0.25)
    lm.set_transition(1)
    w_old = model[0].weight.detach().clone()
    assert lm(torch.randn(0, 1, 6, 6)).shape == (0, 2)
    assert torch.equal(model[0].weight.detach(), w_old)
    lm.end_epoch()


# ------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SignedHebbian(LocalRule):
    name: ClassVar[str] = "signed_hebbian_test"

    def new_weight(self, weight, y, geometry, lr):
        return weight + lr * geometry.correlate(torch.sign(y))


@dataclass(frozen=True)
class NoOp(LocalRule):
    name: ClassVar[str] = "noop_test"
    gemms: ClassVar[int] = 0

    def new_weight(self, weight, y, geometry, lr):    # pragma: no cover - never called for 0 GEMMs
        raise AssertionError("a 0-GEMM rule must not be asked for an update")


def _tiny_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).double()


def test_user_rule_through_compile_localsgd_by_name():
    assert register_rule(SignedHebbian) == "signed_hebbian_test"
    assert "signed_hebbian_test" in list_rules()
    model = _tiny_net()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    lm = compile_localsgd(model, rule="signed_hebbian_test", schedule="manual", local_lr=0.2, weak_supervision="off",
                          example_inputs=(x,), sample_fraction=1.0)
    lm.set_transition(1)
    assert "'signed_hebbian_test'" in lm.graph_module.code
    w_old = model[0].weight.detach().clone()
    rec = CallRecorder(model, ["0"])
    lm(x)
    rec.remove()
    y = F.conv2d(x, w_old, model[0].bias, 1, 1)
    geom = RefGeometry(x, w_old.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
    assert_close(model[0].weight.detach(), w_old + 0.2 * geom.correlate(geom.flat(torch.sign(y))))
    assert rec.calls["0"] == []      # the fused op replaced the module call


def test_rule_instance_with_parameters_and_zero_gemm_rule():
    model = _tiny_net()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    lm = compile_localsgd(model, rule=SoftHebb(tau=0.3), schedule="manual", local_lr=0.2, weak_supervision="off",
                          sample_fraction=1.0)
    lm.set_transition(1)
    assert repr(SoftHebb(tau=0.3)) in lm.graph_module.code
    w_old = model[0].weight.detach().clone()
    lm(x)
    y = F.conv2d(x, w_old, model[0].bias, 1, 1)
    geom = RefGeometry(x, w_old.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
    assert_close(model[0].weight.detach(), ref_new_weight("softhebb", w_old, geom, geom.flat(y), 0.2, tau=0.3))

    register_rule(NoOp())
    lm = compile_localsgd(model, rule="noop_test", schedule="manual", sample_fraction=1.0)
    lm.set_transition(1)
    w_old = model[0].weight.detach().clone()
    lm(x)
    assert torch.equal(model[0].weight.detach(), w_old)
    assert lm.speed_bound == pytest.approx(3 / (3 - 2 * lm.local_fraction))


def test_registry_errors_and_keys():
    assert {"hebbian", "oja", "softhebb", "freeze"} <= set(list_rules())
    assert SoftHebb().key == "softhebb" and SoftHebb(tau=0.5).key == repr(SoftHebb(tau=0.5))
    assert isinstance(get_rule("oja"), Oja) and isinstance(get_rule("hebbian"), Hebbian)
    assert Freeze.gemms == 0
    with pytest.raises(ValueError, match="unknown local rule"):
        get_rule("no_such_rule")
    with pytest.raises(ValueError, match="unknown local rule"):
        compile_localsgd(_tiny_net(), rule="no_such_rule")
    with pytest.raises(TypeError):
        register_rule(object())
    with pytest.raises(ValueError, match="tau"):
        SoftHebb(tau=0.0)

    @dataclass(frozen=True)
    class TwoGemms(LocalRule):
        name: ClassVar[str] = "two_gemms_test"
        gemms: ClassVar[int] = 2

        def new_weight(self, weight, y, geometry, lr):
            return weight

    with pytest.raises(ValueError, match="gemms"):
        register_rule(TwoGemms)


# ------------------------------------------------------------------------ the cotangent API
@dataclass(frozen=True)
class SignedCotangent(LocalRule):
    """The rules.py docstring's example: a rule is a cotangent, nothing else."""

    name: ClassVar[str] = "signed_cotangent_test"

    def cotangent(self, y):
        return torch.sign(y)


def test_user_rule_as_a_cotangent_matches_reference_on_conv_and_transposed_conv():
    register_rule(SignedCotangent)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    w_old = w.clone()
    y = call_op(x, w, None, 0.2, "signed_cotangent_test", (1, 1), (1, 1), (1, 1), 1)
    geom = RefGeometry(x, w_old.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
    assert_close(w, w_old + 0.2 * geom.correlate(geom.flat(torch.sign(y))))
    w = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)    # transposed: (C_in, C_out, k, k)
    w_old = w.clone()
    y = LOCAL_UPDATE(x, w, None, torch.tensor(0.2, dtype=torch.float64), "signed_cotangent_test", [2, 2], [0, 0],
                     [1, 1], 1, 1.0, None, 0, output_padding=[0, 0])
    geom = RefTransposedGeometry(x, w_old.shape, stride=(2, 2), padding=(0, 0), dilation=(1, 1), output_padding=(0, 0))
    expected = filter_major(w_old, 1) + 0.2 * geom.correlate(geom.flat(torch.sign(y)))
    assert_close(filter_major(w, 1), expected)

    class Nothing(LocalRule):
        name: ClassVar[str] = "nothing_test"

    with pytest.raises(TypeError, match="cotangent"):
        register_rule(Nothing)
