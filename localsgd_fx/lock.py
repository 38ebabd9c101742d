"""A lock on a run folder, so that two runs never write into the same ``--out`` at once.

The lock is the file ``OUT/.lock``, held with ``fcntl.flock`` while the run lasts and holding the
owner's process id, host name and start time. A second run into the folder is refused with
:class:`RunFolderBusy`, naming the owner. A lock left behind by a process that no longer runs (on
this host: SIGKILL, a power cut) is taken over with a message; one from another host is never
guessed about. The owner deletes the lock when it ends, Ctrl-C and exceptions included.

Example::

    >>> with RunLock("runs/x"):            # doctest: +SKIP
    ...     train_into("runs/x")
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:   # not POSIX
    fcntl = None  # type: ignore[assignment]

from passes.errors import LocalSGDError

__all__ = ["RunLock", "RunFolderBusy", "LOCK_NAME"]

#: The lock's file name inside a run folder.
LOCK_NAME = ".lock"


class RunFolderBusy(LocalSGDError):
    """Another run holds the run folder's lock; the message names its process and host."""


class RunLock:
    """The lock of the run folder ``folder`` (created if missing); use it as a context manager.

    Args:
        folder: the run folder.
        log: where the note about taking over a stale lock goes.
    """

    def __init__(self, folder: str | os.PathLike[str], *, log: Callable[[str], None] | None = print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.log = log or (lambda _msg: None)
        self._held = False
        self._made_folder = False
        self._fd = -1

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunFolderBusy` naming the process that holds it.

        The lock file is held with ``fcntl.flock`` while the run lasts, so taking over a stale lock is
        atomic: of two processes that find the same stale lock, one gets the flock and the other is
        refused. After taking the flock the file is checked to still be the one at ``.lock`` (a
        releasing owner deletes it), else the lock is taken again from the start.
        """
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(5):   # again when the file was deleted or replaced between opening and locking it
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                if not _flock(fd):   # a live process holds it
                    owner = self._owner()
                    if owner["pid"] is None or _is_stale(owner):   # the new owner has not written its name yet
                        raise RunFolderBusy(f"{self.folder} is being locked by another run at this moment; try "
                                            "again, or use another --out")
                    raise RunFolderBusy(_busy_message(self.folder, self.path, owner))
                if not _same_file(fd, self.path):   # re-check: the owner released (deleted) it meanwhile
                    os.close(fd)
                    continue
                owner = self._owner(fd)   # what the locked file says, not whatever .lock names by now
                if os.fstat(fd).st_size and not _is_stale(owner):   # held by a run that takes no flock
                    raise RunFolderBusy(_busy_message(self.folder, self.path, owner))
                if owner["pid"] is not None:
                    self.log(f"note: taking over the lock of {self.folder} from process {owner['pid']} on "
                             f"{owner['host']}, which no longer runs")
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except BaseException:
                os.close(fd)
                self._drop_made_folder()
                raise
            self._fd, self._held = fd, True
            return self
        self._drop_made_folder()
        raise RunFolderBusy(f"{self.folder} is being locked by another run at this moment; try again, or use "
                            "another --out")

    def release(self) -> None:
        """Delete the lock (and the folder, if this lock created it and nothing else was written)."""
        if self._held:
            self._held = False
            self.path.unlink(missing_ok=True)   # before unlocking: a waiter then finds another file and retries
            os.close(self._fd)
            self._drop_made_folder()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _owner(self, fd: int | None = None) -> dict[str, Any]:
        """The owner named in ``.lock`` (in the file open as ``fd``, if given)."""
        try:
            text = os.pread(fd, 1 << 16, 0).decode() if fd is not None else self.path.read_text(encoding="utf-8")
            owner = json.loads(text)
        except (OSError, ValueError):
            owner = None
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {"pid": None, "host": None}

    def _drop_made_folder(self) -> None:
        if self._made_folder:
            try:
                self.folder.rmdir()   # only if empty
            except OSError:
                pass


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another open file holds it."""
    if fcntl is None:   # no flock on this platform: the owner's process id alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _is_stale(owner: dict[str, Any]) -> bool:
    """A lock of a process that is gone: only decidable for a process on this host."""
    if owner["pid"] is None or owner["host"] != socket.gethostname() or os.name != "posix":
        return False
    try:
        os.kill(owner["pid"], 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:       # it exists, under another user
        return False
    return False


def _busy_message(folder: Path, path: Path, owner: dict[str, Any]) -> str:
    if owner["pid"] is None:
        return (f"{folder} is locked by another run ({path} exists but names no process): wait for that run to "
                f"finish or use another --out; if no run uses the folder, delete {path}")
    return (f"{folder} is in use by another run (process {owner['pid']} on host {owner['host']}, since "
            f"{owner.get('since', '?')}): wait for it to finish or use another --out; if that process is gone, "
            f"delete {path}")
