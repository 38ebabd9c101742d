"""The training loop: exact resume, atomic checkpoints, Ctrl-C, refusal of foreign checkpoints, metrics, plots.

All runs use SmallCNN on a generated 28x28 dataset in the Fashion-MNIST file format (written to a
temporary folder and read through the real loader), a few batches per epoch, on the CPU (where
runs are bit-for-bit reproducible) unless a test is marked ``cuda``.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.devices import DEVICES
from helpers.references import reference_rates
from helpers.state import assert_same_rng_state, without_measurements
from localsgd_fx import LocalSGDError
from localsgd_fx.checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from localsgd_fx.cost import speed_bound
from localsgd_fx.data import DatasetError
from localsgd_fx.lock import LOCK_NAME, RunFolderBusy
from localsgd_fx.metrics import COLUMNS
from localsgd_fx.train import STEP_GAMMA, STEP_MILESTONES, Callback, ConfigError, TrainConfig, Trainer, fit

pytestmark = pytest.mark.single_thread


def config(data_dir: str, out: Path | None, **kw) -> TrainConfig:
    base = dict(model="smallcnn", data_dir=data_dir, train_subset=None, test_subset=None, epochs=4, batch_size=64,
                lr=0.05, out=str(out) if out else None, progress=False, schedule="linear", c1=3, c2=0,
                sample_fraction=0.5, augment=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()



class DrawRandomNumbers(Callback):
    """Draws from the global torch, numpy and Python RNGs at every step (as dropout or user code would)
    and keeps the RNG state captured at every epoch end."""

    def __init__(self):
        self.draws, self.rng_at_epoch_end = [], {}

    def on_step_end(self, trainer, step, loss):
        self.draws.append((trainer.epoch, step, torch.rand(()).item(), float(np.random.rand()), random.random()))

    def on_epoch_end(self, trainer, record):
        self.rng_at_epoch_end[trainer.epoch] = copy.deepcopy(trainer.rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant, stop", [(dict(rule="hebbian", local_lr_schedule="follow"), 3),  # t = 0, 0, 1, 2
                                           (dict(schedule="dynamic", c1=None, c2=None, alpha=0.9, shift=1, rule="oja",
                                                 epochs=5), 4),   # t = 0, 0, 0, 1, 2
                                           (dict(schedule="plasticity", c1=None, c2=None, threshold=0.9, shift=1,
                                                 decide_every=3, epochs=5), 4)],   # every 3 of an epoch's 4 steps:
                                                                                   # t moves in epochs 3 and 5;
                                                                                   # the default rule (freeze)
                         ids=["linear-hebbian", "dynamic-oja", "plasticity-every-3-steps"])
def test_resume_is_exact(data_dir, tmp_path, variant, stop, device, request):
    """Stopping after a local epoch (whose sampled update rows draw random numbers) and resuming
    gives the run of one go: same RNG states, weights, transitions and metrics."""
    if device == "cuda":   # exact only with deterministic kernels; eager (compiled graphs are compared in test_api)
        request.getfixturevalue("cuda_deterministic")
        variant = {**variant, "device": "cuda", "compile": "off"}
    whole_cb, first_cb, resumed_cb = DrawRandomNumbers(), DrawRandomNumbers(), DrawRandomNumbers()
    whole = fit(config(data_dir, tmp_path / "whole", **variant), callbacks=[whole_cb], log=None)
    first = fit(config(data_dir, tmp_path / "split", stop_after=stop, **variant), callbacks=[first_cb], log=None)
    split_ckpt = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert len(first.metrics) == stop and split_ckpt["epoch"] == stop
    assert any(r["t"] > 0 for r in whole.metrics[:stop]), "no local epoch before the resume point"
    assert_same_rng_state(split_ckpt["rng"], whole_cb.rng_at_epoch_end[stop], "checkpoint at the resume point")
    resumed = fit(config(data_dir, tmp_path / "split", resume=True, **variant), callbacks=[resumed_cb], log=None)

    assert first_cb.draws + resumed_cb.draws == whole_cb.draws       # the global RNG streams continue exactly
    assert_same_rng_state(load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["rng"],
                          load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)["rng"], "final checkpoint")
    assert without_measurements(resumed.metrics) == without_measurements(whole.metrics)
    assert resumed.model.transition == whole.model.transition
    if "schedule" not in variant:
        assert [r["t"] for r in whole.metrics] == [0, 0, 1, 2]   # the transition moved across the resume point
    if variant.get("schedule") == "plasticity":                  # it moved inside epochs, also after the resume point
        moves = [h for h in whole.model.history if h["transition"] > h["transition_before"]]
        assert moves and all("step" in h for h in moves) and moves[-1]["epoch"] > stop
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=key)
    assert a["_extra_state"]["schedule"] == b["_extra_state"]["schedule"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(whole.metrics) + 1))


def test_keyboard_interrupt_keeps_last_checkpoint(data_dir, tmp_path):
    seen = {}

    class Interrupt(Callback):
        def on_step_end(self, trainer, step, loss):
            if trainer.epoch == 1 and step == 2:       # in the middle of the second epoch
                seen["digest"] = digest(tmp_path / CHECKPOINT_NAME)
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config(data_dir, tmp_path), callbacks=[Interrupt()], log=None)
    ckpt = tmp_path / CHECKPOINT_NAME
    assert digest(ckpt) == seen["digest"]
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and len(state["metrics"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / LOCK_NAME).exists()                          # the run folder is free again
    resumed = fit(config(data_dir, tmp_path, resume=True), log=None)   # and it resumes
    assert [r["epoch"] for r in resumed.metrics] == [1, 2, 3, 4]


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = digest(path)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    assert digest(path) == before and load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_incompatible_checkpoints_are_refused_without_overwriting(data_dir, tmp_path):
    fit(config(data_dir, tmp_path, epochs=1), log=None)
    ckpt = tmp_path / CHECKPOINT_NAME
    files = {p.name: digest(p) for p in tmp_path.iterdir()}

    with pytest.raises(CheckpointError, match=r"model 'smallcnn'.*model 'resnet20'"):
        fit(config(data_dir, tmp_path, epochs=2, resume=True, model="resnet20"), log=None)
    with pytest.raises(CheckpointError, match="already exists"):      # a fresh run into a used --out
        fit(config(data_dir, tmp_path, epochs=2), log=None)
    state = load_checkpoint(ckpt)
    for change, pattern in ((lambda s: s["config"].update(dataset="cifar10"), "dataset 'cifar10'"),
                            (lambda s: s.update(format_version=FORMAT_VERSION + 1), "format version")):
        other = tmp_path / "other"
        other.mkdir(exist_ok=True)
        tampered = {k: v for k, v in state.items()}
        tampered["config"] = dict(state["config"])
        change(tampered)
        torch.save(tampered, other / CHECKPOINT_NAME)
        kept = digest(other / CHECKPOINT_NAME)
        with pytest.raises(CheckpointError, match=pattern):
            fit(config(data_dir, other, epochs=2, resume=True), log=None)
        assert digest(other / CHECKPOINT_NAME) == kept and sorted(p.name for p in other.iterdir()) == [CHECKPOINT_NAME]
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name != "other"} == files


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_files_and_plots(data_dir, tmp_path, device):
    epochs, lr, alpha, local_lr = 4, 0.05, 0.9, 1e-3     # alpha 0.9: t moves at the end of epoch 3
    result = fit(config(data_dir, tmp_path, epochs=epochs, lr=lr, schedule="dynamic", c1=None, c2=None, alpha=alpha,
                        shift=1, local_lr=local_lr, device=device, compile="off"), log=None)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    header = list(rows[0])
    assert header[:len(COLUMNS)] == list(COLUMNS)
    assert {"sched_delta", "sched_running_avg", "sched_threshold", "sched_moved"} <= set(header)   # δ, W̄
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in jsonl] == [1, 2, 3, 4] and set(COLUMNS) <= set(jsonl[0])
    for row, rec in zip(rows, jsonl):            # the two files say the same
        assert {k: ("" if v is None else str(v)) for k, v in rec.items()} == row

    # the transition chain: each epoch trains with the t chosen at the end of the previous one
    assert jsonl[0]["t"] == 0 and jsonl[-1]["t_next"] == result.model.transition
    assert any(rec["t_next"] > rec["t"] for rec in jsonl), "the transition never moved: nothing to check"
    for prev, rec in zip(jsonl, jsonl[1:]):
        assert rec["t"] == prev["t_next"] >= prev["t"]
    for rec in jsonl:
        assert (rec["local_fraction"] == 0.0) == (rec["t"] == 0) and 0.0 <= rec["local_fraction"] < 1.0
        assert rec["speed_bound"] >= 1.0 and (rec["speed_bound"] > 1.0) == (rec["t"] > 0)
        assert 0.0 <= rec["train_acc"] <= 1.0 and 0.0 <= rec["test_acc"] <= 1.0
        assert math.isfinite(rec["train_loss"]) and rec["train_loss"] > 0 and rec["test_loss"] > 0
        # the dynamic schedule's decision, from its own logged statistics
        assert rec["sched_threshold"] == pytest.approx(alpha * rec["sched_running_avg"])
        assert rec["sched_moved"] == float(rec["t_next"] > rec["t"])
        # per-iteration cosine, read at the end of epoch e: lr0 * (1 + cos(pi * e / epochs)) / 2
        assert rec["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * rec["epoch"] / epochs)) / 2, abs=1e-12)
        assert rec["local_lr"] is None      # the default rule, freeze, has no local rate to record
        # the memory columns of the device
        if device == "cpu":
            assert rec["saved_activation_mb"] > 0 and rec["cuda_peak_mb"] is None
        else:
            assert rec["cuda_peak_mb"] > 0
    assert jsonl[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    for name in ("transition.png", "accuracy_vs_time.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    summary = result.summary()
    for item in ("final test accuracy", "train time", "final t", "local FLOP fraction", "speed", "transition.png"):
        assert item in summary
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == epochs


def test_local_prefix_saves_less_activation_memory(data_dir):
    sgd = Trainer(config(data_dir, None, epochs=2, schedule="sgd", c1=None, c2=None), log=None)
    local = Trainer(config(data_dir, None, epochs=2, schedule="manual", c1=None, c2=None), log=None)
    local.model.set_transition(3)
    a, b = sgd.train_epoch(), local.train_epoch()
    assert b["local_fraction"] > 0.5 and b["saved_activation_mb"] < a["saved_activation_mb"]
    assert b["speed_bound"] > 1.0 and a["local_fraction"] == 0.0


@pytest.mark.parametrize("arm", [dict(schedule="sgd"), dict(rule="hebbian", local_lr=0.01),
                                 dict(rule="freeze")], ids=["SGD", "LoCal", "freeze"])
def test_training_learns(data_dir, arm):
    """The loss falls and accuracy clears chance (10 %) by a wide margin; the local arms spend half
    the run with a local prefix (t = 0, 0, 1, 2 of 5 layers)."""
    kw = {"schedule": "linear", "c1": 3, "c2": 0, **arm}
    if kw["schedule"] == "sgd":
        kw.update(c1=None, c2=None)
    # no augmentation: a random crop shifts the bar that encodes the class
    metrics = fit(config(data_dir, None, epochs=4, batch_size=32, lr=0.1, augment=False, **kw), log=None).metrics
    assert [r["t"] for r in metrics] == ([0, 0, 0, 0] if arm.get("schedule") == "sgd" else [0, 0, 1, 2])
    losses = [r["train_loss"] for r in metrics]
    assert losses[-1] < 0.7 * losses[0] and losses == sorted(losses, reverse=True), losses
    # 3x chance; SmallCNN's global pooling makes the bar's position (the class) hard to see, so ~0.5 is typical
    assert metrics[-1]["train_acc"] >= 0.3 and metrics[-1]["test_acc"] >= 0.3, metrics[-1]


def _applied_lrs(data_dir, **kw) -> tuple[list[float], int]:
    """The learning rate of every optimizer step of a run, and the steps per epoch."""
    trainer = Trainer(config(data_dir, None, **kw), log=None)
    lrs: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    return lrs, len(trainer.batches)


def test_cosine_learning_rate_is_stepped_per_iteration(data_dir):
    lr, epochs = 0.05, 3
    lrs, per_epoch = _applied_lrs(data_dir, lr=lr, epochs=epochs, schedule="sgd", c1=None, c2=None)
    total = epochs * per_epoch
    assert per_epoch > 1 and len(lrs) == total
    assert lrs == pytest.approx([lr * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)], abs=1e-12)


def test_step_learning_rate_drops_at_the_milestones(data_dir):
    lr, epochs = 0.05, 4
    assert (STEP_MILESTONES, STEP_GAMMA) == ((0.5, 0.75), 0.1)     # what the expectation below spells out
    lrs, per_epoch = _applied_lrs(data_dir, lr=lr, epochs=epochs, lr_schedule="step", schedule="sgd", c1=None, c2=None)
    # x0.1 from epoch 2 (50 % of 4 epochs), x0.01 from epoch 3 (75 %), constant within an epoch
    expected = [lr] * (2 * per_epoch) + [lr * 0.1] * per_epoch + [lr * 0.01] * per_epoch
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_trainer_feeds_every_loss_to_weak_supervision(data_dir):
    """observe_loss gets each step's loss: the local rate after every step is the one weak
    supervision gives for the losses so far, and the metrics log the rate at each epoch end."""
    local_lr = 0.01

    class Record(Callback):
        def __init__(self):
            self.losses, self.rates = [], []

        def on_step_end(self, trainer, step, loss):
            self.losses.append(loss.item())
            self.rates.append(trainer.model.supervision.lr.item())

    rec = Record()
    trainer = Trainer(config(data_dir, None, epochs=3, rule="hebbian", local_lr=local_lr, weak_supervision="sign"),
                      callbacks=[rec], log=None)
    trainer.fit()
    steps = 3 * len(trainer.batches)
    assert len(rec.losses) == steps and int(trainer.model.supervision.steps) == steps
    expected, ambiguous = reference_rates("sign", rec.losses, local_lr)
    for s, (got, want, amb) in enumerate(zip(rec.rates, expected[1:], ambiguous[1:])):
        assert amb or got == pytest.approx(want, rel=1e-6), f"step {s}: local rate {got}, expected {want}"
    assert {math.copysign(1, r) for r in rec.rates} == {1.0, -1.0}     # it evolves: rises turn it anti-Hebbian
    per_epoch = len(trainer.batches)
    assert [r["local_lr"] for r in trainer.metrics] == pytest.approx(rec.rates[per_epoch - 1::per_epoch])


def test_local_rate_follows_the_sgd_learning_rate_when_asked(data_dir):
    """--local-lr-schedule follow: after every step the local rate's size is η0 times the SGD LR's
    schedule factor (cosine to 0), with weak supervision's sign unchanged."""
    local_lr, lr = 0.01, 0.05

    class Record(Callback):
        def __init__(self):
            self.rates, self.factors = [], []

        def on_step_end(self, trainer, step, loss):
            self.rates.append(trainer.model.supervision.lr.item())
            self.factors.append(trainer.optimizer.param_groups[0]["lr"] / lr)

    follow, constant = Record(), Record()
    for rec, schedule in ((follow, "follow"), (constant, "constant")):
        Trainer(config(data_dir, None, epochs=3, rule="hebbian", lr=lr, local_lr=local_lr, local_lr_schedule=schedule),
                callbacks=[rec], log=None).fit()
    assert follow.factors == constant.factors and follow.factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert [abs(r) for r in constant.rates] == pytest.approx([local_lr] * len(constant.rates))
    assert [abs(r) for r in follow.rates] == pytest.approx([local_lr * f for f in follow.factors], rel=1e-6, abs=1e-12)
    with pytest.raises(ConfigError, match="local_lr_schedule must be one of constant, follow"):
        config(data_dir, None, local_lr_schedule="decay").validate()


def test_dynamic_per_lr_gets_each_epochs_mean_learning_rate(data_dir):
    """--per-lr: the trainer hands Dynamic the mean of the rates its optimizer steps used, so the
    transition layer's compared δ is its raw update norm divided by that mean."""
    lr = 0.05
    trainer = Trainer(config(data_dir, None, epochs=3, lr=lr, schedule="dynamic", c1=None, c2=None, per_lr=True),
                      log=None)
    trainer.fit()
    steps, factor = len(trainer.batches), trainer._lr_factor()
    last = trainer.model.history[-1]                       # epoch 3, decided at its end
    mean_lr = sum(lr * factor(s) for s in range(2 * steps, 3 * steps)) / steps
    assert trainer.model.schedule.log_stats()["delta"] == pytest.approx(last["update_norm"] / mean_lr, rel=1e-9)
    with pytest.raises(ConfigError, match="--per-lr is an option of the dynamic schedule"):
        config(data_dir, None, schedule="gradnorm", c1=None, c2=None, per_lr=True).validate()


def test_signal_schedule_moves_the_boundary_inside_an_epoch(data_dir):
    trainer = Trainer(config(data_dir, None, epochs=3, schedule="gradnorm", c1=None, c2=None, threshold=10.0,
                             patience=1, shift=1, decide_every=0.5), log=None)
    assert trainer.model.schedule.decide_every == 2              # half of the 4 steps of an epoch
    records = [trainer.train_epoch() for _ in range(3)]
    # every change of the gradient norm is "settled" here: after the epoch-1 warm-up, the first check of an epoch
    # moves (a new layer's first check sets its reference, so the second one cannot)
    assert [(r["t"], r["t_next"]) for r in records] == [(0, 0), (0, 1), (1, 2)]
    moves = [(h["epoch"], h["step"]) for h in trainer.model.history if h["transition"] > h["transition_before"]]
    assert moves == [(2, 2), (3, 2)]                             # in the middle of epochs 2 and 3
    order, lm = trainer.model.layer_order, trainer.model
    for r in records[1:]:                                        # half of each epoch at t, half at t + 1
        p = (order.local_fraction(r["t"]) + order.local_fraction(r["t_next"])) / 2
        assert r["local_fraction"] == pytest.approx(p) and r["local_fraction"] > 0
        cost = sum(0.5 / speed_bound(order.local_fraction(t), lm.rule.gemms, lm.sample_fraction)
                   for t in (r["t"], r["t_next"]))
        assert r["speed_bound"] == pytest.approx(1 / cost)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="--alpha is an option of the dynamic schedule"):
        TrainConfig(schedule="quadratic", alpha=0.2).validate()
    with pytest.raises(ConfigError, match="--threshold is an option of the plasticity/gradnorm schedule"):
        TrainConfig(schedule="dynamic", threshold=0.2).validate()
    with pytest.raises(ConfigError,
                       match="--probe-size is an option of the plasticity schedule, not of schedule 'gradnorm'"):
        TrainConfig(schedule="gradnorm", probe_size=8).validate()
    with pytest.raises(ConfigError,
                       match=r"--decide-every must be an int >= 1 \(training steps\) or a float in \(0, 1\]"):
        TrainConfig(schedule="gradnorm", decide_every=1.5).validate()
    with pytest.raises(ValueError, match="unknown model 'nope'.*resnet20"):
        TrainConfig(model="nope").validate()
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).validate()


def test_resume_with_other_hyperparameters_is_refused_and_changes_nothing(data_dir, tmp_path):
    fit(config(data_dir, tmp_path, stop_after=1), log=None)
    files = {p.name: digest(p) for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError) as info:
        fit(config(data_dir, tmp_path, resume=True, lr=0.5, local_lr=0.01), log=None)
    msg = str(info.value)
    assert "--local-lr 0.0001 in the checkpoint, 0.01 given; --lr 0.05 in the checkpoint, 0.5 given" in msg
    assert "another --out" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="--epochs 4 in the checkpoint, 6 given.*--stop-after"):
        fit(config(data_dir, tmp_path, resume=True, epochs=6), log=None)
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == files     # config.json included: nothing recorded
    # what only steers the run may change
    resumed = fit(config(data_dir, tmp_path, resume=True, stop_after=2, eval_batch_size=100, device="cpu",
                         compile="off"), log=None)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["lr"], saved["local_lr"], saved["eval_batch_size"]) == (0.05, config(data_dir, None).local_lr, 100)


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that takes the run folder's lock and keeps it until its stdin closes."""
    code = ("import sys; from localsgd_fx.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")   # exits without releasing: a stale lock
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parents[1])
    assert child.stdout.readline().strip() == "held"
    return child


def test_run_folder_is_locked_against_a_second_run(data_dir, tmp_path):
    out = tmp_path / "run"
    child = _hold_lock(out)
    try:
        with pytest.raises(RunFolderBusy) as info:
            fit(config(data_dir, out, epochs=1), log=None)
        assert f"process {child.pid} on host {socket.gethostname()}" in str(info.value)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]     # the refused run wrote nothing
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    # the holder died without releasing it: its lock is stale and is taken over, with a note
    notes: list[str] = []
    result = fit(config(data_dir, out, epochs=1), log=notes.append)
    assert len(result.metrics) == 1 and f"from process {child.pid}" in notes[0] and "no longer runs" in notes[0]
    assert not (out / LOCK_NAME).exists()


def test_refusals_leave_no_folder_and_no_lock(data_dir, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(config(data_dir, tmp_path / "new", resume=True), log=None)
    assert not (tmp_path / "new").exists()


def test_overwrite_starts_over_without_the_old_record(data_dir, tmp_path):
    fit(config(data_dir, tmp_path, epochs=2), log=None)

    class Interrupt(Callback):
        def on_step_end(self, trainer, step, loss):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):   # the new run stops in its first step
        fit(config(data_dir, tmp_path, epochs=3, lr=0.02, overwrite=True), callbacks=[Interrupt()], log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.02


def test_oversized_subset_is_refused(data_dir):
    with pytest.raises(ConfigError, match=r"--train-subset 1000 asks for more images than the fashion-mnist train "
                                          r"split holds \(256\): pass at most 256, or 0"):
        Trainer(config(data_dir, None, train_subset=1000), log=None)
    assert len(Trainer(config(data_dir, None, train_subset=256), log=None).train_set) == 256


def test_library_errors_share_one_base():
    for error in (ConfigError, CheckpointError, DatasetError):
        assert issubclass(error, LocalSGDError) and issubclass(error, ValueError)
    assert issubclass(RunFolderBusy, LocalSGDError)
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        TrainConfig(resume=True, overwrite=True).validate()
    for value in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="local_lr must be a finite number"):
            TrainConfig(local_lr=value).validate()
