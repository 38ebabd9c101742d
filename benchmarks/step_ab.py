"""The training step of an earlier revision against this checkout's, both in one process, interleaved.

Two checkouts timed in separate processes disagree by more than the effects we look for on the shared
2 CPU cores (plain SGD's step of the same code scattered 183-271 ms between processes). So the earlier
revision's packages are exported with ``git archive`` and imported under other names beside this checkout's;
each round times plain SGD and the full local prefix (every layer but the classifier local) of both sides, in
alternating order. Both sides run the same hand-written step around the model.

    GOMP_SPINCOUNT=1000 python3 benchmarks/step_ab.py --before 5dfe41d --rule hebbian

Prints median step times, each side's full-prefix ratio to its plain SGD, and after/before of that ratio.
Run it a few times: the medians of one run still move by a few per cent on a shared box.
"""
import argparse
import atexit
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("localsgd_fx", "passes", "models_zoo")
SUFFIX = "_before"


def export_revision(rev: str, into: Path) -> None:
    """The revision's packages under ``into``, renamed ``<name>_before`` in every import and module path."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *PACKAGES], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    names = "|".join(PACKAGES)
    rules = [(re.compile(rf"^(\s*)from ({names})\b", re.M), rf"\1from \2{SUFFIX}"),
             (re.compile(rf"^(\s*)import ({names})\s*$", re.M), rf"\1import \2{SUFFIX} as \2"),
             (re.compile(rf"([\"'])({names})([.\"'])"), rf"\1\2{SUFFIX}\3")]    # lazy imports by module path
    for package in PACKAGES:
        for path in (into / package).rglob("*.py"):
            text = path.read_text()
            for pattern, replacement in rules:
                text = pattern.sub(replacement, text)
            path.write_text(text)
        (into / package).rename(into / f"{package}{SUFFIX}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the git revision to compare this checkout against")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rule", default="hebbian")
    parser.add_argument("--rounds", type=int, default=25, help="timed steps per arm")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="step_ab_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # after the run: lazy imports read it until then
    export_revision(args.before, tmp)
    sys.path[:0] = [str(tmp), str(ROOT)]
    import localsgd_fx_before
    import models_zoo_before

    import localsgd_fx
    import models_zoo
    if not localsgd_fx_before.compile_localsgd.__module__.startswith("localsgd_fx_before"):
        raise SystemExit("step_ab: the earlier revision's package imported this checkout's code")

    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    sides = {}
    for name, package, zoo in (("before", localsgd_fx_before, models_zoo_before), ("after", localsgd_fx, models_zoo)):
        torch.manual_seed(0)
        model = package.compile_localsgd(zoo.get_model(args.model, 10, 1), rule=args.rule, schedule="manual")
        sides[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), len(model.layer_order) - 1)

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        model.observe_loss(loss.detach())

    arms = [(name, t) for name, (_, _, full) in sides.items() for t in (0, full)]
    for name, t in arms:                 # warm-up: graphs emitted, caches filled
        model, optimizer, _ = sides[name]
        model.set_transition(t, force=True)
        for _ in range(3):
            step(model, optimizer)
    times = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        for name, t in (arms if round_ % 2 == 0 else arms[::-1]):
            model, optimizer, _ = sides[name]
            model.set_transition(t, force=True)
            start = time.perf_counter()
            step(model, optimizer)
            times[(name, t)].append(time.perf_counter() - start)
    median = {arm: 1e3 * sorted(v)[len(v) // 2] for arm, v in times.items()}
    ratio = {name: median[(name, full)] / median[(name, 0)] for name, (_, _, full) in sides.items()}
    full = {name: median[(name, sides[name][2])] for name in sides}
    print(f"{args.model} {args.rule}, {args.rounds} rounds: "
          + "  ".join(f"{name} SGD {median[(name, 0)]:.1f} ms, full prefix {full[name]:.1f} ms "
                      f"(ratio {ratio[name]:.3f})"
                      for name in sides)
          + f"  |  after/before: ratio {ratio['after'] / ratio['before']:.3f}, full-prefix step "
            f"{full['after'] / full['before']:.3f}")


if __name__ == "__main__":
    main()
