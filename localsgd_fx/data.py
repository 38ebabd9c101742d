"""Image datasets as in-memory uint8 tensors, and a fast shuffling batch iterator.

This module holds everything the trainer needs to feed real data to a CNN without a per-sample
PIL/``DataLoader`` pipeline (far too slow on a 2-core machine):

* :class:`ImageDataset` -- a whole split as one ``uint8`` tensor ``N x C x H x W`` plus ``int64``
  labels and the dataset's standard per-channel normalisation constants.
* :func:`load_dataset` / :func:`list_datasets` -- Fashion-MNIST (IDX ``.gz`` files, found locally
  or downloaded with an MD5 check), CIFAR-10 and CIFAR-100 (the official python-pickle layout, from
  a folder or the ``.tar.gz`` archive).
* :class:`Batches` -- a batch iterator whose shuffling order and augmentation (random crop with
  zero padding, horizontal flip; vectorised on the whole uint8 batch) depend only on
  ``(seed, epoch)``, so a run resumed at epoch ``e`` sees exactly the same batches.
* :class:`DatasetError` -- the one error raised for missing or corrupt data; it names the file
  and says what to do.

Fashion-MNIST is looked up, in order, in ``root``, ``$LOCALSGD_DATA`` (or its ``fashion-mnist``
subfolder), the user cache ``${XDG_CACHE_HOME:-~/.cache}/localsgd_fx/fashion-mnist`` and
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``); otherwise it is
downloaded into the user cache from :data:`FASHION_MNIST_URL` (overridable with the environment
variable ``LOCALSGD_FASHION_MNIST_URL``). Downloads are checked against the official MD5 sums and
only renamed into place once verified. Files found locally are not checksummed (Debian re-writes
the gzip headers, and a user's own copy may be compressed differently); they are validated
structurally instead (gzip CRC, IDX magic number, dimensions, sizes, label range).

Example:
    >>> from localsgd_fx.data import load_dataset, Batches
    >>> train = load_dataset("fashion-mnist", "train")            # doctest: +SKIP
    >>> batches = Batches(train, 128, augment=True, seed=0)       # doctest: +SKIP
    >>> for x, y in batches.epoch(0):                              # doctest: +SKIP
    ...     pass  # x: float32 128x1x28x28 normalised, y: int64 128
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "DatasetError",
    "ImageDataset",
    "Batches",
    "load_dataset",
    "list_datasets",
    "cache_dir",
    "FASHION_MNIST_URL",
    "FASHION_MNIST_URL_ENV",
    "DATA_ENV",
]

# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

#: Official Fashion-MNIST download location (file names are appended).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Environment variable that overrides :data:`FASHION_MNIST_URL` (for mirrors).
FASHION_MNIST_URL_ENV = "LOCALSGD_FASHION_MNIST_URL"
#: Environment variable naming a data directory searched before the user cache.
DATA_ENV = "LOCALSGD_DATA"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Where to get CIFAR-10/100.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Official MD5 sums of the Fashion-MNIST ``.gz`` files (checked on download).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
#: MD5 sums of the *decompressed* official files. Debian's copies differ from the official
#: ``.gz`` bytes only in the gzip header (file name dropped, mtime normalised), so their content
#: matches these.
FASHION_MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}

_FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class _CifarSpec:
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR = {
    "cifar10": _CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}

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


class DatasetError(ValueError):
    """Missing, corrupt or invalid dataset files. The message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# the dataset container
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def list_datasets() -> list[str]:
    """Return the canonical names accepted by :func:`load_dataset`.

    Returns:
        ``["cifar10", "cifar100", "fashion-mnist"]``.

    Example:
        >>> list_datasets()
        ['cifar10', 'cifar100', 'fashion-mnist']
    """
    return sorted(set(_ALIASES.values()))


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
        root: Directory searched first. For Fashion-MNIST: the folder holding the IDX ``.gz``
            files (or its parent with a ``fashion-mnist`` subfolder). For CIFAR: the extracted
            folder (``cifar-10-batches-py`` / ``cifar-100-python``), its parent, a parent holding
            the ``.tar.gz`` archive, or the archive itself.
        download: Fashion-MNIST only: download into the user cache if no local copy is found.
            CIFAR is never downloaded.

    Returns:
        The split as an :class:`ImageDataset`.

    Raises:
        ValueError: Unknown name or split (the message lists the valid ones).
        DatasetError: Files missing or corrupt (the message names the file and the fix).

    Example:
        >>> test = load_dataset("fmnist", "test")                  # doctest: +SKIP
        >>> test.images.shape, test.num_classes                     # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), 10)
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())} "
            f"(aliases: {', '.join(sorted(k for k in _ALIASES if k not in list_datasets()))})"
        )
    canonical = _ALIASES[key]
    split = str(split).strip().lower()
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(_SPLITS)}")
    if canonical == "fashion-mnist":
        return _load_fashion_mnist(split, root, download)
    return _load_cifar(canonical, split, root)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _fmnist_search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r, r / "fashion-mnist"]
    env = os.environ.get(DATA_ENV)
    if env:
        e = Path(env).expanduser()
        dirs += [e, e / "fashion-mnist"]
    dirs += [cache_dir() / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    return dirs


def _find_idx(directory: Path, gz_name: str) -> Path | None:
    """``directory/gz_name``, else the uncompressed file (``gz_name`` without ``.gz``)."""
    for candidate in (directory / gz_name, directory / gz_name[: -len(".gz")]):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(
    split: str, root: str | os.PathLike[str] | None, download: bool
) -> ImageDataset:
    img_name, lbl_name = _FMNIST_FILES[split]
    searched = _fmnist_search_dirs(root)
    for d in searched:
        img, lbl = _find_idx(d, img_name), _find_idx(d, lbl_name)
        if img is not None and lbl is not None:
            return _fmnist_from_files(img, lbl, downloaded=False)
    where = "\n  ".join(str(d) for d in searched)
    if not download:
        raise DatasetError(
            f"Fashion-MNIST {split} files {img_name} and {lbl_name} not found in any of:\n  "
            f"{where}\nInstall the Debian package `dataset-fashion-mnist` "
            f"(apt-get install dataset-fashion-mnist), put the files in one of these folders "
            f"(or point ${DATA_ENV} at them), or call with download=True."
        )
    target = cache_dir() / "fashion-mnist"
    base = os.environ.get(FASHION_MNIST_URL_ENV) or FASHION_MNIST_URL
    paths = []
    for fname in (img_name, lbl_name):
        dest = target / fname
        if not dest.is_file():
            _download(_join_url(base, fname), dest, FASHION_MNIST_MD5[fname],
                      hint="install the Debian package `dataset-fashion-mnist`, or set "
                           f"${FASHION_MNIST_URL_ENV} to a mirror, or put the files in "
                           f"${DATA_ENV}. Searched:\n  {where}")
        paths.append(dest)
    return _fmnist_from_files(paths[0], paths[1], downloaded=True)


def _fmnist_fix_hint(path: Path, downloaded: bool) -> str:
    if downloaded or path.parent == cache_dir() / "fashion-mnist":
        return f"Delete {path} and load again to re-download it."
    if path.parent == FASHION_MNIST_SYSTEM_DIR:
        return ("Reinstall the Debian package `dataset-fashion-mnist` "
                "(apt-get install --reinstall dataset-fashion-mnist).")
    return ("Delete or replace it (the official files are at "
            f"{FASHION_MNIST_URL}, or install the Debian package `dataset-fashion-mnist`).")


def _read_idx(path: Path, ndim: int, downloaded: bool) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding unsigned bytes with ``ndim`` dimensions."""
    def bad(reason: str) -> DatasetError:
        return DatasetError(
            f"{path} is not a valid IDX file: {reason}. {_fmnist_fix_hint(path, downloaded)}"
        )

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise bad(f"cannot decompress/read it ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4:
        raise bad(f"only {len(raw)} bytes long")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise bad(
            f"magic number 0x{raw[:4].hex()} != 0x000008{ndim:02x} (unsigned bytes, {ndim} dims)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad("truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise bad(f"header says dims {dims} ({expected} bytes) but the data is {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fmnist_from_files(img_path: Path, lbl_path: Path, downloaded: bool) -> ImageDataset:
    images = _read_idx(img_path, 3, downloaded)
    labels = _read_idx(lbl_path, 1, downloaded)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds "
            f"{labels.shape[0]} labels. {_fmnist_fix_hint(img_path, downloaded)}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DatasetError(
            f"{lbl_path} has label {int(labels.max())} outside 0..9. "
            f"{_fmnist_fix_hint(lbl_path, downloaded)}"
        )
    return ImageDataset(
        name="fashion-mnist",
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        classes=_FMNIST_CLASSES,
    )


# --------------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------------


def _join_url(base: str, fname: str) -> str:
    return base.rstrip("/") + "/" + fname


def _download(url: str, dest: Path, md5: str, hint: str = "") -> None:
    """Download ``url`` to ``dest`` atomically, verifying its MD5.

    The data goes to a hidden temporary file in ``dest``'s folder, which is renamed to ``dest``
    only after the checksum passes; on any failure it is removed, so nothing half-written or
    unverified is ever left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    total = resp.headers.get("Content-Length")
                    bar = _progress(int(total) if total else None, f"download {dest.name}")
                    try:
                        while chunk := resp.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                    finally:
                        if bar is not None:
                            bar.close()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DatasetError(
                    f"could not download {url} to {dest} ({type(exc).__name__}: {exc}). "
                    f"No network? {hint}"
                ) from exc
        got = digest.hexdigest()
        if got != md5:
            raise DatasetError(
                f"checksum mismatch for {url}: MD5 {got}, expected {md5}; the download was "
                f"discarded (nothing written to {dest}). Retry, or {hint}"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _progress(total: int | None, desc: str) -> Any:
    """A tqdm bar on stderr (None when tqdm is not installed)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency; degrade gracefully anyway
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False, disable=None)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays/dtypes (what the CIFAR files contain)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol < 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # avoid numpy 2's warning
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt file
        raise DatasetError(
            f"{path} is not a valid CIFAR python pickle ({type(exc).__name__}: {exc}). Delete "
            f"it and extract it again from the official archive ({CIFAR_URL})."
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{path} is not a valid CIFAR python pickle (holds {type(obj).__name__}, expected a "
            f"dict). Delete it and extract it again from the official archive ({CIFAR_URL})."
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_expected(spec: _CifarSpec, split: str) -> tuple[str, ...]:
    return (spec.train_files if split == "train" else spec.test_files)


def _cifar_dir_candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get(DATA_ENV)
    if env:
        bases.append(Path(env).expanduser())
    bases.append(cache_dir())
    return bases


def _locate_cifar(spec: _CifarSpec, split: str, root: str | os.PathLike[str] | None) -> Path:
    needed = _cifar_expected(spec, split)
    bases = _cifar_dir_candidates(root)
    for base in bases:
        if base.is_file() and base.name.endswith((".tar.gz", ".tgz")):
            return _extract_cifar(spec, base, needed)
        for d in (base, base / spec.folder):
            present = [f for f in (*needed, spec.meta_file) if (d / f).is_file()]
            if present:
                missing = [f for f in needed if not (d / f).is_file()]
                if missing:
                    raise DatasetError(
                        f"{d} is missing {', '.join(missing)} (CIFAR {split} split needs "
                        f"{', '.join(needed)}). Extract the official archive {spec.archive} "
                        f"again (from {CIFAR_URL})."
                    )
                return d
        archive = base / spec.archive
        if archive.is_file():
            return _extract_cifar(spec, archive, needed)
    where = "\n  ".join(str(b) for b in bases)
    raise DatasetError(
        f"{spec.folder}/ with {', '.join((*needed, spec.meta_file))} (or the archive "
        f"{spec.archive}) not found in any of:\n  {where}\nDownload {spec.archive} (python "
        f"version) from {CIFAR_URL} and pass its folder as root (or set ${DATA_ENV})."
    )


def _extract_cifar(spec: _CifarSpec, archive: Path, needed: Sequence[str]) -> Path:
    """Extract ``archive`` into the user cache atomically; return the extracted folder."""
    dest = cache_dir() / spec.folder
    if all((dest / f).is_file() for f in needed):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", suffix=".part", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = [m for m in tar.getmembers()
                           if m.name == spec.folder or m.name.startswith(spec.folder + "/")]
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"cannot extract {archive} ({type(exc).__name__}: {exc}). Download "
                f"{spec.archive} again from {CIFAR_URL}."
            ) from exc
        missing = [f for f in needed if not (tmp / spec.folder / f).is_file()]
        if missing:
            raise DatasetError(
                f"{archive} does not contain {', '.join(spec.folder + '/' + f for f in missing)}. "
                f"Download {spec.archive} (python version) again from {CIFAR_URL}."
            )
        if dest.exists():  # an older partial folder: replace it
            shutil.rmtree(dest)
        os.replace(tmp / spec.folder, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_cifar(name: str, split: str, root: str | os.PathLike[str] | None) -> ImageDataset:
    spec = _CIFAR[name]
    folder = _locate_cifar(spec, split, root)
    datas, labels = [], []
    for fname in _cifar_expected(spec, split):
        path = folder / fname
        batch = _unpickle(path)

        def bad(reason: str, path: Path = path) -> DatasetError:
            return DatasetError(
                f"{path} is not a valid {name} batch: {reason}. Delete it and extract it again "
                f"from the official archive {spec.archive} ({CIFAR_URL})."
            )

        if "data" not in batch or spec.label_key not in batch:
            raise bad(f"missing key 'data' or '{spec.label_key}' (has {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise bad(f"'data' is {data.dtype} {data.shape}, expected uint8 N x 3072")
        lab = np.asarray(batch[spec.label_key], dtype=np.int64).reshape(-1)
        if lab.shape[0] != data.shape[0]:
            raise bad(f"{data.shape[0]} images but {lab.shape[0]} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= spec.num_classes):
            raise bad(f"labels outside 0..{spec.num_classes - 1}")
        datas.append(data)
        labels.append(lab)
    classes: tuple[str, ...] = ()
    meta_path = folder / spec.meta_file
    if meta_path.is_file():
        names = _unpickle(meta_path).get(spec.names_key)
        if isinstance(names, (list, tuple)) and len(names) == spec.num_classes:
            classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)
    return ImageDataset(
        name=name,
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# batch iterator
# --------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed that depends only on ``(seed, epoch)``."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)]).generate_state(
        2, np.uint32
    )
    return (int(words[0]) << 31) ^ int(words[1])


class Batches:
    """Shuffling, augmenting batch iterator over an :class:`ImageDataset`.

    The order and the augmentation of epoch ``e`` are drawn from a local ``torch.Generator``
    seeded from ``(seed, e)`` only, so ``batches.epoch(e)`` yields the same batches whenever it
    is called -- a run resumed at epoch ``e`` continues exactly. Augmentation (random crop from
    the zero-padded image, random horizontal flip) is one vectorised gather on the uint8 batch;
    it is then converted to float32 and normalised with the dataset's mean/std. The random
    numbers are drawn on the CPU, so CPU and GPU runs see identical batches.

    Args:
        dataset: The data.
        batch_size: Samples per batch.
        shuffle: Shuffle the order each epoch (else dataset order).
        augment: Apply random crop (and flip) augmentation.
        crop_padding: Zero padding on each side before the random crop (0 disables cropping).
        flip: With ``augment``, flip each image horizontally with probability 1/2.
        drop_last: Drop the final incomplete batch.
        seed: Base seed.
        device: Where the batches are produced (the images are copied there once).
        shard, num_shards: Data-parallel training: every batch (``batch_size`` samples, the
            global batch) is cut into ``num_shards`` contiguous parts whose sizes differ by at
            most one, and this iterator yields part ``shard``. All shards share the epoch's
            order and augmentation, so together they see exactly the unsharded batches. A part
            is empty only in a last batch smaller than ``num_shards``.

    Example:
        >>> ds = ImageDataset("toy", torch.zeros(10, 1, 4, 4, dtype=torch.uint8),
        ...                   torch.arange(10) % 2, 2, (0.0,), (1.0,))
        >>> b = Batches(ds, 4, augment=True, seed=1)
        >>> len(b), [tuple(x.shape) for x, _ in b.epoch(3)]
        (3, [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)])
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..num_shards-1 = 0..{num_shards - 1}, got {shard}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = int(crop_padding)
        self.flip = flip
        self.drop_last = drop_last
        self.seed = int(seed)
        self.device = torch.device(device)
        self.shard, self.num_shards = int(shard), int(num_shards)
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)
        c = dataset.images.shape[1]
        std = torch.tensor(dataset.std, dtype=torch.float32)
        mean = torch.tensor(dataset.mean, dtype=torch.float32)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        self._scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, c, 1, 1).to(self.device)
        self._templates: tuple[Any, torch.Tensor] | None = None  # cache of _augment

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Same as ``epoch(0)`` (convenient for evaluation; use :meth:`epoch` for training)."""
        return self.epoch(0)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the batches of epoch ``e``.

        Args:
            e: Epoch number; with the seed it fully determines order and augmentation.

        Returns:
            An iterator of ``(x, y)``: ``x`` float32 ``B x C x H x W`` normalised, ``y`` int64
            ``B``, both on ``device``.

        Example:
            >>> for x, y in batches.epoch(5):   # doctest: +SKIP
            ...     loss = model(x).cross_entropy(y)
        """
        n = len(self.dataset)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, e))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:
            p = self.crop_padding
            if p > 0:
                offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
            if self.flip:
                flips = torch.rand(n, generator=g) < 0.5
        stop = len(self) * self.batch_size if self.drop_last else n
        return self._iterate(order, offsets, flips, stop)

    def _iterate(
        self,
        order: torch.Tensor,
        offsets: torch.Tensor | None,
        flips: torch.Tensor | None,
        stop: int,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = self.device
        order = order.to(dev)
        offsets = None if offsets is None else offsets.to(dev)
        flips = None if flips is None else flips.to(dev)
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            if self.num_shards > 1:
                start, end = self._shard_range(start, end)
            idx = order[start:end]
            x = self._images.index_select(0, idx)
            if offsets is not None or flips is not None:
                x = self._augment(
                    x,
                    None if offsets is None else offsets[start:end],
                    None if flips is None else flips[start:end],
                )
            xf = x.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield xf, self._labels.index_select(0, idx)

    def _shard_range(self, start: int, end: int) -> tuple[int, int]:
        """This shard's part of positions ``start..end-1``: the first ``r`` parts get ``q + 1``."""
        q, r = divmod(end - start, self.num_shards)
        k = self.shard
        return start + k * q + min(k, r), start + (k + 1) * q + min(k + 1, r)

    def _augment(
        self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Random crop (zero padding) and horizontal flip of a uint8 batch in one gather.

        ``offsets`` (``B x 2``, values in ``[0, 2 * crop_padding]``) are the top-left corners
        ``(dy, dx)`` of the crops in the padded images; ``flips`` (``B``, bool) mirrors the
        chosen crops. Output pixel ``[i, c, y, x]`` is ``padded[i, c, dy + y, dx + x']`` with
        ``x' = w - 1 - x`` if flipped else ``x``, gathered with a single ``index_select`` on
        the flattened padded batch (faster than per-axis gathers or advanced indexing).
        """
        b, c, h, w = x.shape
        p = self.crop_padding if offsets is not None else 0
        if p > 0:
            padded = x.new_zeros(b, c, h + 2 * p, w + 2 * p)
            padded[:, :, p:p + h, p:p + w] = x
        else:
            padded = x
        hp, wp = padded.shape[2], padded.shape[3]
        itype = torch.int32 if padded.numel() < 2**31 else torch.int64
        key = (c, h, w, hp, wp, itype, x.device)
        if self._templates is None or self._templates[0] != key:
            # flat offsets of an unflipped / flipped h x w window at (0, 0) of a padded image
            ch = torch.arange(c, device=x.device).view(c, 1, 1) * (hp * wp)
            row = torch.arange(h, device=x.device).view(1, h, 1) * wp
            col = torch.arange(w, device=x.device).view(1, 1, w)
            tmpl = torch.stack([(ch + row + col).reshape(-1),
                                (ch + row + (w - 1 - col)).reshape(-1)])
            self._templates = (key, tmpl.to(itype))
        tmpl = self._templates[1]
        start = torch.arange(b, device=x.device) * (c * hp * wp)
        if offsets is not None and p > 0:
            start = start + offsets[:, 0] * wp + offsets[:, 1]
        window = tmpl[flips.long()] if flips is not None else tmpl[0].expand(b, -1)
        index = (start.to(itype)[:, None] + window).reshape(-1)
        return padded.reshape(-1).index_select(0, index).view(b, c, h, w)
