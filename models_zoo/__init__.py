"""models_zoo: our own small-image CNNs (no torchvision) and a name -> model registry.

Every model takes ``num_classes`` and ``in_channels``, works on 1x28x28 and 3x32x32
inputs (global average pooling before the classifier), is ``torch.fx.symbolic_trace``-able,
uses ``nn.Module`` layers only (each instance called once) and ends in an ``nn.Linear``.
The model files do without ``from __future__ import annotations``: FX copies ``forward``'s
annotations into the traced graph, and string annotations make it unpicklable.

Example:
    >>> import torch, models_zoo
    >>> model = models_zoo.get_model("resnet20", num_classes=10, in_channels=3)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from torch import nn

from .densenet import DenseNetBC
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet
from .resnet_cifar import CifarResNet
from .small import SmallCNN
from .vgg import VGG
from .wrn import WideResNet

__all__ = [
    "get_model",
    "list_models",
    "count_parameters",
    "SmallCNN",
    "CifarResNet",
    "ResNet",
    "VGG",
    "MobileNetV2",
    "DenseNetBC",
    "WideResNet",
]


def smallcnn(num_classes: int = 10, in_channels: int = 3, *, width: int = 16) -> nn.Module:
    """Tiny 4-conv BN net (~61k params at width 16)."""
    return SmallCNN(num_classes, in_channels, width=width)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (option-B shortcuts)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-32 (option-B shortcuts)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-56 (option-B shortcuts)."""
    return CifarResNet(56, num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3, *, stem: str = "cifar") -> nn.Module:
    """ResNet-18; ``stem`` is ``"cifar"`` (default) or ``"imagenet"``."""
    return ResNet(18, num_classes, in_channels, stem=stem)


def resnet34(num_classes: int = 10, in_channels: int = 3, *, stem: str = "cifar") -> nn.Module:
    """ResNet-34; ``stem`` is ``"cifar"`` (default) or ``"imagenet"``."""
    return ResNet(34, num_classes, in_channels, stem=stem)


def resnet50(num_classes: int = 10, in_channels: int = 3, *, stem: str = "cifar") -> nn.Module:
    """ResNet-50 (bottleneck); ``stem`` is ``"cifar"`` (default) or ``"imagenet"``."""
    return ResNet(50, num_classes, in_channels, stem=stem)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, *, dropout: float = 0.5) -> nn.Module:
    """VGG-11 with BatchNorm, CIFAR style."""
    return VGG(11, num_classes, in_channels, dropout=dropout)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, *, dropout: float = 0.5) -> nn.Module:
    """VGG-16 with BatchNorm, CIFAR style."""
    return VGG(16, num_classes, in_channels, dropout=dropout)


def mobilenetv2(
    num_classes: int = 10, in_channels: int = 3, *, width_mult: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """MobileNetV2 with CIFAR strides."""
    return MobileNetV2(num_classes, in_channels, width_mult=width_mult, dropout=dropout)


def densenet_bc(
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
) -> nn.Module:
    """DenseNet-BC (default depth 100, growth 12)."""
    return DenseNetBC(depth, growth_rate, compression, num_classes=num_classes, in_channels=in_channels)


def wrn16_4(num_classes: int = 10, in_channels: int = 3, *, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 16-4."""
    return WideResNet(16, 4, dropout, num_classes=num_classes, in_channels=in_channels)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (
        smallcnn, resnet20, resnet32, resnet56, resnet18, resnet34, resnet50,
        vgg11_bn, vgg16_bn, mobilenetv2, densenet_bc, wrn16_4,
    )
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, in registry order.

    Returns:
        A new list of model names.

    Example:
        >>> "resnet20" in list_models()
        True
    """
    return list(_REGISTRY)


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build a zoo model by name (case-insensitive).

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the classifier output.
        in_channels: input image channels (1 for Fashion-MNIST, 3 for CIFAR).
        **kw: model-specific options, e.g. ``stem="imagenet"`` for resnet18/34/50,
            ``width_mult`` for mobilenetv2, ``depth``/``growth_rate`` for densenet_bc,
            ``dropout`` for vgg*/mobilenetv2/wrn16_4, ``width`` for smallcnn.

    Returns:
        A freshly initialised ``nn.Module`` mapping ``(N, in_channels, H, W)`` to
        ``(N, num_classes)`` logits.

    Raises:
        ValueError: unknown name (the message lists the valid names and the closest
            match) or invalid ``num_classes`` / ``in_channels``.
        TypeError: an option the chosen model does not accept.

    Example:
        >>> m = get_model("resnet18", num_classes=100, stem="imagenet")
        >>> m.fc.out_features
        100
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(key), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Valid names: {', '.join(_REGISTRY)}")
    for arg, val in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    builder = _REGISTRY[key]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "in_channels")]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise TypeError(
            f"get_model({key!r}) got unexpected option(s) {unknown}; "
            f"{key} accepts: {allowed if allowed else 'no extra options'}"
        )
    return builder(num_classes, in_channels, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``model``.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The total element count.

    Example:
        >>> count_parameters(get_model("resnet20")) > 0
        True
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
