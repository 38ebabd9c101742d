"""Image datasets as in-memory uint8 tensors, and a fast shuffling batch iterator.

Everything the trainer needs to feed real data to a CNN without a per-sample PIL/``DataLoader``
pipeline (far too slow on a 2-core machine), one module per responsibility:

* :mod:`.dataset` -- :class:`ImageDataset`, a whole split as one ``uint8`` tensor ``N x C x H x W``
  plus ``int64`` labels and the dataset's per-channel normalisation constants; :class:`DatasetError`,
  the one error for missing or corrupt data (it names the file and says what to do).
* :mod:`.fashion_mnist` -- Fashion-MNIST: IDX ``.gz`` files found locally or downloaded with an MD5
  check (the search order is in that module).
* :mod:`.cifar` -- CIFAR-10 and CIFAR-100 (the official python-pickle layout, from a folder or
  the ``.tar.gz`` archive).
* :mod:`.batches` -- :class:`Batches`, a batch iterator whose shuffling order and augmentation
  (random crop with zero padding, horizontal flip; vectorised on the whole uint8 batch) depend
  only on ``(seed, epoch)``, so a run resumed at epoch ``e`` sees exactly the same batches.

This module picks the loader by name: :func:`load_dataset`, :func:`list_datasets`.

Example:
    >>> from localsgd_fx.data import load_dataset, Batches
    >>> train = load_dataset("fashion-mnist", "train")            # doctest: +SKIP
    >>> batches = Batches(train, 128, augment=True, seed=0)       # doctest: +SKIP
    >>> for x, y in batches.epoch(0):                              # doctest: +SKIP
    ...     pass  # x: float32 128x1x28x28 normalised, y: int64 128
"""

from __future__ import annotations

import os

from .batches import Batches
from .cifar import CIFAR_URL, load_cifar
from .dataset import DATA_ENV, DatasetError, ImageDataset, cache_dir
from .fashion_mnist import (
    FASHION_MNIST_MD5,
    FASHION_MNIST_RAW_MD5,
    FASHION_MNIST_SYSTEM_DIR,
    FASHION_MNIST_URL,
    FASHION_MNIST_URL_ENV,
    load_fashion_mnist,
)

__all__ = [
    "DatasetError",
    "ImageDataset",
    "Batches",
    "load_dataset",
    "list_datasets",
    "cache_dir",
    "FASHION_MNIST_URL",
    "FASHION_MNIST_URL_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_RAW_MD5",
    "CIFAR_URL",
    "DATA_ENV",
]

_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}
_SPLITS = ("train", "test")


def list_datasets() -> list[str]:
    """Return the canonical names accepted by :func:`load_dataset`.

    Returns:
        ``["cifar10", "cifar100", "fashion-mnist"]``.

    Example:
        >>> list_datasets()
        ['cifar10', 'cifar100', 'fashion-mnist']
    """
    return sorted(set(_ALIASES.values()))


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> ImageDataset:
    """Load one split of a dataset into memory.

    Args:
        name: ``"fashion-mnist"`` (aliases ``"fashion_mnist"``, ``"fmnist"``), ``"cifar10"`` or
            ``"cifar100"`` (case-insensitive).
        split: ``"train"`` or ``"test"``.
        root: Where the files are; when given, the only place looked at (its files are used or a
            :class:`DatasetError` says what is missing; nothing else is searched or downloaded).
            For Fashion-MNIST: the folder holding the IDX ``.gz`` files (or its parent with a
            ``fashion-mnist`` subfolder). For CIFAR: the extracted folder (``cifar-10-batches-py`` /
            ``cifar-100-python``), its parent, a parent holding the ``.tar.gz`` archive, or the
            archive itself. Without it: ``$LOCALSGD_DATA``, the user cache, the system copy.
        download: Fashion-MNIST without ``root`` only: download into the user cache if no local
            copy is found. CIFAR is never downloaded.

    Returns:
        The split as an :class:`ImageDataset`.

    Raises:
        DatasetError: Unknown name or split (the message lists the valid ones), files missing or
            corrupt (the message names the file and the fix). It is a ``ValueError``.

    Example:
        >>> test = load_dataset("fmnist", "test")                  # doctest: +SKIP
        >>> test.images.shape, test.num_classes                     # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), 10)
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise DatasetError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())} "
            f"(aliases: {', '.join(sorted(k for k in _ALIASES if k not in list_datasets()))})"
        )
    canonical = _ALIASES[key]
    split = str(split).strip().lower()
    if split not in _SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(_SPLITS)}")
    if canonical == "fashion-mnist":
        return load_fashion_mnist(split, root, download)
    return load_cifar(canonical, split, root)
