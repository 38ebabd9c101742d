"""Copies of parameters, gradients and RNG states, and their comparison."""
from __future__ import annotations

import torch
from torch import nn


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def assert_same_rng_state(a: dict, b: dict, where: str = "") -> None:
    """Two :func:`localsgd_fx.checkpoint.capture_rng` states are identical (torch CPU and CUDA, numpy, Python)."""
    assert a.keys() == b.keys(), f"{where}: RNG streams {sorted(a)} vs {sorted(b)}"
    assert torch.equal(a["torch"], b["torch"]), f"{where}: torch RNG states differ"
    if "cuda" in a:
        assert all(torch.equal(x, y) for x, y in zip(a["cuda"], b["cuda"])), f"{where}: CUDA RNG states differ"
    assert ((a["python"][0], tuple(a["python"][1]), a["python"][2])
            == (b["python"][0], tuple(b["python"][1]), b["python"][2])), f"{where}: Python RNG states differ"
    na, nb = a["numpy"], b["numpy"]
    assert torch.equal(na["keys"], nb["keys"]) and {k: v for k, v in na.items() if k != "keys"} == \
        {k: v for k, v in nb.items() if k != "keys"}, f"{where}: numpy RNG states differ"


def without_measurements(records):
    """Metrics records without the columns that measure the machine (time, CUDA peak memory), which
    differ between otherwise identical runs."""
    from localsgd_fx.metrics import MEASURED_COLUMNS
    return [{k: v for k, v in r.items() if k not in MEASURED_COLUMNS} for r in records]
