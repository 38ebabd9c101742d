"""The training step as the product runs it: no host reads, mixed precision, channels-last, compiling.

CPU tests check what a CPU can: that a default step never reads a tensor on the host (on CUDA each
read is a sync), with the default rule (freeze) and with an updating one (hebbian), that autocast and
channels-last steps work with fp32 master weights, that a compiled run makes one forward and one
backward graph per distinct ``t`` (partial batches and evaluation add none), and the decisions of
``compile="auto"``. The CUDA-marked tests repeat the critical ones on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.steps import no_host_reads, one_step, small_net
from localsgd_fx import DEFAULT_RULE, Dynamic, compile_localsgd
from localsgd_fx.data import ImageDataset
from localsgd_fx.runtime import AutoCompile, compile_mode
from localsgd_fx.train import TrainConfig, Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: the default rule (freeze: no update in the step) and the paper's rule (an update GEMM, the non-finite guard)
STEP_RULES = pytest.mark.parametrize("rule", [None, "hebbian"], ids=[f"default-{DEFAULT_RULE}", "hebbian"])


def rule_kwargs(rule: str | None) -> dict:
    """``compile_localsgd``/``TrainConfig`` keywords: none for the default rule."""
    return {} if rule is None else {"rule": rule}


def twins(**kwargs):
    torch.manual_seed(0)
    a, b = small_net(), small_net()
    b.load_state_dict(a.state_dict())
    return a, b


# ------------------------------------------------------------------------------- kernels per step
def _step_kernels():
    """``benchmarks/step_kernels.py``, the count behind RESULTS' kernels table."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_kernels.py"
    spec = importlib.util.spec_from_file_location("step_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.step_kernels


def test_a_local_prefix_keeps_the_kernels_a_recorded_step_replays_few():
    """A recorded GPU step keeps every kernel, however small: the frozen prefix must replay well under SGD's
    kernels, and a Hebbian update stay within its 14 kernels per layer (the GEMM, averaging, addcmul, row rescale,
    guard). A rule or guard that grows by a kernel per layer shows here first."""
    count = _step_kernels()
    settings = dict(batch=2, image=28, in_channels=1, amp=None, sample_fraction=None)
    sgd, frozen, hebbian = (sum(count("resnet20", rule, t, **settings).values())
                            for rule, t in (("freeze", 0), ("freeze", 21), ("hebbian", 21)))
    assert frozen <= 0.6 * sgd                 # 101 of 173 when written
    assert hebbian - frozen <= 14 * 21         # 294 when written


# ------------------------------------------------------------------------------- host reads
@STEP_RULES
@pytest.mark.parametrize("compile", ["off", "auto"])
def test_default_step_never_reads_a_tensor_on_the_host(compile, rule):
    torch.manual_seed(0)
    net = small_net()
    # the default step (the default rule, check_finite, sample_fraction) and the same step with an updating rule
    lm = compile_localsgd(net, schedule="manual", compile=compile, **rule_kwargs(rule))
    lm.set_transition(2)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    one_step(lm, opt, x, y)                                              # first call: FLOP counts, graph emission
    w0 = net[0].weight.detach().clone()
    with no_host_reads():
        for _ in range(3):
            one_step(lm, opt, x, y)
    if rule is None:
        assert lm.rule.key == DEFAULT_RULE == "freeze"
        assert torch.equal(net[0].weight.detach(), w0)                   # frozen: the local layer did not move
    else:
        assert not torch.equal(net[0].weight.detach(), w0)               # the local layer did learn in there
    lm.end_epoch()                                                       # the once-per-epoch read is allowed


# ----------------------------------------------------------------------- precision and layout
def test_cpu_autocast_bf16_step_updates_fp32_master_weights():
    ref_net, amp_net = twins()
    ref = compile_localsgd(ref_net, rule="hebbian", schedule="manual", local_lr=0.05, weak_supervision="off",
                           sample_fraction=1.0)
    amp = compile_localsgd(amp_net, rule="hebbian", schedule="manual", local_lr=0.05, weak_supervision="off",
                           sample_fraction=1.0)
    for lm in (ref, amp):
        lm.set_transition(2)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    w0 = ref_net[3].weight.detach().clone()
    F.cross_entropy(ref(x), y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert out.dtype == torch.bfloat16
    for layer in (0, 3):
        w = amp_net[layer].weight
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
    delta_ref, delta_amp = ref_net[3].weight.detach() - w0, amp_net[3].weight.detach() - w0
    assert delta_ref.norm() > 0
    # the same update, to bf16's precision (8 bits of mantissa in the GEMM's inputs)
    assert (delta_amp - delta_ref).norm() < 0.05 * delta_ref.norm()
    assert amp_net[-1].weight.grad is not None and amp_net[-1].weight.grad.dtype == torch.float32


def test_channels_last_model_and_input_match_contiguous():
    ref_net, cl_net = twins()
    cl_net.to(memory_format=torch.channels_last)
    ref = compile_localsgd(ref_net, rule="hebbian", schedule="manual", local_lr=0.05, weak_supervision="off",
                           sample_fraction=0.5)
    cl = compile_localsgd(cl_net, rule="hebbian", schedule="manual", local_lr=0.05, weak_supervision="off",
                          sample_fraction=0.5)
    for lm in (ref, cl):
        lm.set_transition(2)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(2):
        a = ref(x)
        b = cl(x.contiguous(memory_format=torch.channels_last))
        F.cross_entropy(a, y).backward()
        F.cross_entropy(b, y).backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for layer in (0, 3):
        torch.testing.assert_close(cl_net[layer].weight.detach(), ref_net[layer].weight.detach(), rtol=1e-5, atol=1e-6)
    assert cl_net[3].weight.is_contiguous(memory_format=torch.channels_last)   # the update kept the layout


def toy_data(n: int, seed: int) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = (torch.rand(n, 1, 8, 8, generator=gen) * 60 + labels.view(-1, 1, 1, 1) * 70).to(torch.uint8)
    return ImageDataset("toy", images, labels, 3, (0.4,), (0.3,))


@STEP_RULES
@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False)])
def test_trainer_mixed_precision_run(amp, channels_last, rule, tmp_path):
    config = TrainConfig(model="smallcnn", epochs=2, batch_size=32, schedule="linear", c2=0, amp=amp,
                         channels_last=channels_last, device="cpu", compile="off", out=str(tmp_path / "run"),
                         progress=False, train_subset=None, test_subset=None, **rule_kwargs(rule))
    result = Trainer(config, data=(toy_data(96, 0), toy_data(64, 1)), log=None).fit()
    assert [r["t"] for r in result.metrics] == [0, 1] and result.metrics[-1]["t_next"] > 1
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["train_loss"] == r["train_loss"] for r in result.metrics)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in result.model.parameters())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ("grad_scaler" in state) == (amp == "fp16")


# --------------------------------------------------------------------------------- compiling
def test_trainer_gives_auto_the_epoch_length_before_its_first_decision():
    """compile="auto" decides 14 steps into the first epoch; it must count the whole epoch then, not
    only the steps taken yet (which made it expect ~126 steps of a 4,690-step run on a GPU)."""
    config = TrainConfig(model="smallcnn", epochs=3, batch_size=16, schedule="sgd", device="cpu", compile="auto",
                         out=None, progress=False, train_subset=None, test_subset=None)
    result = Trainer(config, data=(toy_data(480, 0), toy_data(64, 1)), log=None).fit()
    first = result.model.compile_decisions[0]
    steps = 480 // 16
    deciding_step = AutoCompile.WARMUP + AutoCompile.WINDOW + 1     # it decides before this step runs
    assert (first.epoch, first.t) == (1, 0)
    assert first.expected_steps == (steps - deciding_step) + 2 * steps


@pytest.mark.slow
def test_compiled_run_makes_one_forward_and_one_backward_graph_per_distinct_t():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net, twin = twins()
    compiled = compile_localsgd(net, rule="hebbian", schedule="manual", compile=True, local_lr=0.1,
                                weak_supervision="off", sample_fraction=0.5)
    eager = compile_localsgd(twin, rule="hebbian", schedule="manual", compile=False, local_lr=0.1,
                             weak_supervision="off", sample_fraction=0.5)
    batches = [torch.randn(8, 1, 6, 6) for _ in range(2)] + [torch.randn(5, 1, 6, 6)]   # a partial last batch
    y = torch.randint(0, 3, (8,))
    for t in (0, 2):
        for lm in (compiled, eager):
            lm.set_transition(t)
            lm.zero_grad(set_to_none=True)
        for x in batches:
            outs = [lm(x) for lm in (compiled, eager)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
            for out in outs:
                F.cross_entropy(out, y[:len(x)]).backward()
            assert net[0].weight.grad is None or t == 0                  # a local layer gets no gradient
            torch.testing.assert_close(net[-1].weight.grad, twin[-1].weight.grad, rtol=1e-5, atol=1e-6)
        compiled.eval()
        with torch.no_grad():
            compiled(torch.randn(3, 1, 6, 6))                            # evaluation: eager, no graph
        compiled.train()
    assert compiled.compile_count == 2
    # one dynamo compile per t; the backward compiles lazily at the first backward, at most once per t (not at
    # all for a t whose backward torch's on-disk cache already holds: then it loads with the forward)
    assert compiled.compile_events["DYNAMO"] == 2 and compiled.compile_events.get("LAZY_BACKWARD", 0) <= 2
    assert set(compiled.compile_events) <= {"DYNAMO", "LAZY_BACKWARD"}
    assert counters["stats"]["unique_graphs"] == 2                       # torch's own count agrees
    assert compiled.compile_seconds > 0
    for layer in (0, 3):                                                 # the traced update = the eager one
        torch.testing.assert_close(net[layer].weight.detach(), twin[layer].weight.detach(), rtol=1e-5, atol=1e-6)


def drive(policy, clock, t, steps, step_s, compile_s=0.0, remaining=10_000):
    """Run ``steps`` steps of ``step_s`` seconds each through the policy, ``remaining`` steps expected at ``t``
    and each compile costing ``compile_s``; returns the choices."""
    choices = []
    for _ in range(steps):
        choice = policy.before_step(t, epoch=0, expected_steps=remaining, compile_seconds=clock[1])
        choices.append(choice)
        if choice == "compile":
            policy.compiled(t, clock[1])
            clock[1] += compile_s
        clock[0] += step_s
    return choices


@pytest.fixture
def clock(monkeypatch):
    now = [100.0, 0.0]      # the time, and the compile seconds spent so far
    monkeypatch.setattr("localsgd_fx.runtime.time.perf_counter", lambda: now[0])
    monkeypatch.setattr(AutoCompile, "_sync", lambda self: None)   # a "cuda" policy on a machine without one
    return now


def test_auto_compiles_when_the_saving_pays_and_keeps_a_faster_graph(clock):
    policy = AutoCompile("cuda")
    choices = drive(policy, clock, 3, AutoCompile.WARMUP + AutoCompile.WINDOW + 1, 0.010, compile_s=20.0)
    assert choices[-1] == "compile" and choices[:-1] == ["eager"] * (len(choices) - 1)
    decision = policy.decisions[0]
    assert decision.choice == "compile" and decision.eager_ms == pytest.approx(10.0)
    assert decision.expected_saving_s == pytest.approx(10_000 * 0.010 * (1 - AutoCompile.PRIOR_RATIO["cuda"]))
    drive(policy, clock, 3, AutoCompile.WARMUP + AutoCompile.WINDOW + 1, 0.005)
    assert decision.compiled_ms == pytest.approx(5.0) and decision.compile_s == pytest.approx(20.0)
    # measured replaces the priors
    assert policy.ratio == pytest.approx(0.5) and policy.compile_s == pytest.approx(20.0)
    assert drive(policy, clock, 3, 5, 0.005) == ["compiled"] * 5


def test_auto_falls_back_when_the_compiled_graph_is_not_faster(clock):
    policy = AutoCompile("cuda")
    drive(policy, clock, 1, AutoCompile.WARMUP + AutoCompile.WINDOW + 1, 0.010, compile_s=20.0)
    drive(policy, clock, 1, AutoCompile.WARMUP + AutoCompile.WINDOW + 1, 0.0101)
    assert [d.choice for d in policy.decisions] == ["compile", "fallback"]
    assert drive(policy, clock, 1, 3, 0.010) == ["eager"] * 3
    policy.reconsider(1, epoch=0, expected_steps=10_000)  # a graph measured slower is not tried again
    assert [d.choice for d in policy.decisions] == ["compile", "fallback"]
    # the next transition is judged with the measured ratio (no saving) instead of the prior
    drive(policy, clock, 2, AutoCompile.WARMUP + AutoCompile.WINDOW + 1, 0.010)
    assert policy.decisions[-1].choice == "eager" and policy.decisions[-1].expected_saving_s <= 0


def test_auto_stays_eager_for_short_stays_and_reconsiders_as_t_holds(clock):
    policy = AutoCompile("cuda")
    choices = drive(policy, clock, 2, 40, 0.010, remaining=500)         # 500 x 10 ms x 0.3 = 1.5 s < 30 s
    assert set(choices) == {"eager"} and [d.choice for d in policy.decisions] == ["eager"]
    policy.reconsider(2, epoch=1, expected_steps=50_000)                # t held on: more steps expected
    assert policy.decisions[-1].choice == "compile"
    assert policy.before_step(2, epoch=1, expected_steps=50_000, compile_seconds=0.0) == "compile"


def test_auto_on_a_cpu_never_compiles_on_priors():
    torch.manual_seed(0)
    lm = compile_localsgd(small_net(), schedule="manual", compile="auto", total_epochs=100)
    lm.set_transition(1)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(AutoCompile.WARMUP + AutoCompile.WINDOW + 2):
        one_step(lm, opt, x, y)
    assert lm.compile_count == 0 and not lm.is_compiled(1)
    assert [d.choice for d in lm.compile_decisions] == ["eager"]
    assert "staying eager" in lm.explain(print_fn=None)


def test_expected_steps_at_transition():
    lm = compile_localsgd(small_net(), schedule="manual", total_epochs=10)
    x = torch.randn(4, 1, 6, 6)
    for _ in range(6):
        lm(x)
    assert lm.expected_steps_at_transition() == 9 * 6       # t cannot move on its own: every epoch left
    lm.end_epoch()
    lm(x)
    assert lm.expected_steps_at_transition() == 5 + 8 * 6
    dyn = compile_localsgd(small_net(), schedule=Dynamic(warmup_epochs=5), total_epochs=10)   # cannot move yet
    for epoch in range(2):
        for _ in range(6):
            dyn(x)
        assert dyn.expected_steps_at_transition() == epoch * 6   # held t for `epoch` epochs: that many more
        dyn.end_epoch()
    assert dyn.transition == 0
    known = compile_localsgd(small_net(), schedule="sgd", total_epochs=10)
    known.steps_per_epoch = 50                               # the trainer says so before the first step
    for _ in range(13):                                      # 13 steps into the first epoch
        known(x)
    assert known.expected_steps_at_transition() == 37 + 9 * 50   # not 9 epochs of the 13 steps seen yet


def test_compile_vocabulary():
    assert ([compile_mode(v) for v in (True, False, "auto", "reduce-overhead")]
            == ["on", "off", "auto", "reduce-overhead"])
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_mode("yes")


# -------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.cuda
@STEP_RULES
@pytest.mark.parametrize("compile", ["off", "reduce-overhead"])
def test_cuda_default_step_has_no_sync(compile, rule):
    torch.manual_seed(0)
    net = small_net(8).cuda()
    lm = compile_localsgd(net, schedule="manual", compile=compile, **rule_kwargs(rule))
    lm.set_transition(2)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    for _ in range(4):                                    # compile, record, warm up
        one_step(lm, opt, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_step(lm, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lm.end_epoch()


@cuda
@pytest.mark.cuda
def test_cuda_bf16_channels_last_reduce_overhead_matches_eager():
    ref_net, net = (m.cuda().to(memory_format=torch.channels_last) for m in twins())
    eager = compile_localsgd(ref_net, rule="hebbian", schedule="manual", compile="off", local_lr=0.05,
                             weak_supervision="off")
    graphed = compile_localsgd(net, rule="hebbian", schedule="manual", compile="reduce-overhead", local_lr=0.05,
                               weak_supervision="off")
    x = torch.randn(16, 1, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (16,), device="cuda")
    for lm in (eager, graphed):
        lm.set_transition(2)
        for _ in range(4):
            # grads cleared every step, as training does: under CUDA graphs a .grad accumulated over two
            # backward passes is a replay output that the next replay overwrites (pytorch#169545)
            lm.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(lm(x), y)
            loss.backward()
    assert net[0].weight.dtype == torch.float32 and torch.isfinite(net[0].weight).all()
    for layer in (0, 3):      # bf16 kernels of eager and inductor differ in rounding, not in the update
        torch.testing.assert_close(net[layer].weight, ref_net[layer].weight, rtol=2e-2, atol=2e-3)


@cuda
@pytest.mark.cuda
@STEP_RULES
def test_cuda_trainer_steps_have_no_sync(tmp_path, rule):
    """The trainer's loop (data, step, progress bar) between its first steps and the epoch's end reads nothing."""
    class SyncGuard:
        def on_step_end(self, trainer, step, loss):
            last = len(trainer.batches) - 1
            torch.cuda.set_sync_debug_mode("error" if 1 <= step < last else "default")

    config = TrainConfig(model="smallcnn", epochs=2, batch_size=16, schedule="linear", c2=0, device="cuda",
                         compile="off", out=None, progress=True, train_subset=None, test_subset=None,
                         **rule_kwargs(rule))
    try:
        result = Trainer(config, callbacks=[SyncGuard()], data=(toy_data(480, 0), toy_data(64, 1)), log=None).fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r["t"] for r in result.metrics] == [0, 1]
