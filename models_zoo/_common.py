"""Shared helpers for the zoo: standard weight init and channel rounding."""
from __future__ import annotations

from torch import nn

__all__ = ["init_weights", "make_divisible"]


def init_weights(model: nn.Module) -> nn.Module:
    """Apply the standard CNN init in place and return ``model``.

    Convs get Kaiming-normal weights (``fan_out``, ReLU gain) and zero bias,
    BatchNorm gets weight 1 / bias 0. Linear layers keep PyTorch's default init
    (as torchvision's ResNets do).

    Args:
        model: the module whose submodules are initialised.

    Returns:
        The same module, for chaining.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going below 90% of it
    (the MobileNet channel rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v
