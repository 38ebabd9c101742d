"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation basic blocks
(BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3), 3 stages of 16k/32k/64k channels,
(d - 4)/6 blocks per stage and 1x1-conv shortcuts where the shape changes.
WRN-16-4 is depth 16, widen factor 4."""

import torch
from torch import nn

from ._common import init_weights

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block with optional dropout between the two convs."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-widen.

    Args:
        depth: 6n + 4 (default 16).
        widen: width multiplier k (default 4).
        dropout: dropout probability inside blocks (default 0.0).
        num_classes: output classes.
        in_channels: input image channels.
    """

    def __init__(
        self,
        depth: int = 16,
        widen: int = 4,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers, c_in = [], 16
        for c_out, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(c_in, c_out, stride if i == 0 else 1, dropout))
                c_in = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))
