"""PNG plots of a run's metrics (matplotlib, Agg backend: no display needed).

* :func:`plot_transition` - the transition layer ``t`` against the epoch (the paper's Figure 3
  view), with the local FLOP fraction ``p`` on a second axis.
* :func:`plot_accuracy_vs_time` - test accuracy against cumulative training wall-clock time, one
  line per run (used by ``train`` for one run and by ``bench tradeoff`` for its arms).
* :func:`plot_tradeoff` - accuracy change against speedup, one point per arm with its spread over
  seeds (``bench tradeoff``'s summary): the trade-off at a glance.

Example::

    >>> plot_transition(records, "runs/x/transition.png")                 # doctest: +SKIP
    >>> plot_accuracy_vs_time({"LoCal+SGD": records}, "runs/x/accuracy_vs_time.png")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_open  # noqa: E402

__all__ = ["plot_transition", "plot_accuracy_vs_time", "plot_tradeoff"]

Records = Sequence[Mapping[str, Any]]


def plot_transition(records: Records, path: str | os.PathLike[str], *, num_layers: int | None = None,
                    title: str = "") -> Path:
    """Transition layer per epoch (step plot) and the local FLOP fraction.

    Args:
        records: per-epoch metric rows with ``epoch``, ``t`` and ``local_fraction``.
        path: the PNG to write.
        num_layers: draw the layer count as the upper limit of the axis.
        title: figure title.
    """
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.step(epochs, [r["t"] for r in records], where="post", color="tab:blue", marker="o", label="transition layer t")
    ax.set_xlabel("epoch")
    ax.set_ylabel("transition layer t (layers < t are local)")
    if num_layers:
        ax.set_ylim(0, num_layers)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(epochs, [_num(r.get("local_fraction")) for r in records], color="tab:orange", ls="--",
             label="local FLOP fraction p")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("local FLOP fraction p")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=8)
    ax.set_title(title or "LoCal+SGD: transition layer per epoch")
    return _save(fig, path)


def plot_accuracy_vs_time(runs: Mapping[str, Records], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Test accuracy against cumulative training time (``elapsed_train_s``), one line per run."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, records in runs.items():
        ax.plot([r["elapsed_train_s"] for r in records], [100 * _num(r["test_acc"]) for r in records],
                marker="o", ms=3, label=name)
    return _finish(fig, ax, path, xlabel="training wall-clock time (s, evaluation excluded)",
                   ylabel="test accuracy (%)", title=title or "test accuracy vs wall-clock time")


def plot_tradeoff(summary: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = "",
                  target: tuple[float, float] | None = None) -> Path:
    """Δ test accuracy (pp) against speedup per arm, with ±1 std bars when there are several seeds.

    Args:
        summary: ``bench tradeoff``'s summary: arm -> {"speedup": (mean, std), "delta_acc_pp": (mean, std), ...}.
        path: the PNG to write.
        title: figure title.
        target: ``(speedup, Δ pp)`` of a goal; draws its corner (at least this fast, at most this loss).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, s in summary.items():
        (x, dx), (y, dy) = s["speedup"], s["delta_acc_pp"]
        marker = "s" if "freeze" in name else ("o" if "SGD" not in name else "*")
        ax.errorbar(x, y, xerr=None if dx != dx else dx, yerr=None if dy != dy else dy, fmt=marker, ms=7,
                    capsize=3, label=name)
    if target is not None:
        ax.axvline(target[0], color="grey", ls=":", lw=1)
        ax.axhline(target[1], color="grey", ls=":", lw=1)
    ax.axhline(0, color="black", lw=0.5)
    return _finish(fig, ax, path, xlabel="end-to-end training speedup over SGD (x)",
                   ylabel="test accuracy change vs SGD (pp)", title=title or "accuracy vs speed")


def _finish(fig: Any, ax: Any, path: str | os.PathLike[str], *, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid, legend and title of a one-axis plot, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
