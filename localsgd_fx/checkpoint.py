"""Training checkpoints: atomic writes, compatibility checks and RNG state capture.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, dicts, lists, numbers,
strings), so it loads with ``torch.load(weights_only=True)``::

    {"format_version", "config", "data" (what identifies the train and test data: image count,
     shape and a SHA-256 of pixels and labels; checked on resume), "epoch", "model"
     (LocalSGDModule.state_dict: weights, weak supervision, transition, schedule state, history),
     "optimizer", "lr_scheduler", "rng", "metrics"}

It is written atomically and durably (:func:`~localsgd_fx.atomic.atomic_open`): a crash or Ctrl-C
at any moment leaves either the old or the new checkpoint, never a torn one.

Example::

    >>> save_checkpoint(state, "runs/x/checkpoint.pt")          # doctest: +SKIP
    >>> state = load_checkpoint("runs/x/checkpoint.pt")          # doctest: +SKIP
    >>> check_compatible(state, config.to_dict(), ignore=("out", "device"))  # doctest: +SKIP
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from passes.errors import LocalSGDError

from .atomic import atomic_open

#: Bumped whenever the layout of a checkpoint changes; other versions are refused.
FORMAT_VERSION = 1
#: The checkpoint's file name inside a run directory.
CHECKPOINT_NAME = "checkpoint.pt"
#: Config fields that say which run a checkpoint belongs to (named first when they differ).
IDENTITY_FIELDS = ("model", "dataset", "rule", "schedule")

__all__ = ["FORMAT_VERSION", "CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "check_compatible", "capture_rng", "restore_rng"]


class CheckpointError(LocalSGDError, ValueError):
    """A checkpoint that is missing, unreadable or belongs to another run; the message says which."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically and durably (temp file in the same dir, fsync, ``os.replace``).

    Args:
        state: the checkpoint dictionary (``format_version`` is added if absent).
        path: destination file; its directory must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with atomic_open(path, "wb", durable=True) as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
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


def check_compatible(state: Mapping[str, Any], config: Mapping[str, Any], path: str | os.PathLike[str] = "", *,
                     ignore: Iterable[str] = ()) -> None:
    """Refuse a checkpoint whose config differs from ``config`` in any field outside ``ignore``.

    A resumed run continues with the checkpoint's hyperparameters or not at all, so the run folder
    never records settings that were not used.

    Raises:
        CheckpointError: naming the first mismatching identity field (model, dataset, rule,
            schedule) and both values, else every other differing field with both values.
    """
    saved = state.get("config", {})
    where = f" {path}" if path else ""
    for key in IDENTITY_FIELDS:
        if saved.get(key) != config.get(key):
            raise CheckpointError(f"checkpoint{where} is for {key} {saved.get(key)!r}, this run asks for {key} "
                                  f"{config.get(key)!r}; pass --{key.replace('_', '-')} {saved.get(key)} to resume it, "
                                  "or use another --out for a new run")
    skip = set(ignore)
    differ = sorted(k for k in config if k not in skip and k in saved and saved[k] != config[k])
    if differ:
        changes = "; ".join(f"--{k.replace('_', '-')} {_shown(saved[k])} in the checkpoint, {_shown(config[k])} given"
                            for k in differ)
        split = " (to train a run in parts, give its full --epochs and --stop-after)" if "epochs" in differ else ""
        raise CheckpointError(f"cannot resume checkpoint{where} with other settings: {changes}. Pass the checkpoint's "
                              f"values to resume it{split}, or start a new run with the new ones (another --out, or "
                              "--overwrite)")


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


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

