"""Local learning rules (docs/DESIGN.md §2): each costs at most one update GEMM.

A rule sees the layer input ``X`` (through :class:`Geometry`), the layer output ``Y`` (conv/linear
result, bias included, before any normalisation) and the weight, and returns the new weight.
``geometry.correlate(P)`` is the one GEMM: ``<P ⊗ X>``, the post x pre outer product averaged over
batch and spatial positions; for a conv it is the weight-gradient GEMM with the error replaced by
``P``. ``W ← W + η·ΔW``; biases are never touched.

Add a rule by subclassing :class:`LocalRule` and calling :func:`register_rule`::

    @dataclass(frozen=True)
    class SignedHebbian(LocalRule):
        name: ClassVar[str] = "signed_hebbian"
        def new_weight(self, weight, y, geometry, lr):
            return weight + lr * geometry.correlate(torch.sign(y))
    register_rule(SignedHebbian)
    compile_localsgd(model, rule="signed_hebbian")
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["Geometry", "LocalRule", "Hebbian", "Oja", "SoftHebb", "Freeze", "register_rule", "get_rule", "make_rule",
           "list_rules"]


class Geometry:
    """The layer's input and shape facts a rule needs; ``correlate`` is the single update GEMM."""

    def __init__(self, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int):
        self.weight_shape = weight.shape
        self.is_linear = weight.dim() == 2
        self._weight = weight
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.x = x.reshape(-1, x.shape[-1]) if self.is_linear else x

    @property
    def channel_dim(self) -> int:
        """The output-channel dimension of ``Y`` (after the reshape linear inputs get)."""
        return 1

    def flat_output(self, y: Tensor) -> Tensor:
        """``Y`` shaped like the rule sees it: ``(rows, out)`` for linear layers, unchanged for convs."""
        return y.reshape(-1, y.shape[-1]) if self.is_linear else y

    def correlate(self, post: Tensor) -> Tensor:
        """``<post ⊗ X>``: shape of the weight, averaged over batch and output positions.

        The GEMM runs in ``post``'s dtype (the autocast dtype under autocast: the GEMM the update
        saves would have run in it too); the result is in the weight's dtype.
        """
        dtype = post.dtype
        x = self.x.to(dtype)
        count = post.numel() // post.shape[1]
        if dtype == torch.float16:
            # fp16 tops out at 65504: a sum over N·H·W positions overflows, so average inside the GEMM
            scale = count ** -0.5
            post, x, count = post * scale, x * scale, 1
        if self.is_linear:
            return (post.t().mm(x) / count).to(self._weight.dtype)
        dims = len(self.stride)
        grad_w = torch.ops.aten.convolution_backward(
            post, x, self._weight.to(dtype), None, self.stride, self.padding, self.dilation, False, [0] * dims,
            self.groups, [False, True, False])[1]
        return (grad_w / count).to(self._weight.dtype)

    def channel_mean(self, t: Tensor) -> Tensor:
        """Per-output-channel mean of ``t`` (shaped like ``Y``), shaped to broadcast against the weight."""
        dims = [d for d in range(t.dim()) if d != self.channel_dim]
        return t.mean(dim=dims).reshape(-1, *([1] * (len(self.weight_shape) - 1)))


class LocalRule(ABC):
    """A local learning rule. Subclasses set ``name`` and ``gemms`` and implement ``new_weight``."""

    name: ClassVar[str]
    gemms: ClassVar[int] = 1   # update GEMMs per step: enters the 3/(3-p) speed bound

    @property
    def updates(self) -> bool:
        """Whether the rule changes weights at all (freeze does not): no local rate, nothing to average."""
        return self.gemms > 0

    @abstractmethod
    def new_weight(self, weight: Tensor, y: Tensor, geometry: Geometry, lr: Tensor) -> Tensor | None:
        """The updated weight (a new tensor), or None for no update.

        Args:
            weight: the current weight (do not modify it).
            y: the layer output, ``(rows, out)`` for linear layers, ``(N, C_out, *spatial)`` for convs.
            geometry: input and shapes; ``geometry.correlate`` is the update GEMM.
            lr: the local learning rate ``η`` (0-dim tensor, may be negative under weak supervision).
        """

    @property
    def key(self) -> str:
        """Registry key: the bare name for default parameters, the repr otherwise."""
        try:
            default = type(self)()
        except TypeError:
            default = None
        return self.name if self == default else repr(self)


def _rescale_rows(new: Tensor, old: Tensor) -> Tensor:
    """Rescale each output filter of ``new`` to the norm it had in ``old``."""
    old_norm = old.flatten(1).norm(dim=1)
    new_norm = new.flatten(1).norm(dim=1).clamp_min(torch.finfo(new.dtype).tiny)
    return new * (old_norm / new_norm).reshape(-1, *([1] * (new.dim() - 1)))


@dataclass(frozen=True)
class Hebbian(LocalRule):
    """``ΔW = <Y ⊗ X>``, then each filter is rescaled to its previous norm (BatchNorm makes the
    forward scale-invariant, so only the direction carries information)."""

    name: ClassVar[str] = "hebbian"

    def new_weight(self, weight, y, geometry, lr):
        return _rescale_rows(weight + lr * geometry.correlate(y), weight)


@dataclass(frozen=True)
class Oja(LocalRule):
    """``ΔW = <Y ⊗ X> - <Y²>_o · W_o``: Hebbian growth with Oja's decay, norm-stable for small ``η > 0``."""

    name: ClassVar[str] = "oja"

    def new_weight(self, weight, y, geometry, lr):
        return weight + lr * (geometry.correlate(y) - geometry.channel_mean(y * y) * weight)


@dataclass(frozen=True)
class SoftHebb(LocalRule):
    """Soft winner-take-all: ``S = softmax(Y/τ)`` over channels, ``ΔW = <S ⊗ X> - <S·Y>_o · W_o``."""

    name: ClassVar[str] = "softhebb"
    tau: float = 1.0

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"SoftHebb tau must be > 0, got {self.tau}")

    def new_weight(self, weight, y, geometry, lr):
        s = torch.softmax(y / self.tau, dim=geometry.channel_dim)
        return weight + lr * (geometry.correlate(s) - geometry.channel_mean(s * y) * weight)


@dataclass(frozen=True)
class Freeze(LocalRule):
    """No update: the layer is frozen (the FreezeOut/AutoFreeze baseline)."""

    name: ClassVar[str] = "freeze"
    gemms: ClassVar[int] = 0

    def new_weight(self, weight, y, geometry, lr):
        return None


_RULES: dict[str, LocalRule] = {}


def register_rule(rule: LocalRule | type[LocalRule]) -> str:
    """Register a rule (an instance, or a class constructible without arguments) and return its key.

    The key is what the fused op receives (it appears in the rewritten code); a class is also
    reachable by its ``name``.
    """
    if isinstance(rule, type):
        rule = rule()
    if not isinstance(rule, LocalRule):
        raise TypeError(f"a local rule must subclass localsgd_fx.rules.LocalRule, got {type(rule).__name__}")
    if rule.gemms not in (0, 1):
        raise ValueError(f"rule {rule.name!r}: gemms must be 0 or 1 (LoCal+SGD rules cost at most one update GEMM)")
    _RULES[rule.key] = rule
    return rule.key


def get_rule(key: str) -> LocalRule:
    """The registered rule for ``key`` (a name or an instance's repr)."""
    try:
        return _RULES[key]
    except KeyError:
        raise ValueError(f"unknown local rule {key!r}; registered rules: {sorted(_RULES)}") from None


def make_rule(spec: str | LocalRule) -> LocalRule:
    """A rule from a name (``"hebbian"``, ``"oja"``, ``"softhebb"``, ``"freeze"`` or a registered
    custom name) or an instance (registered on the way)."""
    if isinstance(spec, str):
        return get_rule(spec)
    register_rule(spec)
    return spec


def list_rules() -> list[str]:
    return sorted(k for k, r in _RULES.items() if k == r.name)


for _rule in (Hebbian, Oja, SoftHebb, Freeze):
    register_rule(_rule)
