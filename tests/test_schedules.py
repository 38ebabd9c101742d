"""Tests of localsgd_fx.schedules: formulas, constraints, Algorithm 1, state and shorthands."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localsgd_fx.schedules import (
    BUDGET_DEFAULT_BUDGET,
    BUDGET_DEFAULT_MAX_SHARE,
    BUDGET_DEFAULT_START,
    DYNAMIC_DEFAULT_ALPHA,
    DYNAMIC_DEFAULT_SHIFT,
    GRADNORM_DEFAULT_THRESHOLD,
    PLASTICITY_DEFAULT_BETA,
    PLASTICITY_DEFAULT_PATIENCE,
    PLASTICITY_DEFAULT_PROBE_SIZE,
    PLASTICITY_DEFAULT_THRESHOLD,
    SCHEDULE_NAMES,
    SIGNAL_DEFAULT_SHIFT,
    SIGNAL_DEFAULT_WARMUP_EPOCHS,
    Budget,
    Dynamic,
    EpochStats,
    GradNorm,
    Manual,
    PlainSGD,
    Plasticity,
    PolicySchedule,
    Schedule,
    Static,
    make_schedule,
    plan_budget,
)


def stats(epoch, transition=0, n=10, max_local=None, norms=None):
    max_local = n - 1 if max_local is None else max_local
    if norms is None:
        norms = {i: 1.0 for i in range(transition, n)}
    return EpochStats(epoch, transition, n, max_local, dict(norms))


def run(schedule, n, max_local, epochs, norms_seq=None):
    """Feed the selections back like the wrapper does; return t after each epoch."""
    t, out = 0, []
    for i, e in enumerate(epochs):
        norms = norms_seq[i] if norms_seq is not None else {j: 1.0 for j in range(n)}
        norms = {j: v for j, v in norms.items() if j >= t}
        t = schedule.select(EpochStats(e, t, n, max_local, norms))
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Static formulas at hand-computed points
# ---------------------------------------------------------------------------------------------
def test_static_linear_int_c1():
    # N=10, c1=6, c2=2, E_max=12: t = floor(6 * (E-2)/10)
    s = Static("linear", c1=6, c2=2, total_epochs=12)
    s.bind(10, 9)
    got = [s.propose(stats(e)) for e in range(0, 15)]
    #        E: 0  1  2  3  4  5  6  7  8  9 10 11 12 13 14
    assert got == [0, 0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 6]


def test_static_quadratic_fraction_c1():
    # N=10, c1=0.5 -> 5 layers, c2=0, E_max=10: t = floor(5 * (E/10)^2)
    s = Static("quadratic", c1=0.5, c2=0, total_epochs=10)
    s.bind(10, 9)
    assert s.c1_layers == 5
    got = [s.propose(stats(e)) for e in range(0, 11)]
    # 5*u^2: 0, .05, .2, .45, .8, 1.25, 1.8, 2.45, 3.2, 4.05, 5
    assert got == [0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5]
    assert s.log_stats()["target"] == 5.0


def test_static_quadratic_c2_positive_and_fraction_c2():
    # c2 = 0.2 of 20 epochs = epoch 4; c1 = 8; u = (E-4)/16; t = floor(8 u^2)
    s = Static("quadratic", c1=8, c2=0.2, total_epochs=20)
    s.bind(10, 9)
    assert s.c2_epochs == 4
    # E=12: u=.5 -> 2 ; E=16: u=.75 -> 4.5 -> 4 ; E=18: u=.875 -> 6.125 -> 6; E=20 -> 8
    assert [s.propose(stats(e)) for e in (4, 8, 12, 16, 18, 20)] == [0, 0, 2, 4, 6, 8]
    assert s.propose(stats(8)) == 0  # 8 * (4/16)^2 = 0.5


def test_static_exponential():
    # c1=10 of N=12, c2=0, E_max=4, k=4: f(u) = (e^{4u}-1)/(e^4-1)
    s = Static("exponential", c1=10, c2=0, total_epochs=4, k=4.0)
    s.bind(12, 11)
    expected = [math.floor(10 * (math.exp(4 * e / 4) - 1) / (math.exp(4) - 1)) for e in range(5)]
    # f: 0, 0.0319, 0.1185, 0.3536, 1  ->  0, 0, 1, 3, 10
    assert expected == [0, 0, 1, 3, 10]
    assert [s.propose(stats(e, n=12)) for e in range(5)] == expected


def test_static_c1_capped_at_max_local():
    s = Static("linear", c1=1.0, c2=0, total_epochs=4)
    s.bind(8, 5)
    assert s.c1_layers == 5
    assert run(s, 8, 5, range(1, 7)) == [1, 2, 3, 5, 5, 5]  # floor(5 u): 1.25, 2.5, 3.75, 5


def test_static_int_c1_above_max_local_is_refused():
    s = Static("linear", c1=9, c2=0, total_epochs=4)
    with pytest.raises(ValueError, match=r"c1=9 layers is more than may turn local: max_local=5 of this model's 8"):
        s.bind(8, 5)
    assert not s.bound
    s.bind(10, 9)                       # the same schedule fits a larger model
    assert s.c1_layers == 9


def test_static_total_epochs_from_bind_and_constructor_wins():
    s = Static("linear", c1=4, c2=0)
    s.bind(5, 4, total_epochs=4)
    assert s.propose(stats(2, n=5)) == 2
    s2 = Static("linear", c1=4, c2=0, total_epochs=8)
    s2.bind(5, 4, total_epochs=4)
    assert s2.total_epochs == 8 and s2.propose(stats(2, n=5)) == 1


# ---------------------------------------------------------------------------------------------
# Invalid arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Static("linear", c1=2, c2=10, total_epochs=10), r"c2 must be below total_epochs"),
        (lambda: Static("linear", c1=2, c2=12, total_epochs=10), r"c2 .*\[0, total_epochs=10\)"),
        (lambda: Static("linear", c1=1.5, total_epochs=10), r"c1 must be a float in \(0, 1\]"),
        (lambda: Static("linear", c1=0, total_epochs=10), r"c1 must be an int >= 1"),
        (lambda: Static("linear", c1=-3, total_epochs=10), r"c1 must be an int >= 1"),
        (lambda: Static("linear", c1=0.0, total_epochs=10), r"c1 must be a float in \(0, 1\]"),
        (lambda: Static("linear", c2=-1, total_epochs=10), r"c2 must be an int >= 0"),
        (lambda: Static("linear", c2=1.5, total_epochs=10), r"c2 must be a float in \[0, 1\)"),
        (lambda: Static("cubic", total_epochs=10), r"kind must be one of .*'quadratic'"),
        (lambda: Static("linear", total_epochs=0), r"total_epochs must be an int >= 1"),
        (lambda: Static("exponential", k=0.0, total_epochs=5), r"k must be a float in \(0, inf\)"),
        (lambda: Dynamic(alpha=0.0), r"alpha must be a float in \(0, 1\)"),
        (lambda: Dynamic(alpha=1.0), r"alpha must be a float in \(0, 1\)"),
        (lambda: Dynamic(alpha=-0.2), r"alpha must be a float in \(0, 1\)"),
        (lambda: Dynamic(shift=-1), r"shift must be an int >= 1"),
        (lambda: Dynamic(shift=0), r"shift must be an int >= 1"),
        (lambda: Dynamic(shift=-0.1), r"shift must be a float in \(0, 1\]"),
        (lambda: Dynamic(shift=1.5), r"shift must be a float in \(0, 1\]"),
        (lambda: Dynamic(beta=1.0), r"beta must be a float in \[0, 1\)"),
        (lambda: Dynamic(warmup_epochs=-1), r"warmup_epochs must be an int >= 0"),
        (lambda: make_schedule("cosine"), r"unknown schedule 'cosine'; valid shorthands .*dynamic"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_static_missing_total_epochs():
    s = Static("quadratic")
    with pytest.raises(ValueError, match="pass total_epochs"):
        s.bind(10, 9)
    with pytest.raises(ValueError, match="pass total_epochs"):
        Static("linear").select(stats(1))


def test_failed_bind_leaves_schedule_unbound():
    s = Static("linear", c1=2, c2=0)
    with pytest.raises(ValueError, match="pass total_epochs"):
        s.select(stats(1))
    assert not s.bound
    s.bind(10, 9, total_epochs=4)
    assert s.select(stats(2)) == 1


def test_static_fraction_c2_checked_at_bind():
    s = Static("linear", c2=5)
    with pytest.raises(ValueError, match="c2 must be below total_epochs"):
        s.bind(10, 9, total_epochs=5)


def test_bind_validates_model():
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        PlainSGD().bind(0, 0)
    with pytest.raises(ValueError, match=r"max_local must be an int in \[0, num_layers=4\]"):
        PlainSGD().bind(4, 5)


def test_dynamic_rejects_bad_norms_without_touching_history():
    s = Dynamic(shift=1)
    s.select(stats(1, n=3))
    before = s.state_dict()
    with pytest.raises(ValueError, match="update norm of layer 1 at epoch 2"):
        s.select(stats(2, n=3, norms={0: 1.0, 1: float("nan"), 2: 1.0}))
    with pytest.raises(ValueError, match="transition layer 0"):
        s.select(stats(2, n=3, norms={1: 1.0, 2: 1.0}))
    assert s.state_dict() == before


# ---------------------------------------------------------------------------------------------
# Dynamic (Algorithm 1)
# ---------------------------------------------------------------------------------------------
def test_dynamic_scripted_sequence():
    alpha, beta = 0.5, 0.9
    s = Dynamic(alpha=alpha, shift=1, beta=beta, warmup_epochs=1)
    n = 4
    # Epoch 1: W̄0 = 10 (first δ). No move (warm-up; and δ = W̄ anyway).
    assert s.select(stats(1, 0, n, norms={0: 10.0, 1: 8.0, 2: 6.0, 3: 4.0})) == 0
    assert s.running_avg == {0: 10.0, 1: 8.0, 2: 6.0, 3: 4.0}
    # Epoch 2: δ0 = 5 -> W̄0 = 0.9*10 + 0.1*5 = 9.5, threshold 4.75; 5 >= 4.75 -> keep.
    assert s.select(stats(2, 0, n, norms={0: 5.0, 1: 2.0, 2: 6.0, 3: 4.0})) == 0
    assert s.running_avg[0] == pytest.approx(9.5)
    assert s.log_stats() == pytest.approx(
        {"delta": 5.0, "running_avg": 9.5, "threshold": 4.75, "moved": 0.0})
    # Layer 1's history was kept although it is not the transition layer: 0.9*8 + 0.1*2 = 7.4.
    assert s.running_avg[1] == pytest.approx(7.4)
    # Epoch 3: δ0 = 4 -> W̄0 = 0.9*9.5 + 0.4 = 8.95, threshold 4.475; 4 < 4.475 -> move to 1.
    assert s.select(stats(3, 0, n, norms={0: 4.0, 1: 3.0, 2: 6.0, 3: 4.0})) == 1
    assert s.log_stats()["threshold"] == pytest.approx(4.475)
    assert s.log_stats()["moved"] == 1.0
    # The new transition layer already has a 3-epoch history: 0.9*7.4 + 0.1*3 = 6.96.
    assert s.running_avg[1] == pytest.approx(6.96)
    # Epoch 4 (t=1): layer 0 is LOCAL and drops out (its stale norm is ignored).
    # δ1 = 3.6 -> W̄1 = 0.9*6.96 + 0.36 = 6.624, threshold 3.312; 3.6 >= 3.312 -> keep.
    assert s.select(stats(4, 1, n, norms={0: 99.0, 1: 3.6, 2: 6.0, 3: 4.0})) == 1
    assert s.running_avg[0] == pytest.approx(8.95)
    assert s.running_avg[1] == pytest.approx(6.624)
    # Epoch 5: δ1 = 3.2 -> W̄1 = 0.9*6.624 + 0.32 = 6.2816, threshold 3.1408; 3.2 >= -> keep.
    assert s.select(stats(5, 1, n, norms={1: 3.2, 2: 6.0, 3: 4.0})) == 1
    # Epoch 6: δ1 = 3.0 -> W̄1 = 0.9*6.2816 + 0.3 = 5.95344, threshold 2.97672; keep.
    assert s.select(stats(6, 1, n, norms={1: 3.0, 2: 6.0, 3: 4.0})) == 1
    # Epoch 7: δ1 = 1.0 -> W̄1 = 0.9*5.95344 + 0.1 = 5.458096, threshold 2.729048; move to 2.
    assert s.select(stats(7, 1, n, norms={1: 1.0, 2: 6.0, 3: 4.0})) == 2
    assert s.running_avg[1] == pytest.approx(5.458096)


def test_dynamic_warmup_blocks_moves_but_records():
    s = Dynamic(alpha=0.5, shift=1, beta=0.5, warmup_epochs=2)
    assert s.select(stats(1, 0, 4, norms={0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})) == 0
    # Epoch 2 would move (0.01 < 0.5 * 0.505) but is inside the warm-up.
    assert s.select(stats(2, 0, 4, norms={0: 0.01, 1: 1.0, 2: 1.0, 3: 1.0})) == 0
    assert s.running_avg[0] == pytest.approx(0.505)
    # Epoch 3: W̄0 = 0.5*0.505 + 0.005 = 0.2575, threshold 0.12875 > 0.01 -> move.
    assert s.select(stats(3, 0, 4, norms={0: 0.01, 1: 1.0, 2: 1.0, 3: 1.0})) == 1


def test_dynamic_exact_tie_keeps_t():
    """``δ < α·W̄`` is strict, as in the paper: δ exactly at the threshold keeps t."""
    s = Dynamic(alpha=0.5, shift=1, beta=0.5, warmup_epochs=0)
    assert s.select(stats(1, 0, 4, norms={0: 3.0, 1: 1.0, 2: 1.0, 3: 1.0})) == 0      # W̄0 = 3
    # δ0 = 1 -> W̄0 = 0.5*3 + 0.5*1 = 2, threshold 0.5*2 = 1 = δ0 exactly (all exact in binary)
    assert s.select(stats(2, 0, 4, norms={0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})) == 0
    assert s.log_stats() == {"delta": 1.0, "running_avg": 2.0, "threshold": 1.0, "moved": 0.0}
    # δ0 = 0.5 -> W̄0 = 1.25, threshold 0.625 > 0.5: below the threshold moves
    assert s.select(stats(3, 0, 4, norms={0: 0.5, 1: 1.0, 2: 1.0, 3: 1.0})) == 1


def test_dynamic_per_lr_asks_whether_the_layer_settled_not_the_learning_rate():
    """δ that halves with the learning rate is a layer still learning at the same pace: per_lr keeps t
    where the plain test moves; δ that falls while the rate holds moves under both."""
    lr_halving = [(1, 1.0, 0.1), (2, 0.5, 0.05)]      # (epoch, δ0, mean lr)
    plain = Dynamic(alpha=0.7, shift=1, beta=0.5, warmup_epochs=0)
    per_lr = Dynamic(alpha=0.7, shift=1, beta=0.5, warmup_epochs=0, per_lr=True)
    for schedule, want in ((plain, [0, 1]), (per_lr, [0, 0])):       # plain: 0.5 < 0.7 * 0.75
        assert [schedule.select(EpochStats(e, 0, 4, 3, {0: d, 1: 1.0, 2: 1.0, 3: 1.0}, mean_lr=lr))
                for e, d, lr in lr_halving] == want
    assert per_lr.running_avg[0] == pytest.approx(10.0) and per_lr.log_stats()["delta"] == pytest.approx(10.0)
    settling = Dynamic(alpha=0.7, shift=1, beta=0.5, warmup_epochs=0, per_lr=True)
    assert [settling.select(EpochStats(e, 0, 4, 3, {0: d, 1: 1.0, 2: 1.0, 3: 1.0}, mean_lr=0.1))
            for e, d in [(1, 1.0), (2, 0.3)]] == [0, 1]           # 3 < 0.7 * 6.5: settled at an unchanged rate
    twin = Dynamic()
    twin.load_state_dict(json.loads(json.dumps(settling.state_dict())))
    assert twin.per_lr and "per_lr=True" in repr(twin)
    with pytest.raises(ValueError, match=r"Dynamic\(per_lr=True\) needs the epoch's mean SGD learning rate"):
        Dynamic(per_lr=True).select(stats(1, 0, 4, norms={0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}))
    with pytest.raises(ValueError, match="per_lr must be True or False"):
        Dynamic(per_lr=1)


def test_dynamic_zero_update_moves_even_with_a_zero_average():
    """A layer whose SGD updates are all zero (δ = W̄ = 0, e.g. it gets no gradient) has nothing to
    learn by SGD: it moves instead of holding t for good (0 < α·0 is false)."""
    s = Dynamic(alpha=0.3, shift=1, warmup_epochs=1)
    dead_two = {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}
    assert run(s, 4, 3, [1, 2, 3, 4, 5], [dead_two] * 5) == [0, 1, 2, 2, 2]
    assert s.running_avg[0] == s.running_avg[1] == 0.0


@pytest.mark.parametrize(
    "shift, n, expected",
    [(0.1, 5, 1), (0.1, 9, 1), (0.1, 10, 1), (0.1, 25, 2), (0.15, 20, 3), (1.0, 7, 7), (3, 50, 3)],
)
def test_dynamic_shift_resolution(shift, n, expected):
    s = Dynamic(shift=shift)
    s.bind(n, n - 1)
    assert s.shift_layers == expected


def test_dynamic_fractional_shift_moves_and_clips():
    # shift 0.25 of 8 layers = 2; δ collapsing every epoch forces a move each time after warm-up.
    s = Dynamic(alpha=0.5, shift=0.25, beta=0.5)
    norms = [{j: 1.0 / 10 ** e for j in range(8)} for e in range(6)]
    assert run(s, 8, 7, range(1, 7), norms) == [0, 2, 4, 6, 7, 7]


def test_dynamic_defaults_visible():
    s = make_schedule("dynamic")
    assert isinstance(s, Dynamic)
    assert (s.alpha, s.shift) == (DYNAMIC_DEFAULT_ALPHA, DYNAMIC_DEFAULT_SHIFT) == (0.3, 0.1)
    assert s.beta == 0.9


# ---------------------------------------------------------------------------------------------
# Constraints, for every selector (hypothesis)
# ---------------------------------------------------------------------------------------------
@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 24))
    max_local = draw(st.integers(0, n))
    total = draw(st.integers(1, 40))
    length = draw(st.integers(1, 12))
    epochs = sorted(draw(st.lists(st.integers(0, total + 5), min_size=length, max_size=length)))
    norm = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)
    norms_seq = [
        {j: draw(norm) for j in range(n)} for _ in range(length)
    ]
    return n, max_local, total, epochs, norms_seq


static_args = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["linear", "quadratic", "exponential"]),
        "c1": st.one_of(st.integers(1, 30), st.floats(0.01, 1.0)),
        "c2": st.one_of(st.floats(0.0, 0.99), st.integers(0, 100)),
        "k": st.floats(0.1, 20.0),
    }
)
dynamic_args = st.fixed_dictionaries(
    {
        "alpha": st.floats(0.01, 0.99),
        "shift": st.one_of(st.integers(1, 5), st.floats(0.01, 1.0)),
        "beta": st.floats(0.0, 0.99),
        "warmup_epochs": st.integers(0, 3),
    }
)


def check_constraints(ts, max_local):
    prev = 0  # the first select happens at transition 0
    for t in ts:
        assert isinstance(t, int)
        assert prev <= t  # monotone
        assert t <= max(max_local, 0)  # never past max_local
        prev = t


@settings(max_examples=60, deadline=None, derandomize=True)
@given(scenarios(), static_args)
def test_static_constraints(scenario, args):
    n, max_local, total, epochs, norms_seq = scenario
    if isinstance(args["c2"], int):
        args["c2"] = args["c2"] % total  # keep it valid: an epoch below total_epochs
    if isinstance(args["c1"], int):
        args["c1"] = min(args["c1"], max_local) or 1.0  # keep it valid: layers that may turn local
    s = Static(args.pop("kind"), total_epochs=total, **args)
    check_constraints(run(s, n, max_local, epochs, norms_seq), max_local)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(scenarios(), dynamic_args)
def test_dynamic_constraints(scenario, args):
    n, max_local, total, epochs, norms_seq = scenario
    s = Dynamic(**args)
    check_constraints(run(s, n, max_local, epochs, norms_seq), max_local)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(scenarios(), st.lists(st.integers(-50, 50), min_size=12, max_size=12))
def test_policy_and_simple_constraints(scenario, wishes):
    n, max_local, total, epochs, norms_seq = scenario
    calls = iter(wishes)
    for s in (PolicySchedule(lambda epoch, stats: next(calls)), PlainSGD(), Manual()):
        check_constraints(run(s, n, max_local, epochs, norms_seq), max_local)


# ---------------------------------------------------------------------------------------------
# State round-trip
# ---------------------------------------------------------------------------------------------
def scripted_norms(n, epochs):
    # Deterministic, decaying with a wobble, so Dynamic moves a few times.
    return [{j: (1.0 + 0.3 * ((e * 7 + j * 3) % 5)) / (1 + e) ** 1.5 for j in range(n)}
            for e in range(epochs)]


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Dynamic(alpha=0.45, shift=1, beta=0.7),
        lambda: Dynamic(),
        lambda: Static("quadratic", c1=0.8, c2=0.1, total_epochs=20),
        lambda: Static("exponential", c1=9, c2=3, total_epochs=20, k=3.0),
        lambda: Budget(budget=0.3, max_share=0.6, start=0.2),
        lambda: PlainSGD(),
        lambda: Manual(),
    ],
)
def test_state_dict_round_trip(factory):
    n, max_local, total = 12, 11, 20
    norms = scripted_norms(n, total)
    a = factory()
    a.bind(n, max_local, total)
    t = 0
    for e in range(1, 8):
        sgd_norms = {j: v for j, v in norms[e - 1].items() if j >= t}
        t = a.select(EpochStats(e, t, n, max_local, sgd_norms))
    state = json.loads(json.dumps(a.state_dict()))  # proves it is plain data
    b = factory()
    if isinstance(b, Static):  # a fresh instance with different arguments still resumes exactly
        b = Static("linear", c1=1, c2=0, total_epochs=3)
    elif isinstance(b, Dynamic):
        b = Dynamic(alpha=0.1, shift=5, beta=0.0)
    elif isinstance(b, Budget):
        b = Budget(budget=0.05, max_share=1.0, start=0.0)
    b.load_state_dict(state)  # no bind(): the state carries the bound values
    assert b.log_stats() == a.log_stats()
    ta = tb = t
    decisions_a, decisions_b = [], []
    for e in range(8, total + 1):
        sa = EpochStats(e, ta, n, max_local, {j: v for j, v in norms[e - 1].items() if j >= ta})
        sb = EpochStats(e, tb, n, max_local, {j: v for j, v in norms[e - 1].items() if j >= tb})
        ta, tb = a.select(sa), b.select(sb)
        decisions_a.append(ta)
        decisions_b.append(tb)
        assert a.log_stats() == b.log_stats()
    assert decisions_a == decisions_b
    assert json.loads(json.dumps(b.state_dict())) == json.loads(json.dumps(a.state_dict()))


def test_dynamic_round_trip_actually_moves():
    # Guard for the round-trip test: the scripted norms make Dynamic move more than once.
    s = Dynamic(alpha=0.45, shift=1, beta=0.7)
    ts = run(s, 12, 11, range(1, 21), scripted_norms(12, 20))
    assert len(set(ts)) > 2


def test_load_state_of_other_class_rejected():
    with pytest.raises(ValueError, match="cannot load a 'Dynamic' schedule state into a Static"):
        Static("linear", total_epochs=3).load_state_dict(Dynamic().state_dict())


# ---------------------------------------------------------------------------------------------
# PolicySchedule and make_schedule
# ---------------------------------------------------------------------------------------------
def test_policy_schedule():
    seen = []

    def policy(epoch, stats):
        seen.append((epoch, stats.transition))
        return epoch // 2

    s = PolicySchedule(policy)
    assert run(s, 6, 4, range(1, 12)) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert seen[:3] == [(1, 0), (2, 0), (3, 1)]
    assert s.state_dict() == {}
    s.load_state_dict({})


def test_policy_non_int_return():
    s = PolicySchedule(lambda epoch, stats: 1.0)
    with pytest.raises(TypeError, match=r"policy .* must return an int transition layer, got 1\.0"):
        s.select(stats(1))
    with pytest.raises(TypeError, match="must return an int"):
        PolicySchedule(lambda epoch, stats: True).select(stats(1))
    with pytest.raises(TypeError, match="callable"):
        PolicySchedule(3)


def test_manual_and_sgd():
    assert Manual().select(stats(4, transition=3)) == 3
    assert PlainSGD().select(stats(4, transition=0)) == 0
    assert PlainSGD().select(stats(4, transition=2)) == 2  # never decreases
    # Already past max_local (set by hand): kept, a layer never goes back to SGD.
    assert Manual().select(stats(4, transition=5, n=6, max_local=3)) == 5


@pytest.mark.parametrize(
    "name, cls, kind",
    [
        ("dynamic", Dynamic, None),
        ("budget", Budget, None),
        ("static", Static, "quadratic"),
        ("quadratic", Static, "quadratic"),
        ("linear", Static, "linear"),
        ("exponential", Static, "exponential"),
        ("sgd", PlainSGD, None),
        ("none", PlainSGD, None),
        ("manual", Manual, None),
        (" Linear ", Static, "linear"),
    ],
)
def test_make_schedule_shorthands(name, cls, kind):
    kwargs = {"total_epochs": 10} if cls is Static else {}
    s = make_schedule(name, **kwargs)
    assert type(s) is cls
    if kind is not None:
        assert s.kind == kind
        assert (s.c1, s.c2, s.k) == (0.75, 0.25, 4.0)


def test_make_schedule_other_specs():
    d = Dynamic()
    assert make_schedule(d) is d
    assert isinstance(make_schedule(None), PlainSGD)
    p = make_schedule(lambda epoch, stats: 0)
    assert isinstance(p, PolicySchedule)
    s = make_schedule(Static, kind="linear", total_epochs=5)
    assert isinstance(s, Static) and s.kind == "linear"
    assert make_schedule("dynamic", alpha=0.2, shift=2).alpha == 0.2
    assert set(SCHEDULE_NAMES) >= {"dynamic", "static", "sgd", "none", "manual"}
    with pytest.raises(ValueError, match="only for a shorthand string"):
        make_schedule(d, alpha=0.2)
    with pytest.raises(ValueError, match="takes no options"):
        make_schedule("sgd", alpha=0.2)
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        make_schedule(3)
    with pytest.raises(ValueError, match=r"alpha must be a float in \(0, 1\)"):
        make_schedule("dynamic", alpha=2.0)


def test_schedule_is_abstract():
    with pytest.raises(TypeError):
        Schedule()


# ---------------------------------------------------------------------------------------------
# Signal schedules: Plasticity and GradNorm
# ---------------------------------------------------------------------------------------------
def check(schedule, value, t=0, epoch=2, n=10, max_local=None, signal=None):
    """One decision of a signal schedule fed ``value`` for its signal."""
    max_local = n - 1 if max_local is None else max_local
    name = signal or schedule.signal
    return schedule.select(EpochStats(epoch, t, n, max_local, {}, signals={name: value}))


def test_plasticity_scripted_sequence():
    s = Plasticity(threshold=0.5, beta=0.5, shift=2, warmup_epochs=0, patience=1)
    # W̄: 1.0, 0.9, 0.55 (line 1 first); 0.8 < 0.45? no; 0.2 < 0.275? yes -> t + 2
    assert [check(s, c) for c in (None, 1.0, 0.8)] == [0, 0, 0]
    assert s.running_avg == pytest.approx(0.9) and s.log_stats()["settled"] == 0.0
    assert check(s, 0.2) == 2
    assert s.log_stats() == {"value": 0.2, "running_avg": pytest.approx(0.55),
                             "threshold": pytest.approx(0.275), "settled": 1.0, "moved": 1.0}
    # the new transition layer starts afresh: no history, so its first values cannot move it
    assert check(s, None, t=2) == 2 and s.layer == 2 and s.running_avg is None and s.log_stats() == {}
    assert check(s, 0.01, t=2) == 2 and s.running_avg == 0.01


def test_plasticity_unchanged_output_has_settled():
    s = Plasticity(threshold=0.5, shift=1, warmup_epochs=0, patience=2)
    assert [check(s, c) for c in (0.0, 0.0)] == [0, 1]        # W̄ = c = 0: no change at all is settled


def test_plasticity_patience_and_warmup():
    s = Plasticity(threshold=0.5, beta=0.5, shift=1, warmup_epochs=3, patience=2)
    values = (1.0, 0.1, 1.0, 0.1, 0.05, 0.02)
    epochs = (1, 1, 2, 2, 2, 3)
    # W̄ 1.0, 0.55, 0.775, 0.4375, 0.24375, 0.131875 -> settled: no, yes, no (the streak resets), yes,
    # yes (2 in a row, but only 2 < warmup 3 epochs are complete), yes -> moves at epoch 3
    assert [check(s, c, epoch=e) for c, e in zip(values, epochs)] == [0, 0, 0, 0, 0, 1]
    assert s.settled_checks == 3 and s.checks == 6


def test_gradnorm_scripted_sequence():
    s = GradNorm(threshold=0.1, patience=2, shift=1, warmup_epochs=0)
    # rates: -, 0.5, 0.05, 0.2 (streak broken), 0.0417, 0.04 -> move on the second settled check in a row
    values = (2.0, 1.0, 0.95, 1.14, 1.0925, 1.0488)
    assert [check(s, g) for g in values] == [0, 0, 0, 0, 0, 1]
    assert s.log_stats()["rate"] == pytest.approx(abs(1.0488 - 1.0925) / 1.0925)
    assert s.log_stats()["moved"] == 1.0
    # after the move the new layer needs two values before a rate exists
    assert check(s, 1.0, t=1) == 1 and s.previous == 1.0 and "rate" not in s.log_stats()


def test_gradnorm_zero_norms_and_missing_values():
    s = GradNorm(threshold=0.1, patience=1, shift=1, warmup_epochs=0)
    assert check(s, 0.0) == 0                   # first value: a reference only
    assert check(s, None) == 0 and s.checks == 1  # no steps since the last check: no value, nothing changes
    assert check(s, 0.0) == 1                   # was zero, stays zero: settled
    s = GradNorm(threshold=0.1, patience=1, shift=1, warmup_epochs=0)
    assert [check(s, g) for g in (0.0, 1.0)] == [0, 0] and s.log_stats()["rate"] == math.inf


def test_signal_schedules_stop_at_max_local_and_clip():
    s = Plasticity(threshold=0.9, beta=0.9, shift=5, warmup_epochs=0)
    assert [check(s, c, n=6, max_local=3) for c in (1.0, 0.1)] == [0, 3]       # 0 + 5 clipped to max_local
    assert check(s, 0.0, t=3, n=6, max_local=3) == 3 and s.layer == 0          # at max_local: not even recorded


def test_signal_schedules_count_steps_between_decisions():
    s = GradNorm(decide_every=3)
    assert [s.due() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert s.steps_since_decision == 1
    assert [Plasticity().due() for _ in range(3)] == [False] * 3            # no decide_every: epoch ends only
    assert Dynamic().decide_every is None and not Dynamic().due()


@pytest.mark.parametrize("make, match", [
    (lambda: Plasticity(threshold=1.0), r"threshold must be a float in \(0, 1\)"),
    (lambda: Plasticity(beta=1.0), r"beta must be a float in \[0, 1\)"),
    (lambda: Plasticity(probe_size=0), "probe_size must be an int >= 1"),
    (lambda: GradNorm(threshold=0.0), r"threshold must be a float in \(0, inf\)"),
    (lambda: GradNorm(patience=0), "patience must be an int >= 1"),
    (lambda: GradNorm(decide_every=0), "decide_every must be an int >= 1"),
    (lambda: GradNorm(decide_every=0.5), "decide_every must be an int >= 1"),
    (lambda: Plasticity(shift=0), "shift must be an int >= 1"),
    (lambda: GradNorm(warmup_epochs=-1), "warmup_epochs must be an int >= 0"),
])
def test_signal_schedule_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_signal_schedule_rejects_bad_values_without_touching_history():
    s = Plasticity(threshold=0.5, warmup_epochs=0)
    check(s, 1.0)
    before = s.state_dict()
    for bad in (float("nan"), -0.1, "0.3"):
        with pytest.raises(ValueError, match="signal 'plasticity' of layer 0"):
            check(s, bad)
    assert s.state_dict() == before


@pytest.mark.parametrize("factory", [
    lambda: Plasticity(threshold=0.6, beta=0.5, shift=1, warmup_epochs=1, patience=2, decide_every=4),
    lambda: GradNorm(threshold=0.15, shift=1, warmup_epochs=0, patience=2, decide_every=3),
])
def test_signal_schedule_state_round_trip(factory):
    n, max_local = 12, 11
    values = [1.0, 1.0, 0.1, 0.1, 0.1] * 12      # spells of change and of rest: both schedules move repeatedly
    a = factory()
    a.bind(n, max_local)
    t = 0
    for k in range(25):
        a.due()
        t = a.select(EpochStats(1 + k // 5, t, n, max_local, {}, signals={a.signal: values[k]}))
    state = json.loads(json.dumps(a.state_dict()))   # plain data
    b = type(a)(shift=7, patience=9)                  # other arguments: the state wins
    b.load_state_dict(state)
    ta = tb = t
    for k in range(25, 60):
        assert a.due() == b.due()
        ta = a.select(EpochStats(1 + k // 5, ta, n, max_local, {}, signals={a.signal: values[k]}))
        tb = b.select(EpochStats(1 + k // 5, tb, n, max_local, {}, signals={b.signal: values[k]}))
        assert ta == tb and a.log_stats() == b.log_stats()
    assert json.loads(json.dumps(b.state_dict())) == json.loads(json.dumps(a.state_dict()))
    assert 0 < t < ta          # it moved before and after the round trip


def test_make_schedule_signal_shorthands():
    p = make_schedule("plasticity", threshold=0.2, decide_every=10)
    g = make_schedule(" GradNorm ", patience=3)
    assert type(p) is Plasticity and (p.threshold, p.decide_every, p.signals) == (0.2, 10, ("plasticity",))
    assert type(g) is GradNorm and (g.patience, g.decide_every, g.signals) == (3, None, ("grad_norm",))
    assert (p.beta, p.patience, p.probe_size, p.shift, p.warmup_epochs) == (
        PLASTICITY_DEFAULT_BETA, PLASTICITY_DEFAULT_PATIENCE, PLASTICITY_DEFAULT_PROBE_SIZE, SIGNAL_DEFAULT_SHIFT,
        SIGNAL_DEFAULT_WARMUP_EPOCHS)
    assert g.threshold == GRADNORM_DEFAULT_THRESHOLD and Plasticity().threshold == PLASTICITY_DEFAULT_THRESHOLD
    assert {"plasticity", "gradnorm"} <= set(SCHEDULE_NAMES) and SCHEDULE_NAMES[0] == "dynamic"
    with pytest.raises(TypeError, match="alpha"):
        make_schedule("gradnorm", alpha=0.3)


# ---------------------------------------------------------------------------------------------
# State dicts written by the release before the dataclass schedules (captured by running that code)
# ---------------------------------------------------------------------------------------------
OLD_STATES = {
    # Dynamic() bound to 12 layers, after epochs 1..8 of scripted_norms: t = 4
    "dynamic": {
        "type": "Dynamic", "num_layers": 12, "max_local": 11, "total_epochs": 20, "alpha": 0.3, "shift": 0.1,
        "beta": 0.9, "per_lr": False, "warmup_epochs": 1, "shift_layers": 1,
        "running_avg": {"0": 0.43727269584056877, "1": 0.2754727693019153, "2": 0.41664437379967306,
                        "3": 0.28389646654722106, "4": 0.4349820144348042, "5": 0.3393347987429153,
                        "6": 0.23764505231337849, "7": 0.38090586234563173, "8": 0.28389646654722106,
                        "9": 0.4349820144348042, "10": 0.3393347987429153, "11": 0.23764505231337849},
        "last_delta": {"0": 0.06804138174397717, "1": 0.05399492471560388, "2": 0.044194173824159216,
                       "3": 0.037037037037037035, "4": 0.07037037037037036, "5": 0.04814814814814815,
                       "6": 0.08148148148148149, "7": 0.05925925925925926, "8": 0.037037037037037035,
                       "9": 0.07037037037037036, "10": 0.04814814814814815, "11": 0.08148148148148149},
        "last": {"delta": 0.037037037037037035, "running_avg": 0.28389646654722106,
                 "threshold": 0.08516893996416632, "moved": 1.0}},
    # Static("quadratic", total_epochs=20) after epochs 1..8: t = 0
    "static": {"type": "Static", "num_layers": 12, "max_local": 11, "total_epochs": 20, "kind": "quadratic",
               "c1": 0.75, "c2": 0.25, "k": 4.0, "c1_layers": 9, "c2_epochs": 5,
               "last": {"u": 0.2, "f": 0.04000000000000001, "target": 0.0}},
    # Plasticity(decide_every=4) after 25 checks of SIGNAL_VALUES: t = 3
    "plasticity": {"type": "Plasticity", "num_layers": 12, "max_local": 11, "total_epochs": None, "shift": 0.1,
                   "warmup_epochs": 1, "patience": 1, "decide_every": 4, "shift_layers": 1,
                   "steps_since_decision": 1, "layer": 3, "checks": 2, "settled_checks": 0,
                   "last": {"running_avg": 0.1, "threshold": 0.03, "value": 0.1, "settled": 0.0, "moved": 0.0},
                   "threshold": 0.3, "beta": 0.9, "probe_size": 64, "running_avg": 0.1},
    # GradNorm(shift=1, decide_every=3) after 25 checks: t = 5
    "gradnorm": {"type": "GradNorm", "num_layers": 12, "max_local": 11, "total_epochs": None, "shift": 1,
                 "warmup_epochs": 1, "patience": 2, "decide_every": 3, "shift_layers": 1, "steps_since_decision": 1,
                 "layer": 4, "checks": 5, "settled_checks": 2,
                 "last": {"value": 0.1, "settled": 1.0, "moved": 1.0, "rate": 0.0}, "threshold": 0.1,
                 "previous": 0.1},
}
SIGNAL_VALUES = [1.0, 1.0, 0.1, 0.1, 0.1] * 12
# the old release's decisions after loading: (t at the save, then t after each epoch 9..20 / check 25..59,
# and for the signal schedules which calls of due() before each check were due)
OLD_NEXT = {
    "dynamic": (4, [5, 6, 7, 8, 9, 10, 11, 11, 11, 11, 11, 11], None),
    "static": (0, [0, 1, 1, 1, 2, 3, 4, 4, 5, 6, 7, 9], None),
    "plasticity": (3, [3] * 7 + [4] * 10 + [5] * 10 + [6] * 8, "00100010001000100010001000100010001"),
    "gradnorm": (5, [5] * 4 + [6] * 5 + [7] * 5 + [8] * 5 + [9] * 5 + [10] * 5 + [11] * 6,
                 "01001001001001001001001001001001001"),
}


@pytest.mark.parametrize("name", sorted(OLD_STATES))
def test_state_dict_of_the_previous_release_loads_and_decides_the_same(name):
    cls = {"dynamic": Dynamic, "static": Static, "plasticity": Plasticity, "gradnorm": GradNorm}[name]
    s = cls("linear", total_epochs=3) if cls is Static else cls(shift=7)     # other arguments: the state wins
    s.load_state_dict(json.loads(json.dumps(OLD_STATES[name])))
    assert s.state_dict() == OLD_STATES[name]              # the same keys and values are written back
    t, expected, due = OLD_NEXT[name]
    n, max_local, decisions, dues = 12, 11, [], []
    if due is None:
        norms = scripted_norms(n, 21)
        for e in range(9, 21):
            t = s.select(EpochStats(e, t, n, max_local, {j: v for j, v in norms[e].items() if j >= t}))
            decisions.append(t)
    else:
        for k in range(25, 60):
            dues.append("1" if s.due() else "0")
            t = s.select(EpochStats(1 + k // 5, t, n, max_local, {}, signals={s.signal: SIGNAL_VALUES[k]}))
            decisions.append(t)
        assert "".join(dues) == due
    assert decisions == expected


def test_state_dict_of_an_older_release_without_per_lr_loads():
    state = {k: v for k, v in OLD_STATES["dynamic"].items() if k not in ("per_lr", "last")}
    s = Dynamic(per_lr=True)
    s.load_state_dict(state)
    assert not s.per_lr and s.log_stats() == {} and s.running_avg[3] == 0.28389646654722106


@pytest.mark.parametrize("change, match", [
    ({"alpha": 1.5}, r"Dynamic state: alpha must be a float in \(0, 1\)"),
    ({"shift_layers": "1"}, r"Dynamic state key 'shift_layers' must be int"),
    ({"running_avg": {"x": 1.0}}, r"Dynamic state key 'running_avg' must map layer indices"),
    ({"running_avg": {"0": "big"}}, r"Dynamic state key 'running_avg'\['0'\] must be float"),
    ({"surprise": 1}, r"Dynamic state has unknown keys \['surprise'\]"),
    ({"type": "Static"}, r"cannot load a 'Static' schedule state into a Dynamic"),
])
def test_load_state_dict_names_the_bad_key_and_leaves_the_schedule_unchanged(change, match):
    s = Dynamic()
    before = s.state_dict()
    with pytest.raises(ValueError, match=match):
        s.load_state_dict({**OLD_STATES["dynamic"], **change})
    with pytest.raises(ValueError, match="Dynamic state lacks key 'running_avg'"):
        s.load_state_dict({k: v for k, v in OLD_STATES["dynamic"].items() if k != "running_avg"})
    assert s.state_dict() == before


def test_user_schedules_get_state_stats_and_repr_from_the_base():
    from dataclasses import dataclass

    from localsgd_fx.schedules import state_field

    @dataclass(eq=False, repr=False, kw_only=True)
    class EveryK(Schedule):             # the way docs/DESIGN.md §4.5 shows
        k: int = 3
        moves: int = state_field(0)
        last: dict = state_field(factory=dict, stats=True)

        def propose(self, stats):
            move = stats.epoch % self.k == 0
            self.moves += move
            self.last = {"moved": float(move)}
            return stats.transition + move

    class OldStyle(Schedule):           # the way before dataclasses: extends state_dict / load_state_dict itself
        def __init__(self):
            super().__init__()
            self.count = 0

        def propose(self, stats):
            self.count += 1
            return 0

        def state_dict(self):
            return {**super().state_dict(), "count": self.count}

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.count = state["count"]

    s = EveryK(k=2)
    assert run(s, 6, 5, range(1, 6)) == [0, 1, 1, 2, 2] and repr(s) == "EveryK(k=2)" and s.log_stats() == {"moved": 0.0}
    b = EveryK()
    b.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (b.k, b.moves, b.log_stats()) == (2, 2, {"moved": 0.0}) and b.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="EveryK state key 'moves' must be int"):
        b.load_state_dict({**s.state_dict(), "moves": 1.5})
    old = OldStyle()
    run(old, 6, 5, range(1, 4))
    again = OldStyle()
    again.load_state_dict(json.loads(json.dumps(old.state_dict())))
    assert again.count == 3 and again.num_layers == 6 and repr(again) == "OldStyle()"


# ---------------------------------------------------------------------------------------------
# Budget: a planned share of the layer-FLOP-epochs, as late as the cap and the start allow
# ---------------------------------------------------------------------------------------------
def local_share(plan, shares):
    cum = [sum(shares[:t]) for t in range(len(shares) + 1)]
    return sum(cum[t] for t in plan) / len(plan)


def test_budget_plan_hand_computed():
    # 4 equal layers, 8 epochs, budget 0.3 -> 2.4 epoch-shares; the cap 0.5 is t=2; from epoch 2 on.
    # Epochs 7..4 hold t=2 (2.0), epoch 3 needs 0.4 -> t=2 (the smallest t with share >= 0.4).
    assert plan_budget([0.25] * 4, 3, 8, 0.3, 0.5, 0.25) == [0, 0, 0, 2, 2, 2, 2, 2]
    # unequal shares: the cap counts FLOPs, not layers (layer 0 alone is 0.6 > 0.5: nothing can turn local)
    assert plan_budget([0.6, 0.2, 0.2], 2, 4, 0.3, 0.5, 0.0) == [0, 0, 0, 0]
    assert plan_budget([0.1, 0.1, 0.3, 0.5], 3, 4, 0.25, 0.5, 0.0) == [0, 0, 3, 3]
    assert plan_budget([0.1, 0.1, 0.3, 0.5], 3, 4, 0.3, 0.5, 0.0) == [0, 2, 3, 3]   # 0.2 left: t=2
    # a budget the cap and the start cannot hold is spent as far as they allow
    assert plan_budget([0.25] * 4, 3, 4, 0.9, 0.5, 0.5) == [0, 0, 2, 2]
    # max_local bounds the cap as well
    assert plan_budget([0.25] * 4, 1, 4, 0.5, 1.0, 0.0) == [0, 1, 1, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=40), st.integers(1, 30), st.floats(0.01, 0.99),
       st.floats(0.05, 1.0), st.floats(0.0, 0.95), st.data())
def test_budget_plan_properties(weights, epochs, budget, max_share, start, data):
    shares = [w / sum(weights) for w in weights]
    max_local = data.draw(st.integers(0, len(shares)))
    plan = plan_budget(shares, max_local, epochs, budget, max_share, start)
    cum = [sum(shares[:t]) for t in range(len(shares) + 1)]
    assert len(plan) == epochs and plan[0] == 0
    assert plan == sorted(plan)                                    # t never decreases
    assert all(t <= max_local and cum[t] <= max_share + 1e-9 for t in plan)
    first = max(1, math.ceil(start * epochs - 1e-9))
    assert all(t == 0 for t in plan[:first])                       # nothing local before the start
    spent = sum(cum[t] for t in plan)
    if spent + 1e-9 < budget * epochs:                             # short of the budget only when nothing is left
        t_cap = max(t for t in range(max_local + 1) if cum[t] <= max_share + 1e-9)
        assert all(t == t_cap for t in plan[first:])
    else:                                                          # and not more than one layer's worth over it
        begin = next(i for i, t in enumerate(plan) if t > 0)
        assert spent - cum[plan[begin]] + cum[plan[begin] - 1] < budget * epochs + 1e-9


def test_budget_is_the_same_share_of_a_deeper_net_at_the_same_point_of_the_run():
    # equal layer shares of 20 and 56 layers: the local FLOP share per epoch differs by less than one layer
    for epochs in (8, 20):
        a = plan_budget([1 / 20] * 20, 19, epochs, 0.25, 0.5, 0.25)
        b = plan_budget([1 / 56] * 56, 55, epochs, 0.25, 0.5, 0.25)
        for ta, tb in zip(a, b):
            assert abs(ta / 20 - tb / 56) <= 1 / 20 + 1e-9
        assert [t > 0 for t in a] == [t > 0 for t in b]


def test_budget_schedule_follows_its_plan_and_reads_flop_shares():
    shares = [0.1, 0.1, 0.3, 0.5]
    s = Budget(budget=0.3, max_share=0.5, start=0.0, total_epochs=4)
    t, seen = 0, []
    for epoch in range(1, 6):      # a decision past the run's end keeps the last epoch's t
        t = s.select(EpochStats(epoch, t, 4, 3, {}, flop_shares=shares))
        seen.append(t)
    assert seen == [2, 3, 3, 3, 3] and s.plan == [0, 2, 3, 3]
    assert s.log_stats() == {"planned": pytest.approx((0.2 + 0.5 + 0.5) / 4)}
    # without FLOP shares every layer counts the same
    u = Budget(budget=0.25, max_share=0.5, start=0.0, total_epochs=4)
    u.select(EpochStats(1, 0, 4, 3, {}))
    assert u.plan == plan_budget([0.25] * 4, 3, 4, 0.25, 0.5, 0.0)


def test_budget_defaults_visible_and_invalid_arguments():
    s = make_schedule("budget", total_epochs=8)
    assert (s.budget, s.max_share, s.start) == (BUDGET_DEFAULT_BUDGET, BUDGET_DEFAULT_MAX_SHARE, BUDGET_DEFAULT_START)
    for kwargs, match in [({"budget": 0.0}, "budget must be a float in"), ({"budget": 1.0}, "budget"),
                          ({"max_share": 0.0}, "max_share must be a float in"), ({"start": 1.0}, "start must be")]:
        with pytest.raises(ValueError, match=match):
            Budget(**kwargs)
    with pytest.raises(ValueError, match="needs its length: pass total_epochs"):
        Budget().bind(4, 3)
    b = Budget(total_epochs=6)
    b.bind(4, 3, 10)                 # the constructor's run length wins
    assert b.total_epochs == 6
