"""Devices: the ``cuda`` mark, and run-to-run deterministic CUDA kernels for tests that compare runs."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

#: cuBLAS reads this when it creates its first handle, so it is set at import (conftest imports this
#: module before any test touches CUDA); ":4096:8" is the value torch's reproducibility notes give.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

#: the device parameter of tests that run on CPU everywhere and also on CUDA where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def requires_cuda(test):
    """Marked ``cuda`` and skipped cleanly without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@contextlib.contextmanager
def deterministic_cuda():
    """cuDNN/cuBLAS kernels that give the same bits on every run (restored afterwards).

    ``warn_only``: kernels without a deterministic variant only warn. The one such kernel in the
    models these tests train, ``adaptive_avg_pool2d``'s CUDA backward, uses atomic adds, but with a
    1x1 output every input element receives exactly one contribution, so its result is
    reproducible all the same."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
