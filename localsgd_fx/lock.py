"""A lock on a run folder, so that two runs never write into the same ``--out`` at once.

The lock is the file ``OUT/.lock``, created exclusively (``O_CREAT | O_EXCL``) and holding the
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

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunFolderBusy` naming the process that holds it."""
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):   # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not _is_stale(owner):
                    self._drop_made_folder()
                    raise RunFolderBusy(_busy_message(self.folder, self.path, owner)) from None
                self.log(f"note: taking over the lock of {self.folder} from process {owner['pid']} on "
                         f"{owner['host']}, which no longer runs")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise RunFolderBusy(f"{self.folder} is being locked by another run at this moment; try again, or use another --out")

    def release(self) -> None:
        """Delete the lock (and the folder, if this lock created it and nothing else was written)."""
        if self._held:
            self._held = False
            self.path.unlink(missing_ok=True)
            self._drop_made_folder()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = None
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {"pid": None, "host": None}

    def _drop_made_folder(self) -> None:
        if self._made_folder:
            try:
                self.folder.rmdir()   # only if empty
            except OSError:
                pass


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
