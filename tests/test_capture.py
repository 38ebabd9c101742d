"""The whole training step as one object (localsgd_fx.capture.TrainStep), recorded per t on a GPU.

CPU: the step runs eagerly and gives exactly the hand-written step's results, with any optimizer; the
recordable-optimizer check refuses what a recording would get wrong. Recorded, both with a CPU stand-in for
CUDA graphs (exactly) and on a GPU (CUDA-marked, within tolerances): steps agree with eager ones over k steps,
across a move of t and a learning rate that changes every step, for freeze and hebbian, with bf16 +
channels-last; a replay reads nothing on the host; a partial batch runs eagerly. Stand-in only: what capture
refuses makes the recording fail and the step train on eagerly; every local rule and weak-supervision mode;
every zoo model; the trainer end to end (also with signal schedules moving t inside epochs) and the benchmarks'
recorded paths. CUDA only: fp16 with a scaler runs eagerly.
"""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import localsgd_fx.bench as bench_module
import localsgd_fx.capture as capture_module
import localsgd_fx.train as train_module
import models_zoo
from helpers.replay import OpRecorder
from helpers.steps import no_host_reads, small_net
from localsgd_fx import compile_localsgd
from localsgd_fx.capture import CudaGraphs, TrainStep, check_capturable
from localsgd_fx.cli import main as cli_main
from localsgd_fx.rules import list_rules
from localsgd_fx.supervision import MODES
from localsgd_fx.train import TrainConfig, Trainer
from passes.errors import LocalSGDError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def twins(rule: str, device: str = "cpu", memory_format=torch.preserve_format):
    torch.manual_seed(0)
    net = small_net().to(device, memory_format=memory_format)
    twin = copy.deepcopy(net)
    kwargs = dict(rule=rule, schedule="manual", local_lr=0.05, weak_supervision="sign", sample_fraction=0.5)
    return net, twin, compile_localsgd(net, **kwargs), compile_localsgd(twin, **kwargs)


def batches(n: int, device: str = "cpu", size: int = 8, shape: tuple[int, ...] = (1, 6, 6), classes: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=g).to(device),
             torch.randint(0, classes, (size,), generator=g).to(device)) for _ in range(n)]


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


# ----------------------------------------------------------------------- recorded: stand-in and CUDA
# Each test runs twice: on the CPU with the stand-in recorder (tests/helpers/replay.py: ops replayed on the
# same tensors, Python values baked in, host reads refused, as in a CUDA graph), where a replay must give the
# eager step's results exactly; and with real CUDA graphs where a GPU is, within bf16/TF32 tolerances.
RECORDING = [pytest.param("cpu", id="cpu-stand-in"), pytest.param("cuda", marks=[cuda, pytest.mark.cuda], id="cuda")]


def recorder(device: str):
    return OpRecorder() if device == "cpu" else None     # None: TrainStep's own, CUDA graphs


def recordable_sgd(module, device, lr=0.1):
    return torch.optim.SGD(module.parameters(), lr=torch.tensor(lr, device=device), momentum=0.9,
                           weight_decay=5e-4, fused=True)


def assert_agree(device, a, b, amp, loose):
    if device == "cpu":
        assert torch.equal(a, b)
    else:
        if amp:
            tol = dict(rtol=5e-2, atol=5e-2) if loose else dict(rtol=2e-2, atol=2e-2)
        else:
            tol = dict(rtol=1e-3, atol=1e-4) if loose else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", RECORDING)
@pytest.mark.parametrize("rule", ["freeze", "hebbian"])
@pytest.mark.parametrize("amp,channels_last", [(None, False), (torch.bfloat16, True)])
def test_recorded_steps_agree_with_eager_across_a_move_of_t(device, rule, amp, channels_last, cuda_deterministic):
    fmt = torch.channels_last if channels_last else torch.preserve_format
    net, twin, lm, ref = twins(rule, device, fmt)
    lm.set_transition(1)
    ref.set_transition(1)
    opt, ref_opt = recordable_sgd(lm, device), recordable_sgd(ref, device)
    # the rate changes every step: a replay must read the tensor the scheduler fills, never a baked number
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9 ** k) for o in (opt, ref_opt)]
    step = TrainStep(lm, opt, F.cross_entropy, autocast_dtype=amp, recorder=recorder(device))
    eager = TrainStep(ref, ref_opt, F.cross_entropy, autocast_dtype=amp, capture=False)
    assert step.capture
    data = [(x.contiguous(memory_format=fmt), y) for x, y in batches(14, device)]
    for i, (x, y) in enumerate(data):
        if i == 7:                                   # a move of t: warm-up and a new recording
            lm.set_transition(2)
            ref.set_transition(2)
        a, out_a = step(x, y)
        b, out_b = eager(x, y)
        for scheduler in schedulers:
            scheduler.step()
        assert_agree(device, a, b, amp, loose=False)
        assert_agree(device, out_a, out_b, amp, loose=False)
    assert step.is_recorded(2) and not step.is_recorded(1)       # the t=1 recording was freed
    assert step.account.captures == 2 and step.account.capture_seconds > 0
    for p, q in zip(net.state_dict().values(), twin.state_dict().values()):   # SGD and local weights, BN statistics
        assert_agree(device, p, q, amp, loose=True)
    if device == "cpu":         # on a GPU the sign of the rate may flip where the two losses differ in rounding
        assert torch.equal(lm.supervision.lr, ref.supervision.lr)   # weak supervision followed the loss exactly
    assert lm.driver.steps_this_epoch == ref.driver.steps_this_epoch == len(data)   # every step counted once
    assert net[0].weight.grad is None                            # a local layer never gets a gradient


@pytest.mark.parametrize("device", RECORDING)
def test_replay_reads_nothing_on_the_host_and_a_partial_batch_runs_eagerly(device):
    _, _, lm, _ = twins("hebbian", device)
    lm.set_transition(1)
    step = TrainStep(lm, recordable_sgd(lm, device), F.cross_entropy, recorder=recorder(device))
    data = batches(TrainStep.WARMUP + 1, device)
    for x, y in data:
        step(x, y)
    assert step.is_recorded(1) and step.capture     # a host read while recording would have turned capture off
    sync_debug = torch.cuda.set_sync_debug_mode if device == "cuda" else (lambda mode: None)
    if device == "cuda":
        torch.cuda.synchronize()
    sync_debug("error")
    try:
        with no_host_reads():
            for x, y in data:
                step(x, y)
    finally:
        sync_debug(0)
    x, y = batches(1, device, size=5)[0]
    w = lm.model[3].weight.detach().clone()
    loss, out = step(x, y)                                        # another size: the eager step
    assert out.shape[0] == 5 and not torch.equal(w, lm.model[3].weight)


def _loss_reading_the_host(output, target):
    loss = F.cross_entropy(output, target)
    return loss if loss.item() < 1e9 else loss * 0


def _loss_making_a_tensor_from_host_data(output, target):
    return F.cross_entropy(output, target) * torch.tensor(1.0, device=output.device)   # a host-to-device copy


def _loss_making_a_tensor_on_no_device(output, target):
    return F.cross_entropy(output, target) * torch.ones(())      # on a GPU: a CPU tensor


def _loss_of_the_masked_rows(output, target):
    keep = target >= 0
    return F.cross_entropy(output[keep], target[keep])          # a boolean mask: its size is read on the host


@pytest.mark.parametrize("loss_fn, why", [(_loss_reading_the_host, "reads a tensor on the host"),
                                          (_loss_making_a_tensor_from_host_data, "makes a tensor from host data"),
                                          (_loss_making_a_tensor_on_no_device, "torch.ones names no device"),
                                          (_loss_of_the_masked_rows, "sizes its output by tensor values")])
def test_the_stand_in_refuses_what_capture_refuses_and_the_step_trains_on_eagerly(loss_fn, why):
    """What a recording does with a step that capture refuses (here a loss function that reads the host, makes a
    tensor from host data or on no named device, or masks rows): it fails, says so once, and the step runs eagerly
    from then on."""
    _, _, lm, _ = twins("freeze")
    notes = []
    step = TrainStep(lm, recordable_sgd(lm, "cpu"), loss_fn, recorder=OpRecorder(), log=notes.append)
    w = [p.detach().clone() for p in lm.parameters()]
    for x, y in batches(TrainStep.WARMUP + 2):
        step(x, y)
    assert not step.capture and step.account.captures == 0
    assert len(notes) == 1 and "recording the training step as a CUDA graph failed" in notes[0] and why in notes[0]
    assert all(not torch.equal(a, b) for a, b in zip(w[-2:], list(lm.parameters())[-2:]))   # it kept training


@pytest.mark.parametrize("device", RECORDING)
def test_an_optimizer_setting_changed_after_recording_turns_recording_off_with_a_note(device):
    """OneCycleLR cycles SGD's momentum, a Python float a recording bakes in: the step notices the change before
    the next replay, says so once, and trains on eagerly, exactly as the eager twin does."""
    net, twin, lm, ref = twins("hebbian", device)
    for m in (lm, ref):
        m.set_transition(1)
    opt, ref_opt = recordable_sgd(lm, device), recordable_sgd(ref, device)
    data = batches(TrainStep.WARMUP + 5, device)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=len(data), cycle_momentum=True)
                  for o in (opt, ref_opt)]
    notes = []
    step = TrainStep(lm, opt, F.cross_entropy, recorder=recorder(device), log=notes.append)
    eager = TrainStep(ref, ref_opt, F.cross_entropy, capture=False)
    for x, y in data:
        a, _ = step(x, y)
        b, _ = eager(x, y)
        for scheduler in schedulers:
            scheduler.step()
        assert_agree(device, a, b, None, loose=False)
    assert step.account.captures == 1 and not step.capture and not step.is_recorded(1)
    assert len(notes) == 1 and "momentum changed after its step was recorded" in notes[0]
    for p, q in zip(net.state_dict().values(), twin.state_dict().values()):
        assert_agree(device, p, q, None, loose=True)


def test_a_training_step_in_eval_mode_is_refused_with_the_fix():
    """Eager, a step in eval mode would train the user's own model with no local prefix, and a replay would run
    the train-mode graph: neither is what was asked, so the step refuses before touching anything."""
    net, _, lm, _ = twins("hebbian")
    lm.set_transition(1)
    step = TrainStep(lm, recordable_sgd(lm, "cpu"), F.cross_entropy, recorder=OpRecorder())
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in net.parameters()]
    for to_eval in (lm, net):                      # the wrapper, or the model itself (compile_localsgd(inplace=True))
        to_eval.eval()
        with pytest.raises(LocalSGDError, match=r"eval mode: call model\.train\(\)"):
            step(x, y)
        to_eval.train()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    step(x, y)
    assert not torch.equal(before[-1], list(net.parameters())[-1])


@cuda
@pytest.mark.cuda
def test_cuda_recording_survives_a_pin_memory_thread():
    """A DataLoader with pin_memory=True keeps a thread that allocates pinned host memory: in CUDA's "global"
    capture mode that breaks the recording and then the thread. The step records in "thread_local" mode."""
    import threading
    _, _, lm, _ = twins("hebbian", "cuda")
    lm.set_transition(1)
    step = TrainStep(lm, recordable_sgd(lm, "cuda"), F.cross_entropy)
    stop, errors = threading.Event(), []

    def pin_memory_thread():
        held = []                       # kept alive, so every allocation is a fresh cudaHostAlloc (at most 80 MB)
        while not stop.is_set() and len(held) < 20_000:
            try:
                held.append(torch.empty(1024, pin_memory=True))
            except Exception as exc:   # reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=pin_memory_thread, daemon=True)
    thread.start()
    try:
        for x, y in batches(TrainStep.WARMUP + 3, "cuda"):
            step(x, y)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert step.capture and step.is_recorded(1) and step.account.captures == 1


def test_recordings_are_made_in_thread_local_capture_mode(monkeypatch):
    """On a CPU, with torch.cuda's recording calls stood in for: CudaGraphs asks for "thread_local" capture (the
    CUDA test above is what shows why)."""
    modes = []

    class FakeGraph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def fake_graph(graph, capture_error_mode="global", **kwargs):
        modes.append(capture_error_mode)
        yield

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    recording = CudaGraphs(torch.device("cuda")).record(lambda: "outputs")
    assert modes == ["thread_local"] and recording.outputs == "outputs"


@cuda
@pytest.mark.cuda
def test_cuda_fp16_with_a_scaler_runs_eagerly_and_says_so():
    _, _, lm, _ = twins("freeze", "cuda")
    notes = []
    step = TrainStep(lm, recordable_sgd(lm, "cuda"), F.cross_entropy, autocast_dtype=torch.float16,
                     scaler=torch.amp.GradScaler("cuda"), log=notes.append)
    assert not step.capture and "gradient scaler" in notes[0]
    x, y = batches(1, "cuda")[0]
    loss, _ = step(x, y)
    assert torch.isfinite(loss)


@pytest.mark.single_thread
@pytest.mark.parametrize("variant", [
    dict(rule="hebbian", local_lr=0.01),                                        # t = 0, 0, 1, 2
    dict(rule="hebbian", local_lr=0.01, amp="bf16", channels_last=True),
    # moves inside epochs (every 3 steps, from the gradient-norm signal the recorded step accumulates)
    dict(schedule="plasticity", c1=None, c2=None, threshold=0.9, shift=1, decide_every=3, epochs=5),
    dict(schedule="gradnorm", c1=None, c2=None, threshold=1.0, shift=1, decide_every=3, epochs=5)],
    ids=["linear-hebbian", "linear-hebbian-bf16-cl", "plasticity-every-3-steps", "gradnorm-every-3-steps"])
def test_the_trainer_recorded_trains_exactly_as_it_does_eagerly(data_dir, monkeypatch, variant):
    """The trainer's recorded path end to end (what compile=auto does on a GPU), on the CPU stand-in: a
    moving boundary, the Hebbian rule with weak supervision following the cosine learning rate, or a schedule
    that reads the boundary's signal and moves inside epochs; a partial last batch, evaluation. Beside it the
    same trainer with its step forced eager: every epoch's figures and the final weights agree exactly."""
    stand_in = OpRecorder()
    monkeypatch.setattr(capture_module, "recorder_for", lambda device: stand_in)
    monkeypatch.setattr(train_module, "recorder_for", lambda device: stand_in)
    cfg = TrainConfig(**{**dict(model="smallcnn", data_dir=data_dir, train_subset=None, test_subset=None, epochs=4,
                                batch_size=30, lr=0.05, progress=False, schedule="linear", c1=3, c2=0,
                                sample_fraction=0.5, augment=True, device="cpu", compile="capture"), **variant})
    recorded, eager = Trainer(cfg, log=None), Trainer(cfg, log=None)
    eager.step.capture = False
    assert recorded.step.capture and recorded.step.recorder is not None
    assert len(recorded.train_set) % cfg.batch_size        # a partial last batch: that step runs eagerly
    keys = ("t", "t_next", "train_loss", "train_acc", "test_loss", "test_acc", "local_lr", "lr")
    trained: set[int] = set()                                     # the t a step has run at
    for epoch in range(1, cfg.epochs + 1):
        a, b = recorded.train_epoch(), eager.train_epoch()
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        ts = {a["t"]} | {h["transition"] for h in recorded.model.history       # and moves inside the epoch
                         if h.get("step", 0) and h["epoch"] == epoch and h["step"] < len(recorded.batches)}
        assert (a["capture_s"] > 0) == bool(ts - trained) and b["capture_s"] == 0   # warm-up and recording at a new t
        trained |= ts
    moves = [h for h in recorded.model.history if h["transition"] > h["transition_before"]]
    if variant.get("schedule") in ("plasticity", "gradnorm"):
        assert any("step" in h for h in moves)                   # a move inside an epoch
    else:
        assert [r["t"] for r in recorded.metrics] == [0, 0, 1, 2]
        # per t 3 warm-up steps, then the recording's own step and replays; each epoch's partial batch runs eagerly
        assert stand_in.replays == 4 * len(recorded.batches) - 3 * TrainStep.WARMUP - 4
    assert recorded.model.graphs.account.captures == stand_in.recordings == len(trained)   # one recording per t
    tensors = [list(t.model.parameters()) + list(t.model.buffers()) for t in (recorded, eager)]   # weak supervision's
    assert all(torch.equal(p, q) for p, q in zip(*tensors))


def test_bench_step_records_each_arm_once_on_the_stand_in(tmp_path, monkeypatch, capsys):
    """``bench step --compile capture`` (what gpu_targets.sh runs first), on the CPU stand-in: the arms move
    t back and forth, each t is recorded once and then only replayed, plain SGD in another mode is timed
    beside, and every recorded arm reports its warm-up + recording seconds."""
    stand_in = OpRecorder()
    monkeypatch.setattr(capture_module, "recorder_for", lambda device: stand_in)
    monkeypatch.setattr(bench_module, "recorder_for", lambda device: stand_in)
    path = tmp_path / "step.json"
    assert cli_main(["bench", "step", "--model", "smallcnn", "--batch-size", "4", "--image-size", "16",
                     "--transitions", "1", "3", "--repeats", "3", "--device", "cpu", "--compile", "capture",
                     "--sgd-modes", "off", "capture", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["transition"], r["mode"]) for r in rows] == [(0, "capture"), (1, "capture"), (3, "capture"), (0, "off")]
    assert stand_in.recordings == 3                       # t = 0, 1, 3: never recorded again when t comes back
    assert all(r["compile_s"] > 0 for r in rows[:3]) and rows[3]["compile_s"] == 0
    assert min(r["vs_best_sgd"] for r in rows if r["transition"] == 0) == 1.0
    assert "vs fastest SGD" in capsys.readouterr().out


def test_the_trainer_says_once_that_a_cpu_cannot_record(data_dir):
    notes = []
    cfg = TrainConfig(model="smallcnn", data_dir=data_dir, train_subset=None, test_subset=None, epochs=1,
                      batch_size=64, progress=False, device="cpu", compile="capture")
    trainer = Trainer(cfg, log=notes.append)
    assert not trainer.step.capture
    assert [n for n in notes if "capture" in n] == [
        "note: --compile capture records training steps as CUDA graphs, which needs a CUDA device; on cpu the steps "
        "run eagerly"]


def test_the_end_to_end_gpu_comparison_runs_through_on_the_stand_in(data_dir, tmp_path, monkeypatch, capsys):
    """The end-to-end part of ``benchmarks/gpu_targets.sh capture`` at toy size on the CPU stand-in: plain SGD
    recorded, the defaults and their Hebbian twin under ``--compile auto`` (which records where a device can),
    bf16 + channels-last. Every arm records one step per t it trains at, and the report carries it."""
    stand_in = OpRecorder()
    monkeypatch.setattr(capture_module, "recorder_for", lambda device: stand_in)
    monkeypatch.setattr(train_module, "recorder_for", lambda device: stand_in)
    arms = ["SGD capture", "freeze budget", "LoCal budget"]
    assert cli_main(["bench", "tradeoff", "--quick", "--data-dir", data_dir, "--train-subset", "0", "--test-subset",
                     "0", "--epochs", "4", "--seeds", "0", "--arms", *arms, "--amp", "bf16", "--channels-last",
                     "--compile", "auto", "--device", "cpu", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "tradeoff.json").read_text())["runs"]
    distinct_t = 0
    for arm in arms:
        (records,) = runs[arm]
        ts = [r["t"] for r in records]
        assert [r["capture_s"] > 0 for r in records] == [i == 0 or ts[i] != ts[i - 1] for i in range(len(ts))], arm
        distinct_t += len(set(ts))
    assert len(set(r["t"] for r in runs["freeze budget"][0])) > 1          # the boundary moved: recorded again
    assert stand_in.recordings == distinct_t and stand_in.replays > 0
    assert "SGD capture" in capsys.readouterr().out


def record_beside_eager(net, options: dict, data, t_at):
    """Twin modules of ``net`` (``compile_localsgd(**options)``), one stepped recorded on the stand-in, one
    eagerly, over ``data`` at ``t = t_at(i, module)`` for batch ``i``; every loss must agree exactly (random ops
    draw the same in both). Returns the recorded step and the two modules."""
    twin = copy.deepcopy(net)
    lm, ref = compile_localsgd(net, **options), compile_localsgd(twin, **options)
    step = TrainStep(lm, recordable_sgd(lm, "cpu"), F.cross_entropy, recorder=OpRecorder())
    eager = TrainStep(ref, recordable_sgd(ref, "cpu"), F.cross_entropy, capture=False)
    for i, (x, y) in enumerate(data):
        for m in (lm, ref):
            if m.transition != t_at(i, m):
                m.set_transition(t_at(i, m))
        torch.manual_seed(i)
        a, _ = step(x, y)
        torch.manual_seed(i)
        b, _ = eager(x, y)
        assert torch.equal(a, b), i
    return step, lm, ref


@pytest.mark.parametrize("name", models_zoo.list_models())
def test_every_zoo_model_records_exactly_on_the_stand_in(name):
    """A recorded Hebbian step of every zoo model (residual adds, concatenations, depthwise convs, dropout)
    replays the eager step exactly: nothing a model computes on the host is baked into its recording."""
    torch.manual_seed(0)
    net = models_zoo.get_model(name, num_classes=10, in_channels=1)
    step, lm, ref = record_beside_eager(net, dict(rule="hebbian", schedule="manual"),
                                        batches(TrainStep.WARMUP + 3, size=4, shape=(1, 32, 32), classes=10),
                                        lambda i, m: m.max_local // 2)
    assert step.account.captures == 1
    state = [[*m.parameters(), *m.buffers()] for m in (lm, ref)]
    assert all(torch.equal(p, q) for p, q in zip(*state))


@pytest.mark.parametrize("rule", list_rules())
@pytest.mark.parametrize("weak_supervision", MODES)
def test_every_local_rule_records_exactly_on_the_stand_in(rule, weak_supervision):
    """Every registered local rule under every weak-supervision mode: its recorded step replays the eager step
    exactly, across a move of t (what the rule and the supervision compute stays on the device)."""
    torch.manual_seed(0)
    per_t = TrainStep.WARMUP + 2
    step, lm, ref = record_beside_eager(
        small_net(), dict(rule=rule, schedule="manual", local_lr=0.05, weak_supervision=weak_supervision),
        batches(2 * per_t), lambda i, m: 1 if i < per_t else 2)
    assert step.account.captures == 2 and step.capture          # t = 1 and t = 2, each recorded, none refused
    state = [[*m.parameters(), *m.buffers()] for m in (lm, ref)]
    assert all(torch.equal(p, q) for p, q in zip(*state))
