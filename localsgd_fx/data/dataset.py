"""The in-memory dataset container, the data error, and where data lives on disk."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from passes.errors import LocalSGDError

__all__ = ["DatasetError", "ImageDataset", "cache_dir", "DATA_ENV"]

#: Environment variable naming a data directory searched before the user cache.
DATA_ENV = "LOCALSGD_DATA"


class DatasetError(LocalSGDError, ValueError):
    """Missing, corrupt or invalid dataset files. The message names the file and the fix."""


@dataclass
class ImageDataset:
    """One split of an image classification dataset, held in memory.

    Attributes:
        name: Canonical dataset name (``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"``).
        images: ``uint8`` tensor ``N x C x H x W`` (raw pixels 0..255).
        labels: ``int64`` tensor ``N`` with values in ``[0, num_classes)``.
        num_classes: Number of classes.
        mean: Per-channel mean, in ``[0, 1]`` pixel units (standard value for the dataset).
        std: Per-channel standard deviation, in ``[0, 1]`` pixel units.
        classes: Class names, if known (may be empty).

    Example:
        >>> ds = ImageDataset("toy", torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
        ...                   torch.tensor([0, 1, 0, 1]), 2, (0.5,), (0.25,))
        >>> len(ds), len(ds.subset(3))
        (4, 3)
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ImageDataset.images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ImageDataset.labels must be int64 of shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )
        c = self.images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} channel values, got {self.mean} / {self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def identity(self) -> dict[str, Any]:
        """What identifies this data: name, image count and shape, and a SHA-256 of the pixels and labels.

        A resumed run compares it with the checkpoint's, so it continues on the same images whatever
        their path, and never on other ones at the same path.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps([list(self.images.shape), self.num_classes]).encode())
        digest.update(self.images.contiguous().numpy())
        digest.update(self.labels.contiguous().numpy())
        return {"name": self.name, "images": len(self), "shape": list(self.image_shape), "sha256": digest.hexdigest()}

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """Return a deterministic random subset of ``n`` samples (kept in original order).

        Args:
            n: Number of samples; values ``>= len(self)`` return all samples.
            seed: Seed of the selection; the same ``(n, seed)`` always gives the same subset.

        Returns:
            A new :class:`ImageDataset` with the same metadata.

        Example:
            >>> small = train.subset(1000, seed=0)   # doctest: +SKIP
        """
        if n <= 0:
            raise ValueError(f"subset size must be positive, got {n}")
        total = len(self)
        if n >= total:
            idx = torch.arange(total)
        else:
            g = torch.Generator().manual_seed(int(seed))
            idx = torch.randperm(total, generator=g)[:n].sort().values
        return ImageDataset(
            self.name, self.images[idx].contiguous(), self.labels[idx].contiguous(),
            self.num_classes, tuple(self.mean), tuple(self.std), tuple(self.classes),
        )



def cache_dir() -> Path:
    """Return this package's user cache directory (not created).

    Returns:
        ``$XDG_CACHE_HOME/localsgd_fx``, or ``~/.cache/localsgd_fx`` if the variable is unset.

    Example:
        >>> cache_dir().name
        'localsgd_fx'
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "localsgd_fx"

