"""The training loop: exact resume, atomic checkpoints, Ctrl-C, refusal of foreign checkpoints, metrics, plots.

All runs use SmallCNN on a generated 28x28 dataset in the Fashion-MNIST file format (written to a
temporary folder and read through the real loader), a few batches per epoch.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from localsgd_fx.checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint,
                                    save_checkpoint)
from localsgd_fx.metrics import COLUMNS, TIME_COLUMNS
from localsgd_fx.train import Callback, Trainer, TrainConfig, fit
from passes.inspection import speed_bound


def config(data_dir: str, out: Path | None, **kw) -> TrainConfig:
    base = dict(model="smallcnn", data_dir=data_dir, train_subset=None, test_subset=None, epochs=4, batch_size=64,
                lr=0.05, out=str(out) if out else None, progress=False, schedule="linear", c1=3, c2=0,
                sample_fraction=0.5, augment=True)
    base.update(kw)
    return TrainConfig(**base)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_times(records):
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in records]


@pytest.mark.parametrize("variant", [dict(), dict(schedule="dynamic", c1=None, c2=None, alpha=0.9, shift=1, rule="oja"),
                                     dict(schedule="plasticity", c1=None, c2=None, threshold=0.9, shift=1, decide_every=3)],
                         ids=["linear-hebbian", "dynamic-oja", "plasticity-every-3-steps"])
def test_resume_is_exact(data_dir, tmp_path, variant):
    whole = fit(config(data_dir, tmp_path / "whole", **variant), log=None)
    first = fit(config(data_dir, tmp_path / "split", stop_after=2, **variant), log=None)
    assert len(first.metrics) == 2 and load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["epoch"] == 2
    resumed = fit(config(data_dir, tmp_path / "split", resume=True, **variant), log=None)

    assert without_times(resumed.metrics) == without_times(whole.metrics)
    assert resumed.model.transition == whole.model.transition
    if "schedule" not in variant:
        assert [r["t"] for r in whole.metrics] == [0, 0, 1, 2]   # the transition moved across the resume point
    if variant.get("schedule") == "plasticity":                  # decisions every 3 of the 4 steps of an epoch
        moves = [h for h in whole.model.history if h["transition"] > h["transition_before"]]
        assert moves and all("step" in h for h in moves) and moves[-1]["epoch"] > 2   # after the resume point
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=key)
    assert a["_extra_state"]["schedule"] == b["_extra_state"]["schedule"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


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


def test_metrics_files_and_plots(data_dir, tmp_path):
    result = fit(config(data_dir, tmp_path, epochs=3, schedule="dynamic", c1=None, c2=None), log=None)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    header = list(rows[0])
    assert header[:len(COLUMNS)] == list(COLUMNS)
    assert {"sched_delta", "sched_running_avg"} <= set(header)          # the schedule's δ and W̄
    assert float(rows[0]["saved_activation_mb"]) > 0 and rows[0]["cuda_peak_mb"] == ""
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in jsonl] == [1, 2, 3] and set(COLUMNS) <= set(jsonl[0])
    for name in ("transition.png", "accuracy_vs_time.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    summary = result.summary()
    for item in ("final test accuracy", "train time", "final t", "local FLOP fraction", "speed", "transition.png"):
        assert item in summary
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 3


def test_local_prefix_saves_less_activation_memory(data_dir):
    sgd = Trainer(config(data_dir, None, epochs=2, schedule="sgd", c1=None, c2=None), log=None)
    local = Trainer(config(data_dir, None, epochs=2, schedule="manual", c1=None, c2=None), log=None)
    local.model.set_transition(3)
    a, b = sgd.train_epoch(), local.train_epoch()
    assert b["local_fraction"] > 0.5 and b["saved_activation_mb"] < a["saved_activation_mb"]
    assert b["speed_bound"] > 1.0 and a["local_fraction"] == 0.0


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
    with pytest.raises(ValueError, match="--threshold is an option of the plasticity/gradnorm schedule"):
        TrainConfig(schedule="dynamic", threshold=0.2).validate()
    with pytest.raises(ValueError, match="--probe-size is an option of the plasticity schedule, not of schedule 'gradnorm'"):
        TrainConfig(schedule="gradnorm", probe_size=8).validate()
    with pytest.raises(ValueError, match=r"--decide-every must be an int >= 1 \(training steps\) or a float in \(0, 1\]"):
        TrainConfig(schedule="gradnorm", decide_every=1.5).validate()
    with pytest.raises(ValueError, match="unknown model 'nope'.*resnet20"):
        TrainConfig(model="nope").validate()
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).validate()
