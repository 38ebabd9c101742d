"""Plant known bugs one at a time in a copy of the repository and check that the tests catch each.

Each mutant is a plain string replacement in one source file and the tests that should catch it.
The repository (its working tree) is copied to a temporary folder once; for every mutant the
file is patched, the tests run there (``python -m pytest -x``) and the file is restored. A
pattern that no longer matches its file is an error, not a pass: update the mutant.

Run from the repository root (a few minutes on 2 CPU cores)::

    python3 tests/mutation_check.py                 # all mutants
    python3 tests/mutation_check.py --list          # their names
    python3 tests/mutation_check.py rng-restore tie-strict

Exit status: 0 every mutant caught, 1 some survived, 2 a mutant no longer applies or the
unmutated tests fail in the copy. (Not collected by pytest: the file name has no ``test_`` prefix.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "*.egg-info", "build",
                                "dist")


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str        # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # the three bugs no test caught before
    Mutant("rng-restore", "resume skips restoring the RNG state", "localsgd_fx/train.py",
           "        restore_rng(self.rng)\n", "        pass  # mutant: the RNG state is not restored\n",
           ("tests/test_train.py::test_resume_is_exact",)),
    Mutant("cosine-constant", "per-iteration cosine learning rate replaced by a constant", "localsgd_fx/train.py",
           "return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))", "return 1.0",
           ("tests/test_train.py",)),
    Mutant("tie-strict", "dynamic schedule: δ < α·W̄ turned into <=", "localsgd_fx/schedules.py",
           "(delta < threshold or delta == 0.0)", "(delta <= threshold or delta == 0.0)",
           ("tests/test_schedules.py",)),
    # the six the suite already caught
    Mutant("hebbian-renorm", "Hebbian renormalisation dropped", "localsgd_fx/rules.py",
           "return _rescale_rows(new, old)", "return new", ("tests/test_rules.py",)),
    Mutant("update-sign", "local update sign flipped", "localsgd_fx/rules.py",
           "return self.finish(torch.addcmul(weight, lr, delta), weight)",
           "return self.finish(torch.addcmul(weight, -lr, delta), weight)", ("tests/test_rules.py",)),
    Mutant("prefix-grad-on", "the prefix runs with grad on", "passes/rewrite.py",
           "graph.call_function(torch._C._set_grad_enabled, (False,))",
           "graph.call_function(torch._C._set_grad_enabled, (True,))", ("tests/test_passes.py",)),
    Mutant("prefix-extra-nodes", "extra nodes in the prefix (branches that feed no local layer)", "passes/partition.py",
           "if inputs_ok and (layer is not None or node in feeds_local "
           "or any(i in prefix for i in node.all_input_nodes)):",
           "if inputs_ok:", ("tests/test_passes.py",)),
    Mutant("ema-vs-last", "weak supervision compares with the last loss, not its average", "localsgd_fx/supervision.py",
           "rising = loss > prev if", "rising = loss > torch.where(self.steps == 0, loss, self.last_loss) if",
           ("tests/test_supervision.py",)),
    Mutant("epoch-snapshot", "the SGD weights are not snapshotted at an epoch end", "localsgd_fx/api.py",
           "expected_steps=self.driver.expected_steps())\n        self._snapshot_sgd_weights()\n",
           "expected_steps=self.driver.expected_steps())\n", ("tests/test_api.py",)),
    # bugs the new tests are for
    Mutant("tie-zero", "dynamic schedule: a layer with δ = W̄ = 0 blocks t", "localsgd_fx/schedules.py",
           "(delta < threshold or delta == 0.0)", "(delta < threshold)", ("tests/test_schedules.py",)),
    Mutant("cosine-per-epoch", "cosine learning rate stepped per epoch, not per iteration", "localsgd_fx/train.py",
           "min(step, total) / total", "min(step // per_epoch * per_epoch, total) / total", ("tests/test_train.py",)),
    Mutant("no-observe-loss", "the training step never feeds the loss to weak supervision", "localsgd_fx/capture.py",
           "        self.forward.observe_loss(loss.detach())\n", "", ("tests/test_train.py",)),
    Mutant("t-logged-late", "metrics log the next t as the epoch's t", "localsgd_fx/train.py",
           '"epoch": self.epoch, "t": t,', '"epoch": self.epoch, "t": t_next,', ("tests/test_train.py",)),
    Mutant("speedup-inverted", "bench tradeoff: speedup inverted", "localsgd_fx/bench_tradeoff.py",
           '"speedup": sum(r["train_time_s"] for r in ref_recs) / time_s',
           '"speedup": time_s / sum(r["train_time_s"] for r in ref_recs)',
           ("tests/test_cli.py::test_bench_tradeoff_quick",)),
    # the GPU step path
    Mutant("guard-dropped", "a non-finite local update is written into the weight", "localsgd_fx/ops.py",
           "    torch.where(refused, weight, new, out=weight)\n", "    weight.copy_(new)\n", ("tests/test_rules.py",)),
    Mutant("one-graph-any-batch", "a compiled graph runs every batch size (recompiles on a partial batch)",
           "localsgd_fx/graphs.py", "        elif size != self.batch:\n", "        elif False:\n",
           ("tests/test_step_path.py::test_compiled_run_makes_one_forward_and_one_backward_graph_per_distinct_t",)),
    # the recorded step (issue 20), caught on a CPU by the stand-in recorder (tests/helpers/replay.py)
    Mutant("replay-stale-batch", "a replay does not copy the batch into the recording's inputs",
           "localsgd_fx/capture.py", "        self.x.copy_(x, non_blocking=True)\n", "",
           ("tests/test_capture.py::test_recorded_steps_agree_with_eager_across_a_move_of_t",)),
    Mutant("replay-uncounted", "a replayed step is not counted (the schedule sees too few steps)",
           "localsgd_fx/capture.py", "            self.model.driver.step()          # the recorded forward",
           "            pass  #",
           ("tests/test_capture.py::test_recorded_steps_agree_with_eager_across_a_move_of_t",)),
    Mutant("record-stale-grads", "gradients of the warm-up steps are kept into the recording (replays accumulate)",
           "localsgd_fx/capture.py",
           "        self.optimizer.zero_grad(set_to_none=True)   # the recorded backward writes the gradients afresh\n",
           "", ("tests/test_capture.py::test_recorded_steps_agree_with_eager_across_a_move_of_t",)),
    Mutant("guard-uncounted", "a refused non-finite local update is not counted (nobody is told)",
           "localsgd_fx/ops.py", "    nonfinite.select(0, layer_index).add_(refused)\n", "",
           ("tests/test_rules.py",)),
    Mutant("capture-global", "recordings in CUDA's global capture mode (a pin-memory thread breaks them)",
           "localsgd_fx/capture.py", '    CAPTURE_ERROR_MODE = "thread_local"', '    CAPTURE_ERROR_MODE = "global"',
           ("tests/test_capture.py::test_recordings_are_made_in_thread_local_capture_mode",)),
    Mutant("settings-unchecked", "replays go on after the optimizer's momentum changed (the recording keeps the old)",
           "localsgd_fx/capture.py",
           "            if (settings := _settings(self.optimizer)) != recorded.settings:\n", "            if False:\n",
           ("tests/test_capture.py::test_an_optimizer_setting_changed_after_recording_turns_recording_off_with_a_note",)),
    Mutant("step-host-tensor", "the step makes a tensor from host data (a host-to-device copy capture refuses)",
           "localsgd_fx/supervision.py", "        ok = torch.isfinite(loss)\n",
           "        ok = torch.isfinite(loss) & torch.tensor(True, device=loss.device)\n",
           ("tests/test_capture.py::test_every_local_rule_records_exactly_on_the_stand_in",)),
    # layer kinds (issue 21/25): transposed convs seen filter-major, opaque calls kept out of the prefix
    Mutant("filter-major", "a transposed conv's weight is not permuted to filter-major for the rule",
           "localsgd_fx/ops.py", "    if not transposed:\n        return weight\n", "    return weight\n",
           ("tests/test_layer_kinds.py",)),
    Mutant("linear-rows", "a linear layer's leading dimensions are not flattened into rows for the rule",
           "localsgd_fx/ops.py", "    y_rule = ys.reshape(-1, ys.shape[-1]) if weight.dim() == 2 else ys\n",
           "    y_rule = ys\n", ("tests/test_rules.py::test_linear_rules_match_reference",)),
    Mutant("opaque-in-prefix", "a conv of a computed weight may join the prefix (silently frozen)",
           "passes/partition.py", " or node.name in opaque:", ":", ("tests/test_layer_kinds.py",)),
    Mutant("bench-bound", "bench step: the bound reported as a speedup, not a time ratio", "localsgd_fx/bench.py",
           "bound = 1.0 / speed_bound(p, gemms, sample_fraction)", "bound = speed_bound(p, gemms, sample_fraction)",
           ("tests/test_cli.py::test_bench_step_rows_follow_the_bound",)),
    # issue 21: opaque submodules and trace-time modes
    Mutant("opaque-submodule-in-prefix", "a call of an opaque submodule holding layers may join the prefix (frozen)",
           "passes/layers.py", "            elif node.op == \"call_module\" and holds_hidden_layers(",
           "            elif False and (",
           ("tests/test_trace.py", "tests/test_any_model.py")),
    Mutant("mode-not-recorded", "traced-through modes are not recorded (a changed mode goes unnoticed)",
           "passes/trace.py", "            self.modes[path] = m.training", "            pass",
           ("tests/test_trace.py",)),
    Mutant("shapes-move-stats", "measuring shapes leaves BatchNorm statistics moved", "passes/layers.py",
           "                b.copy_(saved)\n", "                pass\n", ("tests/test_trace.py",)),
    # issue 22: hardening (the lock, the data identity, the run folder)
    Mutant("lock-recheck", "the lock is not re-checked after the flock (a deleted lock file is held)",
           "localsgd_fx/lock.py", "                if not _same_file(fd, self.path):", "                if False:",
           ("tests/test_hardening.py::test_a_lock_replaced_between_opening_and_locking_is_taken_again",)),
    Mutant("lock-no-flock", "the lock file is not flocked: two processes take a stale lock over at once",
           "localsgd_fx/lock.py", "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "        pass\n",
           ("tests/test_hardening.py::test_two_processes_taking_over_a_stale_lock_never_both_hold_it",)),
    Mutant("data-identity", "resume does not compare the data with the checkpoint's", "localsgd_fx/train.py",
           "        self._check_same_data(state, path)\n", "",
           ("tests/test_hardening.py::test_item5_resume_refuses_other_data_but_not_another_path",)),
    Mutant("cifar-cache-source", "the CIFAR cache is used whatever archive it came from", "localsgd_fx/data/cifar.py",
           'known.get("sha256") == ident["sha256"]', "True",
           ("tests/test_data.py::test_cifar_cache_follows_the_archive_it_came_from",)),
    Mutant("out-foreign-files", "a new run writes into a folder holding other files", "localsgd_fx/run_folder.py",
           "    if present:\n", "    if False:\n",
           ("tests/test_hardening.py::test_item1_a_new_run_never_overwrites_files_it_did_not_write",)),
    Mutant("budget-early", "the budget plan is spent from the first allowed epoch on, not from the last backwards",
           "localsgd_fx/schedules.py", "for epoch in range(total_epochs - 1, first - 1, -1):",
           "for epoch in range(first, total_epochs):", ("tests/test_schedules.py",)),
    Mutant("budget-no-cap", "the budget plan ignores max_share (the deepest layers may turn local)",
           "localsgd_fx/schedules.py", "if cum[t] <= max_share + eps)", "if cum[t] <= 1.0 + eps)",
           ("tests/test_schedules.py",)),
]


def pytest_run(copy: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LOCALSGD_UPDATE_GOLDEN", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, time.perf_counter() - start, lines[-1] if lines else done.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<20} {m.path:<28} {m.what}")
        return 0
    unknown = sorted(set(args.names) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; see --list")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    for m in chosen:   # every pattern must still match its file, once, before anything runs
        count = (ROOT / m.path).read_text().count(m.old)
        if count != 1:
            print(f"mutant {m.name}: its pattern occurs {count} times in {m.path} (expected once); update the mutant",
                  file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="localsgd-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE)
        where = subprocess.run([sys.executable, "-c",
                                "import localsgd_fx, passes; print(localsgd_fx.__file__, passes.__file__)"],
                               cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if where.returncode or any(not Path(p).is_relative_to(copy) for p in where.stdout.split()):
            print(f"the copy's packages are not the ones imported there: {where.stdout or where.stderr}",
                  file=sys.stderr)
            return 2
        targets = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, seconds, last = pytest_run(copy, targets)
        print(f"unmutated: {last} ({seconds:.0f} s)")
        if code != 0:
            print("the unmutated tests fail in the copy; fix them first", file=sys.stderr)
            return 2
        results = []
        for m in chosen:
            target = copy / m.path
            pristine = target.read_text()
            target.write_text(pristine.replace(m.old, m.new))
            try:
                code, seconds, last = pytest_run(copy, m.tests)
            finally:
                target.write_text(pristine)
            # pytest exits 1 when tests failed; anything else (collection/usage errors) is not a catch
            verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"error (pytest exit {code})")
            results.append((m, verdict))
            print(f"{m.name:<20} {verdict:<10} {seconds:5.0f} s  {m.what}  [{' '.join(m.tests)}]: {last}", flush=True)

    print("\n| planted bug | file | tests | result |\n| --- | --- | --- | --- |")
    for m, verdict in results:
        print(f"| {m.what} | `{m.path}` | {', '.join(f'`{t}`' for t in m.tests)} | {verdict} |")
    survived = [m.name for m, v in results if v != "caught"]
    print(f"\n{len(results) - len(survived)} of {len(results)} caught"
          + (f"; not caught: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
