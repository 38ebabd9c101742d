"""Weak supervision (docs/DESIGN.md §3): scripted loss sequences, causality, non-finite losses, state."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from helpers.hypothesis_profile import examples
from helpers.references import RefGeometry, ref_new_weight, reference_rates
from localsgd_fx import compile_localsgd
from localsgd_fx.supervision import WeakSupervision

pytestmark = pytest.mark.single_thread

ETA = 0.01


def rates(mode: str, losses, base=ETA) -> list[float]:
    ws = WeakSupervision(mode, base_lr=base)
    out = [float(ws.lr)]
    for loss in losses:
        ws.observe(torch.tensor(loss))
        out.append(float(ws.lr))
    return out


def assert_rates(got, want, ambiguous):
    for s, (g, w, a) in enumerate(zip(got, want, ambiguous)):
        if not a:
            assert g == pytest.approx(w, rel=1e-4, abs=1e-9), f"step {s}: {g} != {w}"


# ---------------------------------------------------------------------- hand-computed
def test_sign_sequence_by_hand():
    # ema: 2 | .9*2+.1*3 = 2.1 | .9*2.1+.1*1 = 1.99 | .9*1.99+.1*2 = 1.991 | (nan, inf ignored) | .9*1.991+.1*.5
    losses = [2.0, 3.0, 1.0, 2.0, float("nan"), float("inf"), 0.5]
    expected = [ETA, ETA, -ETA, ETA, -ETA, -ETA, -ETA, ETA]
    assert_close(torch.tensor(rates("sign", losses)), torch.tensor(expected))


def test_sign_follows_the_average_not_the_last_loss():
    """Sequences where "the loss rose since the average" and "since the last loss" disagree."""
    # ema: 2 | 2.2 | 2.28 | 2.302: 3 and 2.5 fall against the last loss but rise above the average
    assert_close(torch.tensor(rates("sign", [2.0, 4.0, 3.0, 2.5, 2.1])),
                 torch.tensor([ETA, ETA, -ETA, -ETA, -ETA, ETA]))
    # ema: 4 | 3.7: 1.5 rises against the last loss (1) but stays below the average
    assert_close(torch.tensor(rates("sign", [4.0, 1.0, 1.5])), torch.tensor([ETA, ETA, ETA, ETA]))


def test_scale_sequence_by_hand():
    # ema: 2 | 2.2 | 2.08 | 2.172 ; η = η0·min(1, ema/L)
    losses = [2.0, 4.0, 1.0, 3.0, float("-inf")]
    expected = [ETA, ETA, ETA * 2.2 / 4.0, ETA, ETA * 2.172 / 3.0, ETA * 2.172 / 3.0]
    assert_close(torch.tensor(rates("scale", losses)), torch.tensor(expected), rtol=1e-6, atol=1e-9)


def test_off_sequence_is_constant():
    assert rates("off", [5.0, 1.0, 9.0, float("nan"), 0.0]) == [pytest.approx(ETA)] * 6


def test_equal_loss_is_not_a_rise():
    assert rates("sign", [1.5, 1.5, 1.5]) == [pytest.approx(ETA)] * 4


# ------------------------------------------------------------------------- properties
LOSS = st.one_of(st.floats(0.01, 10.0), st.integers(1, 40).map(lambda k: k / 8),          # grid: exact ties
                 st.sampled_from([float("nan"), float("inf"), float("-inf")]))
LOSSES = st.lists(LOSS, max_size=30)


@examples(80)
@given(mode=st.sampled_from(["sign", "scale", "off"]), losses=LOSSES)
def test_rates_match_exact_reference(mode, losses):
    assert_rates(rates(mode, losses), *reference_rates(mode, losses, ETA))


@examples(30)
@given(mode=st.sampled_from(["sign", "scale"]), value=LOSS.filter(math.isfinite), steps=st.integers(2, 60))
def test_flat_loss_never_turns_anti_hebbian(mode, value, steps):
    """A constant loss is not a rise: L = L̄ exactly, so η stays +η0 (float rounding of the
    average must not flip the rule to anti-Hebbian)."""
    assert rates(mode, [value] * steps) == [pytest.approx(ETA, rel=1e-6)] * (steps + 1)


@examples(40)
@given(mode=st.sampled_from(["sign", "scale", "off"]), prefix=LOSSES, tail_a=LOSSES, tail_b=LOSSES)
def test_rate_of_step_s_depends_only_on_earlier_losses(mode, prefix, tail_a, tail_b):
    """η_s is a function of losses[:s]: two runs that share the first s losses agree up to step s."""
    a, b = rates(mode, prefix + tail_a), rates(mode, prefix + tail_b)
    assert a[:len(prefix) + 1] == b[:len(prefix) + 1]


@examples(30)
@given(mode=st.sampled_from(["sign", "scale", "off"]), before=LOSSES, junk=st.lists(
    st.sampled_from([float("nan"), float("inf"), float("-inf")]), min_size=1, max_size=4), after=LOSSES)
def test_non_finite_losses_are_ignored(mode, before, junk, after):
    assert rates(mode, before + junk + after)[-1] == rates(mode, before + after)[-1]
    ws = WeakSupervision(mode, base_lr=ETA)
    for loss in before:
        ws.observe(loss)
    state = {k: v.clone() for k, v in ws.state_dict().items()}
    for loss in junk:
        ws.observe(loss)
    for k, v in ws.state_dict().items():
        assert torch.equal(v, state[k]) or (torch.isnan(v).all() and torch.isnan(state[k]).all()), k


@examples(30)
@given(mode=st.sampled_from(["sign", "scale", "off"]), first=LOSSES, second=LOSSES)
def test_state_round_trips_through_state_dict(mode, first, second):
    ws = WeakSupervision(mode, base_lr=ETA)
    for loss in first:
        ws.observe(loss)
    fresh = WeakSupervision(mode, base_lr=0.5)
    fresh.load_state_dict(ws.state_dict())
    for loss in second:
        ws.observe(loss)
        fresh.observe(loss)
        assert float(ws.lr) == float(fresh.lr)
    assert float(fresh.base_lr) == pytest.approx(ETA)


# ------------------------------------------------------------ inside the compiled module
def test_local_update_of_step_s_uses_the_rate_from_losses_before_s():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    lm = compile_localsgd(model, rule="oja", schedule="manual", local_lr=0.05, weak_supervision="sign",
                          sample_fraction=1.0)
    lm.set_transition(1)
    graph = lm.graph_module
    losses = [2.0, 3.0, 1.0, float("nan"), 4.0, 0.5]
    expected, _ = reference_rates("sign", losses, base=0.05)
    for s in range(len(losses) + 1):
        x = torch.randn(5, 4, dtype=torch.float64)
        w_old = model[0].weight.detach().clone()
        out = lm(x)
        y = x @ w_old.t() + model[0].bias.detach()
        geom = RefGeometry(x, w_old.shape)
        assert_close(model[0].weight.detach(), ref_new_weight("oja", w_old, geom, y, expected[s]),
                     msg=f"step {s}: expected rate {expected[s]}")
        if s < len(losses):
            loss = out.square().mean() * 0 + losses[s]       # a loss tensor still attached to the graph
            loss.backward()
            lm.observe_loss(loss)
    assert lm.graph_module is graph                   # a changing rate never re-emits the graph


def test_compiled_module_state_dict_carries_supervision():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", weak_supervision="scale", local_lr=0.1,
                          sample_fraction=1.0)
    for loss in (1.0, 3.0):
        lm.observe_loss(torch.tensor(loss))
    state = lm.state_dict()
    assert {"supervision.lr", "supervision.loss_ema", "supervision.steps"} <= set(state)
    twin = compile_localsgd(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), rule="hebbian", schedule="manual",
                            weak_supervision="scale", local_lr=0.1, sample_fraction=1.0)
    twin.load_state_dict(state)
    assert float(twin.supervision.lr) == pytest.approx(0.1 * 1.2 / 3.0)
    lm.observe_loss(2.0)
    twin.observe_loss(2.0)
    assert float(twin.supervision.lr) == float(lm.supervision.lr)


def test_set_base_lr_keeps_sign_and_validation():
    ws = WeakSupervision("sign", base_lr=0.1)
    ws.observe(1.0)
    ws.observe(5.0)
    assert float(ws.lr) == pytest.approx(-0.1)
    ws.set_base_lr(0.2)
    assert float(ws.lr) == pytest.approx(-0.2) and float(ws.base_lr) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="weak_supervision"):
        WeakSupervision("sometimes")
    with pytest.raises(ValueError, match="beta"):
        WeakSupervision("sign", beta=1.0)
    with pytest.raises(ValueError, match="local_lr"):
        WeakSupervision("sign", base_lr=float("nan"))
    with pytest.raises(ValueError, match="local_lr"):
        WeakSupervision("sign", base_lr=-1.0)
    with pytest.raises(ValueError, match="weak_supervision"):
        compile_localsgd(nn.Linear(2, 2), weak_supervision="bogus")


@pytest.mark.parametrize("mode", ["sign", "scale", "off"])
def test_rate_factor_scales_every_mode_from_the_next_loss_on(mode):
    losses = [2.0, 3.0, 1.0, 1.5]
    plain = rates(mode, losses)
    ws = WeakSupervision(mode, base_lr=ETA)
    got = [float(ws.lr)]
    for i, loss in enumerate(losses):
        ws.set_rate_factor(0.25 if i >= 2 else 1.0)     # the schedule's factor drops before the third loss
        ws.observe(torch.tensor(loss))
        got.append(float(ws.lr))
    assert got[:3] == plain[:3]
    assert got[3:] == pytest.approx([0.25 * r for r in plain[3:]], rel=1e-6)
    assert "rate_factor" not in ws.state_dict()          # the trainer sets it again on resume
