"""``localsgd`` command line: ``train``, ``inspect``, ``bench tradeoff``, ``bench step``.

* ``localsgd train`` - LoCal+SGD training (:mod:`localsgd_fx.train`); with no flags it is the default
  run: ResNet-20 on Fashion-MNIST (10,000 train / 2,000 test images, 8 epochs, frozen local prefix, budget
  schedule), about 4 minutes on 2 idle CPU cores (6-7 when they are shared). Writes metrics, plots and
  checkpoints to ``--out``.
* ``localsgd inspect`` - prints a model's rewritten graph for a transition ``t`` and its per-layer
  map, and writes the graph as DOT (and PNG if graphviz's ``dot`` is installed).
* ``localsgd bench tradeoff`` - SGD vs the shipped defaults, LoCal+SGD and other schedules, interleaved
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
    "OUT/checkpoint.pt (every epoch). With no flags it is the default run: ResNet-20 on Fashion-MNIST, "
    "10000 train / 2000 test "
    "images, 8 epochs, frozen local prefix, dynamic schedule (~4 min on 2 idle CPU cores); "
    "use --train-subset 0 --test-subset 0 "
    "for the full dataset.")

#: Printed as one line with exit status 2: the library's errors, ValueError (Python's error for a bad
#: argument, raised by the zoo, the schedules and the rules) and OSError (a file that cannot be read or written).
_ERRORS: tuple[type[BaseException], ...] = (LocalSGDError, ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the message and where the help is), exit status 2."""

    def error(self, message: str) -> None:   # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~localsgd_fx.train.TrainConfig` setting, from the field's metadata: its default, help,
    choices (the list their owner keeps), type and group."""
    from .train import TrainConfig

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        if meta.get("help") is None:       # not a command-line setting
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        kwargs: dict = {"dest": f.name, "default": f.default, "help": meta["help"]}
        if meta["action"] is not None:
            kwargs["action"] = meta["action"]
        else:
            kwargs.update({k: meta[k] for k in ("type", "metavar") if meta[k] is not None})
            if meta["choices"] is not None:
                kwargs["choices"] = list(meta["choices"]())
                if f.name == "model":      # a long list: in the help, not as a metavar
                    kwargs["help"] += f": {', '.join(kwargs['choices'])}"
            if f.default is not None:
                kwargs["help"] = f"{kwargs['help']} (default %(default)s)".lstrip()
        group.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .api import DEFAULT_RULE

    parser = OneLineParser(prog="localsgd",
                                     description="LoCal+SGD: selective localized learning as a torch.fx pass.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,inspect,bench}")
    train = sub.add_parser("train",
                           help="train a model with LoCal+SGD (no flags: the default run, ~4 min on 2 CPU cores)",
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
    from .distributed import process_group_from_env, rank
    from .train import TrainConfig, fit

    values = {k: v for k, v in vars(args).items() if k != "command"}
    with process_group_from_env(args.device):           # under torchrun: one process per shard
        for key in ("train_subset", "test_subset"):
            values[key] = values[key] or None            # 0 = the whole split
        result = fit(TrainConfig.from_dict(values))
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
