"""Small modules with the quirks of real model libraries that trip symbolic tracing (issue 21).

* :class:`BNAct` (from :mod:`helpers.random_cnn`, whose random nets draw it too) - BatchNorm fused
  with its activation, branching on ``self.training`` through ``F.batch_norm(..., self.training, ...)``:
  FX traces *through* it and freezes the branch;
* :class:`DropPath` - stochastic depth, ``if not self.training: return x``; ``drop_prob=1.0`` drops
  every sample in train mode, so both modes are deterministic and differ (a test can compare them);
* :class:`PadSameConv` - "same" padding computed in Python from the input size (``max`` on a traced
  size: untraceable), as TF-ported model libraries do;
* :class:`Twice` - one conv module called at two sites.

:data:`QUIRKS` maps a name to a builder ``() -> (model, example input)`` of a tiny model (3x8x8
inputs) with that quirk; every model is seeded, in train mode, and has randomised BatchNorm state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .random_cnn import BNAct, randomize_batchnorm

__all__ = ["BNAct", "DropPath", "PadSameConv", "Twice", "BNActNet", "DropPathNet", "PadSameNet", "TwiceNet",
           "AllQuirksNet", "QUIRKS", "MODE_BRANCHING", "UNTRACEABLE", "build_quirk"]


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per-sample drop, scaled by the keep probability)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        if keep > 0.0:
            mask = mask / keep
        return x * mask


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class PadSameConv(nn.Conv2d):
    """TF "SAME" padding worked out from the input size: ``max`` on a traced size cannot be traced."""

    def forward(self, x):
        ph = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Twice(nn.Module):
    """The same conv applied twice (one weight, two call sites)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


class _Head(nn.Module):
    def __init__(self, channels: int, classes: int = 5):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BNActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), BNAct(6)
        self.conv2, self.act2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), BNAct(8)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = _Head(8)

    def forward(self, x):
        return self.head(self.bn3(self.act2(self.conv2(self.act1(self.conv1(x))))))


class DropPathNet(nn.Module):
    """A residual block whose branch goes through :class:`DropPath` (``drop_prob=1``: deterministic)."""

    def __init__(self, drop_prob: float = 1.0):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_a, self.bn_a = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1)
        self.drop = DropPath(drop_prob)
        self.head = _Head(6)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.drop(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return self.head(x)


class PadSameNet(nn.Module):
    """A conv with padding computed from the input size between two plain convs."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.blocks = nn.Sequential(nn.Sequential(PadSameConv(6, 8, 3, stride=2), nn.ReLU()))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = _Head(8)

    def forward(self, x):
        return self.head(F.relu(self.conv(self.blocks(F.relu(self.bn(self.stem(x)))))))


class TwiceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.twice = Twice(6)
        self.head = _Head(6)

    def forward(self, x):
        return self.head(self.twice(F.relu(self.bn(self.stem(x)))))


class AllQuirksNet(nn.Module):
    """Every quirk in one model: fused BN+act, drop path, untraceable padding, a shared conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 6, 3, padding=1, bias=False), BNAct(6)
        self.twice = Twice(6)
        self.conv_a, self.act_a = nn.Conv2d(6, 6, 3, padding=1, bias=False), BNAct(6)
        self.drop = DropPath(1.0)
        self.down = PadSameConv(6, 8, 3, stride=2)
        self.head = _Head(8)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.twice(x)
        x = x + self.drop(self.act_a(self.conv_a(x)))
        return self.head(self.down(x))


QUIRKS = {"bnact": BNActNet, "droppath": DropPathNet, "padsame": PadSameNet, "twice": TwiceNet,
          "all": AllQuirksNet}
#: the quirk models whose graph a trace freezes into train mode (mode-branching code traced through)
MODE_BRANCHING = {"bnact", "droppath", "all"}
#: the quirk models with a submodule FX cannot trace (kept opaque), by qualified name
UNTRACEABLE = {"padsame": "blocks.0.0", "all": "down"}


def build_quirk(name: str, batch: int = 4, dtype=torch.float32) -> tuple[nn.Module, torch.Tensor]:
    """The seeded quirk model ``name`` (train mode, randomised BatchNorm state) and an input batch."""
    torch.manual_seed(0)
    model = QUIRKS[name]().to(dtype).train()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return model, x
