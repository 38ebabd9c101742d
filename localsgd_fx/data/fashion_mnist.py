"""Fashion-MNIST: finding the IDX files, parsing them, and downloading them (MD5-checked).

An explicit ``root`` is the only place looked at (the folder, or its ``fashion-mnist`` subfolder):
its files are used or the load fails, never replaced by another copy. Without one, the files are
looked up, in order, in ``$LOCALSGD_DATA`` (or its ``fashion-mnist`` subfolder), the user cache
``${XDG_CACHE_HOME:-~/.cache}/localsgd_fx/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist``
(Debian package ``dataset-fashion-mnist``); otherwise downloaded into the user cache from
:data:`FASHION_MNIST_URL` (overridable with the environment variable
``LOCALSGD_FASHION_MNIST_URL``). Downloads are checked against the official MD5 sums and
only renamed into place once verified. Files found locally are not checksummed (Debian re-writes
the gzip headers, and a user's own copy may be compressed differently); they are validated
structurally instead (gzip CRC, IDX magic number, dimensions, sizes, label range).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_open
from .dataset import DATA_ENV, DatasetError, ImageDataset, cache_dir

__all__ = ["load_fashion_mnist", "FASHION_MNIST_URL", "FASHION_MNIST_URL_ENV", "FASHION_MNIST_SYSTEM_DIR",
           "FASHION_MNIST_MD5", "FASHION_MNIST_RAW_MD5"]

#: Official Fashion-MNIST download location (file names are appended).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Environment variable that overrides :data:`FASHION_MNIST_URL` (for mirrors).
FASHION_MNIST_URL_ENV = "LOCALSGD_FASHION_MNIST_URL"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

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



def _fmnist_search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / "fashion-mnist"]
    dirs: list[Path] = []
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


def load_fashion_mnist(
    split: str, root: str | os.PathLike[str] | None, download: bool
) -> ImageDataset:
    """The Fashion-MNIST ``split``; see :func:`localsgd_fx.data.load_dataset`."""
    img_name, lbl_name = _FMNIST_FILES[split]
    searched = _fmnist_search_dirs(root)
    for d in searched:
        img, lbl = _find_idx(d, img_name), _find_idx(d, lbl_name)
        if img is not None and lbl is not None:
            return _fmnist_from_files(img, lbl, downloaded=False)
    if root is not None:   # the user named the folder: use it or say so, never fall back to another copy
        state = ("it exists" if searched[0].is_dir() else "it is a file, not a folder" if searched[0].exists()
                 else "it does not exist")
        raise DatasetError(
            f"Fashion-MNIST {split} files {img_name} and {lbl_name} are not in the data folder {searched[0]} "
            f"({state}) nor in its fashion-mnist subfolder: fix the path, put the files there (the Debian "
            f"package `dataset-fashion-mnist` installs them in {FASHION_MNIST_SYSTEM_DIR}), or leave out the "
            f"data folder (root, --data-dir) to use the standard places or the download."
        )
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



def _join_url(base: str, fname: str) -> str:
    return base.rstrip("/") + "/" + fname


def _download(url: str, dest: Path, md5: str, hint: str = "") -> None:
    """Download ``url`` to ``dest`` atomically, verifying its MD5.

    The data goes to a hidden temporary file in ``dest``'s folder, which is renamed to ``dest``
    only after the checksum passes; on any failure it is removed, so nothing half-written or
    unverified is ever left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    with atomic_open(dest, "wb", suffix=".part") as out:   # a failed check below discards the file
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


def _progress(total: int | None, desc: str) -> Any:
    """A tqdm bar on stderr (None when tqdm is not installed)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency; degrade gracefully anyway
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False, disable=None)

