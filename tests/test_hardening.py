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
    finally:
        for child in children:
            child.wait(timeout=60)
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
