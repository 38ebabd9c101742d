"""DenseNet-BC for CIFAR (Huang et al. 2017): 3 dense blocks of BN-ReLU-1x1(4k)-
BN-ReLU-3x3(k) bottleneck layers whose outputs are channel-concatenated onto their
input, compression-0.5 transitions (BN-ReLU-1x1 conv-2x2 avg-pool), growth rate
k = 12 and depth 100 (16 layers per block) by default."""

import torch
from torch import nn

from ._common import init_weights

__all__ = ["DenseLayer", "Transition", "DenseNetBC"]


class DenseLayer(nn.Module):
    """Bottleneck layer: returns ``cat([x, H(x)], dim=1)`` with ``growth`` new channels."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (channel compression) then 2x2 average pooling."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNetBC(nn.Module):
    """DenseNet-BC.

    Args:
        depth: total depth, must be 6n + 4 (e.g. 40, 100, 190); default 100.
        growth_rate: channels added per dense layer (k); default 12.
        compression: transition channel ratio (theta); default 0.5.
        num_classes: output classes.
        in_channels: input image channels.
    """

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        compression: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n+4 (40, 100, 190, ...), got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        n = (depth - 4) // 6
        c = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for b in range(3):
            for _ in range(n):
                stages.append(DenseLayer(c, growth_rate))
                c += growth_rate
            if b < 2:
                c_out = int(c * compression)
                stages.append(Transition(c, c_out))
                c = c_out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))
