"""The schedule driver: where a run is (epoch, steps, ``t``) and the one path by which ``t`` moves.

:class:`ScheduleDriver` counts training steps and epochs, builds the :class:`~localsgd_fx.schedules.EpochStats`
a schedule decides on (at an epoch end, or every K steps for schedules with ``decide_every``), applies the
schedule's choice, and keeps the history. It knows nothing of graphs or devices: the boundary signals
come from a :class:`~localsgd_fx.signals.SignalMeter` (or none), and moves of ``t`` are reported to
whoever listens (``on_move``), so the module, the meter and a data-parallel wrapper all follow one path.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from passes.errors import LocalSGDError
from passes.layers import LayerOrder
from passes.partition import check_transition

from .schedules import EpochStats, Manual, PlainSGD, Schedule

__all__ = ["ScheduleDriver"]


class ScheduleDriver:
    """Drives ``schedule`` over the layers of ``order``.

    Args:
        schedule: the learning-mode selector (bound here).
        order: the layer order (for FLOP shares and the range of ``t``).
        max_local: the most layers ever local.
        total_epochs: the run length, if known.
        read_signals: ``(t) -> {signal: value}``, the boundary signals of layer ``t`` since the last call
            (one host read), or None when the schedule reads none.
        read_update_norms: ``(t) -> {layer index: ||ΔW|| over the epoch}`` for the SGD layers ``>= t``, or None
            when the schedule reads none.
        on_move: called with the new ``t`` after every move.
    """

    def __init__(self, schedule: Schedule, order: LayerOrder, max_local: int, total_epochs: int | None, *,
                 read_signals: Callable[[int], dict] | None = None,
                 read_update_norms: Callable[[int], dict[int, float]] | None = None,
                 on_move: Callable[[int], None] = lambda t: None):
        self.schedule, self.order, self.max_local, self.total_epochs = schedule, order, max_local, total_epochs
        self.read_signals, self.read_update_norms, self.on_move = read_signals, read_update_norms, on_move
        schedule.bind(len(order), max_local, total_epochs)
        self.transition, self.epoch = 0, 0
        self.history: list[dict[str, Any]] = []
        self.steps_this_epoch = 0
        self.longest_epoch = 0            # the most steps an epoch has had so far
        self.epoch_length: int | None = None   # steps per epoch when the caller knows (the trainer says)
        self.epochs_at_transition = 0     # whole epochs the current t has lasted

    # ------------------------------------------------------------------------------ steps
    def step(self) -> None:
        """A training step is about to run."""
        self.steps_this_epoch += 1

    def expected_steps(self) -> int:
        """How many more training steps the current ``t`` is expected to run (for ``compile="auto"``).

        The rest of this epoch, plus whole epochs: all that are left when the schedule cannot move ``t``
        any more, else as many as ``t`` has lasted already (a run that held ``t`` for k epochs is
        expected to hold it about k more), never past ``total_epochs``.
        """
        per_epoch = self.epoch_length or max(self.longest_epoch, self.steps_this_epoch)
        left_this_epoch = max(0, per_epoch - self.steps_this_epoch)
        stuck = isinstance(self.schedule, (PlainSGD, Manual)) or self.transition >= self.max_local
        epochs_left = None if self.total_epochs is None else max(0, self.total_epochs - self.epoch - 1)
        if stuck:
            more = epochs_left if epochs_left is not None else max(1, self.epoch)
        else:
            more = self.epochs_at_transition if epochs_left is None else min(epochs_left, self.epochs_at_transition)
        return left_this_epoch + per_epoch * more

    # ---------------------------------------------------------------------------- decisions
    def end_epoch(self, mean_lr: float | None = None) -> int:
        """The epoch ended: decide (unless the schedule decides every K steps), move, record; returns ``t``."""
        before = self.transition
        norms: dict[int, float] = {}
        if self.schedule.decide_every is None:      # else it decides in maybe_decide
            norms = self.read_update_norms(before) if self.read_update_norms is not None else {}
            if self.steps_this_epoch or any(norms.values()):    # no step and no weight moved: nothing to judge
                self._move(int(self.schedule.select(self._stats(self.epoch + 1, norms, mean_lr))))
        self.epoch += 1
        self.longest_epoch = max(self.longest_epoch, self.steps_this_epoch)
        self.steps_this_epoch = 0
        self.epochs_at_transition = 0 if self.transition != before else self.epochs_at_transition + 1
        self.history.append({"epoch": self.epoch, "transition_before": before, "transition": self.transition,
                             "update_norm": norms.get(before), **self.schedule.log_stats()})
        return self.transition

    def maybe_decide(self) -> int:
        """After an optimizer step: a decision if the schedule decides every K steps and one is due."""
        return self.decide() if self.schedule.due() else self.transition

    def decide(self) -> int:
        """A decision inside the epoch, now (``schedule.due()`` said one is due)."""
        before = self.transition
        self._move(int(self.schedule.select(self._stats(self.epoch, {}, None))))
        if self.transition != before:
            self.epochs_at_transition = 0
        self.history.append({"epoch": self.epoch + 1, "step": self.steps_this_epoch, "transition_before": before,
                             "transition": self.transition, **self.schedule.log_stats()})
        return self.transition

    def set_transition(self, t: int, *, force: bool = False) -> None:
        """Make layers ``0..t-1`` local. Moving backwards (``t`` smaller) or past ``max_local`` needs ``force=True``."""
        check_transition(self.order, t)
        if t > self.max_local and not force:    # every layer local would leave nothing to back-propagate
            raise LocalSGDError(f"transition {t} is past max_local={self.max_local}: at most {self.max_local} of the "
                                f"{len(self.order)} layers may be local (force=True to inspect it anyway)")
        if t < self.transition and not force:
            raise LocalSGDError(f"transition {t} < current {self.transition}: layers switch SGD -> LOCAL once and "
                                "never back. Pass force=True to move backwards anyway.")
        self.transition = t
        self.on_move(t)

    def _move(self, t: int) -> None:
        if t != self.transition:
            self.set_transition(t)

    def _stats(self, epoch: int, norms: dict[int, float], mean_lr: float | None) -> EpochStats:
        # nothing left to decide once t is at its cap: the signals are not read (no host copy)
        signals = ({} if self.read_signals is None or self.transition >= self.max_local
                   else self.read_signals(self.transition))
        return EpochStats(epoch=epoch, transition=self.transition, num_layers=len(self.order), max_local=self.max_local,
                          update_norms=norms, flop_shares=self.order.flop_shares(), signals=signals, mean_lr=mean_lr)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"transition": self.transition, "epoch": self.epoch, "schedule": self.schedule.state_dict(),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])     # first: it validates its own state
        self.set_transition(int(state["transition"]), force=True)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
