"""The ``localsgd`` command line: train, inspect, bench tradeoff --quick, bench step, error messages, ``python -m``.

Training runs take ``--device cpu`` (bit-for-bit reproducible, and what these checks are about) on
every machine."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import models_zoo
from localsgd_fx.bench_tradeoff import DEFAULT_ARMS
from localsgd_fx.cli import main
from localsgd_fx.lock import LOCK_NAME

pytestmark = pytest.mark.single_thread

#: --quick's subsets (512 / 256) are larger than the test data set, and would be refused.
FIT_DATA = ["--train-subset", "256", "--test-subset", "128"]
SMALL = ["--model", "smallcnn", "--train-subset", "192", "--test-subset", "128", "--batch-size", "64", "--no-progress",
         "--device", "cpu"]


def test_train_writes_metrics_plots_checkpoint_and_table(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--data-dir", data_dir, "--epochs", "3", "--stop-after", "2", "--out", str(out),
            "--schedule", "linear", "--c1", "2", "--c2", "0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for item in ("final test accuracy", "train time", "epochs", "final t", "local FLOP fraction", "speed bound",
                 str(out / "transition.png"), str(out / "accuracy_vs_time.png")):
        assert item in text
    for name in ("metrics.jsonl", "metrics.csv", "checkpoint.pt", "transition.png", "accuracy_vs_time.png",
                 "config.json"):
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


def test_train_lr_schedule_step(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--data-dir", data_dir, "--epochs", "4", "--lr", "0.1", "--lr-schedule", "step",
                 "--schedule", "sgd", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["lr_schedule"] == "step"
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the rate at each epoch's end, i.e. the next epoch's: x0.1 from epoch 3 (50 % of 4), x0.01 from epoch 4 (75 %)
    assert lrs == pytest.approx([0.1, 0.01, 0.001, 0.001], rel=1e-12)


def test_resume_with_changed_hyperparameters_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--data-dir", data_dir, "--epochs", "3", "--out", str(out), "--schedule", "sgd"]
    assert main([*argv, "--stop-after", "1"]) == 0
    record = ("checkpoint.pt", "config.json", "metrics.jsonl")
    before = {name: (out / name).read_bytes() for name in record}
    capsys.readouterr()
    code = main([*argv, "--resume", "--lr", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lr" in err and "\n" not in err and "Traceback" not in err
    assert {name: (out / name).read_bytes() for name in record} == before    # the run folder says what happened


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
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for arm in (*DEFAULT_ARMS, "speedup", "Δ acc (pp)"):
        assert arm in text
    report = json.loads((tmp_path / "tradeoff.json").read_text())
    assert list(report["summary"]) == list(DEFAULT_ARMS) and report["seeds"] == [0]
    # every figure recomputed from the per-epoch records of the run
    runs = report["runs"]
    sgd = runs["SGD"][0]
    sgd_time = sum(r["train_time_s"] for r in sgd)
    for arm, (records,) in runs.items():
        assert [r["epoch"] for r in records] == [1, 2]
        figures = report["summary"][arm]
        time_s = sum(r["train_time_s"] for r in records)
        speedup = sgd_time / time_s
        delta_pp = 100 * (records[-1]["test_acc"] - sgd[-1]["test_acc"])
        bound = len(records) / sum(1 / r["speed_bound"] for r in records)
        assert figures["train_time_s"][0] == pytest.approx(time_s)
        assert figures["speedup"][0] == pytest.approx(speedup)
        assert figures["delta_acc_pp"][0] == pytest.approx(delta_pp, abs=1e-9)
        assert figures["test_acc"][0] == pytest.approx(100 * records[-1]["test_acc"])
        assert figures["bound"][0] == pytest.approx(bound)
        assert figures["final_t"][0] == records[-1]["t"]
        row = next(line for line in text.splitlines() if line.startswith(arm + "  "))
        assert f"{speedup:.2f}x" in row and f"{delta_pp:+.2f}" in row and f"{time_s:.1f}" in row
    assert report["summary"]["SGD"]["speedup"][0] == 1.0 and report["summary"]["SGD"]["delta_acc_pp"][0] == 0.0
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
                 "--out", str(tmp_path), "--arms", "SGD", "freeze dynamic", "--device", "cpu"]) == 0
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
    assert main(["train", *SMALL, "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
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
    (["inspect", "--model", "smallcnn", "--image-size", "0"],
     ["SmallCNN cannot run on the example inputs [(2, 3, 0, 0)]"]),
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


def _layer_flops(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Multiply-add FLOPs per sample of each conv/linear call, in call order (counted here, not by the library)."""
    flops: list[int] = []

    def count(module, args, out):
        per_output = module.in_features if isinstance(module, nn.Linear) else \
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        flops.append(2 * out[0].numel() * per_output)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return flops


def test_bench_step_rows_follow_the_bound(tmp_path, capsys):
    """A tiny real ``bench step``: its rows are consistent with the measured times and the GEMM bound
    (the times themselves are not checked: they depend on the machine)."""
    fraction, transitions = 0.5, [1, 2, 4]
    path = tmp_path / "step.json"
    assert main(["bench", "step", "--model", "smallcnn", "--batch-size", "4", "--in-channels", "1",
                 "--image-size", "16",
                 "--transitions", *map(str, transitions), "--repeats", "2", "--warmup", "1", "--sample-fraction",
                 str(fraction), "--device", "cpu", "--compile", "off", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "bench step: smallcnn" in text and "ratio/bound" in text
    rows = json.loads(path.read_text())["rows"]
    assert [r["transition"] for r in rows] == [0, *transitions]     # plain SGD first
    flops = _layer_flops(models_zoo.get_model("smallcnn", 10, 1), torch.zeros(1, 1, 16, 16))
    sgd = rows[0]
    for r in rows:
        p = sum(flops[:r["transition"]]) / sum(flops)
        assert r["local_fraction"] == pytest.approx(p, rel=1e-9)
        # an SGD layer is 3 GEMMs, a hebbian one 1 + f (its update from a fraction f of the batch)
        assert r["bound"] == pytest.approx((3 - (2 - fraction) * p) / 3, rel=1e-9)
        assert r["ratio"] == pytest.approx(r["step_ms"] / sgd["step_ms"], rel=1e-9)
        assert r["quotient"] == pytest.approx(r["ratio"] / r["bound"], rel=1e-9)
        assert r["step_ms"] > 0 and r["peak_mb"] is None
    assert sgd["ratio"] == 1.0 and sgd["bound"] == 1.0
    saved = [r["saved_mb"] for r in rows]     # a longer local prefix saves less for backward
    assert saved == sorted(saved, reverse=True) and saved[-1] < 0.5 * saved[0], saved


def test_python_dash_m(data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "localsgd_fx", "train", *SMALL, "--data-dir", data_dir,
                           "--epochs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
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


def test_bench_tradeoff_marks_the_defaults_and_the_fastest_plain_sgd(data_dir, tmp_path, capsys):
    """The row a user gets without flags is marked, and with plain SGD in several compile modes every arm is also
    compared with the fastest of them (recomputed here from the per-epoch records)."""
    arms = ["SGD", "SGD eager", "freeze budget"]
    assert main(["bench", "tradeoff", "--quick", "--data-dir", data_dir, *FIT_DATA, "--epochs", "1",
                 "--arms", *arms, "--compile", "off", "--out", str(tmp_path), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "vs fastest SGD" in text and "shipped defaults" in text
    report = json.loads((tmp_path / "tradeoff.json").read_text())
    assert [name for name, s in report["summary"].items() if s["default"]] == ["freeze budget"]
    times = {name: sum(r["train_time_s"] for r in recs) for name, (recs,) in report["runs"].items()}
    fastest = min(times["SGD"], times["SGD eager"])
    for name in arms:
        assert report["summary"][name]["vs_fastest_sgd"][0] == pytest.approx(fastest / times[name])


def test_the_defaults_arm_is_known_by_what_it_runs_not_by_its_name():
    from localsgd_fx.bench_tradeoff import ARMS, DEFAULTS_ARM, runs_the_defaults
    from localsgd_fx.schedules import BUDGET_DEFAULT_BUDGET

    assert ARMS[DEFAULTS_ARM] == {"rule": "freeze", "schedule": "budget"}
    assert runs_the_defaults({"rule": "freeze", "schedule": "budget", "budget": BUDGET_DEFAULT_BUDGET})
    assert not runs_the_defaults({"rule": "freeze", "schedule": "budget", "budget": BUDGET_DEFAULT_BUDGET + 0.05})
    assert not runs_the_defaults({"rule": "hebbian", "schedule": "budget"})
    assert not runs_the_defaults({"rule": "freeze", "schedule": "dynamic"})
    assert not runs_the_defaults({"schedule": "sgd"})
    assert [name for name, o in ARMS.items() if runs_the_defaults(o)] == [DEFAULTS_ARM]   # exactly one
