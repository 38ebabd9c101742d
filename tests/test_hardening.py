"""Hardening, round two (issue 22): nothing a user owns is overwritten, no crash a resume cannot pass, one line
for every bad input. One regression test (or more) per item of the issue; the LocalSGDModule side is in
``test_hardening_api.py``.

Training runs take ``--device cpu`` and tiny data (the ``data_dir`` fixture)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import localsgd_fx.lock as lock_module
from localsgd_fx.lock import LOCK_NAME, RunFolderBusy, RunLock

pytestmark = pytest.mark.single_thread

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The process id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _stale_lock(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}))


# ---------------------------------------------------------------------------------------------- item 7: the lock
_CONTENDER = """
import os, sys, time
from pathlib import Path
from localsgd_fx.lock import RunLock, RunFolderBusy
folder, trials, me = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def wait(path):
    while not path.exists():
        time.sleep(0.0002)
print("ready", flush=True)
for i in range(trials):
    wait(folder.parent / f"go{i}")
    lock = RunLock(folder, log=None)
    try:
        lock.acquire()
        got = "held"
    except RunFolderBusy:
        got = "busy"
    (folder.parent / f"{me}-{i}").write_text(got)
    wait(folder.parent / f"done{i}")
    if got == "held":
        os.close(lock._fd)   # dies holding it: the file stays
"""


def test_two_processes_taking_over_a_stale_lock_never_both_hold_it(tmp_path):
    """Real concurrent processes: each trial leaves a stale lock, releases both at once; exactly one may hold it."""
    folder, trials, dead = tmp_path / "run", 30, _dead_pid()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(folder), str(trials), name], env=env,
                                 stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    finished = False
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for i in range(trials):
            _stale_lock(folder, dead)
            (tmp_path / f"go{i}").touch()
            results = [tmp_path / f"{name}-{i}" for name in ("a", "b")]
            deadline = time.monotonic() + 60
            while not all(r.exists() and r.read_text() for r in results):
                assert time.monotonic() < deadline, "a contender hangs"
                time.sleep(0.001)
            assert sorted(r.read_text() for r in results) == ["busy", "held"], f"trial {i}"
            (tmp_path / f"done{i}").touch()
        finished = True
    finally:
        for child in children:
            try:
                child.wait(timeout=60 if finished else 0.1)
            except subprocess.TimeoutExpired:   # a failed trial: the contenders wait for the next one
                child.kill()
                child.wait()
    assert all(child.returncode == 0 for child in children)


def test_a_lock_replaced_between_opening_and_locking_is_taken_again(tmp_path, monkeypatch):
    """The re-check after the flock: the file this run opened was deleted and another run made a new one."""
    folder = tmp_path / "run"
    _stale_lock(folder, _dead_pid())
    other = RunLock(folder, log=None)
    real = lock_module._flock

    def others_get_there_first(fd):
        monkeypatch.setattr(lock_module, "_flock", real)
        (folder / LOCK_NAME).unlink()       # a run took the stale lock over and ended ...
        other.acquire()                     # ... and another one holds the folder now
        return real(fd)                     # this run's flock on the deleted file succeeds

    monkeypatch.setattr(lock_module, "_flock", others_get_there_first)
    late = RunLock(folder, log=None)
    with pytest.raises(RunFolderBusy, match=f"process {os.getpid()}"):
        late.acquire()
    assert other._held and not late._held
    other.release()
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_is_released_and_taken_again(tmp_path):
    notes: list[str] = []
    with RunLock(tmp_path / "run", log=notes.append):
        with pytest.raises(RunFolderBusy, match=f"process {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists() and notes == []       # the folder it made is gone again
    _stale_lock(tmp_path / "run", _dead_pid())
    with RunLock(tmp_path / "run", log=notes.append):
        pass
    assert "no longer runs" in notes[0]


# ---------------------------------------------------------------------------------------------- the CLI runs
SMALL = ["--model", "smallcnn", "--train-subset", "192", "--test-subset", "128", "--batch-size", "64", "--no-progress",
         "--device", "cpu"]


def train(data_dir: str, out: Path | str, *extra: str) -> int:
    from localsgd_fx.cli import main

    return main(["train", *SMALL, "--data-dir", str(data_dir), "--out", str(out), *extra])


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("localsgd") and "error:" in err and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_item1_a_new_run_never_overwrites_files_it_did_not_write(data_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine":1}')
    assert train(data_dir, mine, "--epochs", "1") == 2
    one_line_error(capsys, f"--out {mine} already holds files that a new run must not overwrite (config.json)",
                   "another --out")
    assert files_of(mine) == {"config.json": b'{"mine":1}'}
    # a finished run whose checkpoint was deleted keeps its record; --overwrite replaces it, and only it
    done = tmp_path / "done"
    assert train(data_dir, done, "--epochs", "1") == 0
    (done / "checkpoint.pt").unlink()
    (done / "notes.txt").write_text("keep me")
    record = files_of(done)
    capsys.readouterr()
    assert train(data_dir, done, "--epochs", "1") == 2
    one_line_error(capsys, "config.json, metrics.csv, metrics.jsonl, notes.txt and 2 more", "--overwrite")
    assert files_of(done) == record
    assert train(data_dir, done, "--epochs", "1", "--overwrite") == 0
    assert (done / "notes.txt").read_text() == "keep me" and (done / "checkpoint.pt").exists()
    # an existing empty folder takes a new run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(data_dir, empty, "--epochs", "1") == 0


def test_item2_an_empty_out_is_refused(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train(data_dir, "", "--epochs", "1") == 2
    one_line_error(capsys, "--out must name a folder, got ''")
    assert list(tmp_path.iterdir()) == []


def test_item3_max_local_leaves_a_layer_to_sgd_and_the_run_ends(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path / "x", "--epochs", "1", "--max-local", "5") == 2
    one_line_error(capsys, "--max-local 5 is out of range for smallcnn (5 layers): pass 0..4")
    assert not (tmp_path / "x").exists()
    # the reproducer with the largest valid --max-local: t stops at 4, every epoch trains
    out = tmp_path / "run"
    assert train(data_dir, out, "--epochs", "4", "--max-local", "4", "--schedule", "dynamic", "--shift", "99",
                 "--alpha", "0.99") == 0
    ts = [json.loads(line)["t"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ts) == 4 and max(ts) == 4


def test_item3_a_checkpoint_past_max_local_is_refused_on_resume(data_dir, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert train(data_dir, out, "--epochs", "2", "--stop-after", "1") == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["model"]["_extra_state"]["transition"] = 5          # what the old --max-local 5 could leave
    torch.save(state, out / "checkpoint.pt")
    record = files_of(out)
    capsys.readouterr()
    assert train(data_dir, out, "--epochs", "2", "--resume") == 2
    one_line_error(capsys, "is at t=5, past the 4 layers that may be local")
    assert files_of(out) == record


def test_item5_resume_refuses_other_data_but_not_another_path(data_dir, tmp_path, capsys):
    from helpers.data import write_tiny_fmnist

    out = tmp_path / "run"
    assert train(data_dir, out, "--epochs", "2", "--stop-after", "1") == 0
    record = files_of(out)
    other = write_tiny_fmnist(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert train(other, out, "--epochs", "2", "--resume") == 2
    one_line_error(capsys, "was trained on other train data than --data-dir " + str(other))
    assert files_of(out) == record                                   # config.json still names the old folder
    same = tmp_path / "same"
    same.mkdir()
    for f in Path(data_dir).iterdir():
        (same / f.name).write_bytes(f.read_bytes())
    assert train(same, out, "--epochs", "2", "--resume") == 0        # the same images elsewhere
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(same)


def _fail_second_checkpoint(monkeypatch) -> None:
    """The second checkpoint write runs out of space half-way (simulated: the first real ENOSPC test needs a tmpfs)."""
    import errno

    import torch

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_item6_disk_full_is_one_line_and_keeps_the_checkpoint_simulated(data_dir, tmp_path, capsys, monkeypatch):
    from localsgd_fx.checkpoint import load_checkpoint

    _fail_second_checkpoint(monkeypatch)
    out = tmp_path / "run"
    assert train(data_dir, out, "--epochs", "3") == 2
    one_line_error(capsys, f"the disk holding {out} is full", "the last checkpoint (epoch 1) is intact", "--resume")
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / LOCK_NAME).exists()
    assert train(data_dir, out, "--epochs", "3", "--resume") == 0


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (needs root and the right to mount; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_item6_disk_full_on_a_real_full_disk(data_dir, small_tmpfs):
    from localsgd_fx.checkpoint import load_checkpoint
    from localsgd_fx.run_folder import DiskFullError
    from localsgd_fx.train import Callback, TrainConfig, fit

    class FillDisk(Callback):
        def on_epoch_end(self, trainer, record):
            if record["epoch"] == 2:            # after checkpoint 1, before checkpoint 2: nothing left
                fd = os.open(small_tmpfs / "filler", os.O_CREAT | os.O_WRONLY)
                try:
                    while os.write(fd, b"\0" * 4096):
                        pass
                except OSError:
                    pass
                finally:
                    os.close(fd)

    out = small_tmpfs / "run"
    cfg = TrainConfig(model="smallcnn", data_dir=data_dir, train_subset=192, test_subset=128, batch_size=64, epochs=3,
                      out=str(out), progress=False, device="cpu")
    with pytest.raises(DiskFullError, match=r"is full \(No space left on device\).*checkpoint \(epoch 1\) is intact"):
        fit(cfg, callbacks=[FillDisk()], log=None)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_item8_damaged_checkpoints_are_one_line(data_dir, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert train(data_dir, out, "--epochs", "2", "--stop-after", "1") == 0
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    for damage, needle in ((lambda s: s.pop("optimizer"), "lacks optimizer"),
                           (lambda s: s["model"].update({"model.fc.weight": torch.zeros(3, 3)}),
                            "does not fit this run's model or optimizer")):
        state = {**good, "model": dict(good["model"])}
        damage(state)
        torch.save(state, out / "checkpoint.pt")
        record = files_of(out)
        capsys.readouterr()
        assert train(data_dir, out, "--epochs", "2", "--resume") == 2
        one_line_error(capsys, needle)
        assert files_of(out) == record


def test_item8_bench_tradeoff_from_json_needs_a_tradeoff_json(tmp_path, capsys):
    from localsgd_fx.cli import main

    for name, text in (("summary.json", json.dumps({"final_test_acc": 0.5})), ("empty.json", "{}"),
                       ("list.json", "[]"), ("bad.json", "{")):
        (tmp_path / name).write_text(text)
        assert main(["bench", "tradeoff", "--from-json", str(tmp_path / name)]) == 2
        one_line_error(capsys, f"--from-json {tmp_path / name}")


def test_item10_data_dir_that_is_a_file(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train(tmp_path / "file", tmp_path / "run", "--epochs", "1") == 2
    one_line_error(capsys, "it is a file, not a folder")


def test_item10_divergence_is_named(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path / "run", "--epochs", "2", "--lr", "1e6") == 2
    one_line_error(capsys, "training diverged in epoch ", "lower --lr (now 1000000.0)")


def test_item10_settings_a_run_would_not_use(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path / "a", "--epochs", "1", "--rule", "hebbian", "--schedule", "sgd") == 2
    one_line_error(capsys, "--rule hebbian has no effect: --schedule sgd trains every layer by SGD")
    assert not (tmp_path / "a").exists()
    assert train(data_dir, tmp_path / "b", "--epochs", "1", "--local-lr", "0.01", "--weak-supervision", "off") == 0
    text = capsys.readouterr().out
    assert "warning: --local-lr 0.01 has no effect: rule 'freeze' makes no local update" in text
    assert "warning: --weak-supervision off has no effect" in text


def test_item10_left_temp_files_are_cleaned_and_modes_follow_the_umask(data_dir, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert train(data_dir, out, "--epochs", "2", "--stop-after", "1") == 0
        for p in out.iterdir():
            assert p.stat().st_mode & 0o777 == 0o640, p.name
    finally:
        os.umask(old)
    left = out / ".checkpoint.pt.k1ll3d.tmp"          # a kill during a checkpoint write
    left.write_bytes(b"half")
    assert train(data_dir, out, "--epochs", "2", "--resume") == 0
    assert not left.exists()
    left.write_bytes(b"half")
    assert train(data_dir, out, "--epochs", "1", "--overwrite") == 0
    assert not left.exists()


def test_item10_runs_started_in_the_same_second_get_their_own_folders(data_dir, tmp_path, monkeypatch):
    from localsgd_fx.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20260101-000000")
    for _ in range(2):
        assert main(["train", *SMALL, "--data-dir", data_dir, "--epochs", "1"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["smallcnn-fashion-mnist-20260101-000000", "smallcnn-fashion-mnist-20260101-000000-2"]
    # a refused run leaves no folder behind
    assert main(["train", *SMALL, "--data-dir", data_dir, "--epochs", "1", "--lr", "-1"]) == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def test_item10_usage_errors_are_one_line(capsys):
    from localsgd_fx.cli import main

    for argv in (["train", "--rule", "nope"], ["train", "--epochs", "x"], ["bench", "step", "--device", "tpu"],
                 ["bench", "tradeoff", "--arms", "nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "error:" in err and "--help" in err and "usage" not in err, err


def test_item3_bench_step_refuses_an_all_local_transition(capsys):
    from localsgd_fx.cli import main

    assert main(["bench", "step", "--model", "smallcnn", "--transitions", "5", "--device", "cpu"]) == 2
    one_line_error(capsys, "--transitions 5 is past the 4 layers that may be local (of 5): pass values in 0..4")


def test_item10_weights_beyond_the_float_range_are_divergence_too(data_dir):
    """With real data and --lr 1e6 the loss stayed finite while the weights' norms overflowed."""
    import torch

    from localsgd_fx.train import Callback, TrainConfig, TrainingDiverged, fit

    class Blow(Callback):
        def on_step_end(self, trainer, step, loss):
            with torch.no_grad():
                trainer.model.model.fc.weight.fill_(1e20)          # finite, but its norm is not

    cfg = TrainConfig(model="smallcnn", data_dir=data_dir, train_subset=192, test_subset=128, batch_size=64, epochs=2,
                      out=None, progress=False, device="cpu")
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1: the weights grew beyond the float range"):
        fit(cfg, callbacks=[Blow()], log=None)
