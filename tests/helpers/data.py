"""A learnable toy data set in the Fashion-MNIST file format (read through the library's real loader)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_tiny_fmnist(folder: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-format IDX files of a learnable toy problem (class = position of a bright bar)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 230
        for kind, arr, magic in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            header = bytes([0, 0, 8, magic]) + np.array(arr.shape, dtype=">u4").tobytes()
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())
    return folder
