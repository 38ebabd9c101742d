"""CIFAR-10 and CIFAR-100 from the official python-pickle layout: a folder, or the ``.tar.gz`` archive.

Never downloaded; the archive is extracted into the user cache. The pickles are read with an
unpickler that only rebuilds numpy arrays, so a crafted file cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..atomic import atomic_write_text
from .dataset import DATA_ENV, DatasetError, ImageDataset, cache_dir

__all__ = ["load_cifar", "CIFAR_URL"]

#: Where to get CIFAR-10/100.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


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


#: One row a dataset, in the order of _CifarSpec's fields.
_CIFAR = {
    "cifar10": _CifarSpec("cifar-10-batches-py", "cifar-10-python.tar.gz",
                          tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels",
                          "label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _CifarSpec("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta", "fine_labels",
                           "fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


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
    if root is not None:   # the user named the place: use it or fail, never fall back to another copy
        return [Path(root).expanduser()]
    bases: list[Path] = []
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
        if root is not None and base.exists() and not base.is_dir():
            raise DatasetError(f"the data folder {base} (--data-dir) is a file, not a folder nor a .tar.gz archive: "
                               f"pass the folder holding {spec.folder}/ or {spec.archive}, or the archive itself")
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
        f"version) from {CIFAR_URL} and pass its folder, or the archive, with --data-dir (root= in Python), or set "
        f"${DATA_ENV}."
    )


#: In an extracted folder of the cache: which archive it came from (``{"size", "mtime_ns", "sha256"}``).
SOURCE_NAME = ".source.json"


def _archive_identity(archive: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, modification time and SHA-256 of ``archive``; the hash is reused from ``known`` when size and
    time match it (hashing the 170 MB archive on every run would cost a second)."""
    st = archive.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in ident.items()) and known.get("path") == str(archive.resolve()):
        return {**ident, "path": known["path"], "sha256": known.get("sha256")}
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {**ident, "path": str(archive.resolve()), "sha256": digest.hexdigest()}


def _extract_cifar(spec: _CifarSpec, archive: Path, needed: Sequence[str]) -> Path:
    """Extract ``archive`` into the user cache atomically; return the extracted folder.

    The folder records the archive it came from (:data:`SOURCE_NAME`) and is used again only for the
    same archive contents: a cache extracted from another archive is replaced."""
    dest = cache_dir() / spec.folder
    try:
        known = json.loads((dest / SOURCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = None
    ident = _archive_identity(archive, known if isinstance(known, dict) else None)
    if (isinstance(known, dict) and known.get("sha256") == ident["sha256"]
            and all((dest / f).is_file() for f in needed)):
        if known != ident:   # the same contents at another path or time: remember the fast check
            atomic_write_text(dest / SOURCE_NAME, json.dumps(ident))
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
        atomic_write_text(tmp / spec.folder / SOURCE_NAME, json.dumps(ident))
        if dest.exists():  # an older partial folder, or one from another archive: replace it
            shutil.rmtree(dest)
        os.replace(tmp / spec.folder, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_cifar(name: str, split: str, root: str | os.PathLike[str] | None) -> ImageDataset:
    """``split`` of ``name`` (``"cifar10"`` / ``"cifar100"``); see :func:`localsgd_fx.data.load_dataset`."""
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

