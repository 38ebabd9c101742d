"""Data-parallel LoCal+SGD: bytes all-reduced per step (``bytes``) and step time at 1 and N processes (``time``).

``bytes`` trains nothing: for each transition ``t`` it adds up what one step of
:class:`~localsgd_fx.distributed.LocalSGDDataParallel` communicates (DDP's gradient all-reduce over
the parameters that get gradients, the flat all-reduce of the local layers' weights, the 4-byte
loss), against plain SGD (``t = 0``), and prints a Markdown table. The same figures are checked
against DDP's own comm hook in tests/test_distributed.py.

``time`` launches ``torchrun --standalone`` with 1 and with N processes on this machine (CPU, gloo),
the global batch fixed (``--batch`` split over the processes, each with cores/N threads), and times
full training steps of a zoo model on random data at several ``t``, interleaved round by round
(t1, t2, ..., t1, t2, ...) so a busy neighbour slows every arm alike. It prints per process count
and ``t`` the median step time, the step after a move of ``t`` (graph emitted or fetched, DDP
rebuilt), and the speedup over 1 process. Run it on idle cores.

Run: ``python benchmarks/bench_ddp.py bytes --model resnet20`` and
``python benchmarks/bench_ddp.py time --model resnet20 --nproc 2``.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")   # before torch starts OpenMP: see README "Timing"

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import models_zoo
from localsgd_fx import compile_localsgd
from localsgd_fx.distributed import LocalSGDDataParallel, communication_per_step, process_group_from_env, rank
from localsgd_fx.metrics import format_table

IN_CHANNELS, IMAGE_SIZE, CLASSES = 1, 28, 10


def build(model: str):
    net = models_zoo.get_model(model, CLASSES, IN_CHANNELS)
    example = torch.randn(2, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return compile_localsgd(net, schedule="manual", compile=False, example_inputs=(example,))


def transitions(lm, given: list[int] | None) -> list[int]:
    return given or sorted({0, lm.max_local // 4, lm.max_local // 2, 3 * lm.max_local // 4, lm.max_local})


def bytes_table(model: str, given: list[int] | None) -> str:
    lm = build(model)
    sgd = communication_per_step(lm, 0)
    sgd_total = sgd["gradients"] + sgd["loss"]
    rows = []
    for t in transitions(lm, given):
        c = communication_per_step(lm, t)
        total = c["gradients"] + c["local_weights"] + c["loss"]
        rows.append((t, f"{lm.layer_order.local_fraction(t):.2f}", f"{sgd_total:,}", f"{c['gradients']:,}",
                     f"{c['local_weights']:,}", f"{total:,}", f"{total / sgd_total:.3f}", f"{c['buffers']:,}"))
    header = ("t", "p", "SGD all-reduce", "LoCal: gradients", "LoCal: local weights", "LoCal all-reduce",
              "LoCal / SGD", "buffers broadcast (both)")
    return f"{model}, bytes per process per step (float32)\n\n" + format_table(rows, header, markdown=True)


def worker(args) -> None:
    """One process under torchrun: time steps at each ``t``; rank 0 writes the medians to ``--json``."""
    with process_group_from_env("cpu") as distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        torch.manual_seed(0)
        lm = build(args.model)
        step_model = LocalSGDDataParallel(lm) if distributed else lm
        opt = torch.optim.SGD(lm.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(args.batch // world, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        y = torch.randint(0, CLASSES, (args.batch // world,))

        def step() -> float:
            start = time.perf_counter()
            loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_model.observe_loss(loss.detach())
            return time.perf_counter() - start

        ts = transitions(lm, args.t)
        steady: dict[int, list[float]] = {t: [] for t in ts}
        after_move: dict[int, list[float]] = {t: [] for t in ts}
        for round_ in range(args.rounds + 1):          # round 0 warms up (graphs emitted, buffers allocated)
            for t in ts:
                lm.set_transition(t, force=True)
                first = step()
                times = [step() for _ in range(args.steps)]
                if round_:
                    after_move[t].append(first)
                    steady[t] += times
        if rank() == 0:
            Path(args.json).write_text(json.dumps({t: {"step_ms": 1000 * statistics.median(steady[t]),
                                                       "after_move_ms": 1000 * statistics.median(after_move[t])}
                                                   for t in ts}))


def time_table(args) -> str:
    results = {}
    for n in sorted({1, args.nproc}):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "times.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
                   "worker", "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--rounds", str(args.rounds), "--json", str(out), *(["--t", *map(str, args.t)] if args.t else [])]
            subprocess.run(cmd, check=True)
            results[n] = {int(t): v for t, v in json.loads(out.read_text()).items()}
    rows = [(n, t, f"{v['step_ms']:.0f}", f"{v['after_move_ms']:.0f}",
             f"{results[1][t]['step_ms'] / v['step_ms']:.2f}x") for n, by_t in results.items() for t, v in by_t.items()]
    return (f"{args.model}, global batch {args.batch}, {os.cpu_count()} CPU cores, gloo\n\n"
            + format_table(rows, ("processes", "t", "step ms (median)", "step after a move of t, ms",
                                  "speedup vs 1 process"), markdown=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["bytes", "time", "worker"], help="worker: one process of 'time' (internal)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--t", type=int, nargs="*", help="transitions (default: 0, max/4, max/2, 3max/4, max)")
    parser.add_argument("--nproc", type=int, default=2, help="processes to compare with 1 (time)")
    parser.add_argument("--batch", type=int, default=128, help="global batch (time)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per t and round (time)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds after a warm-up round (time)")
    parser.add_argument("--json", help="where a worker writes its medians (internal)")
    args = parser.parse_args()
    if args.mode == "bytes":
        print(bytes_table(args.model, args.t))
    elif args.mode == "time":
        print(time_table(args))
    else:
        worker(args)


if __name__ == "__main__":
    main()
