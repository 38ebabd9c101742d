"""VGG-11/16 with BatchNorm, CIFAR style: the conv stack of Simonyan & Zisserman
(each 3x3 conv followed by BN + ReLU, five 2x2 max-pools with ``ceil_mode=True`` so
28x28 inputs survive: 28->14->7->4->2->1), global average pooling and a small
512-512-classes classifier."""

import torch
from torch import nn

from ._common import init_weights

__all__ = ["VGG", "VGG_CFGS"]

# Integers are conv widths, "M" is a 2x2 max-pool.
VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-BN for small images.

    Args:
        depth: 11 or 16.
        num_classes: output classes.
        in_channels: input image channels.
        dropout: dropout probability in the classifier (default 0.5).
    """

    def __init__(
        self, depth: int = 16, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if depth not in VGG_CFGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c_in, 512), nn.ReLU(), nn.Dropout(dropout), nn.Linear(512, num_classes)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
