"""The ``localsgd`` command line: train, inspect, bench tradeoff --quick, error messages, ``python -m``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from localsgd_fx.bench_tradeoff import DEFAULT_ARMS
from localsgd_fx.cli import main
from localsgd_fx.lock import LOCK_NAME

#: --quick's subsets (512 / 256) are larger than the test data set, and would be refused.
FIT_DATA = ["--train-subset", "256", "--test-subset", "128"]
SMALL = ["--model", "smallcnn", "--train-subset", "192", "--test-subset", "128", "--batch-size", "64", "--no-progress"]


def test_train_writes_metrics_plots_checkpoint_and_table(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--data-dir", data_dir, "--epochs", "3", "--stop-after", "2", "--out", str(out),
            "--schedule", "linear", "--c1", "2", "--c2", "0"]
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
    assert main(["bench", "tradeoff", "--quick", "--data-dir", data_dir, *FIT_DATA, "--epochs", "2",
                 "--out", str(tmp_path)]) == 0
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
    assert main(["bench", "tradeoff", "--quick", "--data-dir", data_dir, *FIT_DATA, "--epochs", "1",
                 "--out", str(tmp_path), "--arms", "SGD", "freeze dynamic"]) == 0
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


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("localsgd: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("argv, needles", [
    (["inspect", "--model", "smallcnn", "-t", "999"], ["transition 999 is out of range", "0..5"]),
    (["inspect", "--model", "smallcnn", "--image-size", "0"], ["SmallCNN cannot run on the example inputs [(2, 3, 0, 0)]"]),
    (["bench", "step", "--model", "smallcnn", "--transitions", "-1"], ["transition -1 is out of range"]),
    (["bench", "step", "--batch-size", "0"], ["--batch-size must be a positive int, got 0"]),
    (["bench", "step", "--image-size", "0"], ["--image-size must be a positive int"]),
    (["bench", "step", "--repeats", "0"], ["--repeats must be a positive int"]),
    (["bench", "step", "--json", "/no/such/folder/rows.json"], ["--json /no/such/folder/rows.json: cannot write"]),
])
def test_bad_values_are_one_line_before_any_work(argv, needles, capsys):
    assert main(argv) == 2
    one_line_error(capsys, *needles)
    assert "bench step:" not in capsys.readouterr().out          # refused before the benchmark ran


@pytest.mark.parametrize("extra, needles", [
    (["--local-lr", "inf"], ["local_lr must be a finite number, got inf"]),
    (["--overwrite", "--resume"], ["resume and overwrite exclude each other"]),
    (["--schedule", "linear", "--c1", "99"], ["c1=99 layers is more than may turn local", "max_local=4"]),
    (["--train-subset", "100000"], ["--train-subset 100000 asks for more images", "(256)"]),
])
def test_bad_train_values_are_one_line_and_write_nothing(extra, needles, data_dir, tmp_path, capsys):
    assert main(["train", *SMALL, "--data-dir", data_dir, "--out", str(tmp_path / "run"), *extra]) == 2
    one_line_error(capsys, *needles)
    assert not (tmp_path / "run").exists()


def test_explicit_data_dir_is_used_or_refused(tmp_path, capsys):
    assert main(["train", *SMALL, "--data-dir", str(tmp_path / "typo"), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "not in the data folder " + str(tmp_path / "typo"))


def test_a_run_folder_in_use_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}   # a live process: this one
    (out / LOCK_NAME).write_text(json.dumps(holder))
    assert main(["train", *SMALL, "--data-dir", data_dir, "--epochs", "1", "--out", str(out)]) == 2
    one_line_error(capsys, f"in use by another run (process {os.getpid()} on host {socket.gethostname()}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_bench_step_is_wired(capsys):
    assert main(["bench", "step", "--help"]) == 0
    assert "bench step" in capsys.readouterr().out


def test_python_dash_m(data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "localsgd_fx", "train", *SMALL, "--data-dir", data_dir,
                           "--epochs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout and (tmp_path / "checkpoint.pt").exists()
