"""Training checkpoints: atomic writes, compatibility checks and RNG state capture.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, dicts, lists, numbers,
strings), so it loads with ``torch.load(weights_only=True)``::

    {"format_version", "config", "epoch", "model" (LocalSGDModule.state_dict: weights, weak
     supervision, transition, schedule state, history), "optimizer", "lr_scheduler", "rng",
     "metrics"}

It is written to a temporary file in the same directory, flushed and fsync'ed, then moved over
the previous checkpoint with ``os.replace`` (atomic on POSIX): a crash or Ctrl-C at any moment
leaves either the old or the new checkpoint, never a torn one.

Example::

    >>> save_checkpoint(state, "runs/x/checkpoint.pt")          # doctest: +SKIP
    >>> state = load_checkpoint("runs/x/checkpoint.pt")          # doctest: +SKIP
    >>> check_compatible(state, {"model": "resnet20", "dataset": "fashion-mnist"})  # doctest: +SKIP
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

#: Bumped whenever the layout of a checkpoint changes; other versions are refused.
FORMAT_VERSION = 1
#: The checkpoint's file name inside a run directory.
CHECKPOINT_NAME = "checkpoint.pt"
#: Config fields that must match for a checkpoint to be resumed (the rest may change, with a warning).
IDENTITY_FIELDS = ("model", "dataset", "rule", "schedule")

__all__ = ["FORMAT_VERSION", "CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "check_compatible", "capture_rng", "restore_rng"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or belongs to another run; the message says which."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    Args:
        state: the checkpoint dictionary (``format_version`` is added if absent).
        path: destination file; its directory must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # KeyboardInterrupt included: never leave a temp file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``) and check its version.

    Raises:
        CheckpointError: missing file, unreadable file or another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume (train without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means "not our checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}, this release reads version "
                              f"{FORMAT_VERSION}; it cannot be resumed (start a new run with another --out)")
    return state


def check_compatible(state: Mapping[str, Any], config: Mapping[str, Any], path: str | os.PathLike[str] = "") -> list[str]:
    """Refuse a checkpoint whose model, dataset, rule or schedule differ from ``config``.

    Returns:
        Names of the other config fields that differ (the caller may warn about them).

    Raises:
        CheckpointError: naming the first mismatching identity field and both values.
    """
    saved = state.get("config", {})
    where = f" {path}" if path else ""
    for key in IDENTITY_FIELDS:
        if saved.get(key) != config.get(key):
            raise CheckpointError(f"checkpoint{where} is for {key} {saved.get(key)!r}, this run asks for {key} "
                                  f"{config.get(key)!r}; pass --{key.replace('_', '-')} {saved.get(key)} to resume it, "
                                  "or use another --out for a new run")
    return sorted(k for k in config if k not in IDENTITY_FIELDS and k in saved and saved[k] != config[k])


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states, as checkpoint-safe data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: Path) -> None:
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
