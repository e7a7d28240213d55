"""Failure injection on a local Ray cluster with a tiny model: `raydpo train` keeps training through a killed worker
process, resumes after a killed driver, rides out an S3 server restart, and stops with a storage error when the
bucket disappears. Every run is compared with one uninterrupted run of the same recipe and seed: the same steps, the
same pairs in each step on each rank, losses equal within float noise.

Workers report what they trained on through RAYDPO_TRACE_DIR (training/checkpoint.py trace_step): one line per step
and rank with the process id and the pairs' file:line sources; RAYDPO_TRACE_HOLD_AT_STEP pauses training once after
a step, so that a failure lands at a known step with a known last checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.s3server import s3_server  # noqa: F401
from training import checkpoint as ckpt
from core import storage

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # `make test-faults`

RAYDPO = str(Path(sys.executable).parent / "raydpo")
PAIRS, BATCH, EVERY = 64, 8, 2
STEPS = PAIRS // BATCH  # one epoch
WAIT_S = 900  # a run on a busy 2-core machine


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.tiny import build_tiny_workspace

    return build_tiny_workspace(tmp_path_factory.mktemp("resume"), PAIRS)


def write_recipe(workspace: Path, name: str, output: str, max_failures: int = 1) -> Path:
    recipe = {
        "run": {"name": name, "model_name_or_path": str(workspace / "model"), "replicas": 2,
                "data_s3_path": str(workspace / "data"), "output_s3_path": output},
        "training_config": {
            # fp32: resumed and resharded runs' losses are checked against an uninterrupted run's at 1e-3 to 1e-5
            "max_length": 128, "global_batch_size": BATCH, "seed": 7, "max_failures": max_failures, "precision": "fp32",
            "trainer": {"max_epochs": 1}, "data": {"validation_fraction": 0.0},
            "checkpoint": {"every_n_steps": EVERY, "keep_last": 2},
            "model": {"optim": {"lr": 5.0e-3, "sched": {"warmup_steps": 1, "min_lr": 1.0e-5}},
                      "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "alpha": 16}}}},
    }
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fresh_name(workspace: Path, base: str) -> str:
    """A run name not used yet in this workspace: a rerun of a failed test (pytest --reruns) starts clean instead
    of finding the first attempt's finished run."""
    attempt = 1
    while (workspace / f"{base}-{attempt}.yaml").exists():
        attempt += 1
    return f"{base}-{attempt}"


RAY_DID_NOT_START = "The current node timed out during startup"  # Ray's fixed 30 s raylet wait, on a busy machine


class Run:
    """One `raydpo train` process, started again (at most twice) when Ray's local cluster failed to come up:
    that is the machine's load, not what these tests are about."""

    def __init__(self, recipe: Path, trace: Path, log: Path, hold_at: int | None = None):
        trace.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ckpt.TRACE_HOLD_ENV)}
        self.env[ckpt.TRACE_DIR_ENV] = str(trace)
        if hold_at is not None:
            self.env[ckpt.TRACE_HOLD_ENV] = str(hold_at)
        self.recipe, self.log, self.starts = recipe, log, 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([RAYDPO, "train", str(self.recipe)], stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.recipe.parent, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ended(self) -> bool:
        """True once the run is over; starts it again instead when Ray did not come up."""
        if self.proc.poll() is None:
            return False
        if self.proc.returncode != 0 and RAY_DID_NOT_START in self.log.read_text() and self.starts < 3:
            self.start()
            return False
        return True

    def finish(self) -> str:
        deadline = time.time() + WAIT_S
        while not self.ended():
            if time.time() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError(f"raydpo train did not finish in {WAIT_S} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)
        return self.log.read_text()

    def wait_for(self, condition, what: str) -> None:
        deadline = time.time() + WAIT_S
        while not condition():
            if self.ended():
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {what}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"no {what} after {WAIT_S} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)


def trace_lines(trace: Path) -> list[dict]:
    lines = []
    for path in sorted(trace.glob("trace_rank*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sorted(lines, key=lambda x: x["time"])


def held(trace: Path) -> bool:
    return all((trace / f"held_rank{r}").exists() for r in (0, 1))


def checkpoint_step(ray_train_uri: str) -> int:
    found = ckpt.latest_complete(ray_train_uri)
    return found[1]["step"] if found else 0


def sources_by_step(lines: list[dict]) -> dict[tuple[int, int], list[str]]:
    """(step, rank) -> the pairs trained on; a step trained again after a restart: the last time counts."""
    return {(x["step"], x["rank"]): x["sources"] for x in lines}


def metrics(run_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(f"{run_uri}/metrics.jsonl").decode().splitlines()]


def train_losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}  # a repeated step: the last one counts


def descendants(pid: int) -> list:
    psutil = pytest.importorskip("psutil")
    return psutil.Process(pid).children(recursive=True)


def still_running(process) -> bool:
    """A process that exited but was not reaped yet (a zombie: its parent died too) holds nothing: gone."""
    psutil = pytest.importorskip("psutil")
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def reference(workspace):
    """The uninterrupted run every failure run is compared with."""
    output = str(workspace / "out")
    log, trace = workspace / "reference.log", workspace / "trace-reference"
    run = Run(write_recipe(workspace, "reference", output), trace, log)
    out = run.finish()
    assert run.proc.returncode == 0, out[-3000:]
    run_uri = f"{output}/reference"
    rows = metrics(run_uri)
    lines = trace_lines(trace)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))
    every_pair = sorted(s for x in lines for s in x["sources"])
    assert len(every_pair) == PAIRS == len(set(every_pair))  # one epoch: each pair once
    return {"losses": train_losses(rows), "sources": sources_by_step(lines)}


def assert_continues_the_reference(losses: dict[int, float], sources: dict, reference: dict) -> None:
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sources == reference["sources"]  # the same pairs in every step on every rank: none twice, none skipped
    for step, loss in reference["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}"


# ---------------------------------------------------------------- the failures

def test_a_killed_worker_process_is_restarted_from_the_last_checkpoint(workspace, reference):
    output, name = str(workspace / "out"), fresh_name(workspace, "worker-kill")
    log, trace = workspace / f"{name}.log", workspace / f"trace-{name}"
    run = Run(write_recipe(workspace, name, output, max_failures=1), trace, log, hold_at=3)
    ray_train = f"{output}/{name}/ray_train"
    # the driver has printed step 3's row: Ray's controller collected it before the kill, so the restart is known to
    # redo exactly one reported step (3) from the step-2 checkpoint
    run.wait_for(lambda: held(trace) and checkpoint_step(ray_train) == 2 and f"step 3/{STEPS} |" in log.read_text(),
                 "a hold after step 3 with the step-2 checkpoint written and step 3 reported")
    victim = next(x["pid"] for x in reversed(trace_lines(trace)) if x["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    out = run.finish()
    assert run.proc.returncode == 0, out[-3000:]

    run_uri = f"{output}/{name}"
    summary = json.loads(storage.read_bytes(f"{run_uri}/summary.json"))
    assert summary["steps"] == summary["planned_steps"] == STEPS
    assert summary["worker_failures"] == 1
    lines = trace_lines(trace)
    rank1 = [(x["step"], x["pid"]) for x in lines if x["rank"] == 1]
    assert rank1[:3] == [(1, victim), (2, victim), (3, victim)]  # killed after training step 3 ...
    assert [s for s, _ in rank1[3:]] == [3, 4, 5, 6, 7, 8] and all(p != victim for _, p in rank1[3:])  # ... redone
    # steps 1-3 reached the driver before the kill; the restart went on from the step-2 checkpoint and redid step 3
    assert summary["restarts"] == [{"last_reported_step": 3, "resumed_from_step": 2, "reported_steps_redone": 1}]
    rows = metrics(run_uri)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    assert_continues_the_reference(train_losses(rows), sources_by_step(lines), reference)
    assert storage.exists(f"{run_uri}/model/adapter_model.safetensors")
    assert storage.exists(f"{run_uri}/manifest.json")
    lost = max(s for s, p in rank1 if p == victim) - (min(s for s, p in rank1 if p != victim) - 1)
    assert lost == 1
    print(f"failure-record: worker process SIGKILLed after step 3 | survived: {summary['steps']}/{STEPS} steps "
          f"| went on from the step-2 checkpoint | steps lost: {lost}")


def test_a_killed_driver_reruns_from_the_latest_checkpoint_in_s3_through_a_server_restart(
        workspace, reference, s3_server):
    bucket = s3_server.make_bucket("resume-runs")
    name = fresh_name(workspace, "driver-kill")
    recipe = write_recipe(workspace, name, bucket, max_failures=0)
    run_uri = f"{bucket}/{name}"
    first_log, first_trace = workspace / f"{name}-first.log", workspace / f"trace-{name}-first"
    first = Run(recipe, first_trace, first_log, hold_at=3)
    first.wait_for(lambda: held(first_trace) and checkpoint_step(f"{run_uri}/ray_train") == 2,
                   "a hold after step 3 with the step-2 checkpoint in S3")
    run_processes = descendants(first.pid)  # the local Ray cluster this driver started: GCS, raylet, workers
    assert any("raylet" in " ".join(p.cmdline()) for p in run_processes)
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    time.sleep(5)  # what Ray cleans up by itself when its driver dies
    for process in run_processes:  # the rest, as a lost pod would take them: by pid, nothing else
        try:
            process.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    deadline = time.time() + 30
    while (alive := [p for p in run_processes if still_running(p)]) and time.time() < deadline:
        time.sleep(0.5)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"

    second_log, second_trace = workspace / f"{name}-second.log", workspace / f"trace-{name}-second"
    second = Run(recipe, second_trace, second_log, hold_at=3)  # the same command, run again
    second.wait_for(lambda: held(second_trace), "the rerun's first step")
    s3_server.stop()  # the step-4 checkpoint goes up while the server is down ...
    (second_trace / "release").touch()
    second.wait_for(lambda: any(x["step"] == 4 for x in trace_lines(second_trace)), "step 4")
    time.sleep(2)
    s3_server.start()  # ... and lands once it is back: retried with back-off
    out = second.finish()
    assert second.proc.returncode == 0, out[-3000:]

    assert f"resuming from s3://resume-runs/{name}/ray_train/checkpoint_" in out
    assert f"step 2/{STEPS}, 16 pairs consumed" in out  # 2 steps × 2 workers × one micro-batch of 4 pairs
    second_lines = trace_lines(second_trace)
    assert min(x["step"] for x in second_lines) == 3  # first new step = checkpoint step + 1
    # each step once on each rank: the server outage cost no restart
    assert sorted((x["step"], x["rank"]) for x in second_lines) == [(s, r) for s in range(3, STEPS + 1) for r in (0, 1)]
    assert {x["pid"] for x in second_lines}.isdisjoint({x["pid"] for x in trace_lines(first_trace)})
    summary = json.loads(storage.read_bytes(f"{run_uri}/summary.json"))
    assert summary["steps"] == STEPS and summary["resumed_from"]["step"] == 2 and summary["worker_failures"] == 0
    rows = metrics(run_uri)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))  # the curve continues
    first_steps = {k: v for k, v in sources_by_step(trace_lines(first_trace)).items() if k[0] <= 2}
    assert_continues_the_reference(train_losses(rows), first_steps | sources_by_step(second_lines), reference)
    checkpoints = [u for u in storage.list_dirs(f"{run_uri}/ray_train") if "/checkpoint_" in u]
    assert checkpoints and all(ckpt.missing_parts(u) == [] for u in checkpoints)
    assert max(ckpt.read_state(u)["step"] for u in checkpoints) == 6
    assert storage.exists(f"{run_uri}/model/adapter_model.safetensors") and storage.exists(f"{run_uri}/manifest.json")
    lost = max(x["step"] for x in trace_lines(first_trace)) - (min(x["step"] for x in second_lines) - 1)
    assert lost == 1
    print(f"failure-record: driver SIGKILLed after step 3 (its Ray cluster with it), same command rerun | survived: "
          f"{summary['steps']}/{STEPS} steps | went on from the step-2 checkpoint in S3 | steps lost: {lost}")
    print(f"failure-record: S3 server stopped for ~2 s while the step-4 checkpoint was uploading | survived "
          f"(retried with back-off) | steps lost: 0")


def test_a_bucket_that_disappears_stops_the_run_with_a_storage_error_naming_the_path(workspace, s3_server):
    bucket = s3_server.make_bucket("resume-gone")
    name = fresh_name(workspace, "bucket-gone")
    log, trace = workspace / f"{name}.log", workspace / f"trace-{name}"
    run = Run(write_recipe(workspace, name, bucket, max_failures=0), trace, log, hold_at=1)
    run.wait_for(lambda: held(trace), "the hold after step 1")
    s3_server.remove_bucket("resume-gone")
    (trace / "release").touch()  # step 2 writes the first checkpoint
    out = run.finish()
    assert run.proc.returncode == 4, out[-3000:]  # StorageError's exit code
    assert "storage error: could not upload checkpoint file" in out
    assert f"s3://resume-gone/{name}/ray_train/checkpoint_" in out
    assert "the bucket does not exist" in out
    assert "Traceback" not in out
    print("failure-record: bucket deleted before the step-2 checkpoint | not survivable: the run stopped with a "
          "storage error naming the path (exit 4)")
