"""Sweep for the defaults of the local rule and the dynamic schedule (issue: defaults from measurements).

What it measures: ResNet-20 on Fashion-MNIST with the default run's settings (10,000 train / 2,000 test
images, 8 epochs, batch 128, cosine LR 0.1), every arm trained side by side with the same data and
seed, interleaved epoch by epoch (``localsgd_fx.bench_tradeoff.run_tradeoff``). Per arm: train time,
speedup over SGD, test accuracy and its difference to SGD, local FLOP-epoch fraction, final t.

Stages (``--stage``):
  lr        the local learning rate of the hebbian rule (and oja), against SGD and freeze
  schedule  alpha and shift of the dynamic schedule, with the chosen local rate
  static    c1 and c2 of the static quadratic schedule, with the chosen local rate
  aggressive  larger alpha/shift, sample_fraction, and freeze on the same schedule
  signals   threshold of the plasticity and gradnorm schedules (deciding every quarter epoch)
  rules     the local rules against freeze (the reference arm) on the default schedule: hebbian with
            weak supervision "scale" at a 10x rate, oja and softhebb
  follow    the Hebbian rate decaying with the SGD learning rate (``local_lr_schedule="follow"``) against
            freeze, on gradnorm (run with ``--epochs 20 --test-subset 5000 --seeds 0 1``)
  perlr     Algorithm 1 comparing update norms divided by the epoch's mean learning rate (``per_lr``),
            against plain Algorithm 1 (the reference arm); run with ``--epochs 20 --test-subset 5000``
  long      the 20-epoch regime (``--epochs 20 --test-subset 5000``): how far each schedule moves,
            a cap on the local prefix (``max_local``), and a cheaper local update (sample 1/16)

Run: ``python benchmarks/sweep_defaults.py --stage lr`` (about 25 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from localsgd_fx.atomic import atomic_write_text
from localsgd_fx.bench_tradeoff import format_summary, run_tradeoff, summarise
from localsgd_fx.train import TrainConfig

# The sweeps behind docs/RESULTS.md ran the Hebbian rule (the library's default until freeze replaced it):
# every arm uses it unless it names another rule.
BASE = dict(model="resnet20", dataset="fashion-mnist", train_subset=10000, test_subset=2000, epochs=8, batch_size=128,
            rule="hebbian")
STAGES = {
    "lr": {
        "SGD": {"schedule": "sgd"},
        "freeze dynamic": {"rule": "freeze", "schedule": "dynamic"},
        "hebbian 1e-3": {"rule": "hebbian", "local_lr": 1e-3},
        "hebbian 1e-4": {"rule": "hebbian", "local_lr": 1e-4},
        "hebbian 1e-5": {"rule": "hebbian", "local_lr": 1e-5},
        "oja 1e-4": {"rule": "oja", "local_lr": 1e-4},
    },
    "static": {
        "SGD": {"schedule": "sgd"},
        "quadratic c1 0.75 c2 0.1": {"schedule": "quadratic", "c1": 0.75, "c2": 0.1},
        "quadratic c1 1.0 c2 0.1": {"schedule": "quadratic", "c1": 1.0, "c2": 0.1},
        "quadratic c1 0.5 c2 0.1": {"schedule": "quadratic", "c1": 0.5, "c2": 0.1},
        "quadratic c1 0.75 c2 0.25": {"schedule": "quadratic", "c1": 0.75, "c2": 0.25},
    },
    "aggressive": {   # for the trade-off issue: how far the dynamic schedule can be pushed
        "SGD": {"schedule": "sgd"},
        "hebbian a0.5 s0.15": {"alpha": 0.5, "shift": 0.15},
        "hebbian a0.5 s0.15 f0.25": {"alpha": 0.5, "shift": 0.15, "sample_fraction": 0.25},
        "hebbian a0.5 s0.25": {"alpha": 0.5, "shift": 0.25},
        "freeze a0.5 s0.15": {"rule": "freeze", "alpha": 0.5, "shift": 0.15},
    },
    "signals": {   # issue 12: boundary signals that can move t inside an epoch
        "SGD": {"schedule": "sgd"},
        **{f"plasticity {thr}": {"schedule": "plasticity", "threshold": thr, "decide_every": 0.25}
           for thr in (0.3, 0.5, 0.7)},
        **{f"gradnorm {thr}": {"schedule": "gradnorm", "threshold": thr, "decide_every": 0.25}
           for thr in (0.05, 0.1, 0.2)},
    },
    "rules": {   # issue 12: can a local rule beat a frozen prefix? Δ and speedup are against freeze here
        "freeze dynamic": {"rule": "freeze"},
        "hebbian scale 1e-3": {"rule": "hebbian", "weak_supervision": "scale", "local_lr": 1e-3},
        "oja 1e-4": {"rule": "oja", "local_lr": 1e-4},
        "softhebb 1e-4": {"rule": "softhebb", "local_lr": 1e-4},
    },
    "long": {   # issue 12: the >= 20-epoch regime; the rule barely matters at eta0 1e-4, so mostly freeze
        "SGD": {"schedule": "sgd"},
        "freeze dynamic": {"rule": "freeze"},
        "freeze a0.5 s0.25": {"rule": "freeze", "alpha": 0.5, "shift": 0.25},
        "freeze a0.5 s0.25 max14": {"rule": "freeze", "alpha": 0.5, "shift": 0.25, "max_local": 14},
        "hebbian f1/16": {"sample_fraction": 1 / 16},
    },
    "follow": {   # issue 12: a Hebbian rate that decays with the SGD LR, on the 20-epoch regime's best schedule
        "SGD": {"schedule": "sgd"},
        "freeze gradnorm": {"rule": "freeze", "schedule": "gradnorm", "decide_every": 0.25},
        "hebbian gradnorm follow": {"schedule": "gradnorm", "decide_every": 0.25, "local_lr_schedule": "follow"},
    },
    "perlr": {   # issue 12: Algorithm 1 with update norms per unit of learning rate, in the 20-epoch regime
        "freeze dynamic": {"rule": "freeze"},
        "freeze dynamic per-lr": {"rule": "freeze", "per_lr": True},
    },
    "schedule": {
        "SGD": {"schedule": "sgd"},
        "alpha 0.1 shift 0.1": {"alpha": 0.1, "shift": 0.1},
        "alpha 0.3 shift 0.1": {"alpha": 0.3, "shift": 0.1},
        "alpha 0.5 shift 0.1": {"alpha": 0.5, "shift": 0.1},
        "alpha 0.5 shift 0.15": {"alpha": 0.5, "shift": 0.15},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--stage", choices=list(STAGES), required=True)
    parser.add_argument("--local-lr", type=float,
                        help="stage 'schedule': the local rate to use (default: the library's)")
    parser.add_argument("--epochs", type=int, default=BASE["epochs"])
    parser.add_argument("--test-subset", type=int, default=BASE["test_subset"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args()
    extra = {"local_lr": args.local_lr} if args.local_lr is not None else {}
    base = TrainConfig(**{**BASE, "epochs": args.epochs, "test_subset": args.test_subset}, **extra, out=None,
                       progress=False).validate()
    start = time.perf_counter()
    runs = run_tradeoff(base, args.seeds, arms=STAGES[args.stage])
    summary = summarise(runs)
    print(format_summary(summary, "saved activ. MB"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sweep_{args.stage}.json"
    atomic_write_text(path, json.dumps({"base": base.to_dict(), "arms": STAGES[args.stage], "summary": summary,
                                        "runs": runs, "wall_time_s": time.perf_counter() - start},
                                       indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
