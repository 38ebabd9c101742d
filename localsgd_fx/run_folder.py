"""The run folder (``--out``): which files a run writes there, and what it refuses to touch.

A run writes only :data:`RUN_FILES` (and the lock, :mod:`localsgd_fx.lock`). Before it writes
anything, with the lock held, :func:`prepare_run_folder` checks the folder:

* a new run goes into a new or empty folder; a folder holding a checkpoint is refused (continue
  it with ``--resume``), and so is one holding any other file (a user's file, or the record of a
  run whose checkpoint was deleted): a run never overwrites what it did not write;
* ``--overwrite`` deletes the run files of the previous run (and leaves every other file);
* ``--resume`` continues the run whose checkpoint is there.

Temporary files that a killed write left behind (``.checkpoint.pt.XXXX.tmp``) are deleted in every
case. :func:`new_run_folder` makes a fresh folder for a run without ``--out`` (two runs started in
the same second get two folders), and :func:`disk_full_guard` turns a full disk into one line.

Example::

    >>> with RunLock(out):                                                 # doctest: +SKIP
    ...     prepare_run_folder(out, resume=False, overwrite=False)
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from passes.errors import LocalSGDError

from .checkpoint import CHECKPOINT_NAME, CheckpointError
from .lock import LOCK_NAME

__all__ = ["RUN_FILES", "RunFolderError", "DiskFullError", "prepare_run_folder", "new_run_folder",
           "disk_full_guard"]

#: The files a run writes into its folder (``--overwrite`` deletes them before starting over).
RUN_FILES = (CHECKPOINT_NAME, "config.json", "metrics.jsonl", "metrics.csv", "summary.json", "transition.png",
             "accuracy_vs_time.png")


class RunFolderError(LocalSGDError, ValueError):
    """A run folder that a run may not write into; the message names its files and the way out."""


class DiskFullError(LocalSGDError):
    """The disk filled up while a run wrote its files; the message says what was kept."""


def _is_left_temp(name: str) -> bool:
    """A temporary file of :func:`~localsgd_fx.atomic.atomic_open` for one of the run files."""
    return name.endswith(".tmp") and any(name.startswith(f".{run_file}.") for run_file in RUN_FILES)


def prepare_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Check (and for ``overwrite`` clear) ``folder`` before a run writes into it; call it holding its lock.

    Raises:
        CheckpointError: a new run into a folder holding a checkpoint.
        RunFolderError: a new run into a folder holding other files.
    """
    for path in folder.iterdir():
        if _is_left_temp(path.name):      # a write killed half-way (the finished file is intact)
            path.unlink(missing_ok=True)
    if resume:
        return
    if overwrite:   # the old run's record must not stand beside the new run's config
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
        return
    if (folder / CHECKPOINT_NAME).exists():
        raise CheckpointError(f"{folder / CHECKPOINT_NAME} already exists: pass --resume to continue that run, "
                              "--overwrite to start over, or another --out")
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise RunFolderError(f"--out {folder} already holds files that a new run must not overwrite ({shown}): pass "
                             "another --out (a new or empty folder), or --overwrite to delete an earlier run's files "
                             f"there ({', '.join(RUN_FILES[1:])}; other files are kept)")


def new_run_folder(stem: str | os.PathLike[str]) -> Path:
    """Make and return a new folder ``stem`` (or ``stem-2``, ``stem-3``, ... if taken), atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10000):
        path = stem if i == 1 else stem.with_name(f"{stem.name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunFolderError(f"no free run folder name {stem}-N: pass --out")


@contextlib.contextmanager
def disk_full_guard(folder: Path, saved_epoch: int) -> Iterator[None]:
    """Turn a full disk (or quota) while writing into ``folder`` into a :class:`DiskFullError`.

    ``saved_epoch``: the epoch of the checkpoint in ``folder`` (0: none written yet).
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = (f"the last checkpoint (epoch {saved_epoch}) is intact: free space and continue with --resume"
                if saved_epoch else "no checkpoint was written yet: free space and start the run again")
        raise DiskFullError(f"the disk holding {folder} is full ({exc.strerror}) while writing the run's files; "
                            f"{kept}") from exc
