"""Data-parallel training: 2 gloo processes (spawned here) against 1 process, replicas, resume, torchrun.

The 2-vs-1 comparison uses a CNN without BatchNorm: with BN each process normalises its own half
of the batch (DDP's semantics, and SyncBatchNorm has no CPU kernels), so the forward itself would
differ from the full batch. Without BN, DDP's averaged gradient is the full-batch gradient and,
for the Oja rule (linear in the batch statistics), the averaged local weights are the full-batch
update; for the Hebbian rule the per-filter rescaling makes them equal to first order in the local
rate (the default rate is used). Replica identity is checked bit for bit, with BatchNorm too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import localsgd_fx.distributed as ldist
import models_zoo
from helpers.state import without_measurements
from localsgd_fx import DEFAULT_LOCAL_LR, compile_localsgd
from localsgd_fx.checkpoint import CHECKPOINT_NAME, load_checkpoint
from localsgd_fx.data import Batches, ImageDataset
from localsgd_fx.distributed import LocalSGDDataParallel, communication_per_step, local_weights, sgd_parameters
from localsgd_fx.schedules import GradNorm, Plasticity
from localsgd_fx.train import TrainConfig, Trainer, fit

WORLD = 2
#: step -> transition set before it: the steps span two moves of t (two DDP rebuilds)
MOVES = {2: 1, 4: 2}
STEPS, GLOBAL_BATCH = 6, 16
EPOCH_ENDS = (3, STEPS - 1)   # buffers are rank 0's after end_epoch (between forwards they are each rank's)
ROOT = Path(__file__).resolve().parents[1]


class PlainCNN(nn.Module):
    """Three convs and a linear head; BatchNorm only with ``norm`` (see the module docstring)."""

    def __init__(self, norm: bool = False):
        super().__init__()
        bn = (lambda c: nn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn(4), nn.ReLU(),
                                  nn.Conv2d(4, 8, 3, stride=2, padding=1), bn(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), bn(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(x))


def make(rule: str, norm: bool = False):
    torch.manual_seed(0)
    lm = compile_localsgd(PlainCNN(norm), rule=rule, schedule="manual", compile=False, sample_fraction=1.0,
                          local_lr={"oja": 0.05, "hebbian": DEFAULT_LOCAL_LR}[rule])
    return lm, torch.optim.SGD(lm.parameters(), lr=0.05, momentum=0.9)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 1, 12, 12, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def train(step_model, lm, opt, shard=slice(None), after_step=lambda: None):
    """The documented loop; ``step_model`` is the wrapper (a shard each) or the bare module (all)."""
    for step, (x, y) in enumerate(batches()):
        if step in MOVES:
            lm.set_transition(MOVES[step])
        loss = F.cross_entropy(step_model(x[shard]), y[shard])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_model.observe_loss(loss.detach())
        after_step()
        if step in EPOCH_ENDS:
            step_model.end_epoch()


def state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.state_dict().items() if isinstance(v, torch.Tensor)}


_in_hook = [False]


def _counting_hook(counts: list, bucket):
    counts.append(bucket.buffer().numel() * bucket.buffer().element_size())
    _in_hook[0] = True           # the default hook all-reduces through dist.all_reduce too
    try:
        return default_hooks.allreduce_hook(None, bucket)
    finally:
        _in_hook[0] = False


def _worker(rank: int, out: str, data_dir: str) -> None:
    """One process of the pair: the wrapper in a hand-written loop, then the trainer (one spawn: start-up is slow)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {"api": _api_part(rank), "trainer": _trainer_part(Path(out), data_dir)}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        ldist.shutdown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_dir) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("two_processes")
    mp.spawn(_worker, args=(str(out), data_dir), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------- the wrapper (API)
def _api_part(rank: int) -> dict:
    sent: list[int] = []      # bytes of the wrapper's own all-reduces (local weights, loss)
    real = ldist.dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        if not _in_hook[0]:
            sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    results = {}
    shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    for rule, norm in (("oja", False), ("hebbian", False), ("hebbian", True)):
        lm, opt = make(rule, norm)
        grads: list[int] = []
        wrapper = LocalSGDDataParallel(lm, comm_hook=(grads, _counting_hook))
        per_step = []

        def record():   # the step's expected bytes, DDP's (comm hook) and the wrapper's own
            per_step.append((wrapper.communication_per_step(), sum(grads), sum(sent)))
            grads.clear(), sent.clear()

        ldist.dist.all_reduce = counting_all_reduce
        try:
            train(wrapper, lm, opt, shard, after_step=record)
        finally:
            ldist.dist.all_reduce = real
        results[(rule, norm)] = {"state": state(lm), "rewraps": wrapper.rewraps, "bytes": per_step,
                                 "diff": wrapper.replica_max_abs_diff()}
    results["signals"] = _signals_part(shard)
    with torch.no_grad():       # the check can fail: rank 1 drifts by 0.25 in one weight
        if rank == 1:
            lm.model.head.weight[0, 0] += 0.25
    results["perturbed"] = ldist.replica_max_abs_diff(lm)
    return results


def _signals_part(shard: slice) -> dict:
    """Both signal schedules deciding every 2 steps: each rank measures its own shard."""
    out = {}
    for schedule in (Plasticity(decide_every=1, warmup_epochs=0, threshold=0.99, beta=0.5, shift=1, probe_size=8),
                     GradNorm(decide_every=2, warmup_epochs=0, threshold=10.0, patience=1, shift=1)):
        torch.manual_seed(0)
        lm = compile_localsgd(PlainCNN(True), rule="hebbian", schedule=schedule, compile=False, sample_fraction=1.0)
        opt = torch.optim.SGD(lm.parameters(), lr=0.05, momentum=0.9)
        wrapper = LocalSGDDataParallel(lm)
        for x, y in batches():
            loss = F.cross_entropy(wrapper(x[shard]), y[shard])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            wrapper.observe_loss(loss.detach())
            wrapper.maybe_decide()
        wrapper.end_epoch()
        out[type(schedule).__name__] = {"history": lm.history, "state": state(lm),
                                        "diff": wrapper.replica_max_abs_diff(), "probe": lm.signals.probe}
    return out


def test_two_processes_stay_identical_and_match_one_process(two_processes):
    ranks = [r["api"] for r in two_processes[1]]
    for key in [("oja", False), ("hebbian", False), ("hebbian", True)]:
        a, b = ranks[0][key], ranks[1][key]
        assert a["diff"] == 0.0 and b["diff"] == 0.0
        assert a["rewraps"] == len(MOVES)
        for name, value in a["state"].items():                        # bit-identical replicas
            assert torch.equal(value, b["state"][name]), f"{key}: replicas differ in {name}"
        for moment, got_grads, got_own in a["bytes"]:
            assert got_grads == moment["gradients"]                    # what DDP's comm hook saw
            assert got_own == moment["local_weights"] + moment["loss"]
        if key[1]:
            continue                                                   # BatchNorm: per-shard statistics
        lm, opt = make(*key)                                           # one process, the whole batch
        train(lm, lm, opt)
        start, _ = make(*key)
        before = state(start)
        for name, value in state(lm).items():
            if key[0] == "oja" and name == "model.body.0.weight":     # local for 4 of the 6 steps
                assert (value - before[name]).abs().max() > 1e-2, "the local update is too small to test"
            torch.testing.assert_close(a["state"][name], value, rtol=1e-4, atol=1e-6, msg=f"{key}: {name}")
    assert ranks[0]["perturbed"] == ranks[1]["perturbed"] == pytest.approx(0.25)


def test_signal_schedules_decide_alike_on_every_rank(two_processes):
    """Each rank measures its own shard (its gradients; the probe is rank 0's): the values are averaged,
    so every rank takes the same decisions and the replicas stay identical."""
    ranks = [r["api"]["signals"] for r in two_processes[1]]
    for name in ("Plasticity", "GradNorm"):
        a, b = ranks[0][name], ranks[1][name]
        assert a["history"] == b["history"] and a["diff"] == b["diff"] == 0.0
        assert sum("value" in h for h in a["history"]) >= 3, f"{name}: too few signal values to compare"
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert any(h["transition"] > h["transition_before"] for h in ranks[0]["GradNorm"]["history"])
    assert torch.equal(ranks[0]["Plasticity"]["probe"][0], ranks[1]["Plasticity"]["probe"][0])


# ---------------------------------------------------------------------- the trainer, resumed
def _config(data_dir: str, out: Path | None, **kw) -> TrainConfig:
    """Odd sizes on purpose: 193 = 3 x 64 + 1 leaves a last global batch of one image (dropped: a process
    would get none), and 127 test images in batches of 2 x 63 leave rank 1 an empty last part."""
    base = dict(model="smallcnn", data_dir=data_dir, train_subset=193, test_subset=127, eval_batch_size=63, epochs=3,
                batch_size=32, lr=0.05, out=str(out) if out else None, progress=False, schedule="linear", c1=3, c2=0,
                sample_fraction=0.5, augment=True, device="cpu",   # gloo; also on machines with a GPU
                rule="hebbian")   # an updating rule: local weights averaged every step (torchrun runs the default)
    return TrainConfig(**{**base, **kw})


#: a signal schedule that decides inside epochs (every 2 of an epoch's 3 steps) and moves whenever it may
SIGNAL_RUN = dict(schedule="gradnorm", c1=None, c2=None, threshold=10.0, patience=1, shift=1, decide_every=2)


def _trainer_part(out: Path, data_dir: str) -> dict:
    runs = {}
    for name, kw in (("", {}), ("signals_", SIGNAL_RUN)):
        whole = fit(_config(data_dir, out / f"{name}whole", **kw), log=None)
        fit(_config(data_dir, out / f"{name}split", stop_after=1, **kw), log=None)
        resumed = fit(_config(data_dir, out / f"{name}split", resume=True, **kw), log=None)
        runs.update({f"{name}whole": (whole.metrics, state(whole.model), whole.model.history),
                     f"{name}resumed": (resumed.metrics, state(resumed.model), resumed.model.history)})
    return runs



def test_resume_under_two_processes_equals_an_uninterrupted_run(two_processes, data_dir):
    out, ranks = two_processes[0], [r["trainer"] for r in two_processes[1]]
    metrics, weights, _ = ranks[0]["whole"]
    assert [r["world_size"] for r in metrics] == [WORLD] * 3
    assert [r["replica_max_abs_diff"] for r in metrics] == [0.0] * 3
    assert [r["t"] for r in metrics] == [0, 1, 2]                          # t moved across the resume point
    for rank in ranks:
        for run in ("whole", "resumed"):
            assert without_measurements(rank[run][0]) == without_measurements(metrics)  # same figures on every process
            for name, value in weights.items():
                assert torch.equal(rank[run][1][name], value), f"{run}: {name}"
    lines = (out / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # a signal schedule deciding every 2 steps (epochs of 3), stopped after epoch 1: a partial gradient sum in the
    # checkpoint, each rank's averaged at the epoch end
    signal_metrics, signal_weights, history = ranks[0]["signals_whole"]
    assert [(r["t"], r["t_next"]) for r in signal_metrics] == [(0, 0), (0, 1), (1, 2)]
    assert [h["step"] for h in history if h["transition"] > h["transition_before"]] == [1, 2]   # inside epochs
    for rank in ranks:
        for run in ("signals_whole", "signals_resumed"):
            assert without_measurements(rank[run][0]) == without_measurements(signal_metrics)
            assert rank[run][2] == history                           # every decision's signal value
            for name, value in signal_weights.items():
                assert torch.equal(rank[run][1][name], value), f"{run}: {name}"
    one = Trainer(_config(data_dir, None), log=None)          # the sharded test = one process's test
    one.model.load_state_dict(load_checkpoint(out / "split" / CHECKPOINT_NAME)["model"])
    test_loss, test_acc, _ = one.evaluate()
    assert test_acc == metrics[-1]["test_acc"] and test_loss == pytest.approx(metrics[-1]["test_loss"], rel=1e-6)


# ------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_train(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "localsgd_fx", "train", "--model", "smallcnn", "--data-dir", data_dir, "--train-subset", "0",
           "--test-subset", "0", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--schedule", "linear",
           "--c2", "0", "--seed", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("final test accuracy") == 1                   # rank 0 alone prints
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["world_size"], r["replica_max_abs_diff"]) for r in rows] == [(WORLD, 0.0)] * 2
    assert rows[-1]["t_next"] > 0


# ------------------------------------------------------------------------- single process
class SharedLayer(nn.Module):
    """One conv called twice: once in the local prefix, once after an SGD layer (a detached weight there)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3, 4)

    def forward(self, x):
        y = self.a(self.b(self.bn(self.a(x))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("name", ["smallcnn", "resnet20", "shared"])
def test_sgd_parameters_are_those_that_get_gradients(name):
    torch.manual_seed(0)
    net = SharedLayer() if name == "shared" else models_zoo.get_model(name, 10, 3)
    x = torch.randn(2, 3, 8, 8)
    lm = compile_localsgd(net, schedule="manual", compile=False)
    n = len(lm.layer_order)
    for t in sorted({0, 1, n // 2, n - 1}):
        lm.set_transition(t)
        lm.zero_grad(set_to_none=True)
        F.cross_entropy(lm(x), torch.tensor([1, 2])).backward()
        assert {id(p) for p in sgd_parameters(lm)} == {id(p) for p in lm.parameters() if p.grad is not None}, t


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg11_bn"])
def test_a_local_layer_costs_no_more_bytes_than_its_gradient(name):
    lm = compile_localsgd(models_zoo.get_model(name, 10, 3), rule="hebbian", schedule="manual", compile=False)
    sgd = communication_per_step(lm, 0)
    assert sgd["local_weights"] == 0
    for t in range(1, lm.max_local + 1):
        local = communication_per_step(lm, t)
        assert 0 < local["local_weights"] and local["gradients"] + local["local_weights"] <= sgd["gradients"], t


def test_a_frozen_prefix_is_not_averaged():
    """Frozen weights never change, so the default rule sends nothing for them."""
    lm = compile_localsgd(models_zoo.get_model("resnet20", 10, 3), schedule="manual", compile=False)
    assert lm.rule.key == "freeze"
    for t in (1, lm.max_local):
        assert local_weights(lm, t) == [] and communication_per_step(lm, t)["local_weights"] == 0, t
    assert communication_per_step(lm, 1)["loss"] == 0          # and no loss average: freeze reads no rate


def test_shards_partition_every_batch():
    ds = ImageDataset("toy", torch.arange(11 * 16, dtype=torch.uint8).view(11, 1, 4, 4), torch.arange(11), 11,
                      (0.0,), (1.0,))
    whole = list(Batches(ds, 4, augment=True, seed=3).epoch(2))
    parts = [list(Batches(ds, 4, augment=True, seed=3, shard=k, num_shards=3).epoch(2)) for k in range(3)]
    assert [[len(y) for _, y in p] for p in parts] == [[2, 2, 1], [1, 1, 1], [1, 1, 1]]
    for i, (x, y) in enumerate(whole):                    # same order and augmentation, cut in contiguous parts
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    with pytest.raises(ValueError, match="shard must be in 0..num_shards-1"):
        Batches(ds, 4, shard=3, num_shards=3)


def test_wrapper_refuses_bad_input_in_one_line():
    lm = compile_localsgd(PlainCNN(), schedule="manual", compile=False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        LocalSGDDataParallel(lm)
    with pytest.raises(TypeError, match="wraps a LocalSGDModule"):
        LocalSGDDataParallel(PlainCNN())
