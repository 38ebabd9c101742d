"""Per-epoch metrics: the column list, JSON-lines/CSV files, a saved-activation meter, text tables.

Columns of ``metrics.jsonl`` / ``metrics.csv`` (one row per epoch):

========================  ====================================================================
``epoch``                 1-based epoch number
``t``                     transition layer at the start of the epoch (layers ``< t`` were LOCAL)
``t_next``                transition at the end of the epoch (after learning-mode selection; a
                          schedule with ``decide_every`` may also move it inside the epoch)
``local_fraction``        ``p``: FLOP fraction of the layers that were LOCAL during the epoch
                          (averaged over its steps when ``t`` moved inside it)
``speed_bound``           the GEMM model's step-speedup bound ``3/(3-p)`` (rule dependent) over
                          the epoch's transitions
``train_loss/acc``        mean cross-entropy / accuracy over the epoch's training batches
``test_loss/acc``         on the (sub)set of the test split, ``model.eval()`` + ``no_grad``
``epoch_time_s``          wall time of the epoch: training + evaluation
``train_time_s``          wall time of the training loop alone (batches included)
``elapsed_train_s``       cumulative ``train_time_s`` (the x axis of accuracy-vs-time plots)
``mean_step_ms``          ``train_time_s`` per batch (data, step and progress bar; no per-step sync)
``saved_activation_mb``   bytes saved for backward in one training step (2nd batch of the
                          epoch), counted with ``torch.autograd.graph.saved_tensors_hooks``
                          (each storage once; the local prefix saves nothing). Empty when the
                          step is ``torch.compile``'d (hooks do not see inside compiled graphs)
``cuda_peak_mb``          ``torch.cuda.max_memory_allocated`` over the epoch; empty on CPU
``compile_s``             seconds torch spent compiling during the epoch: forward and backward
                          graphs, recompiles and CUDA-graph recording (dynamo's compile callbacks)
``capture_s``             seconds of warm-up steps and CUDA-graph recording of whole training steps
                          during the epoch (a GPU run under ``compile="auto"``/``"capture"``: one
                          recording per transition); 0 elsewhere
``compile_cache_hits``    graphs loaded from torch's compile caches instead of compiled (reuse
                          across runs and resumes)
``compiled``              whether the epoch's transition ran a compiled graph at the epoch's end
                          (``compile="auto"`` decides per transition; its choices go to the log)
``lr``                    optimizer learning rate at the end of the epoch
``local_lr``              current (signed) local learning rate of weak supervision (empty for freeze)
``world_size``            processes training the run (1 without torchrun)
``replica_max_abs_diff``  largest ``|w - w_rank0|`` over all parameters and buffers of all
                          processes at the end of the epoch (0.0: the replicas are identical)
``sched_*``               the schedule's ``log_stats()`` (dynamic: ``delta`` = δ_E of the
                          transition layer, ``running_avg`` = W̄, ``threshold``, ``moved``;
                          static: ``u``, ``f``, ``target``; budget: ``planned`` (its local
                          FLOP-epoch share); plasticity / gradnorm: ``value``,
                          ``settled``, ``moved`` of the last check, and ``running_avg``,
                          ``threshold`` / ``rate``)
========================  ====================================================================
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text

#: The fixed columns, in file order; schedule statistics (``sched_*``) follow.
COLUMNS = ("epoch", "t", "t_next", "local_fraction", "speed_bound", "train_loss", "train_acc", "test_loss", "test_acc",
           "epoch_time_s", "train_time_s", "elapsed_train_s", "mean_step_ms", "saved_activation_mb", "cuda_peak_mb",
           "compile_s", "capture_s", "compiled", "compile_cache_hits", "lr", "local_lr", "world_size",
           "replica_max_abs_diff")
#: Columns that measure the machine (they differ between otherwise identical runs): time, and the CUDA
#: peak, which depends on what the process's allocator and cuBLAS/cuDNN workspaces already hold.
MEASURED_COLUMNS = ("epoch_time_s", "train_time_s", "elapsed_train_s", "mean_step_ms", "compile_s", "capture_s",
                    "cuda_peak_mb")

__all__ = ["COLUMNS", "MEASURED_COLUMNS", "columns_of", "write_metrics", "SavedActivationMeter", "format_table"]


def columns_of(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The fixed :data:`COLUMNS`, then every other key seen in ``records`` (first-seen order)."""
    cols = list(COLUMNS)
    for rec in records:
        cols += [k for k in rec if k not in cols]
    return cols


def write_metrics(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(Re)write ``metrics.jsonl`` and ``metrics.csv`` in ``out_dir`` from all records so far.

    Both files are rewritten atomically every epoch, so after a resume they hold exactly the
    epochs of the checkpoint plus the new ones.

    Returns:
        ``(jsonl path, csv path)``.
    """
    out = Path(out_dir)
    lines = "".join(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n" for rec in records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns_of(records), restval="", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: "" if v is None else v for k, v in rec.items()})
    return atomic_write_text(out / "metrics.jsonl", lines), atomic_write_text(out / "metrics.csv", buf.getvalue())


class SavedActivationMeter:
    """Counts the bytes autograd saves for backward while active (each storage once).

    Example::

        >>> meter = SavedActivationMeter()
        >>> with meter:
        ...     y = (torch.ones(4, requires_grad=True) * 2).exp()
        >>> meter.bytes > 0
        True
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None

    @classmethod
    def measure(cls, fn: Callable[[], Any]) -> int:
        """Bytes saved for backward while ``fn()`` runs."""
        with cls() as meter:
            fn()
        return meter.bytes

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":   # no memory behind it
            return tensor
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedActivationMeter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)
        self._seen.clear()

    @property
    def megabytes(self) -> float:
        return self.bytes / 2**20


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str], *, markdown: bool = False) -> str:
    """A plain fixed-width text table, or a Markdown one (numbers already formatted by the caller)."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(cells) + " |"
                         for cells in [list(map(str, header)), ["---"] * len(header), *rows])
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
