"""Weak supervision (docs/DESIGN.md §3): the local learning rate follows the overall training loss.

The rate of step ``s`` is computed from the losses of steps ``< s`` only (the local update happens
in the forward pass, before step ``s``'s loss exists). With ``L`` the last observed loss and ``L̄``
its exponential moving average (β = 0.9, started at the first loss):

- ``sign`` (default): ``η = +η0`` if ``L ≤ L̄`` else ``-η0`` (anti-Hebbian while the loss rises);
- ``scale``: ``η = η0 · min(1, L̄ / L)``;
- ``off``: ``η = η0``.

Everything is kept in device tensors and updated with tensor ops, so observing a loss never
synchronises a GPU with the host. Non-finite losses are ignored.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["WeakSupervision", "MODES"]

MODES = ("sign", "scale", "off")


class WeakSupervision(nn.Module):
    """The local learning rate ``lr`` (a 0-dim tensor read by the fused ops) and its loss history.

    Args:
        mode: ``"sign"``, ``"scale"`` or ``"off"``.
        base_lr: ``η0``.
        beta: EMA decay of the loss.

    Example::

        >>> ws = WeakSupervision("sign", base_lr=0.01)
        >>> ws.observe(torch.tensor(2.0)); ws.observe(torch.tensor(3.0)); float(ws.lr)
        -0.01
    """

    def __init__(self, mode: str = "sign", base_lr: float = 0.01, beta: float = 0.9):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"weak_supervision must be one of {MODES}, got {mode!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"weak-supervision beta must be in [0, 1), got {beta}")
        if not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr < 0:
            raise ValueError(f"local_lr must be a finite number >= 0, got {base_lr!r}")
        self.mode, self.beta = mode, float(beta)
        self.register_buffer("base_lr", torch.tensor(float(base_lr)))
        self.register_buffer("lr", torch.tensor(float(base_lr)))
        self.register_buffer("loss_ema", torch.tensor(0.0))
        # 0 until the first loss (``steps`` says whether there was one): a NaN here would make replicas
        # that never observe a loss (freeze) compare as different and checkpoints compare unequal
        self.register_buffer("last_loss", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        # η0's multiplier (set_rate_factor); not saved: its owner (the trainer, from its LR schedule) sets
        # it before every loss it feeds, a resumed run's first included
        self.register_buffer("rate_factor", torch.tensor(1.0), persistent=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, base_lr={float(self.base_lr):g}, beta={self.beta}"

    @torch.no_grad()
    def observe(self, loss: Tensor | float) -> None:
        """Record the loss of the step just taken; sets ``lr`` for the next step."""
        if not isinstance(loss, Tensor):   # a float (outside a training step): a tensor of it
            loss = torch.tensor(float(loss))
        loss = loss.detach().to(self.lr.device, torch.float32).reshape(())
        ok = torch.isfinite(loss)
        base = self.base_lr * self.rate_factor
        prev = torch.where(self.steps == 0, loss, self.loss_ema)
        ema = prev + (1 - self.beta) * (loss - prev)   # incremental: a flat loss keeps the average exact
        if self.mode == "sign":
            # L <= β·prev + (1-β)·L  <=>  L <= prev (β > 0): decided on prev, so rounding never makes a
            # flat loss look like a rise
            rising = loss > prev if self.beta > 0 else torch.zeros_like(ok)
            lr = torch.where(rising, -base, base)
        elif self.mode == "scale":
            lr = base * torch.clamp(ema / loss.clamp_min(1e-12), max=1.0)
        else:
            lr = base
        self.loss_ema.copy_(torch.where(ok, ema, self.loss_ema))
        self.lr.copy_(torch.where(ok, lr, self.lr))
        self.last_loss.copy_(torch.where(ok, loss, self.last_loss))
        self.steps.add_(ok.long())

    def set_rate_factor(self, factor: float) -> None:
        """Scale η0 by ``factor`` from the next observed loss on (e.g. the SGD learning rate's schedule
        factor, so that the local rate decays with it). A device-side fill: no host read."""
        self.rate_factor.fill_(float(factor))

    def set_base_lr(self, value: float) -> None:
        """Change ``η0``; the current rate keeps its sign."""
        sign = -1.0 if float(self.lr) < 0 else 1.0
        self.base_lr.fill_(float(value))
        self.lr.fill_(sign * float(value) if self.mode != "scale" else float(value))
