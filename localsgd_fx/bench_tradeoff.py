"""``localsgd bench tradeoff``: the time/accuracy trade-off of LoCal+SGD against its baselines.

What it measures: arms trained side by side on the same data, seeds, epochs and SGD hyperparameters. By
default five: plain SGD; the shipped defaults (the freeze rule on the budget schedule: a fifth of the run's
layer-FLOP-epochs local, at most half of the layer FLOPs, spent as late as the run allows); LoCal+SGD with the
paper's hebbian rule on that same schedule (its *freeze twin* is the defaults arm: "why a local rule at all?");
the paper's Algorithm 1 (``dynamic``) with freeze; and the faster budget preset (``--budget 0.25``). ``--arms``
also offers a budget of 0.3, Algorithm 1's ``fast`` (alpha 0.5, 15 % per move) and ``fastest`` (alpha
0.5, 25 %) presets and the signal schedules ``plasticity`` (Egeria) and ``gradnorm`` (AutoFreeze) at their
defaults, deciding every quarter of an epoch, each with a hebbian arm and its freeze twin. The arms are
interleaved epoch by epoch (SGD, LoCal, freeze, ..., SGD, ...; each keeps its own model, optimizer, RNG stream
and schedule state) so a busy neighbour on a shared machine slows every arm
alike. Per arm it reports the total training time (evaluation excluded), the speedup over SGD,
the GEMM model's bound on that speedup for the transitions actually taken, the final
test accuracy and its difference to SGD in percentage points, the peak activation memory saved
for backward in a step (CPU; CUDA: peak allocated) over the run and in its last epoch (every arm
starts on plain SGD, so the peaks match; the last epoch shows what the local prefix saves), and
the fraction of layer-FLOP-epochs that were local. With several ``--seeds`` the figures are
mean ± standard deviation over seeds.
Writes ``tradeoff.json``, ``tradeoff.png`` (test accuracy vs training wall-clock per arm) and
``tradeoff_scatter.png`` (Δ accuracy vs speedup per arm, ±1 std over seeds). The arm a user gets without flags
(the default rule on the default schedule) is marked ``"default": true`` in the JSON and in the table. The
arms ``SGD eager``, ``SGD capture`` and ``SGD reduce-overhead`` pin plain SGD to one compile mode; with more
than one plain-SGD arm every arm is also compared with the fastest of them ("vs fastest SGD"), the strongest
plain setup measured in the same run;
``--from-json runs/tradeoff/tradeoff.json`` re-prints the table (also as Markdown) and redraws them.

Default: ResNet-20 on Fashion-MNIST, 10,000 train / 5,000 test images (the default run's training
subset, a larger test set for less sampling noise), 8 epochs, batch 128, seeds 0 and 1 (80
arm-epochs of 79 steps): SGD and four freeze arms took 23 minutes on 2 CPU cores (a hebbian arm costs a
little more than a freeze one); every extra seed adds half as much again. Epoch timings include one-time costs
and whatever the neighbours do at that moment; the interleaving spreads the latter over the arms but cannot
remove it: repeat, or use ``--seeds``, before trusting a speedup difference of a few percent.
``--quick``: SmallCNN, 512 / 256 images, 3 epochs, batch 64 - a smoke test of a few seconds.

Run: ``localsgd bench tradeoff [--seeds 0 1 2] [--arms SGD "freeze budget"] [--model vgg11_bn] [--quick]``.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from .api import DEFAULT_RULE
from .atomic import atomic_write_text
from .cli import OneLineParser
from .metrics import format_table
from .runtime import COMPILE_MODES, DEVICES, resolve_device
from .schedules import DEFAULT_SCHEDULE, make_schedule
from .train import AMP_DTYPES, ConfigError, TrainConfig, Trainer, load_data, without_unused

# ---- defaults, in one place: (model, train subset, test subset, epochs, batch size) and seeds
DEFAULT = dict(model="resnet20", train_subset=10000, test_subset=5000, epochs=8, batch_size=128)
DEFAULT_SEEDS = [0, 1]
QUICK = dict(model="smallcnn", train_subset=512, test_subset=256, epochs=3, batch_size=64)
#: Documented presets of the dynamic schedule, faster than the defaults (alpha 0.3, 10 % of the
#: layers per decision) at a larger accuracy cost (docs/RESULTS.md).
FAST = {"alpha": 0.5, "shift": 0.15}
FASTEST = {"alpha": 0.5, "shift": 0.25}
#: The signal schedules' arms decide four times an epoch, so that short runs can move early.
SIGNAL_DECIDE_EVERY = 0.25
#: The arms: name -> TrainConfig fields that differ from the base. The first one is the reference.
#: Every LoCal arm has a freeze twin on the same schedule: is a local rule better than none?
ARMS: dict[str, dict[str, Any]] = {
    "SGD": {"schedule": "sgd"},
    # plain SGD pinned to one compile mode each: a speedup on a GPU is claimed against the fastest of them
    "SGD eager": {"schedule": "sgd", "compile": "off"},
    "SGD capture": {"schedule": "sgd", "compile": "capture"},
    "SGD reduce-overhead": {"schedule": "sgd", "compile": "reduce-overhead"},
    "LoCal dynamic": {"rule": "hebbian", "schedule": "dynamic"},
    "freeze dynamic": {"rule": "freeze", "schedule": "dynamic"},
    "LoCal fast": {"rule": "hebbian", "schedule": "dynamic", **FAST},
    "freeze fast": {"rule": "freeze", "schedule": "dynamic", **FAST},
    "LoCal fastest": {"rule": "hebbian", "schedule": "dynamic", **FASTEST},
    "freeze fastest": {"rule": "freeze", "schedule": "dynamic", **FASTEST},
    "freeze budget": {"rule": "freeze", "schedule": "budget"},
    "LoCal budget": {"rule": "hebbian", "schedule": "budget"},
    "freeze budget 0.25": {"rule": "freeze", "schedule": "budget", "budget": 0.25},
    "LoCal budget 0.25": {"rule": "hebbian", "schedule": "budget", "budget": 0.25},
    "freeze budget 0.3": {"rule": "freeze", "schedule": "budget", "budget": 0.3},
    "LoCal budget 0.3": {"rule": "hebbian", "schedule": "budget", "budget": 0.3},
    "LoCal plasticity": {"rule": "hebbian", "schedule": "plasticity", "decide_every": SIGNAL_DECIDE_EVERY},
    "freeze plasticity": {"rule": "freeze", "schedule": "plasticity", "decide_every": SIGNAL_DECIDE_EVERY},
    "LoCal gradnorm": {"rule": "hebbian", "schedule": "gradnorm", "decide_every": SIGNAL_DECIDE_EVERY},
    "freeze gradnorm": {"rule": "freeze", "schedule": "gradnorm", "decide_every": SIGNAL_DECIDE_EVERY},
}


def runs_the_defaults(overrides: dict[str, Any]) -> bool:
    """Whether an arm with these overrides runs what a user gets without flags: the default rule on the default
    schedule, every schedule option it names at the schedule's default value (``{"budget": 0.2}`` counts when 0.2
    is the default budget)."""
    rest = dict(overrides)
    if rest.pop("rule", DEFAULT_RULE) != DEFAULT_RULE or rest.pop("schedule", DEFAULT_SCHEDULE) != DEFAULT_SCHEDULE:
        return False
    defaults = make_schedule(DEFAULT_SCHEDULE)
    return all(hasattr(defaults, key) and getattr(defaults, key) == value for key, value in rest.items())


#: The arm a user gets without flags: marked ``"default": true``.
DEFAULTS_ARM = next(name for name, o in ARMS.items() if runs_the_defaults(o))
#: The arms run when ``--arms`` is not given.
DEFAULT_ARMS = ("SGD", "freeze budget", "LoCal budget", "freeze dynamic", "freeze budget 0.25")


def select_arms(names: Sequence[str] = DEFAULT_ARMS) -> dict[str, dict[str, Any]]:
    """``{name: overrides}`` of the named arms of :data:`ARMS`, in the given order."""
    return {name: ARMS[name] for name in names}

__all__ = ["run_tradeoff", "summarise", "select_arms", "seed_lines", "main", "ARMS", "DEFAULT", "DEFAULT_ARMS",
           "DEFAULT_SEEDS", "FAST", "FASTEST", "QUICK", "SIGNAL_DECIDE_EVERY"]


def run_tradeoff(base: TrainConfig, seeds: list[int], *, arms: dict[str, dict[str, Any]] | None = None,
                 log=print) -> dict[str, list[list[dict[str, Any]]]]:
    """Train every arm (``base`` with the arm's overrides) for every seed, interleaved epoch by epoch.

    Returns:
        ``{arm name: [per-epoch records of seed 0, of seed 1, ...]}``.
    """
    arms = arms if arms is not None else select_arms()
    data = load_data(base)
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in arms}
    for seed in seeds:
        # an arm runs what it names: settings of the base that the arm does not use (a local rate for SGD) are reset
        trainers = {name: Trainer(without_unused(replace(base, **overrides, seed=seed)).validate(), data=data,
                                  log=None)
                    for name, overrides in arms.items()}
        for epoch in range(base.epochs):
            for name, trainer in trainers.items():
                r = trainer.train_epoch()
                log(f"seed {seed} epoch {epoch + 1}/{base.epochs} {name:<24} t={r['t']:<2} "
                    f"test {100 * r['test_acc']:.2f}%  {r['train_time_s']:.1f}s")
        for name, trainer in trainers.items():
            runs[name].append(trainer.metrics)
    return runs


def summarise(runs: dict[str, list[list[dict[str, Any]]]],
              arms: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm: mean and spread over seeds of time, speedup, bound, accuracy, Δ accuracy, memory, local FLOPs.
    ``arms`` (name -> overrides; by default those of :data:`ARMS`) says which arms are plain SGD and which runs
    the shipped defaults."""
    arms = {name: (arms or ARMS).get(name, {"?": None}) for name in runs}   # an unknown arm is neither
    ref = next(iter(runs))
    plain = [name for name in runs if arms[name].get("schedule") == "sgd"] or [ref]
    out: dict[str, dict[str, Any]] = {}
    for name, seeds in runs.items():
        per_seed = []
        for i, recs in enumerate(seeds):
            ref_recs = runs[ref][i]
            time_s = sum(r["train_time_s"] for r in recs)
            fastest_sgd = min(sum(r["train_time_s"] for r in runs[p][i]) for p in plain)
            mem = [r["cuda_peak_mb"] if r["cuda_peak_mb"] is not None else r["saved_activation_mb"] for r in recs]
            per_seed.append({
                "train_time_s": time_s,
                "speedup": sum(r["train_time_s"] for r in ref_recs) / time_s,
                "vs_fastest_sgd": fastest_sgd / time_s,    # over every plain-SGD arm run (its compile modes)
                # the GEMM model's speedup over the run: epochs / sum of per-epoch step-time ratios
                "bound": len(recs) / sum(1.0 / (r["speed_bound"] or 1.0) for r in recs),
                "test_acc": 100 * recs[-1]["test_acc"],
                "delta_acc_pp": 100 * (recs[-1]["test_acc"] - ref_recs[-1]["test_acc"]),
                "peak_memory_mb": max((m for m in mem if m is not None), default=float("nan")),
                "last_epoch_memory_mb": mem[-1] if mem[-1] is not None else float("nan"),
                "local_flop_epochs": sum(r["local_fraction"] or 0.0 for r in recs) / len(recs),
                "final_t": recs[-1]["t"],
            })
        out[name] = {"default": runs_the_defaults(arms[name]), "per_seed": per_seed,
                     **{k: _mean_std([s[k] for s in per_seed]) for k in per_seed[0]}}
    return out


#: The keys of a tradeoff.json that --from-json reads.
SAVED_KEYS = ("runs", "seeds", "config", "machine")


def _read_saved(path: Path) -> dict[str, Any]:
    """A ``tradeoff.json`` written by ``bench tradeoff``, or a :class:`ConfigError` naming what it lacks."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--from-json {path}: cannot read it as JSON ({exc})") from exc
    missing = [key for key in SAVED_KEYS if key not in saved] if isinstance(saved, dict) else list(SAVED_KEYS)
    runs = saved.get("runs") if isinstance(saved, dict) else None
    if missing or not isinstance(runs, dict) or not runs or not all(isinstance(v, list) and v for v in runs.values()):
        lacks = f"lacks {', '.join(missing)}" if missing else "has no per-epoch records under 'runs'"
        raise ConfigError(f"--from-json {path} is not a tradeoff.json written by 'localsgd bench tradeoff' (it "
                          f"{lacks}); pass the tradeoff.json of a finished benchmark")
    return saved


def format_summary(summary: dict[str, dict[str, Any]], memory_kind: str, *, markdown: bool = False) -> str:
    def cell(stat: tuple[float, float], spec: str) -> str:
        mean, std = stat
        return spec.format(mean) + ("" if std != std else " ± " + spec.replace("+", "").format(std))

    several = sum(ARMS.get(name, {}).get("schedule") == "sgd" for name in summary) > 1   # plain SGD in several modes

    def fastest(s: dict[str, Any]) -> list[str]:
        return [cell(s["vs_fastest_sgd"], "{:.2f}") + "x"] if several and "vs_fastest_sgd" in s else []

    rows = [(name, cell(s["train_time_s"], "{:.1f}"),
             cell(s["speedup"], "{:.2f}") + "x", *fastest(s), cell(s["bound"], "{:.2f}") + "x",
             cell(s["test_acc"], "{:.2f}"), cell(s["delta_acc_pp"], "{:+.2f}"),
             cell(s["peak_memory_mb"], "{:.1f}") + " / " + cell(s["last_epoch_memory_mb"], "{:.1f}"),
             cell(s["local_flop_epochs"], "{:.3f}"), cell(s["final_t"], "{:.0f}"),
             "yes" if s.get("default") else "-")        # the row a user gets without flags
            for name, s in summary.items()]
    return format_table(rows, ("arm", "train time (s)", "speedup", *(["vs fastest SGD"] if several else []),
                               "GEMM bound", "test acc (%)", "Δ acc (pp)", memory_kind, "local FLOP-epochs",
                               "final t", "shipped defaults"), markdown=markdown)


def main(argv: list[str] | None = None) -> int:
    """``localsgd bench tradeoff`` (see the module docstring)."""
    parser = OneLineParser(prog="localsgd bench tradeoff", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test: " + _describe(QUICK))
    parser.add_argument("--model", help=f"zoo model (default {DEFAULT['model']}; --quick: {QUICK['model']})")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-subset", type=int, help="0 = the whole split")
    parser.add_argument("--test-subset", type=int, help="0 = the whole split")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help=f"one run per seed (default: {DEFAULT_SEEDS}; --quick: [0])")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM",
                        help=f"the arms, the first is the reference (default: {list(DEFAULT_ARMS)}; all: {list(ARMS)})")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                        help="every arm in this mode (default %(default)s: on a GPU each t's whole step recorded as a "
                             "CUDA graph, plain SGD's too; elsewhere compile only where it pays)")
    parser.add_argument("--amp", default="off", choices=list(AMP_DTYPES),
                        help="every arm under autocast (default %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="every arm channels-last")
    parser.add_argument("--out", default="runs/tradeoff",
                        help="folder for tradeoff.json / tradeoff.png / tradeoff_scatter.png (default %(default)s)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="train nothing: print the table (Markdown too) and redraw the plots of a saved "
                             "tradeoff.json")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = _read_saved(Path(args.from_json))
        try:
            _report(saved["runs"], saved["seeds"], saved["config"], Path(args.from_json).parent, saved.get("arms"),
                    memory_kind="CUDA MB peak / last" if "cuda" in saved["machine"] else "saved activ. MB peak / last",
                    markdown=True)
        except (KeyError, TypeError, IndexError, ZeroDivisionError) as exc:
            raise ConfigError(f"--from-json {args.from_json}: its records are incomplete ({type(exc).__name__}: "
                              f"{exc}); pass the unedited tradeoff.json of a finished benchmark") from exc
        return 0
    preset = QUICK if args.quick else DEFAULT
    args.seeds = args.seeds or ([0] if args.quick else DEFAULT_SEEDS)
    arms = select_arms(args.arms or DEFAULT_ARMS)
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    for key in ("train_subset", "test_subset"):
        chosen[key] = chosen[key] or None
    base = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, device=args.device, compile=args.compile,
                       amp=args.amp, channels_last=args.channels_last, out=None, progress=False, **chosen)
    base.validate()
    print(f"bench tradeoff: {base.model} on {base.dataset}, {_describe(chosen)}, seeds {args.seeds}, arms interleaved "
          f"epoch by epoch; {_machine(base)}")
    start = time.perf_counter()
    runs = run_tradeoff(base, args.seeds, arms=arms)
    wall_time_s = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = resolve_device(base.device).type == "cuda"
    summary = _report(runs, args.seeds, base.to_dict(), out, arms,
                      memory_kind="CUDA MB peak / last" if cuda else "saved activ. MB peak / last")
    json_path = out / "tradeoff.json"
    atomic_write_text(json_path, json.dumps({"config": base.to_dict(), "seeds": args.seeds, "arms": arms,
                                             "machine": _machine(base), "wall_time_s": wall_time_s, "summary": summary,
                                             "runs": runs}, indent=1, default=str))
    print(f"wrote {json_path} ({time.perf_counter() - start:.0f} s in all)")
    return 0


def _report(runs: dict[str, list[list[dict[str, Any]]]], seeds: list[int], config: dict[str, Any], out: Path,
            arms: dict[str, dict[str, Any]] | None, *, memory_kind: str,
            markdown: bool = False) -> dict[str, dict[str, Any]]:
    """Print the summary table, draw tradeoff.png (accuracy vs time) and tradeoff_scatter.png
    (Δ acc vs speedup), and return the summary."""
    from .plots import plot_accuracy_vs_time, plot_tradeoff

    summary = summarise(runs, arms)
    print(format_summary(summary, memory_kind))
    if markdown:
        print()
        print(format_summary(summary, memory_kind, markdown=True))
    what = f"{config['model']} {config['dataset']}, {config['epochs']} epochs, seeds {seeds}"
    png = plot_accuracy_vs_time(seed_lines(runs, seeds), out / "tradeoff.png", title=f"{what}: test accuracy vs time")
    scatter = plot_tradeoff(summary, out / "tradeoff_scatter.png", title=what, target=(1.3, -0.5))
    print(f"wrote {png} and {scatter}")
    return summary


def seed_lines(runs: dict[str, list[list[dict[str, Any]]]], seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """One plot line per arm and seed: ``{"arm (seed s)": records}`` (just the arm with a single seed)."""
    return {(name if len(seeds) == 1 else f"{name} (seed {s})"): recs
            for name, per_seed in runs.items() for s, recs in zip(seeds, per_seed)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))


def _describe(p: dict[str, Any]) -> str:
    return (f"{p['model']}, {p['train_subset'] or 'all'} train / {p['test_subset'] or 'all'} test images, "
            f"{p['epochs']} epochs, batch {p['batch_size']}")


def _machine(cfg: TrainConfig) -> str:
    from .bench import machine_line

    device = resolve_device(cfg.device)
    return (f"{machine_line(str(device))}, device {device.type}, compile {cfg.compile}, amp {cfg.amp}"
            + (", channels-last" if cfg.channels_last else ""))
