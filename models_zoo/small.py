"""SmallCNN: a tiny 4-conv BN network (~61k params) for fast tests and smoke runs."""

import torch
from torch import nn

from ._common import init_weights

__all__ = ["SmallCNN"]


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (widths ``w, 2w, 4w, 4w``; strides 1,2,2,2),
    global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w, 1),
            _conv_bn_relu(w, 2 * w, 2),
            _conv_bn_relu(2 * w, 4 * w, 2),
            _conv_bn_relu(4 * w, 4 * w, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))
