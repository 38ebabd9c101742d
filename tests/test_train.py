"""The training loop: exact resume, atomic checkpoints, Ctrl-C, refusal of foreign checkpoints, metrics, plots.

All runs use SmallCNN on a generated 28x28 dataset in the Fashion-MNIST file format (written to a
temporary folder and read through the real loader), a few batches per epoch.
"""
from __future__ import annotations

import csv
import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localsgd_fx import LocalSGDError
from localsgd_fx.checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint,
                                    save_checkpoint)
from localsgd_fx.data import DatasetError
from localsgd_fx.lock import LOCK_NAME, RunFolderBusy
from localsgd_fx.metrics import COLUMNS, TIME_COLUMNS
from localsgd_fx.train import Callback, ConfigError, Trainer, TrainConfig, fit


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


@pytest.mark.parametrize("variant", [dict(), dict(schedule="dynamic", c1=None, c2=None, alpha=0.9, shift=1, rule="oja")],
                         ids=["linear-hebbian", "dynamic-oja"])
def test_resume_is_exact(data_dir, tmp_path, variant):
    whole = fit(config(data_dir, tmp_path / "whole", **variant), log=None)
    first = fit(config(data_dir, tmp_path / "split", stop_after=2, **variant), log=None)
    assert len(first.metrics) == 2 and load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["epoch"] == 2
    resumed = fit(config(data_dir, tmp_path / "split", resume=True, **variant), log=None)

    assert without_times(resumed.metrics) == without_times(whole.metrics)
    assert resumed.model.transition == whole.model.transition
    if variant.get("schedule") != "dynamic":
        assert [r["t"] for r in whole.metrics] == [0, 0, 1, 2]   # the transition moved across the resume point
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


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="--alpha is an option of the dynamic schedule"):
        TrainConfig(schedule="quadratic", alpha=0.2).validate()
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
