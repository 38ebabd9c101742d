"""Local learning rules (docs/DESIGN.md §2): each costs at most one update GEMM.

Every rule is the layer's weight-gradient GEMM with the error replaced by an activity: a
*cotangent* ``P`` computed from the layer output ``Y`` (conv/linear result, bias included, before
any normalisation), pulled back through the layer by ``torch.func.vjp`` (:mod:`localsgd_fx.ops`), plus
optional per-filter terms. ``pullback.correlate(P)`` is that one GEMM: ``<P ⊗ X>``, the post x pre
outer product averaged over the output's rows and positions, whatever the layer kind (linear, conv
1-3 d, grouped, dilated, strided, transposed, functional): no rule knows which kind it updates.
``W ← W + η·ΔW``; biases are never touched. Weights are seen *filter-major*: ``weight[o]`` is
everything that feeds output channel ``o`` (a transposed conv's weight is permuted for the rule).

Add a rule by subclassing :class:`LocalRule` and calling :func:`register_rule`::

    @dataclass(frozen=True)
    class SignedHebbian(LocalRule):
        name: ClassVar[str] = "signed_hebbian"
        def cotangent(self, y):
            return torch.sign(y)           # ΔW = <sign(Y) ⊗ X>
    register_rule(SignedHebbian)
    compile_localsgd(model, rule="signed_hebbian")

``filter_decay`` adds ``-<D>_o · W_o`` (Oja, SoftHebb) and ``finish`` post-processes the new weight
(Hebbian's per-filter norm rescale). A rule that needs more overrides ``new_weight`` itself.
"""
from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["Pullback", "LocalRule", "Hebbian", "Oja", "SoftHebb", "Freeze", "register_rule", "get_rule", "make_rule",
           "list_rules"]


class Pullback:
    """The update GEMM of one layer call: its weight's vector-Jacobian product, averaged.

    Built by :func:`localsgd_fx.ops.local_update` from ``torch.func.vjp`` of ``W ↦ layer(x, W)``.
    ``y`` is the layer output as rules see it, output channels at dimension 1 (the op flattens a linear
    layer's leading dimensions into rows); ``pull(P)``, for ``P`` shaped like ``y``, returns the weight
    gradient at that cotangent, summed over rows and positions, filter-major and in the weight's dtype.
    """

    #: The output-channel dimension of ``Y`` as rules see it.
    channel_dim: ClassVar[int] = 1

    def __init__(self, pull: Callable[[Tensor], Tensor], y: Tensor, weight_dims: int, scale: float = 1.0):
        self._pull, self._dtype, self._dims = pull, y.dtype, weight_dims
        self._count = y.numel() // max(y.shape[self.channel_dim], 1)   # rows x positions per output channel
        # fp16 tops out at 65504: a sum over N·H·W positions overflows, so the op scales X by `scale`
        # (≈ count**-0.5) and we scale P by it too; the GEMM then sums terms already divided by ~count
        self._scale = scale

    def correlate(self, post: Tensor) -> Tensor:
        """``<post ⊗ X>``: filter-major, shape of the weight, averaged over rows and output positions.

        The GEMM runs in the layer output's dtype (the autocast dtype under autocast: the GEMM the update
        saves would have run in it too); the result is in the weight's dtype.
        """
        post = post.to(self._dtype)
        if self._scale != 1.0:
            return self._pull(post * self._scale) / (self._count * self._scale * self._scale)
        return self._pull(post) / self._count

    __call__ = correlate

    def channel_mean(self, t: Tensor) -> Tensor:
        """Per-output-channel mean of ``t`` (shaped like the rule's ``Y``), shaped to broadcast against the weight."""
        dims = [d for d in range(t.dim()) if d != self.channel_dim]
        return t.mean(dim=dims).reshape(-1, *([1] * (self._dims - 1)))


class LocalRule(ABC):
    """A local learning rule: a cotangent of the layer output, optional per-filter terms.

    Subclasses set ``name`` (and ``gemms = 0`` for a rule that never updates) and implement
    :meth:`cotangent`; :meth:`filter_decay` and :meth:`finish` are optional. ``new_weight`` composes
    them: ``finish(W + η·(<P ⊗ X> - <D>_o·W_o), W)``.
    """

    name: ClassVar[str]
    gemms: ClassVar[int] = 1   # update GEMMs per step: enters the 3/(3-p) speed bound

    @property
    def updates(self) -> bool:
        """Whether the rule changes weights at all (freeze does not): no local rate, nothing to average."""
        return self.gemms > 0

    def cotangent(self, y: Tensor) -> Tensor:
        """``P``: the activity pulled back through the layer in place of the error (shaped like ``y``).

        ``y`` is the layer output, output channels at dimension 1 (``(rows, out)`` for a linear layer).
        """
        raise NotImplementedError(f"rule {self.name!r} must define cotangent(y) (or override new_weight)")

    def filter_decay(self, y: Tensor, post: Tensor) -> Tensor | None:
        """``D`` (shaped like ``y``): ``ΔW`` gets ``-<D>_o · W_o``, the per-filter mean of ``D`` times the filter.
        None (the default): no such term."""
        return None

    def finish(self, new: Tensor, old: Tensor) -> Tensor:
        """Post-process the new (filter-major) weight; ``old`` is the weight before the update."""
        return new

    def new_weight(self, weight: Tensor, y: Tensor, pullback: Pullback, lr: Tensor) -> Tensor | None:
        """The updated weight (a new tensor), or None for no update.

        Args:
            weight: the current weight, filter-major (do not modify it).
            y: the layer output, output channels at dimension 1 (``(rows, out)`` for a linear layer).
            pullback: ``pullback.correlate(P)`` is the update GEMM ``<P ⊗ X>``.
            lr: the local learning rate ``η`` (0-dim tensor, may be negative under weak supervision).
        """
        post = self.cotangent(y)
        delta = pullback.correlate(post)
        decay = self.filter_decay(y, post)
        if decay is not None:
            delta = delta - pullback.channel_mean(decay) * weight
        return self.finish(torch.addcmul(weight, lr, delta), weight)   # W + η·ΔW in one kernel

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

    def cotangent(self, y):
        return y

    def finish(self, new, old):
        return _rescale_rows(new, old)


@dataclass(frozen=True)
class Oja(LocalRule):
    """``ΔW = <Y ⊗ X> - <Y²>_o · W_o``: Hebbian growth with Oja's decay, norm-stable for small ``η > 0``."""

    name: ClassVar[str] = "oja"

    def cotangent(self, y):
        return y

    def filter_decay(self, y, post):
        return y * y


@dataclass(frozen=True)
class SoftHebb(LocalRule):
    """Soft winner-take-all: ``S = softmax(Y/τ)`` over channels, ``ΔW = <S ⊗ X> - <S·Y>_o · W_o``."""

    name: ClassVar[str] = "softhebb"
    tau: float = 1.0

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"SoftHebb tau must be > 0, got {self.tau}")

    def cotangent(self, y):
        return torch.softmax(y / self.tau, dim=Pullback.channel_dim)

    def filter_decay(self, y, post):
        return post * y


@dataclass(frozen=True)
class Freeze(LocalRule):
    """No update: the layer is frozen (the FreezeOut/AutoFreeze baseline)."""

    name: ClassVar[str] = "freeze"
    gemms: ClassVar[int] = 0

    def new_weight(self, weight, y, pullback, lr):
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
    cls = type(rule)
    if rule.gemms and cls.cotangent is LocalRule.cotangent and cls.new_weight is LocalRule.new_weight:
        raise TypeError(f"rule {rule.name!r} defines neither cotangent(y) nor new_weight(...); define cotangent(y), "
                        "the activity the update GEMM pulls back")
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
