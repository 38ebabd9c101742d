"""Draw the figures of docs/RESULTS.md from saved ``localsgd bench tradeoff`` runs (trains nothing).

What it draws: one Δ-accuracy-vs-speedup scatter over several tradeoff.json files (each arm's
speedup and Δ accuracy are taken against the SGD arm *of its own run*, so runs made at different
times can share a plot), and test accuracy vs training time for each run. ``--rename OLD=NEW``
relabels arms whose names changed since the run (the arm's overrides are in its tradeoff.json).

Run: ``python benchmarks/results_figures.py runs/results/resnet20/tradeoff.json
runs/results/resnet20_gentle/tradeoff.json --out docs/img --name resnet20``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from localsgd_fx.bench_tradeoff import seed_lines, summarise
from localsgd_fx.plots import plot_accuracy_vs_time, plot_tradeoff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", help="tradeoff.json files")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--name", required=True, help="file name prefix, e.g. the model")
    parser.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW")
    args = parser.parse_args()
    rename = dict(pair.split("=", 1) for pair in args.rename)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged: dict = {}
    for i, path in enumerate(args.runs):
        saved = json.loads(Path(path).read_text())
        runs = {rename.get(name, name): seeds for name, seeds in saved["runs"].items()}
        summary = summarise(runs)
        merged.update({name: s for name, s in summary.items() if name != "SGD" or not merged})
        cfg, seeds = saved["config"], saved["seeds"]
        plot_accuracy_vs_time(seed_lines(runs, seeds), out / f"{args.name}_accuracy_vs_time_{i}.png",
                              title=f"{cfg['model']} {cfg['dataset']}: test accuracy vs training time")
    png = plot_tradeoff(merged, out / f"{args.name}_tradeoff.png", target=(1.3, -0.5),
                        title=f"{cfg['model']} {cfg['dataset']}, {cfg['epochs']} epochs, seeds {seeds} (±1 std)")
    print(f"wrote {png} and {len(args.runs)} accuracy-vs-time plots in {out}")


if __name__ == "__main__":
    main()
