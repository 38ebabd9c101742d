"""The LoCal+SGD training loop behind ``localsgd train``: :class:`TrainConfig`, :class:`Trainer`, :func:`fit`.

What a run measures, per epoch (columns: :mod:`localsgd_fx.metrics`): the transition layer ``t``
and local FLOP fraction ``p``, train loss/accuracy, test accuracy (``model.eval()``: the untouched
graph, under ``no_grad``), epoch and step wall times, activation memory saved for backward, compile
time, the local learning rate and the schedule's statistics (δ, W̄). Files in ``config.out``:
``metrics.jsonl``, ``metrics.csv``, ``transition.png``, ``accuracy_vs_time.png``, ``checkpoint.pt``
(every epoch, atomic), ``config.json`` and, at the end, ``summary.json``.

The step: forward (a local rule updates the prefix inside it; the default, freeze, leaves it), cross-entropy, backward,
optimizer step, LR scheduler step, ``model.observe_loss(loss)``; ``model.end_epoch()`` once per
epoch. The learning rate is stepped **per iteration**: cosine from ``lr`` to 0 over all
iterations, or ``step`` (x0.1 at 50 % and 75 % of the epochs).

Determinism: the model is initialised from ``seed``; the batch order and augmentation of epoch
``e`` depend only on ``(seed, e)`` (:class:`~localsgd_fx.data.Batches`); the global RNG states
(torch, numpy, python) are captured at every epoch end, checkpointed, and restored before the
next epoch. So on CPU ``epochs=4`` in one go and ``stop_after=2`` + ``resume`` give identical
weights, transitions and metrics (apart from wall times).

Data parallel: in a running ``torch.distributed`` group (``torchrun``) each process trains its
shard of every global batch of N x ``batch_size`` through
:class:`~localsgd_fx.distributed.LocalSGDDataParallel` and tests its shard of the test set (sums
all-reduced); rank 0 alone logs and writes files; the checkpoint holds every process's RNG state.

Example::

    >>> from localsgd_fx.train import TrainConfig, fit
    >>> result = fit(TrainConfig(model="smallcnn", epochs=2, train_subset=512, out="runs/demo"))  # doctest: +SKIP
    >>> print(result.summary())                                                                  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import models_zoo
from passes import find_layers, trace
from passes.errors import LocalSGDError

from .api import DEFAULT_LOCAL_LR, DEFAULT_RULE, DEFAULT_SAMPLE_FRACTION, LocalSGDModule, compile_localsgd
from .atomic import atomic_write_text
from .capture import TrainStep, recorder_for
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    capture_rng,
    check_compatible,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .cost import speed_bound
from .data import Batches, ImageDataset, list_datasets, load_dataset
from .distributed import LocalSGDDataParallel, all_reduce_sum, gather_objects, rank, replica_max_abs_diff, world_size
from .lock import RunLock
from .metrics import SavedActivationMeter, format_table, write_metrics
from .rules import list_rules, make_rule
from .run_folder import disk_full_guard, new_run_folder, prepare_run_folder
from .runtime import COMPILE_MODES, DEVICES, compile_cache_hits, resolve_device
from .schedules import DEFAULT_SCHEDULE, SCHEDULE_NAMES, make_schedule
from .supervision import MODES as WEAK_SUPERVISION_MODES

__all__ = ["TrainConfig", "ConfigError", "TrainingDiverged", "unused_settings", "without_unused", "Trainer",
           "TrainResult", "Callback", "fit", "load_data"]

# ---------------------------------------------------------------------------------------------
# The default run (``python3 -m localsgd_fx train``): LoCal+SGD ResNet-20 on Fashion-MNIST
# that finishes within 10 minutes on 2 CPU cores. Measured there: a plain-SGD step (batch 128) takes
# ~0.27 s on idle cores and ~0.5 s when the cores are shared, so one full-data epoch (469 steps) is
# 2-4 minutes. The default run therefore trains on a fixed 10,000-image subset for 8 epochs and tests
# on 2,000 test images: ~4 minutes idle, ~6-7 minutes shared.
# ---------------------------------------------------------------------------------------------
MAIN_EPOCHS = 8
MAIN_TRAIN_SUBSET = 10000
MAIN_TEST_SUBSET = 2000
#: The learning-rate step schedule: multiply by ``STEP_GAMMA`` at these fractions of the epochs.
STEP_MILESTONES, STEP_GAMMA = (0.5, 0.75), 0.1
#: Data subsets are drawn with this seed whatever ``seed`` is, so every seed sees the same images.
SUBSET_SEED = 0
#: Config fields that steer the run but not its numbers: a resumed run may change them; any other
#: difference from the checkpoint's config (``epochs`` included: it shapes the LR and static schedules)
#: is refused.
RUN_CONTROL = ("data_dir", "out", "resume", "overwrite", "stop_after", "progress", "device", "compile",
               "eval_batch_size")


#: The keys a checkpoint must hold to be resumed (``grad_scaler``, ``rng_ranks`` and ``data`` are optional).
CHECKPOINT_KEYS = ("config", "epoch", "model", "optimizer", "lr_scheduler", "rng", "metrics")

#: How the local rule's η0 changes over a run: kept, or multiplied by the SGD learning rate's schedule factor.
LOCAL_LR_SCHEDULES = ("constant", "follow")


#: The learning-rate schedules the trainer steps per iteration (see :meth:`Trainer._lr_factor`).
LR_SCHEDULES = ("cosine", "step")
#: ``out``'s default: a new folder ``runs/<model>-<dataset>-<date-time>`` made when the run starts
NEW_RUN_FOLDER = "runs/{model}-{dataset}-{time}"

_group = ""   # the flag group of the settings declared next (see setting)


def setting(default: Any, help: str | None, *, group: str | None = None, choices: Callable[[], Sequence] | None = None,
            type: Callable | None = None, metavar: str | None = None, action: Any = None, flag: str | None = None):
    """A :class:`TrainConfig` field and its command-line flag: ``--name-with-dashes`` (or ``flag``), its help
    (None: no flag), its choices (a callable returning the list its owner keeps) and argparse's type, metavar and
    action. ``group`` starts a flag group that the settings declared after it join."""
    global _group
    _group = group or _group
    meta = {"help": help, "group": _group, "choices": choices, "type": type, "metavar": metavar, "action": action,
            "flag": flag}
    return field(default=default, metadata=meta)


def _int_or_float(text: str) -> int | float:
    """``"2"`` -> 2 (layers / an epoch), ``"0.1"`` -> 0.1 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int or a float, got {text!r}") from None


class ConfigError(LocalSGDError, ValueError):
    """A configuration value or combination that cannot run; the message names the field and what is valid."""


class TrainingDiverged(LocalSGDError):
    """The training loss became inf or NaN; the message names the epoch and the settings to lower."""


@dataclass
class TrainConfig:
    """Every hyperparameter of a run, in one place (the CLI flags map 1:1 onto these fields).

    ``schedule="sgd"`` is plain SGD (the rule is then irrelevant); ``rule="freeze"`` is the
    freeze baseline (FreezeOut/AutoFreeze) driven by the chosen schedule. ``alpha``/``shift``
    tune the dynamic schedule, ``budget``/``max_share``/``start`` the budget one, ``c1``/``c2`` the static ones,
    ``threshold``/``shift``/``patience``/
    ``decide_every`` (and ``probe_size``) the plasticity and gradnorm ones (``None``: the schedule's
    defaults, :mod:`localsgd_fx.schedules`); an int ``shift``/``c1`` counts layers, a float in (0, 1)
    is a fraction of the layers; an int ``c2`` is an epoch, a float a fraction of the epochs; an int
    ``decide_every`` counts training steps, a float in (0, 1] is a fraction of an epoch's steps.
    """

    # data and model
    model: str = setting("resnet20", "zoo model", group="data and model", choices=models_zoo.list_models,
                         metavar="NAME")
    dataset: str = setting("fashion-mnist", "", choices=list_datasets)
    data_dir: str | None = setting(None, "folder holding the dataset files (default: the standard places)")
    train_subset: int | None = setting(MAIN_TRAIN_SUBSET, "train on N images (0 = the whole split)", type=int,
                                       metavar="N")
    test_subset: int | None = setting(MAIN_TEST_SUBSET, "test on N images (0 = the whole split)", type=int, metavar="N")
    augment: bool | None = setting(None, "random crop + flip (default: on for CIFAR, off for Fashion-MNIST)",
                                   action=argparse.BooleanOptionalAction)
    # SGD
    epochs: int = setting(MAIN_EPOCHS, "", group="SGD", type=int)
    batch_size: int = setting(128, "per process; under torchrun the global batch is N x this", type=int)
    lr: float = setting(0.1, "", type=float)
    lr_schedule: str = setting("cosine", "stepped per iteration: cosine to 0, or x0.1 at 50%% and 75%% of the epochs",
                               choices=lambda: LR_SCHEDULES)
    momentum: float = setting(0.9, "", type=float)
    weight_decay: float = setting(5e-4, "", type=float)
    # LoCal
    rule: str = setting(DEFAULT_RULE, "what the local prefix does: freeze (no update), hebbian (the paper's rule), "
                                      "oja, softhebb", group="LoCal", choices=list_rules)
    schedule: str = setting(DEFAULT_SCHEDULE, "learning-mode selection; sgd = plain SGD",
                            choices=lambda: SCHEDULE_NAMES)
    alpha: float | None = setting(None, "dynamic: move when delta < alpha * running average", type=float)
    per_lr: bool | None = setting(None, "dynamic: divide each epoch's update norm by the epoch's mean learning rate "
                                        "(long runs)", action="store_true")
    shift: int | float | None = setting(None, "dynamic/plasticity/gradnorm: layers per move (int) or fraction of the "
                                              "layers", type=_int_or_float)
    c1: int | float | None = setting(None, "static: most layers ever local (int) or fraction of the layers",
                                     type=_int_or_float)
    c2: int | float | None = setting(None, "static: epoch (int) or fraction of the epochs where local starts",
                                     type=_int_or_float)
    budget: float | None = setting(None, "budget: fraction of the run's layer-FLOP-epochs that are local", type=float)
    max_share: float | None = setting(None, "budget: most of the layer FLOPs the local prefix may hold", type=float)
    start: float | None = setting(None, "budget: no layer is local before this fraction of the run", type=float)
    threshold: float | None = setting(None, "plasticity: move when the probe output's change < threshold * its "
                                            "running average; gradnorm: move when the gradient norm's relative change "
                                            "< threshold", type=float)
    patience: int | None = setting(None, "plasticity/gradnorm: checks in a row below the threshold to move", type=int)
    decide_every: int | float | None = setting(None, "plasticity/gradnorm: decide every K training steps (int) or "
                                                     "fraction of an epoch (float) instead of at epoch ends",
                                               type=_int_or_float, metavar="K")
    probe_size: int | None = setting(None, "plasticity: images in the fixed probe batch", type=int)
    local_lr: float = setting(DEFAULT_LOCAL_LR, "eta0 of the local rule", type=float)
    local_lr_schedule: str = setting("constant", "'follow': the local rate decays with the SGD learning rate's "
                                                 "schedule", choices=lambda: LOCAL_LR_SCHEDULES)
    weak_supervision: str = setting("sign", "", choices=lambda: WEAK_SUPERVISION_MODES)
    sample_fraction: float = setting(DEFAULT_SAMPLE_FRACTION, "local update from this fraction of the batch",
                                     type=float)
    max_local: int | None = setting(None, "most layers ever local (default: all but the classifier)", type=int)
    # run control
    seed: int = setting(0, "", group="run", type=int)
    device: str = setting("auto", "", choices=lambda: DEVICES)
    compile: str = setting("auto", "capture = record each transition's whole training step as a CUDA graph (what "
                                   "auto does on a GPU); on = torch.compile each transition's graph; reduce-overhead "
                                   "= with CUDA graphs; auto on a CPU: eager; off", choices=lambda: COMPILE_MODES)
    amp: str = setting("off", "mixed precision (autocast; fp16 adds a gradient scaler); weights stay fp32",
                       choices=lambda: tuple(AMP_DTYPES))
    channels_last: bool = setting(False, "channels-last model and inputs (faster convs on GPUs)", action="store_true")
    out: str | None = setting(NEW_RUN_FOLDER, "run directory, new or empty for a new run (by default a new folder "
                                              "named by the date and time; --resume needs the folder of the run; "
                                              "None in the API: write nothing)")
    resume: bool = setting(False, "continue the run checkpointed in --out", action="store_true")
    overwrite: bool = setting(False, "start over in --out: deletes the files an earlier run wrote there (other files "
                                     "are kept)", action="store_true")
    stop_after: int | None = setting(None, "stop after epoch E (resumable; schedules still span --epochs)", type=int,
                                     metavar="E")
    progress: bool = setting(True, "no progress bars (for logs)", action="store_false", flag="--no-progress")
    eval_batch_size: int = setting(512, None)

    def validate(self) -> "TrainConfig":
        """Check every field; raises :class:`ConfigError` naming the field, its value and what is valid."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("lr", "momentum", "weight_decay", "local_lr", "sample_fraction", "alpha", "shift", "c1", "c2",
                     "budget", "max_share", "start"):
            value = getattr(self, name)   # inf/nan pass the range checks below (and inf > 0)
            need(value is None or (isinstance(value, (int, float)) and math.isfinite(value)),
                 f"{name} must be a finite number, got {value!r}")

        for name in ("epochs", "batch_size", "eval_batch_size"):
            need(_pos_int(getattr(self, name)), f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("train_subset", "test_subset", "stop_after"):
            value = getattr(self, name)
            need(value is None or _pos_int(value), f"{name} must be a positive int or None, got {value!r}")
        for f in fields(self):     # every field with a choice list, checked against its owner's list
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices():
                raise ConfigError(f"unknown {f.name} {value!r}: {f.name} must be one of "
                                  f"{', '.join(map(str, choices()))}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.local_lr >= 0, f"local_lr must be >= 0, got {self.local_lr}")
        need(0 < self.sample_fraction <= 1, f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        need(self.out is None or (isinstance(self.out, str) and self.out.strip() != ""),
             f"--out must name a folder, got {self.out!r}; leave --out out to write into a new folder under runs/")
        need(not (self.resume and self.overwrite),
             "resume and overwrite exclude each other: --resume continues the run in --out, --overwrite starts it over")
        need(not (self.resume and self.out == NEW_RUN_FOLDER),
             "--resume needs --out DIR: the folder of the run to continue")
        need(self.max_local is None or (isinstance(self.max_local, int) and not isinstance(self.max_local, bool)
                                        and self.max_local >= 0),
             f"max_local must be an int >= 0 (layers), got {self.max_local!r}")
        resolve_device(self.device)   # raises when CUDA is asked for and absent
        schedule_kwargs(self)   # raises on options that do not belong to the schedule
        unused = unused_settings(self)
        need("rule" not in unused, f"--rule {self.rule} has no effect: {unused.get('rule')}; leave it out, or pick "
                                   "another --schedule")   # the rest is warned about (Trainer)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def unused_settings(config: TrainConfig) -> dict[str, str]:
    """The fields ``config`` sets away from their defaults that its run would not use -> why.

    :meth:`TrainConfig.validate` refuses a rule under ``schedule="sgd"``, :class:`Trainer` warns about the
    others (a local rule's settings with a rule that makes no update); :func:`without_unused` resets them
    (for benchmark arms that share one base config)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    unused: dict[str, str] = {}
    if config.schedule == "sgd" and config.rule != defaults["rule"]:
        unused["rule"] = "--schedule sgd trains every layer by SGD, no layer is ever local"
    if config.schedule == "sgd" or not make_rule(config.rule).updates:
        why = ("--schedule sgd has no local layers" if config.schedule == "sgd"
               else f"rule {config.rule!r} makes no local update (pick hebbian, oja or softhebb to use it)")
        for name in ("local_lr", "local_lr_schedule", "weak_supervision"):
            if getattr(config, name) != defaults[name]:
                unused[name] = why
    return unused


def without_unused(config: TrainConfig) -> TrainConfig:
    """``config`` with the fields its run would not use (:func:`unused_settings`) back at their defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return replace(config, **{name: defaults[name] for name in unused_settings(config)})


def _pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


#: schedule -> the TrainConfig fields that are its options
SCHEDULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "dynamic": ("alpha", "shift", "per_lr"),
    "budget": ("budget", "max_share", "start"),
    "plasticity": ("threshold", "shift", "patience", "decide_every", "probe_size"),
    "gradnorm": ("threshold", "shift", "patience", "decide_every"),
    **{kind: ("c1", "c2") for kind in ("static", "quadratic", "linear", "exponential")},
}


def schedule_kwargs(config: TrainConfig, steps_per_epoch: int | None = None) -> dict[str, Any]:
    """The options of ``config.schedule`` that are set; options of another schedule are an error.

    A fractional ``decide_every`` becomes that share of ``steps_per_epoch`` (at least 1 step).
    """
    own = SCHEDULE_OPTIONS.get(config.schedule, ())
    every_option = {name for names in SCHEDULE_OPTIONS.values() for name in names}
    given = {k: getattr(config, k) for k in sorted(every_option) if getattr(config, k) is not None}
    stray = sorted(set(given) - set(own))
    if stray:
        users = "/".join(name for name, names in SCHEDULE_OPTIONS.items() if stray[0] in names)
        raise ConfigError(f"--{stray[0].replace('_', '-')} is an option of the {users} schedule, not of schedule "
                          f"{config.schedule!r}")
    every = given.get("decide_every")
    if isinstance(every, float):
        if not 0.0 < every <= 1.0:
            raise ConfigError(f"--decide-every must be an int >= 1 (training steps) or a float in (0, 1] (a fraction "
                              f"of an epoch), got {every!r}")
        if steps_per_epoch is not None:
            given["decide_every"] = max(1, round(every * steps_per_epoch))
    return given


class Callback:
    """Hooks into :class:`Trainer` (override what you need; any object with these methods works)."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", step: int, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...


@dataclass
class TrainResult:
    """What :func:`fit` returns: the per-epoch metrics, the trained model and the files written."""

    config: TrainConfig
    metrics: list[dict[str, Any]]
    model: LocalSGDModule
    out_dir: Path | None = None
    checkpoint: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def final_test_acc(self) -> float | None:
        return self.metrics[-1]["test_acc"] if self.metrics else None

    @property
    def train_time_s(self) -> float:
        return sum(r["train_time_s"] for r in self.metrics)

    @property
    def local_flop_epochs(self) -> float:
        """Mean over epochs of ``p``: the fraction of layer-FLOP-epochs that were local."""
        return sum(r["local_fraction"] or 0.0 for r in self.metrics) / max(1, len(self.metrics))

    def summary(self) -> str:
        """The result table (and the paths of the plots)."""
        if not self.metrics:
            return "no epoch trained"
        last, cfg = self.metrics[-1], self.config
        rows = [("final test accuracy", f"{100 * last['test_acc']:.2f} %"),
                ("train time", f"{self.train_time_s:.1f} s (evaluation excluded)"),
                ("epochs", f"{last['epoch']} of {cfg.epochs}"),
                ("final t (last epoch)",
                 f"{last['t']} of {len(self.model.layer_order)} layers (next: {last['t_next']})"),
                ("local FLOP fraction p", _fmt(last["local_fraction"], "{:.3f}")),
                ("step-speed bound at p", _fmt(last["speed_bound"], "{:.3f}x") + " (GEMM model)"),
                ("local layer-FLOP-epochs", f"{self.local_flop_epochs:.3f}")]
        compile_s = sum(r.get("compile_s") or 0.0 for r in self.metrics)
        if self.model.compile_count:
            rows.append(("compiling", f"{compile_s:.1f} s of the train time, {self.model.compile_count} graphs, "
                                      f"{sum(r.get('compile_cache_hits') or 0 for r in self.metrics)} "
                                      "loaded from torch's cache "
                                      f"(compile={cfg.compile})"))
        account = self.model.graphs.account
        if account.captures:
            rows.append(("recorded steps (CUDA graphs)",
                         f"{account.captures} transitions, "
                         f"{sum(r.get('capture_s') or 0.0 for r in self.metrics):.2f} s "
                         "of warm-up steps and recording in the train time"))
        head = (f"{cfg.model} on {cfg.dataset} ({cfg.train_subset or 'all'} train / {cfg.test_subset or 'all'} test "
                f"images), rule={cfg.rule}, schedule={cfg.schedule}, seed={cfg.seed}")
        text = head + "\n" + format_table(rows, ("result", "value"))
        for name, path in self.plots.items():
            text += f"\n{name} plot: {path}"
        return text


def load_data(config: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    """The train and test splits of ``config.dataset``, cut to the configured subsets.

    A subset larger than its split is refused (:class:`ConfigError`) rather than cut to the split,
    which would make the run report a size it did not train on.
    """
    splits = []
    for split, size in (("train", config.train_subset), ("test", config.test_subset)):
        data = load_dataset(config.dataset, split, config.data_dir)
        if size and size > len(data):
            raise ConfigError(f"--{split}-subset {size} asks for more images than the {config.dataset} {split} split "
                              f"holds ({len(data)}): pass at most {len(data)}, or 0 for the whole split")
        splits.append(data.subset(size, seed=SUBSET_SEED) if size else data)
    return splits[0], splits[1]


#: ``--amp`` -> autocast dtype
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _ProgressReader:
    """Running loss/accuracy for the progress bar without waiting for the device: the sums are copied
    asynchronously into pinned memory, and a copy is shown once it has landed (on a CPU, at once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(2, pin_memory=self.cuda)
        self.event: torch.cuda.Event | None = None
        self.seen = 0                      # images behind the sums in flight (a host number: no copy needed)
        self.shown: list[float] | None = None

    def push(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> list[float] | None:
        """Start a copy of the sums unless one is still in flight; returns the newest landed ``[loss, acc]``."""
        if self.event is not None and not self.event.query():
            return self.shown
        if self.event is not None:
            self._land()
        self.host.copy_(torch.stack([loss_sum.float(), correct.float()]), non_blocking=True)
        self.seen = seen
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self._land()
        return self.shown

    def _land(self) -> None:
        total, right = self.host.tolist()
        if self.seen:
            self.shown = [total / self.seen, right / self.seen]


class Trainer:
    """One run: model, optimizer, LR schedule, data and state; :meth:`train_epoch` advances one epoch.

    Args:
        config: the hyperparameters (validated here).
        callbacks: :class:`Callback`-like objects.
        data: ``(train, test)`` datasets to use instead of loading ``config.dataset`` (shared
            between the arms of a benchmark).
        log: where per-epoch lines and warnings go (``None``: silent).
    """

    def __init__(self, config: TrainConfig, *, callbacks: Sequence[Any] | None = None,
                 data: tuple[ImageDataset, ImageDataset] | None = None, log: Callable[[str], None] | None = print):
        self.config = config.validate()
        self.callbacks = list(callbacks or [])
        # under torch.distributed (torchrun) every process trains a shard; rank 0 alone logs and writes
        self.rank, self.world_size = rank(), world_size()
        self.log = log if log is not None and self.rank == 0 else (lambda _msg: None)
        self.device = resolve_device(config.device)
        for name, why in unused_settings(config).items():
            self.log(f"warning: --{name.replace('_', '-')} {getattr(config, name)} has no effect: {why}")
        self.train_set, self.test_set = data if data is not None else load_data(config)
        #: what identifies the data trained and tested on (checked on resume): ``{"train": ..., "test": ...}``
        self.data_identity = {"train": self.train_set.identity(), "test": self.test_set.identity()}
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        net = models_zoo.get_model(config.model, self.train_set.num_classes, self.train_set.image_shape[0])
        net.to(self.device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
        augment = config.augment if config.augment is not None else self.train_set.name.startswith("cifar")
        n, shards = self.world_size, dict(shard=self.rank, num_shards=self.world_size)
        # a last global batch smaller than the process count would leave a process without data: drop it
        tiny_tail = 0 < len(self.train_set) % (config.batch_size * n) < n
        self.batches = Batches(self.train_set, config.batch_size * n, augment=augment, seed=config.seed,
                               device=self.device, drop_last=tiny_tail, **shards)
        schedule = make_schedule(config.schedule, **schedule_kwargs(config, len(self.batches)))
        if config.max_local is not None:
            n = len(find_layers(trace(net, warn=False)))
            if config.max_local >= n:
                raise ConfigError(f"--max-local {config.max_local} is out of range for {config.model} ({n} layers): "
                                  f"pass 0..{n - 1}; at least the last layer must learn by SGD")
        # a GPU run under compile="auto" records each t's whole step as a CUDA graph (no compiler in the loop),
        # where a recording can work: one process, no fp16 gradient scaler
        can_record = recorder_for(self.device) is not None
        capture = config.compile == "capture" or (config.compile == "auto" and can_record
                                                  and self.world_size == 1 and config.amp != "fp16")
        self.model = compile_localsgd(
            net, rule=config.rule, schedule=schedule,
            local_lr=config.local_lr, weak_supervision=config.weak_supervision, max_local=config.max_local,
            compile="capture" if capture else config.compile, total_epochs=config.epochs,
            sample_fraction=config.sample_fraction)
        amp_dtype = AMP_DTYPES[config.amp]
        self.autocast = ((lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype
                         else contextlib.nullcontext)
        # fp16 needs loss scaling (bf16 has fp32's range); the local rules never see the scaled loss
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        self.data_parallel = LocalSGDDataParallel(self.model) if self.world_size > 1 else None
        recordable = capture and can_record
        # a recorded step reads the learning rate from a device tensor (the scheduler fills it in place)
        lr = torch.tensor(config.lr, device=self.device) if recordable else config.lr
        self.optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, **({"fused": True} if recordable else {}))
        self.step = TrainStep(self.model, self.optimizer, F.cross_entropy, autocast_dtype=amp_dtype,
                              scaler=self.scaler, capture=capture,
                              forward=self.data_parallel if self.data_parallel is not None else self.model,
                              log=self.log)
        if config.compile == "capture" and not recordable:
            self.log(f"note: --compile capture records training steps as CUDA graphs, which needs a CUDA device; "
                     f"on {self.device.type} the steps run eagerly")
        self.test_batches = Batches(self.test_set, config.eval_batch_size * n, shuffle=False, device=self.device,
                                    **shards)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor())
        self.epoch = 0
        self.metrics: list[dict[str, Any]] = []
        self.rng = capture_rng()          # each trainer owns its RNG stream (interleaved arms stay independent)
        self.rng_ranks = [self.rng]       # every process's, for the checkpoint (resume restores each its own)
        self.out_dir = Path(config.out) if config.out else None

    # ------------------------------------------------------------------------------ schedule
    def _lr_factor(self) -> Callable[[int], float]:
        total, per_epoch = self.config.epochs * len(self.batches), len(self.batches)
        milestones = [round(m * self.config.epochs) for m in STEP_MILESTONES]

        def factor(step: int) -> float:   # a plain function: LambdaLR's state_dict stores nothing for it
            if self.config.lr_schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
            return STEP_GAMMA ** sum(step // per_epoch >= m for m in milestones)
        return factor

    # ------------------------------------------------------------------------------ one epoch
    def train_epoch(self) -> dict[str, Any]:
        """Train one epoch, run learning-mode selection, evaluate; returns (and stores) its record."""
        cfg, lm, cuda = self.config, self.model, self.device.type == "cuda"
        step_model = self.data_parallel if self.data_parallel is not None else lm
        restore_rng(self.rng)
        lm.train()
        t = t_now = lm.transition
        segments: list[tuple[int, int]] = []     # (t, steps) of each stretch of the epoch at one transition
        segment_start = 0
        account = lm.graphs.account
        compile_before, capture_before = account.seconds, account.capture_seconds
        decisions_before, hits_before = len(lm.compile_decisions), compile_cache_hits()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        steps = lm.steps_per_epoch = len(self.batches)   # compile="auto" needs it in the first epoch already
        follow_lr = cfg.local_lr_schedule == "follow" and lm.rule.updates
        lr_at = self._lr_factor()
        lr_sum = 0.0
        meter_step = min(1, steps - 1)
        meter = SavedActivationMeter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        progress = _ProgressReader(self.device)
        bar = tqdm(total=steps, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or self.rank != 0, leave=False, dynamic_ncols=True)
        channels_last = torch.channels_last if cfg.channels_last else torch.preserve_format
        start = time.perf_counter()
        # the step: nothing in it waits for the device (no .item(), no sync); values are read once per epoch
        # (and once per decision by a schedule that decides every K steps)
        for i, (x, y) in enumerate(self.batches.epoch(self.epoch)):
            x = x.contiguous(memory_format=channels_last)
            k = self.lr_scheduler.last_epoch                 # steps taken so far: this one runs at lr(k)
            lr_sum += cfg.lr * lr_at(k)                      # host-side: the optimizer's rate may be a device tensor
            if follow_lr:       # the step's observe_loss sets the next local rate, which follows the next SGD rate
                lm.supervision.set_rate_factor(lr_at(k + 1))
            # hooks do not see inside compiled or recorded graphs
            measure = i == meter_step and not lm.is_compiled(t_now) and not self.step.is_recorded(t_now)
            with meter if measure else contextlib.nullcontext():
                loss, out = self.step(x, y)
            self.lr_scheduler.step()
            if step_model.maybe_decide() != t_now:      # a schedule deciding every K steps moved the boundary
                segments.append((t_now, i + 1 - segment_start))
                t_now, segment_start = lm.transition, i + 1
            loss_sum += loss * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
            for cb in self.callbacks:
                _call(cb, "on_step_end", self, i, loss)
            if not bar.disable and (i % 10 == 0 or i == steps - 1):
                shown = progress.push(loss_sum, correct, seen)
                if shown is not None:
                    bar.set_postfix({"t": t_now, "loss": f"{shown[0]:.3f}", "acc": f"{100 * shown[1]:.1f}%"})
            bar.update()
        segments.append((t_now, steps - segment_start))
        self._check_diverged(loss_sum)   # before the schedule reads the (non-finite) weights
        p, bound = _epoch_figures(lm, [seg for seg in segments if seg[1]])        # of the transitions used this epoch
        compiled = lm.is_compiled(t_now)
        t_next = step_model.end_epoch(mean_lr=lr_sum / steps if steps else None)
        if cuda:
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - start
        bar.close()
        for decision in lm.compile_decisions[decisions_before:]:
            # "no saving at all" stays in summary.json
            if decision.choice != "eager" or decision.expected_saving_s > 0:
                self.log(decision.line())
        if self.world_size > 1:   # the epoch's figures over all processes
            totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                                 torch.tensor(float(seen), dtype=torch.float64, device=self.device)]))
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
        test_loss, test_acc, eval_time = self.evaluate()
        self.epoch += 1
        stats = lm.stats()
        record = {
            "epoch": self.epoch, "t": t, "t_next": t_next, "local_fraction": p, "speed_bound": bound,
            "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "test_loss": test_loss, "test_acc": test_acc,
            "epoch_time_s": train_time + eval_time, "train_time_s": train_time,
            "elapsed_train_s": (self.metrics[-1]["elapsed_train_s"] if self.metrics else 0.0) + train_time,
            "mean_step_ms": 1000 * train_time / steps,
            "saved_activation_mb": meter.megabytes if meter.bytes else None,
            "cuda_peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
            "compile_s": account.seconds - compile_before, "compiled": compiled,
            "capture_s": account.capture_seconds - capture_before,
            "compile_cache_hits": compile_cache_hits() - hits_before,
            "lr": cfg.lr * lr_at(self.lr_scheduler.last_epoch), "local_lr": stats["local_lr"],
            "world_size": self.world_size, "replica_max_abs_diff": replica_max_abs_diff(lm),
            **{f"sched_{k}": v for k, v in lm.schedule.log_stats().items()},
        }
        self.metrics.append(record)
        self.rng = capture_rng()
        self.rng_ranks = gather_objects(self.rng)
        for cb in self.callbacks:
            _call(cb, "on_epoch_end", self, record)
        return record

    @torch.no_grad()
    def _check_diverged(self, loss_sum: torch.Tensor) -> None:
        """Raise :class:`TrainingDiverged` if the epoch's loss or a weight's norm is inf/NaN (one device read)."""
        norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in self.model.parameters()])
        finite = torch.isfinite(torch.cat([loss_sum.float().reshape(1), norms])).tolist()
        if all(finite):
            return
        cfg = self.config
        what = (f"the training loss became {loss_sum.item()}" if not finite[0]
                else "the weights grew beyond the float range")
        raise TrainingDiverged(
            f"training diverged in epoch {self.epoch + 1}: {what}; lower --lr (now {cfg.lr})"
            + (f" or --local-lr (now {cfg.local_lr})" if self.model.rule.updates else "")
            + (f"; the last checkpoint (epoch {self.epoch}) is intact" if self.epoch and cfg.out else ""))

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, float]:
        """``(test loss, test accuracy, seconds)`` with ``model.eval()`` (the user's own model)."""
        start = time.perf_counter()
        self.model.eval()
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long, device=self.device)
        channels_last = torch.channels_last if self.config.channels_last else torch.preserve_format
        for x, y in self.test_batches.epoch(0):
            if len(y) == 0:                 # a process's share of a last batch smaller than the process count
                continue
            with self.autocast():
                out = self.model(x.contiguous(memory_format=channels_last))
            loss_sum += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
        self.model.train()
        if self.world_size > 1:   # each process tested its shard of the test set
            totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]))
            loss_sum, correct = totals[0], totals[1]
        n = len(self.test_set)
        return loss_sum.item() / n, correct.item() / n, time.perf_counter() - start

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint contents (see :mod:`localsgd_fx.checkpoint`)."""
        return {"config": self.config.to_dict(), "data": self.data_identity, "epoch": self.epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                "rng": self.rng, "metrics": list(self.metrics),
                **({"rng_ranks": self.rng_ranks} if self.world_size > 1 else {})}

    def load_state_dict(self, state: dict[str, Any], path: Path | str = "") -> None:
        """Restore a checkpoint; refuses (:class:`CheckpointError`) one whose config differs outside
        :data:`RUN_CONTROL`."""
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by a finished "
                                  "epoch of this release and cannot be resumed; start a new run with another --out "
                                  "(or --overwrite)")
        check_compatible(state, self.config.to_dict(), path, ignore=RUN_CONTROL)
        self._check_same_data(state, path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            self.epoch, self.metrics, self.rng = int(state["epoch"]), list(state["metrics"]), state["rng"]
        except CheckpointError:
            raise
        except LocalSGDError as exc:   # the model's own checks (its layers, a transition past max_local)
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {exc}") from exc
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {path} does not fit this run's model or optimizer "
                                  f"({type(exc).__name__}: {first}); it was changed after it was written or by "
                                  "another release: start a new run with another --out (or --overwrite)") from exc
        lm = self.model
        if lm.transition > lm.max_local:   # a run whose every layer is local has nothing to back-propagate
            raise CheckpointError(f"checkpoint {path} is at t={lm.transition}, past the {lm.max_local} layers that may "
                                  f"be local (of {len(lm.layer_order)}); it cannot be trained further: start a new run "
                                  "with another --out (or --overwrite)")
        ranks = state.get("rng_ranks", [])
        if len(ranks) == self.world_size > 1:   # each process continues its own random stream
            self.rng = ranks[self.rank]
        self.rng_ranks = list(ranks) if len(ranks) == self.world_size else [self.rng]
        was = self.metrics[-1].get("world_size", 1) if self.metrics else self.world_size
        if was != self.world_size:
            self.log(f"warning: resuming a run of {was} process(es) with {self.world_size}: the global batch changes "
                     f"from {was} x {self.config.batch_size} to {self.world_size} x {self.config.batch_size}")

    def _check_same_data(self, state: dict[str, Any], path: Path | str) -> None:
        """Refuse to resume on other data than the checkpoint's (the splits' contents, not their paths)."""
        saved, now = state.get("data"), self.data_identity
        if saved is None:   # written before data identities were recorded
            return
        for split in ("train", "test"):
            if saved.get(split) != now[split]:
                raise CheckpointError(
                    f"checkpoint {path} was trained on other {split} data than --data-dir "
                    f"{self.config.data_dir or '(the standard places)'} holds now ({saved.get(split, {}).get('images')}"
                    f" images, fingerprint {saved.get(split, {}).get('sha256', '?')[:12]}; now {now[split]['images']} "
                    f"images, {now[split]['sha256'][:12]}): resume with the data it was trained on, or start a new "
                    "run with another --out")

    # ------------------------------------------------------------------------------ the run
    def fit(self) -> TrainResult:
        """Train until ``epochs`` (or ``stop_after``), checkpointing and logging every epoch.

        The run folder is locked meanwhile (:class:`~localsgd_fx.lock.RunLock`): a second run into it
        is refused with :class:`~localsgd_fx.lock.RunFolderBusy`.
        """
        made = self._new_run_folder() if self.config.out == NEW_RUN_FOLDER else None
        try:
            if self.out_dir is None or self.rank != 0:   # under torchrun, rank 0 holds the lock for all processes
                return self._fit()
            with RunLock(self.out_dir, log=self.log):
                return self._fit()
        finally:
            if made is not None and not any(made.iterdir()):   # a refused run leaves no empty folder
                made.rmdir()

    def _new_run_folder(self) -> Path | None:
        """Make ``runs/<model>-<dataset>-<date-time>`` (unique: ``-2``... when taken; rank 0 makes it for every
        process) and run in it; returns it on the rank that made it."""
        cfg = self.config
        stem = NEW_RUN_FOLDER.format(model=cfg.model, dataset=cfg.dataset, time=time.strftime("%Y%m%d-%H%M%S"))
        made = new_run_folder(stem) if self.rank == 0 else None
        folder = gather_objects(made)[0]
        self.config = replace(cfg, out=str(folder))      # config.json records the folder itself
        self.out_dir = Path(folder)
        return made

    def _fit(self) -> TrainResult:
        cfg = self.config
        ckpt = self._prepare_out_dir()
        for cb in self.callbacks:
            _call(cb, "on_train_start", self)
        stop = min(cfg.epochs, cfg.stop_after or cfg.epochs)
        plots: dict[str, Path] = {}
        writes = self.out_dir is not None and self.rank == 0
        saved = self.epoch          # the epoch of the checkpoint in the run folder
        while self.epoch < stop:
            rec = self.train_epoch()
            self.log(self._epoch_line(rec))
            if writes:
                with disk_full_guard(self.out_dir, saved):
                    save_checkpoint(self.state_dict(), ckpt)
                    saved = self.epoch
                    write_metrics(self.metrics, self.out_dir)
                    plots = self.write_plots()
        if writes and self.metrics and not plots:
            with disk_full_guard(self.out_dir, saved):
                plots = self.write_plots()
        result = TrainResult(cfg, list(self.metrics), self.model, self.out_dir, ckpt, plots)
        if writes:
            summary = {"final_test_acc": result.final_test_acc, "train_time_s": result.train_time_s,
                       "epochs": self.epoch, "final_transition": self.model.transition,
                       "local_flop_epochs": result.local_flop_epochs,
                       "compile_s": sum(r["compile_s"] for r in self.metrics),
                       "capture_s": sum(r.get("capture_s") or 0.0 for r in self.metrics),
                       "captures": self.model.graphs.account.captures,
                       "compile_decisions": [d.as_dict() for d in self.model.compile_decisions],
                       "last_epoch": self.metrics[-1] if self.metrics else None}
            with disk_full_guard(self.out_dir, saved):
                atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=1))
        for cb in self.callbacks:
            _call(cb, "on_train_end", self, result)
        return result

    def write_plots(self) -> dict[str, Path]:
        from .plots import plot_accuracy_vs_time, plot_transition  # matplotlib: imported only when plotting

        assert self.out_dir is not None
        cfg = self.config
        name = f"{cfg.model} {cfg.dataset} {cfg.rule}/{cfg.schedule}"
        return {"transition": plot_transition(self.metrics, self.out_dir / "transition.png",
                                              num_layers=len(self.model.layer_order),
                                              title=f"transition layer: {name}"),
                "accuracy vs time": plot_accuracy_vs_time({name: self.metrics}, self.out_dir / "accuracy_vs_time.png")}

    def _prepare_out_dir(self) -> Path | None:
        """Resume from ``out/checkpoint.pt``, or check that ``out`` may take a new run
        (:func:`~localsgd_fx.run_folder.prepare_run_folder`); nothing is written before the checks pass."""
        if self.out_dir is None:
            if self.config.resume:
                raise CheckpointError("resume needs an output directory (out) holding checkpoint.pt")
            return None
        ckpt = self.out_dir / CHECKPOINT_NAME
        if self.rank == 0:
            prepare_run_folder(self.out_dir, resume=self.config.resume, overwrite=self.config.overwrite)
        if self.config.resume:
            self.load_state_dict(load_checkpoint(ckpt), ckpt)
            self.log(f"resumed {ckpt} at epoch {self.epoch} (t={self.model.transition})")
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with disk_full_guard(self.out_dir, self.epoch):
                atomic_write_text(self.out_dir / "config.json", json.dumps(self.config.to_dict(), indent=1))
        return ckpt

    def _epoch_line(self, r: dict[str, Any]) -> str:
        p = "?" if r["local_fraction"] is None else f"{r['local_fraction']:.2f}"
        return (f"epoch {r['epoch']:>3}/{self.config.epochs}  t={r['t']:<2} p={p}  loss {r['train_loss']:.3f}  "
                f"train {100 * r['train_acc']:.2f}%  test {100 * r['test_acc']:.2f}%  {r['train_time_s']:.1f}s "
                f"({r['mean_step_ms']:.0f} ms/step)  -> t={r['t_next']}")


def fit(config: TrainConfig, *, callbacks: Sequence[Any] | None = None,
        log: Callable[[str], None] | None = print) -> TrainResult:
    """Train with ``config`` (resuming if ``config.resume``); see :class:`Trainer`.

    Example::

        >>> res = fit(TrainConfig(model="smallcnn", epochs=1, train_subset=256, out=None))  # doctest: +SKIP
    """
    return Trainer(config, callbacks=callbacks, log=log).fit()


def _epoch_figures(lm: LocalSGDModule, segments: list[tuple[int, int]]) -> tuple[float | None, float | None]:
    """``(p, speed bound)`` of an epoch that ran ``segments`` = [(t, steps), ...]: ``p`` averaged over the
    steps, the bound as total steps over the sum of each step's bounded cost."""
    if len(segments) == 1:
        return lm.local_fraction, lm.speed_bound
    fractions = [(lm.layer_order.local_fraction(t), n) for t, n in segments]
    if any(f is None for f, _ in fractions):
        return None, None
    steps = sum(n for _, n in fractions)
    cost = sum(n / speed_bound(f, lm.rule.gemms, lm.sample_fraction) for f, n in fractions)
    return sum(f * n for f, n in fractions) / steps, steps / cost


def _call(obj: Any, name: str, *args: Any) -> None:
    method = getattr(obj, name, None)
    if method is not None:
        method(*args)


def _fmt(value: float | None, spec: str) -> str:
    return "?" if value is None else spec.format(value)

