"""``localsgd`` command line: ``train``, ``inspect``, ``bench tradeoff``, ``bench step``.

* ``localsgd train`` - LoCal+SGD training (:mod:`localsgd_fx.train`); with no flags it is the default
  run: ResNet-20 on Fashion-MNIST (10,000 train / 2,000 test images, 8 epochs, frozen local prefix, dynamic
  schedule), about 4 minutes on 2 idle CPU cores (6-7 when they are shared). Writes metrics, plots and checkpoints to ``--out``.
* ``localsgd inspect`` - prints a model's rewritten graph for a transition ``t`` and its per-layer
  map, and writes the graph as DOT (and PNG if graphviz's ``dot`` is installed).
* ``localsgd bench tradeoff`` - SGD vs LoCal+SGD (static, dynamic) vs freeze, interleaved
  (:mod:`localsgd_fx.bench_tradeoff`).
* ``localsgd bench step`` - per-step time and memory vs ``t`` (:mod:`localsgd_fx.bench`).
* ``torchrun --nproc_per_node N -m localsgd_fx train ...`` - data-parallel training, one process per
  shard of each global batch (:mod:`localsgd_fx.distributed`); rank 0 writes the files.

Errors (bad names or values, missing data, incompatible checkpoints, a run folder in use) print one
line and exit with status 2; Ctrl-C exits with 130 and leaves the last checkpoint intact.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from passes.errors import LocalSGDError

__all__ = ["main", "build_parser", "OneLineParser"]

TRAIN_DESCRIPTION = (
    "Train a CNN with LoCal+SGD: layers 0..t-1 run forward only - frozen (the default rule) or updated by a local rule "
    "in the forward pass - and the rest learn with SGD; "
    "t grows by the --schedule. Measures per epoch: t, local FLOP fraction p, train loss/accuracy, test accuracy, "
    "epoch and step wall time, activation memory saved for backward, compile time, the local learning rate and the "
    "schedule's statistics -> OUT/metrics.{jsonl,csv}, OUT/transition.png, OUT/accuracy_vs_time.png, "
    "OUT/checkpoint.pt (every epoch). With no flags it is the default run: ResNet-20 on Fashion-MNIST, 10000 train / 2000 test "
    "images, 8 epochs, frozen local prefix, dynamic schedule (~4 min on 2 idle CPU cores); use --train-subset 0 --test-subset 0 "
    "for the full dataset.")

#: Printed as one line with exit status 2: the library's errors, ValueError (Python's error for a bad
#: argument, raised by the zoo, the schedules and the rules) and OSError (a file that cannot be read or written).
_ERRORS: tuple[type[BaseException], ...] = (LocalSGDError, ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the message and where the help is), exit status 2."""

    def error(self, message: str) -> None:   # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_or_float(text: str) -> int | float:
    """``"2"`` -> 2 (layers / an epoch), ``"0.1"`` -> 0.1 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int or a float, got {text!r}") from None


def _add_train_args(p: argparse.ArgumentParser) -> None:
    import models_zoo

    from .data import list_datasets
    from .rules import list_rules
    from .runtime import COMPILE_MODES
    from .schedules import SCHEDULE_NAMES
    from .train import LOCAL_LR_SCHEDULES, TrainConfig

    d = {f.name: f.default for f in fields(TrainConfig)}
    g = p.add_argument_group("data and model")
    g.add_argument("--model", default=d["model"], choices=models_zoo.list_models(), metavar="NAME",
                   help=f"zoo model: {', '.join(models_zoo.list_models())} (default %(default)s)")
    g.add_argument("--dataset", default=d["dataset"], choices=list_datasets(), help="(default %(default)s)")
    g.add_argument("--data-dir", default=None, help="folder holding the dataset files (default: the standard places)")
    g.add_argument("--train-subset", type=int, default=d["train_subset"], metavar="N",
                   help="train on N images (default %(default)s; 0 = the whole split)")
    g.add_argument("--test-subset", type=int, default=d["test_subset"], metavar="N",
                   help="test on N images (default %(default)s; 0 = the whole split)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: on for CIFAR, off for Fashion-MNIST)")
    g = p.add_argument_group("SGD")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="(default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="per process; under torchrun the global batch is N x this (default %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"], help="(default %(default)s)")
    g.add_argument("--lr-schedule", default=d["lr_schedule"], choices=["cosine", "step"],
                   help="stepped per iteration: cosine to 0, or x0.1 at 50%% and 75%% of the epochs (default %(default)s)")
    g.add_argument("--momentum", type=float, default=d["momentum"], help="(default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="(default %(default)s)")
    g = p.add_argument_group("LoCal")
    g.add_argument("--rule", default=d["rule"], choices=list_rules(),
                   help="what the local prefix does: freeze (no update), hebbian (the paper's rule), oja, softhebb "
                        "(default %(default)s)")
    g.add_argument("--schedule", default=d["schedule"], choices=SCHEDULE_NAMES,
                   help="learning-mode selection; sgd = plain SGD (default %(default)s)")
    g.add_argument("--alpha", type=float, help="dynamic: move when delta < alpha * running average")
    g.add_argument("--per-lr", action="store_true", default=None,
                   help="dynamic: divide each epoch's update norm by the epoch's mean learning rate (long runs)")
    g.add_argument("--shift", type=_int_or_float,
                   help="dynamic/plasticity/gradnorm: layers per move (int) or fraction of the layers")
    g.add_argument("--c1", type=_int_or_float, help="static: most layers ever local (int) or fraction of the layers")
    g.add_argument("--c2", type=_int_or_float, help="static: epoch (int) or fraction of the epochs where local starts")
    g.add_argument("--threshold", type=float,
                   help="plasticity: move when the probe output's change < threshold * its running average; "
                        "gradnorm: move when the gradient norm's relative change < threshold")
    g.add_argument("--patience", type=int, help="plasticity/gradnorm: checks in a row below the threshold to move")
    g.add_argument("--decide-every", type=_int_or_float, metavar="K",
                   help="plasticity/gradnorm: decide every K training steps (int) or fraction of an epoch (float) "
                        "instead of at epoch ends")
    g.add_argument("--probe-size", type=int, help="plasticity: images in the fixed probe batch")
    g.add_argument("--local-lr", type=float, default=d["local_lr"], help="eta0 of the local rule (default %(default)s)")
    g.add_argument("--local-lr-schedule", default=d["local_lr_schedule"], choices=list(LOCAL_LR_SCHEDULES),
                   help="'follow': the local rate decays with the SGD learning rate's schedule (default %(default)s)")
    g.add_argument("--weak-supervision", default=d["weak_supervision"], choices=["sign", "scale", "off"],
                   help="(default %(default)s)")
    g.add_argument("--sample-fraction", type=float, default=d["sample_fraction"],
                   help="local update from this fraction of the batch (default %(default)s)")
    g.add_argument("--max-local", type=int, default=None, help="most layers ever local (default: all but the classifier)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d["seed"], help="(default %(default)s)")
    g.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"], help="(default %(default)s)")
    g.add_argument("--compile", default=d["compile"], choices=COMPILE_MODES,
                   help="capture = record each transition's whole training step as a CUDA graph (what auto does on a "
                        "GPU); on = torch.compile each transition's graph; reduce-overhead = with CUDA graphs; auto on a "
                        "CPU: eager; off (default %(default)s)")
    g.add_argument("--amp", default=d["amp"], choices=["off", "bf16", "fp16"],
                   help="mixed precision (autocast; fp16 adds a gradient scaler); weights stay fp32 (default %(default)s)")
    g.add_argument("--channels-last", action="store_true", help="channels-last model and inputs (faster convs on GPUs)")
    g.add_argument("--out", help="run directory, new or empty for a new run (default: a new "
                                 "runs/<model>-<dataset>-<date-time>; --resume needs the folder of the run)")
    g.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in --out: deletes the files an earlier run wrote there (other files are kept)")
    g.add_argument("--stop-after", type=int, metavar="E",
                   help="stop after epoch E (resumable; schedules still span --epochs)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (for logs)")


def build_parser() -> argparse.ArgumentParser:
    from .api import DEFAULT_RULE

    parser = OneLineParser(prog="localsgd",
                                     description="LoCal+SGD: selective localized learning as a torch.fx pass.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,inspect,bench}")
    train = sub.add_parser("train", help="train a model with LoCal+SGD (no flags: the default run, ~4 min on 2 CPU cores)",
                           description=TRAIN_DESCRIPTION)
    _add_train_args(train)
    insp = sub.add_parser("inspect", help="print the rewritten graph and layer map for a transition t; write DOT/PNG")
    insp.add_argument("--model", default="resnet20", metavar="NAME", help="zoo model (default %(default)s)")
    insp.add_argument("--transition", "-t", type=int, default=0, help="layers 0..t-1 local (default %(default)s)")
    insp.add_argument("--rule", default=DEFAULT_RULE, help="local rule (default %(default)s)")
    insp.add_argument("--in-channels", type=int, default=3, help="(default %(default)s)")
    insp.add_argument("--image-size", type=int, default=32, help="(default %(default)s)")
    insp.add_argument("--num-classes", type=int, default=10, help="(default %(default)s)")
    insp.add_argument("--out", default="runs/inspect", help="folder for the DOT/PNG (default %(default)s)")
    bench = sub.add_parser("bench", help="benchmarks: 'bench tradeoff ...' or 'bench step ...' (see their --help)")
    bench.add_argument("which", choices=["tradeoff", "step"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``localsgd`` command line; returns the exit status (0 ok, 2 bad input, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in ("tradeoff", "step"):
            return _bench(argv[1], argv[2:])       # their own parsers see their own --help
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return _train(args)
        return _inspect(args)
    except SystemExit as exc:                      # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint (if any) is intact; continue with --resume", file=sys.stderr)
        return 130
    except _ERRORS as exc:
        print(f"localsgd: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .distributed import gather_objects, process_group_from_env, rank
    from .run_folder import new_run_folder
    from .train import TrainConfig, fit

    values = {k: v for k, v in vars(args).items() if k != "command"}
    if values["out"] is None and args.resume:
        raise ValueError("--resume needs --out DIR: the folder of the run to continue")
    with process_group_from_env(args.device):           # under torchrun: one process per shard
        made = None
        if values["out"] is None:                       # rank 0 makes the folder of every process
            stem = f"runs/{args.model}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
            made = new_run_folder(stem) if rank() == 0 else None
            values["out"] = str(gather_objects(made)[0])
        for key in ("train_subset", "test_subset"):
            values[key] = values[key] or None            # 0 = the whole split
        try:
            result = fit(TrainConfig.from_dict(values))
        finally:
            if made is not None and not any(made.iterdir()):   # a refused run leaves no empty folder
                made.rmdir()
        if rank() == 0:
            print(result.summary())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import torch

    import models_zoo
    from passes.inspection import to_dot

    from .api import compile_localsgd
    from .atomic import atomic_write_text

    model = models_zoo.get_model(args.model, args.num_classes, args.in_channels)
    example = torch.randn(2, args.in_channels, args.image_size, args.image_size)
    lm = compile_localsgd(model, rule=args.rule, schedule="manual", compile=False, example_inputs=(example,))
    lm.set_transition(args.transition, force=True)   # only looked at: every layer local may be shown too
    print(lm.graph_module.code)
    lm.explain()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dot_path = out / f"{args.model}_t{args.transition}.dot"
    atomic_write_text(dot_path, to_dot(lm.graph_module, name=f"{args.model} t={args.transition}"))
    print(f"DOT: {dot_path}")
    if shutil.which("dot"):
        png = dot_path.with_suffix(".png")
        done = subprocess.run(["dot", "-Tpng", str(dot_path), "-o", str(png)], capture_output=True, text=True)
        print(f"PNG: {png}" if done.returncode == 0 else f"(dot failed: {done.stderr.strip()[:200]})")
    else:
        print("(no PNG: graphviz's `dot` is not installed)")
    return 0


def _bench(which: str, argv: list[str]) -> int:
    if which == "tradeoff":
        from .bench_tradeoff import main as tradeoff_main
        return tradeoff_main(argv)
    from .bench import main_step
    return main_step(argv)


if __name__ == "__main__":
    sys.exit(main())
