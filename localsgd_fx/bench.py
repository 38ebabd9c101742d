"""``localsgd bench step``: per-step time and activation memory of LoCal+SGD vs plain SGD.

What it measures: one full training step (forward, cross-entropy, backward, SGD-with-momentum
step, ``observe_loss``) of a zoo model on random data, for several transitions ``t`` and for plain
SGD (``t = 0``), on this machine's device. All arms share one model and are timed interleaved
(SGD, t1, t2, ..., SGD, t1, ...) so a busy neighbour slows every arm alike; medians are reported.
Printed per ``t``: the local FLOP fraction ``p``, the measured step-time ratio to plain SGD, the
GEMM-model bound on that ratio (``(3-(2-f)p)/3`` for 1-GEMM rules whose update uses a fraction
``f`` of the batch - ``(3-p)/3`` at ``f = 1`` - and ``(3-2p)/3`` for ``freeze``),
their quotient (1.00 = at the bound), and the activation memory saved for backward (CPU; on CUDA
also the peak allocated memory).

Run: ``localsgd bench step --model resnet20`` (or ``python -m localsgd_fx bench step ...``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from passes.partition import check_transition

from .api import DEFAULT_SAMPLE_FRACTION
from .atomic import atomic_write_text
from .capture import TrainStep, recorder_for
from .cli import OneLineParser
from .cost import speed_bound
from .metrics import SavedActivationMeter, format_table
from .runtime import COMPILE_MODES, DEVICES
from .train import AMP_DTYPES, ConfigError

__all__ = ["StepRow", "measure_steps", "default_transitions", "format_rows", "machine_line", "main_step"]

#: the compile modes a benchmark arm can be pinned to (auto decides during a run: not one setting to time)
FIXED_MODES = tuple(m for m in COMPILE_MODES if m != "auto")

# ---- defaults, in one place
MODEL, BATCH, IN_CHANNELS, IMAGE_SIZE, REPEATS, WARMUP = "resnet20", 128, 1, 28, 7, 2


@dataclass
class StepRow:
    transition: int
    local_fraction: float
    step_ms: float
    ratio: float          # step time / plain-SGD step time
    bound: float          # the GEMM model's ratio
    quotient: float       # ratio / bound
    saved_mb: float | None  # activation bytes saved for backward (eager only: hooks do not see compiled graphs)
    peak_mb: float | None  # CUDA peak allocated memory
    compile_s: float = 0.0  # seconds compiling (or warming up and recording) this t's step
    mode: str = ""          # the compile mode of the arm
    vs_best_sgd: float | None = None   # step time / the fastest plain-SGD arm's (over all modes measured)


def default_transitions(n_layers: int, max_local: int) -> list[int]:
    picks = {max(1, round(i * max_local / 5)) for i in range(1, 6)} | {max_local}
    return sorted(t for t in picks if 0 < t <= max_local)


def measure_steps(model_name: str = MODEL, *, transitions: list[int] | None = None, rule: str = "hebbian",
                  batch: int = BATCH, in_channels: int = IN_CHANNELS, image_size: int = IMAGE_SIZE,
                  repeats: int = REPEATS, warmup: int = WARMUP, sample_fraction: float = DEFAULT_SAMPLE_FRACTION,
                  device: str = "cpu", compile: bool | str = "off", amp: str = "off", channels_last: bool = False,
                  seed: int = 0, sgd_modes: tuple[str, ...] | None = None) -> list[StepRow]:
    """Measure step time and memory of plain SGD and of LoCal+SGD at each ``t`` (interleaved).

    Every arm runs in the same settings (compile mode, autocast dtype, memory format), so the SGD
    arm is the strongest plain setup of those settings, not plain eager fp32. ``sgd_modes``: further
    plain-SGD arms in other compile modes (each its own copy of the model), timed in the same rounds, so
    that ``vs_best_sgd`` compares every arm with the fastest plain setup measured; by default on CUDA
    eager, whole-step capture and ``reduce-overhead``, none on a CPU (where compiling does not pay).
    """
    import models_zoo
    from localsgd_fx import compile_localsgd

    from .runtime import compile_mode

    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    net = models_zoo.get_model(model_name, num_classes=10, in_channels=in_channels).to(device, memory_format=fmt)
    mode = compile_mode(compile)
    if sgd_modes is None:
        sgd_modes = ("off", "capture", "reduce-overhead") if device.startswith("cuda") else ()
    baselines = {m: _plain_sgd_arm(copy.deepcopy(net), m, device, amp) for m in sgd_modes if m != mode}
    x = torch.randn(batch, in_channels, image_size, image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    model = compile_localsgd(net, rule=rule, schedule="manual", example_inputs=(x[:2],), compile=compile,
                             sample_fraction=sample_fraction)
    n = len(model.layer_order)
    transitions = transitions or default_transitions(n, model.max_local)
    for t in transitions:   # before any step: a bad t fails in seconds, not after the warm-up
        check_transition(model.layer_order, t)
        if t > model.max_local:   # every layer local: nothing to back-propagate
            raise ConfigError(f"--transitions {t} is past the {model.max_local} layers that may be local "
                              f"(of {n}): pass values in 0..{model.max_local}")
    arms = [0, *transitions]
    train_step = _train_step(model, mode, device, amp)

    def step():
        train_step(x, y)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[int, list[float]] = {t: [] for t in arms}
    saved: dict[int, int | None] = {}
    peak: dict[int, float | None] = {}
    compile_s: dict[int, float] = {}
    if mode != "off" or baselines:   # the first call compiles, CUDA graphs record on a later one: time only replays
        warmup = max(warmup, TrainStep.WARMUP + 2)
    for other in baselines.values():
        for _ in range(warmup):
            other(x, y)
        sync()
    sgd_times: dict[str, list[float]] = {m: [] for m in baselines}
    for t in arms:   # warm-up, compilation and memory, one arm at a time
        model.set_transition(t, force=True)
        account = model.graphs.account
        before = account.seconds + account.capture_seconds
        for _ in range(warmup):
            step()
        sync()
        compile_s[t] = account.seconds + account.capture_seconds - before
        compiled = model.is_compiled(t) or train_step.is_recorded(t)
        saved[t] = SavedActivationMeter.measure(step) if not compiled else None
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            peak[t] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak[t] = None
    for _ in range(repeats):
        for t in arms:
            model.set_transition(t, force=True)
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[t].append(time.perf_counter() - start)
        for m, other in baselines.items():
            sync()
            start = time.perf_counter()
            other(x, y)
            sync()
            sgd_times[m].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    best_sgd = min([base, *(statistics.median(v) for v in sgd_times.values())])
    gemms = model.rule.gemms
    rows = []
    for t in arms:
        p = model.layer_order.local_fraction(t) or 0.0
        med = statistics.median(times[t])
        bound = 1.0 / speed_bound(p, gemms, sample_fraction)
        rows.append(StepRow(t, p, 1e3 * med, med / base, bound, med / base / bound,
                            None if saved[t] is None else saved[t] / 2**20, peak[t], compile_s[t], mode,
                            med / best_sgd))
    for m, values in sgd_times.items():     # the other plain setups, after the arms of this mode
        med = statistics.median(values)
        spent = baselines[m].account.seconds + baselines[m].account.capture_seconds
        rows.append(StepRow(0, 0.0, 1e3 * med, med / base, 1.0, med / base, None, None, spent, m, med / best_sgd))
    return rows


def _train_step(model, mode: str, device: str, amp: str) -> TrainStep:
    """The benchmark's step of ``model`` in compile mode ``mode`` (a recorded step on CUDA for ``"capture"``)."""
    recordable = mode == "capture" and recorder_for(torch.device(device)) is not None
    # a recorded step reads its learning rate from a device tensor (see localsgd_fx.capture)
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(1e-3, device=device) if recordable else 1e-3,
                          momentum=0.9, **({"fused": True} if recordable else {}))
    # fp16: no loss scaling here; step time is what is measured, and it costs the same. The arms move t back
    # and forth, so every recording is kept
    return TrainStep(model, opt, F.cross_entropy, autocast_dtype=AMP_DTYPES[amp], capture=mode == "capture",
                     free_passed=False)


def _plain_sgd_arm(net, mode: str, device: str, amp: str) -> TrainStep:
    """A plain-SGD step of its own copy of the model in compile mode ``mode``."""
    from localsgd_fx import compile_localsgd

    return _train_step(compile_localsgd(net, schedule="sgd", compile=mode), mode, device, amp)


def format_rows(rows: list[StepRow], header: str) -> str:
    """``header``, then the rows as a table (the first row is plain SGD in the same mode, the reference of
    "ratio"; rows of plain SGD in other modes follow, and "vs fastest SGD" compares with the fastest of them)."""
    peak = rows[0].peak_mb is not None
    base_saved = rows[0].saved_mb or 1.0

    def saved(r: StepRow) -> list[str]:     # compiled steps: the hooks cannot see inside the graph
        return ["-", "-"] if r.saved_mb is None else [f"{r.saved_mb:.1f}", f"{r.saved_mb / base_saved:.2f}"]

    modes = len({r.mode for r in rows}) > 1      # plain SGD was also timed in other modes: name each row's

    def extra(r: StepRow) -> list[str]:
        return [r.mode, f"{r.vs_best_sgd:.3f}"] if modes else []

    cells = [(r.transition, f"{r.local_fraction:.3f}", f"{r.step_ms:.1f}", f"{r.ratio:.3f}", f"{r.bound:.3f}",
              f"{r.quotient:.3f}", *saved(r), f"{r.compile_s:.1f}",
              *([_fmt_mb(r.peak_mb)] if peak else []), *extra(r))
             for r in rows]
    columns = ("t", "p", "step ms", "ratio", "bound", "ratio/bound", "saved MB", "vs SGD", "compile s",
               *(["peak MB"] if peak else []), *(["mode", "vs fastest SGD"] if modes else []))
    return header + "\n" + format_table(cells, columns)


def _fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def machine_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


def main_step(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="localsgd bench step", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--rule", default="hebbian",
                        help="local rule (default %(default)s: the rule whose update GEMM the bound models; "
                             "freeze: none)")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--in-channels", type=int, default=IN_CHANNELS)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--transitions", type=int, nargs="*", help="values of t (default: 5 spread up to max_local)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--sample-fraction", type=float, default=DEFAULT_SAMPLE_FRACTION,
                        help="local update from this fraction of the batch (default %(default)s)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--compile", default="off", choices=FIXED_MODES,
                        help="every arm, SGD included, in this mode (capture: the whole step recorded as a CUDA graph "
                             "per t); compile/recording seconds per t are reported (default %(default)s)")
    parser.add_argument("--amp", default="off", choices=list(AMP_DTYPES), help="autocast dtype (default %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and input")
    parser.add_argument("--sgd-modes", nargs="*", choices=FIXED_MODES,
                        help="also time plain SGD in these compile modes, to compare every arm with the fastest plain "
                             "setup (default on CUDA: off capture reduce-overhead; on a CPU: none)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from .runtime import resolve_device

    _check_args(args)
    device = str(resolve_device(args.device))
    rows = measure_steps(args.model, transitions=args.transitions, rule=args.rule, batch=args.batch_size,
                         in_channels=args.in_channels, image_size=args.image_size, repeats=args.repeats,
                         warmup=args.warmup, sample_fraction=args.sample_fraction, device=device, compile=args.compile,
                         amp=args.amp, channels_last=args.channels_last,
                         sgd_modes=None if args.sgd_modes is None else tuple(args.sgd_modes))
    header = (f"bench step: {args.model}, rule={args.rule}, batch {args.batch_size}x{args.in_channels}x"
              f"{args.image_size}x{args.image_size}, sample_fraction={args.sample_fraction}, compile={args.compile}, "
              f"amp={args.amp}{', channels-last' if args.channels_last else ''}, {device}: "
              f"{machine_line(device)}; medians of {args.repeats} interleaved steps")
    print(format_rows(rows, header))
    if args.json:
        atomic_write_text(args.json, json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before the (minutes long) benchmark starts, the --json path included."""
    for flag in ("batch_size", "in_channels", "image_size", "repeats"):
        value = getattr(args, flag)
        if value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive int, got {value}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.sample_fraction <= 1:
        raise ConfigError(f"--sample-fraction must be in (0, 1], got {args.sample_fraction}")
    if args.json:
        path = Path(args.json)
        if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK) or (
                path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"--json {args.json}: cannot write there (the folder must exist and be writable); "
                              "pick another path")
