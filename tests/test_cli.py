"""The ``localsgd`` command line: train, inspect, bench tradeoff --quick, error messages, ``python -m``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localsgd_fx.bench_tradeoff import DEFAULT_ARMS
from localsgd_fx.cli import main

SMALL = ["--model", "smallcnn", "--train-subset", "192", "--test-subset", "128", "--batch-size", "64", "--no-progress"]


def test_train_writes_metrics_plots_checkpoint_and_table(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--data-dir", data_dir, "--epochs", "2", "--out", str(out), "--schedule", "linear",
            "--c1", "2", "--c2", "0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for item in ("final test accuracy", "train time", "epochs", "final t", "local FLOP fraction", "speed bound",
                 str(out / "transition.png"), str(out / "accuracy_vs_time.png")):
        assert item in text
    for name in ("metrics.jsonl", "metrics.csv", "checkpoint.pt", "transition.png", "accuracy_vs_time.png", "config.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["c1"] == 2
    # a second fresh run into the same --out is refused; --resume with another model names the mismatch
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *SMALL[2:], "--model", "resnet20", "--data-dir", data_dir, "--epochs", "3", "--out", str(out),
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model 'smallcnn'" in err and "model 'resnet20'" in err and "\n" not in err and "Traceback" not in err
    assert main(["train", *SMALL, "--data-dir", data_dir, "--epochs", "3", "--out", str(out), "--resume",
                 "--schedule", "linear", "--c1", "2", "--c2", "0"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_inspect_prints_graph_and_writes_dot(tmp_path, capsys):
    argv = ["inspect", "--model", "smallcnn", "--transition", "2", "--in-channels", "1", "--image-size", "28",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "local_update" in text and "LOCAL" in text and "SGD" in text and "def forward" in text
    dot = tmp_path / "smallcnn_t2.dot"
    assert dot.read_text().startswith("digraph")
    if (tmp_path / "smallcnn_t2.png").exists():
        assert (tmp_path / "smallcnn_t2.png").stat().st_size > 0


def test_bench_tradeoff_quick(data_dir, tmp_path, capsys):
    assert main(["bench", "tradeoff", "--quick", "--data-dir", data_dir, "--epochs", "2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for arm in (*DEFAULT_ARMS, "speedup", "Δ acc (pp)"):
        assert arm in text
    report = json.loads((tmp_path / "tradeoff.json").read_text())
    assert list(report["summary"]) == list(DEFAULT_ARMS) and report["seeds"] == [0]
    assert report["summary"]["SGD"]["speedup"][0] == pytest.approx(1.0)
    for png in ("tradeoff.png", "tradeoff_scatter.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # Re-rendering a saved run trains nothing and prints the same figures, also as a Markdown table.
    (tmp_path / "tradeoff_scatter.png").unlink()
    assert main(["bench", "tradeoff", "--from-json", str(tmp_path / "tradeoff.json")]) == 0
    again = capsys.readouterr().out
    sgd_row = next(line for line in text.splitlines() if line.startswith("SGD "))
    assert sgd_row in again and "| SGD | " in again and "| --- |" in again
    assert (tmp_path / "tradeoff_scatter.png").exists()


def test_bench_tradeoff_arms_subset(data_dir, tmp_path, capsys):
    assert main(["bench", "tradeoff", "--quick", "--data-dir", data_dir, "--epochs", "1", "--out", str(tmp_path),
                 "--arms", "SGD", "freeze dynamic"]) == 0
    assert list(json.loads((tmp_path / "tradeoff.json").read_text())["summary"]) == ["SGD", "freeze dynamic"]
    assert main(["bench", "tradeoff", "--quick", "--arms", "no such arm"]) == 2
    assert "invalid choice: 'no such arm'" in capsys.readouterr().err


def test_bad_names_list_the_valid_ones(data_dir, tmp_path, capsys):
    assert main(["train", "--model", "no_such_net", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "resnet20" in err and "smallcnn" in err and "no_such_net" in err
    assert main(["inspect", "--model", "no_such_net"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("localsgd: error:") and "resnet20" in err and "\n" not in err
    assert main(["train", "--dataset", "mnist"]) == 2
    assert "fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    assert main(["train", *SMALL, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cifar" in err.lower() and "https://www.cs.toronto.edu/~kriz/cifar.html" in err
    assert "\n" not in err and "Traceback" not in err


def test_bench_step_is_wired(capsys):
    assert main(["bench", "step", "--help"]) == 0
    assert "bench step" in capsys.readouterr().out


def test_python_dash_m(data_dir, tmp_path):
    env = {**os.environ, "GOMP_SPINCOUNT": "1000"}
    done = subprocess.run([sys.executable, "-m", "localsgd_fx", "train", *SMALL, "--data-dir", data_dir,
                           "--epochs", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout and (tmp_path / "checkpoint.pt").exists()


def test_signal_schedule_flags_reach_the_config():
    from localsgd_fx.cli import build_parser
    from localsgd_fx.train import TrainConfig, schedule_kwargs

    args = build_parser().parse_args(["train", "--schedule", "plasticity", "--threshold", "0.2", "--patience", "2",
                                      "--decide-every", "0.25", "--probe-size", "32", "--shift", "1"])
    config = TrainConfig.from_dict({k: v for k, v in vars(args).items() if k != "command"})
    assert schedule_kwargs(config.validate(), steps_per_epoch=79) == {
        "threshold": 0.2, "patience": 2, "decide_every": 20, "probe_size": 32, "shift": 1}
    assert main(["train", "--schedule", "dynamic", "--decide-every", "5"]) == 2
