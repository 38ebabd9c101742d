"""Atomic file writes: an interrupted write leaves the previous file or the new one, never a torn one.

Every file the library writes (checkpoints, metrics, plots, JSON reports, downloads) goes through
:func:`atomic_open`: the data is written to a hidden temporary file in the destination's folder and
moved over the destination with ``os.replace`` (atomic on POSIX) once complete, with the mode the
umask gives any new file; on any exception, Ctrl-C included, the temporary file is deleted instead.

Example::

    >>> with atomic_open("runs/x/checkpoint.pt", durable=True) as f:   # doctest: +SKIP
    ...     torch.save(state, f)
    >>> atomic_write_text("runs/x/summary.json", text)                 # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write_text"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, durable: bool = False,
                suffix: str = ".tmp") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without an exception.

    Args:
        path: the destination; its folder must exist.
        mode: ``"wb"`` or ``"w"`` (text is UTF-8).
        durable: also ``fsync`` the file and its folder, so the new file survives a power cut
            (checkpoints; costs a disk flush).
        suffix: of the temporary file's name (``.{name}.XXXX{suffix}``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it 0600; the file gets the mode any new file would
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # KeyboardInterrupt included: never leave a temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path`` as a :class:`~pathlib.Path`."""
    with atomic_open(path, "w", durable=durable) as f:
        f.write(text)
    return Path(path)


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
