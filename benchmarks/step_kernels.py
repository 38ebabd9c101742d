"""How many device kernels one training step runs: plain SGD, freeze and a local rule at a few transitions.

A small model's step on a GPU is bound by its kernels, not its FLOPs: in a CUDA graph each kernel still costs
a few microseconds however small it is. This counts, on any device (a CPU is enough), the aten ops of one
eager training step that compute something (views, allocations and profiler marks left out), through
``TrainStep.eager`` after warm-up steps: the ops a recorded step replays. One aten op is one kernel or a few
(a cuDNN convolution or BatchNorm may launch several), so compare arms with each other, not with a profiler.

    python3 benchmarks/step_kernels.py --model resnet20 --rules freeze hebbian

Prints per arm and t: the step's kernels, its ratio to plain SGD's, and the kernels per local layer beyond
those of its frozen twin (the cost of the rule's update, per layer).
"""
from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models_zoo
from localsgd_fx import compile_localsgd
from localsgd_fx.capture import TrainStep

#: ops that allocate, alias or mark a profiler range: no kernel
NOT_KERNELS = {"empty", "empty_strided", "new_empty_strided", "new_empty", "empty_like", "detach",
               "_record_function_enter_new", "_record_function_exit"}


class KernelCount(TorchDispatchMode):
    """Counts the ops that compute (``counts``: name -> calls); holds no tensor, so autograd runs as usual."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        name = func.overloadpacket.__name__
        if name not in NOT_KERNELS and not is_view:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def step_kernels(model: str, rule: str, t: int, batch: int, image: int, in_channels: int,
                 amp: torch.dtype | None, sample_fraction: float | None) -> collections.Counter[str]:
    torch.manual_seed(0)
    net = models_zoo.get_model(model, num_classes=10, in_channels=in_channels)
    options = {} if sample_fraction is None else {"sample_fraction": sample_fraction}
    lm = compile_localsgd(net, rule=rule, schedule="manual", **options)
    lm.set_transition(t)
    opt = torch.optim.SGD(lm.parameters(), lr=torch.tensor(0.1), momentum=0.9, weight_decay=5e-4, fused=True)
    step = TrainStep(lm, opt, F.cross_entropy, autocast_dtype=amp, capture=False)
    x, y = torch.randn(batch, in_channels, image, image), torch.randint(0, 10, (batch,))
    for _ in range(2):                          # warm-up: momentum buffers, traced pullbacks
        step.eager(x, y)
    count = KernelCount()
    with count:
        step.eager(x, y)
    return count.counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rules", nargs="+", default=["freeze", "hebbian"])
    parser.add_argument("--batch-size", type=int, default=8, help="kernel counts do not depend on it")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--sample-fraction", type=float, default=None, help="default: the library's")
    parser.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of each arm")
    args = parser.parse_args(argv)
    settings = dict(batch=args.batch_size, image=args.image_size, in_channels=args.in_channels,
                    amp=torch.bfloat16 if args.amp == "bf16" else None, sample_fraction=args.sample_fraction)

    def run(rule: str, t: int) -> collections.Counter[str]:
        return step_kernels(args.model, rule, t, **settings)

    sgd = run("freeze", 0)
    layers = len(compile_localsgd(models_zoo.get_model(args.model, num_classes=10, in_channels=args.in_channels),
                                  schedule="manual").graphs.order)
    last = layers - 1
    ts = sorted({last // 2, last})
    print(f"{args.model}, one training step, amp {args.amp}: kernels (aten ops that compute)")
    print(f"{'arm':<10} {'t':>3} {'kernels':>8} {'vs SGD':>7} {'per local layer beyond freeze':>30}")
    print(f"{'SGD':<10} {0:>3} {sum(sgd.values()):>8} {1.0:>7.2f}")
    frozen = {t: run("freeze", t) for t in ts}
    for rule in args.rules:
        for t in ts:
            counts = frozen[t] if rule == "freeze" else run(rule, t)
            n = sum(counts.values())
            extra = (n - sum(frozen[t].values())) / t
            print(f"{rule:<10} {t:>3} {n:>8} {n / sum(sgd.values()):>7.2f} {extra:>30.1f}")
            if args.top:
                print("           " + ", ".join(f"{k} {v}" for k, v in counts.most_common(args.top)))


if __name__ == "__main__":
    main()
