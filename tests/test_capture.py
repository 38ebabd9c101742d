"""The whole training step as one object (localsgd_fx.capture.TrainStep), recorded per t on a GPU.

CPU: the step runs eagerly and gives exactly the hand-written step's results, with any optimizer; the
recordable-optimizer check refuses what a recording would get wrong. CUDA (marked): recorded steps agree
with eager ones over k steps and across a move of t, for freeze and hebbian, with bf16 + channels-last;
a replay reads nothing on the host; a partial batch and fp16 with a scaler run eagerly.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.steps import no_host_reads, small_net
from localsgd_fx import compile_localsgd
from localsgd_fx.capture import TrainStep, check_capturable
from passes.errors import LocalSGDError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def twins(rule: str, device: str = "cpu", memory_format=torch.preserve_format):
    torch.manual_seed(0)
    net = small_net().to(device, memory_format=memory_format)
    twin = copy.deepcopy(net)
    kwargs = dict(rule=rule, schedule="manual", local_lr=0.05, weak_supervision="sign", sample_fraction=0.5)
    return net, twin, compile_localsgd(net, **kwargs), compile_localsgd(twin, **kwargs)


def batches(n: int, device: str = "cpu", size: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 6, 6, generator=g).to(device), torch.randint(0, 3, (size,), generator=g).to(device))
            for _ in range(n)]


@pytest.mark.parametrize("rule", ["freeze", "hebbian"])
def test_cpu_step_is_the_eager_step_exactly(rule):
    net, twin, lm, ref = twins(rule)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = lm.capture_step(opt, F.cross_entropy)          # no CUDA: it runs eagerly
    assert not step.capture
    for i, (x, y) in enumerate(batches(6)):
        if i == 3:
            lm.set_transition(2)
            ref.set_transition(2)
        loss, out = step(x, y)
        ref_opt.zero_grad(set_to_none=True)                  # the step written out by hand
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref.observe_loss(ref_loss.detach())
        assert torch.equal(loss, ref_loss.detach()) and not out.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    assert torch.equal(lm.supervision.lr, ref.supervision.lr)
    assert lm.driver.steps_this_epoch == ref.driver.steps_this_epoch == 6    # every step counted once
    assert step.account.captures == 0 and "recorded steps" not in lm.explain(print_fn=None)


def test_only_recordable_optimizers_pass_the_check():
    params = [torch.nn.Parameter(torch.zeros(2))]
    check_capturable(torch.optim.SGD(params, lr=torch.tensor(0.1), fused=True))
    check_capturable(torch.optim.AdamW(params, lr=1e-3, capturable=True))
    for opt in (torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.1, fused=True),
                torch.optim.Adam(params, lr=1e-3), torch.optim.RMSprop(params)):
        with pytest.raises(LocalSGDError, match="cannot be recorded in a CUDA graph.*fused=True"):
            check_capturable(opt)


# -------------------------------------------------------------------------------------- CUDA
def recordable_sgd(module, lr=0.1):
    return torch.optim.SGD(module.parameters(), lr=torch.tensor(lr, device="cuda"), momentum=0.9,
                           weight_decay=5e-4, fused=True)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["freeze", "hebbian"])
@pytest.mark.parametrize("amp,channels_last", [(None, False), (torch.bfloat16, True)])
def test_cuda_recorded_steps_agree_with_eager_across_a_move_of_t(rule, amp, channels_last, cuda_deterministic):
    fmt = torch.channels_last if channels_last else torch.preserve_format
    net, twin, lm, ref = twins(rule, "cuda", fmt)
    step = TrainStep(lm, recordable_sgd(lm), F.cross_entropy, autocast_dtype=amp)
    eager = TrainStep(ref, recordable_sgd(ref), F.cross_entropy, autocast_dtype=amp, capture=False)
    assert step.capture
    data = [(x.contiguous(memory_format=fmt), y) for x, y in batches(14, "cuda")]
    for i, (x, y) in enumerate(data):
        if i == 7:                                   # a move of t: warm-up and a new recording
            lm.set_transition(2)
            ref.set_transition(2)
        a, _ = step(x, y)
        b, _ = eager(x, y)
        tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, b, **tol)
    assert step.is_recorded(2) and not step.is_recorded(1)       # the t=1 recording was freed
    assert step.account.captures == 2 and step.account.capture_seconds > 0
    tol = dict(rtol=5e-2, atol=5e-2) if amp else dict(rtol=1e-3, atol=1e-4)
    for p, q in zip(net.parameters(), twin.parameters()):        # SGD weights and local weights alike
        torch.testing.assert_close(p, q, **tol)
    assert net[0].weight.grad is None                            # a local layer never gets a gradient


@cuda
@pytest.mark.cuda
def test_cuda_replay_reads_nothing_on_the_host_and_a_partial_batch_runs_eagerly():
    _, _, lm, _ = twins("hebbian", "cuda")
    lm.set_transition(1)
    step = TrainStep(lm, recordable_sgd(lm), F.cross_entropy)
    data = batches(TrainStep.WARMUP + 1, "cuda")
    for x, y in data:
        step(x, y)
    assert step.is_recorded(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with no_host_reads():
            for x, y in data:
                step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    x, y = batches(1, "cuda", size=5)[0]
    w = lm.model[3].weight.detach().clone()
    loss, out = step(x, y)                                        # another size: the eager step
    assert out.shape[0] == 5 and not torch.equal(w, lm.model[3].weight)


@cuda
@pytest.mark.cuda
def test_cuda_fp16_with_a_scaler_runs_eagerly_and_says_so():
    _, _, lm, _ = twins("freeze", "cuda")
    notes = []
    step = TrainStep(lm, recordable_sgd(lm), F.cross_entropy, autocast_dtype=torch.float16,
                     scaler=torch.amp.GradScaler("cuda"), log=notes.append)
    assert not step.capture and "gradient scaler" in notes[0]
    x, y = batches(1, "cuda")[0]
    loss, _ = step(x, y)
    assert torch.isfinite(loss)
