"""A small CNN, one training step, and a guard that no tensor is read on the host (a sync on CUDA)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from localsgd_fx.capture import TrainStep

__all__ = ["small_net", "one_step", "no_host_reads"]


def small_net(channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))


@contextlib.contextmanager
def no_host_reads():
    """Every way a step could read a tensor value on the host raises inside this block."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the training step (a device-to-host sync on CUDA)")
        return method

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, m in saved.items():
            setattr(torch.Tensor, n, m)


def one_step(lm, opt, x, y):
    """The library's training step (the trainer's), run eagerly; returns the loss."""
    return TrainStep(lm, opt, F.cross_entropy, capture=False).eager(x, y)[0]
