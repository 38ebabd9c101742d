"""Fixtures shared by the test modules (helper code lives in the ``helpers`` package next to this file).

* every test starts from ``torch.manual_seed(0)`` and gets grad mode, default dtype and thread
  count restored afterwards;
* ``@pytest.mark.single_thread`` (or a module's ``pytestmark``) runs a test on one intra-op thread:
  tiny float64 kernels are much slower on two contended OpenMP threads than on one;
* ``cuda_deterministic``: run-to-run reproducible CUDA kernels, for tests that compare two runs;
* ``data_dir``: a learnable toy data set in the Fashion-MNIST file format.
"""
from __future__ import annotations

import pytest
import torch

from helpers.data import write_tiny_fmnist
from helpers.devices import deterministic_cuda  # also sets CUBLAS_WORKSPACE_CONFIG before CUDA starts


@pytest.fixture(autouse=True)
def _seeded_and_restored(request):
    threads = torch.get_num_threads()
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    torch.manual_seed(0)
    if request.node.get_closest_marker("single_thread") is not None:
        torch.set_num_threads(1)
    yield
    torch.set_grad_enabled(grad)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def cuda_deterministic():
    with deterministic_cuda():
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(write_tiny_fmnist(tmp_path_factory.mktemp("fmnist")))
