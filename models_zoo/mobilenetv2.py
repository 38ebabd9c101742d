"""MobileNetV2 (Sandler et al. 2018) with CIFAR-style strides: stride-1 stem and a
stride-1 second stage, so 32x32 inputs are downsampled only 8x (32->4, 28->4).
Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project) with an
identity shortcut when stride is 1 and channels match; ``width_mult`` scales widths."""

import torch
from torch import nn

from ._common import init_weights, make_divisible

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_relu6(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    ]


class InvertedResidual(nn.Module):
    """expand (1x1) -> depthwise 3x3 -> project (1x1, no activation) [+ identity]."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn_relu6(c_in, hidden, 1)
        layers += _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # use_residual is fixed at construction, so this branch is trace-safe.
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expansion t, channels c, repeats n, first stride s); stage-2 stride 2 -> 1 for CIFAR.
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        width_mult: channel multiplier (1.0 = the standard 32..320 + 1280 widths).
        dropout: dropout before the classifier (default 0.2, as in the paper's code).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        c_in = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = _conv_bn_relu6(in_channels, c_in, 3, stride=1)
        for t, c, n, s in _CFG:
            c_out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers += _conv_bn_relu6(c_in, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(self.dropout(torch.flatten(x, 1)))
