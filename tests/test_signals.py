"""The boundary signals measured on the device (localsgd_fx.signals) and the wrapper's mid-epoch decisions.

Each signal is checked against an independent computation: the plasticity against the layer's output
recomputed with the plain model in eval mode, the gradient norm against the norms of ``.grad`` read
after each backward. Then: no host read in the step, an exact resume from ``state_dict`` in the middle
of a decision interval, and the errors a user can meet.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.steps import no_host_reads, small_net
from helpers.steps import one_step as step
from localsgd_fx import compile_localsgd
from localsgd_fx.schedules import GradNorm, Plasticity
from passes.errors import LocalSGDError


def batches(n: int, seed: int = 0, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def standardised(y: torch.Tensor) -> torch.Tensor:
    """Per channel: centred and unit norm over batch and positions (written out for a 4-d conv output)."""
    rows = y.permute(1, 0, 2, 3).reshape(y.shape[1], -1)
    rows = rows - rows.mean(1, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True)


def test_plasticity_is_the_change_of_the_standardised_probe_output():
    torch.manual_seed(0)
    net = small_net()
    lm = compile_localsgd(net, rule="hebbian", schedule=Plasticity(decide_every=2, warmup_epochs=99, probe_size=5),
                          compile="off", sample_fraction=1.0)
    lm.set_transition(1)        # layer 1 = net[3]: its input passes the local layer 0 (updating) and an eval-mode BN
    opt = torch.optim.SGD(lm.parameters(), lr=0.2)
    data = batches(6)
    probe = data[0][0][:5].clone()

    def layer_output():
        net.eval()
        with torch.no_grad():
            out = net[:4](probe)
        net.train()
        return standardised(out)

    refs, values = [], []
    for i, (x, y) in enumerate(data):
        step(lm, opt, x, y)
        running = [m.running_mean.clone() for m in (net[1], net[4])]
        lm.maybe_decide()
        if i % 2 == 1:
            refs.append(layer_output())
            values.append(lm.schedule.log_stats().get("value"))
            assert all(m.training for m in net.modules()) and lm.training          # train flags restored
            assert all(torch.equal(a, m.running_mean) for a, m in zip(running, (net[1], net[4])))   # eval: no BN update
    assert torch.equal(lm.signals.probe[0], probe)      # the first call's first probe_size images
    assert values[0] is None                            # the first check only sets the reference
    for k in (1, 2):
        expected = ((refs[k] - refs[k - 1]).norm() / refs[k - 1].norm()).item()
        assert values[k] == pytest.approx(expected, rel=1e-5) and values[k] > 0
    assert [h["step"] for h in lm.history] == [2, 4, 6] and lm.transition == 1


def test_plasticity_ignores_a_rescaled_weight():
    # a following BatchNorm undoes a per-channel rescaling, so the signal must not count it as change
    torch.manual_seed(0)
    net = small_net()
    lm = compile_localsgd(net, schedule=Plasticity(decide_every=1, warmup_epochs=99), compile="off")
    x = torch.randn(8, 1, 6, 6)
    lm.set_probe(x)
    lm.maybe_decide()
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([0.5, 2.0, 3.0, 0.1]).view(-1, 1, 1, 1))
        net[0].bias.mul_(torch.tensor([0.5, 2.0, 3.0, 0.1]))
    lm.maybe_decide()
    assert lm.schedule.log_stats()["value"] < 1e-5


def test_gradnorm_is_the_mean_gradient_norm_since_the_last_check():
    torch.manual_seed(0)
    net = small_net()
    lm = compile_localsgd(net, schedule=GradNorm(decide_every=3, warmup_epochs=99), compile="off")
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    norms, values = [], []
    for i, (x, y) in enumerate(batches(6)):
        step(lm, opt, x, y)
        norms.append(net[0].weight.grad.norm().item())
        lm.maybe_decide()
        if i % 3 == 2:
            values.append(lm.schedule.log_stats()["value"])
    g1, g2 = sum(norms[:3]) / 3, sum(norms[3:]) / 3
    assert values == [pytest.approx(g1, rel=1e-5), pytest.approx(g2, rel=1e-5)]
    assert lm.schedule.log_stats()["rate"] == pytest.approx(abs(g2 - g1) / g1, rel=1e-4)
    # the layer moves: the hook follows the new transition layer
    lm.set_transition(1)
    x, y = batches(1, seed=5)[0]
    step(lm, opt, x, y)
    assert lm.signals.grad_layer == 1
    assert lm.signals.grad_sum.item() == pytest.approx(net[3].weight.grad.norm().item(), rel=1e-5)


def test_gradnorm_skips_non_finite_gradients():
    torch.manual_seed(0)
    net = small_net()
    lm = compile_localsgd(net, schedule=GradNorm(decide_every=3, warmup_epochs=99), compile="off")
    norms = []
    for i, (x, y) in enumerate(batches(3)):
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(lm(x), y) * (float("nan") if i == 1 else 1.0)
        loss.backward()
        if i != 1:
            norms.append(net[0].weight.grad.norm().item())
        lm.maybe_decide()
    assert lm.schedule.log_stats()["value"] == pytest.approx(sum(norms) / 2, rel=1e-5)


@pytest.mark.parametrize("schedule", [Plasticity(decide_every=4), GradNorm(decide_every=4)],
                         ids=["plasticity", "gradnorm"])
def test_signals_add_no_host_read_to_the_step(schedule):
    torch.manual_seed(0)
    lm = compile_localsgd(small_net(), schedule=schedule, compile="off")
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    data = batches(8)
    for x, y in data[:4]:                         # a first decision (plasticity: its reference)
        step(lm, opt, x, y)
        lm.maybe_decide()
    with no_host_reads():
        for x, y in data[4:7]:                    # steps 1-3 of the next 4-step interval: no decision due
            step(lm, opt, x, y)
            lm.maybe_decide()
    step(lm, opt, *data[7])
    lm.maybe_decide()                             # the decision reads its signals once
    assert lm.schedule.log_stats()["value"] > 0


def make_pair(schedule_factory):
    torch.manual_seed(0)
    a_net, b_net = small_net(), small_net()
    lms = [compile_localsgd(net, rule="hebbian", schedule=schedule_factory(), compile="off", sample_fraction=1.0,
                            local_lr=0.05) for net in (a_net, b_net)]
    opts = [torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.9) for lm in lms]
    return lms, opts


@pytest.mark.parametrize("schedule_factory", [
    lambda: Plasticity(decide_every=2, warmup_epochs=0, threshold=0.99, beta=0.5, shift=1, probe_size=4),
    lambda: GradNorm(decide_every=2, warmup_epochs=0, threshold=5.0, patience=2, shift=1),
], ids=["plasticity", "gradnorm"])
def test_state_dict_resumes_exactly_inside_a_decision_interval(schedule_factory):
    (a, b), (opt_a, opt_b) = make_pair(schedule_factory)
    data = batches(16)
    def advance(lm, opt, x, y):
        step(lm, opt, x, y)
        lm.maybe_decide()
        for group in opt.param_groups:
            group["lr"] *= 0.8                     # the changes shrink: the signals settle and move t

    for x, y in data[:7]:                         # 7 steps: the interval after the 3rd decision is half done
        advance(a, opt_a, x, y)
    t_before = a.transition
    b(data[0][0])                                 # b's first call would capture another probe: the state wins
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))     # (else the momentum buffers are shared)
    assert all(torch.equal(p, q) for p, q in zip(a.signals.get_extra_state()["probe"] or (),
                                                  b.signals.get_extra_state()["probe"] or ()))
    for x, y in data[7:]:
        for lm, opt in ((a, opt_a), (b, opt_b)):
            advance(lm, opt, x, y)
        assert a.transition == b.transition
    # the same decisions; "step" counts the wrapper's calls since the epoch began, which a state_dict
    # taken inside an epoch does not carry (checkpoints are written at epoch ends)
    assert [{k: v for k, v in h.items() if k != "step"} for h in a.history] == \
        [{k: v for k, v in h.items() if k != "step"} for h in b.history]
    assert 0 < t_before < a.transition            # it moved before and after the resume point
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_probe_errors_name_the_fix():
    lm = compile_localsgd(small_net(), schedule="dynamic")
    with pytest.raises(LocalSGDError, match="set_probe is for a schedule that reads the plasticity signal"):
        lm.set_probe(torch.randn(2, 1, 6, 6))
    net = small_net()
    lm = compile_localsgd(net, schedule=Plasticity(decide_every=1), inplace=True, compile="off")
    net(torch.randn(4, 1, 6, 6))                  # the user calls the model itself: the wrapper never sees a batch
    with pytest.raises(LocalSGDError, match=r"call model.set_probe\(x\) once"):
        lm.maybe_decide()
    lm.set_probe(torch.randn(4, 1, 6, 6))
    lm.maybe_decide()
    assert lm.signals.reference_layer == 0


def test_moving_the_module_moves_the_signal_state():
    torch.manual_seed(0)
    net = small_net()
    lm = compile_localsgd(net, schedule=Plasticity(decide_every=1, warmup_epochs=99), compile="off")
    grads = compile_localsgd(small_net(), schedule=GradNorm(decide_every=1, warmup_epochs=99), compile="off")
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for m in (lm, grads):
        F.cross_entropy(m(x), y).backward()
        m.maybe_decide()
        m.double()
        m.zero_grad()
        F.cross_entropy(m(x.double()), y).backward()
        m.maybe_decide()
    assert lm.signals.probe[0].dtype == torch.float64 and lm.schedule.log_stats()["value"] >= 0
    assert grads.signals.grad_sum.dtype == torch.float64 and grads.schedule.log_stats()["value"] > 0
    assert isinstance(lm.signals, nn.Module) and "signals._extra_state" in lm.state_dict()
