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
from training import storage

pytestmark = pytest.mark.slow

RAYDPO = str(Path(sys.executable).parent / "raydpo")
PAIRS, BATCH, EVERY = 64, 8, 2
STEPS = PAIRS // BATCH  # one epoch
WAIT_S = 900  # a run on a busy 2-core machine


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.tiny import build_tiny_model_dir
    from training.data.synthetic import answer_format_pairs

    root = tmp_path_factory.mktemp("resume")
    build_tiny_model_dir(root / "model")
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w") as f:
        for row in answer_format_pairs(PAIRS, seed=1):
            f.write(json.dumps(row) + "\n")
    return root


def write_recipe(workspace: Path, name: str, output: str, max_failures: int = 1) -> Path:
    recipe = {
        "run": {"name": name, "model_name_or_path": str(workspace / "model"), "replicas": 2,
                "data_s3_path": str(workspace / "data"), "output_s3_path": output},
        "training_config": {
            "max_length": 128, "global_batch_size": BATCH, "seed": 7, "max_failures": max_failures,
            "trainer": {"max_epochs": 1}, "data": {"validation_fraction": 0.0},
            "checkpoint": {"every_n_steps": EVERY, "keep_last": 2},
            "model": {"optim": {"lr": 5.0e-3, "sched": {"warmup_steps": 1, "min_lr": 1.0e-5}},
                      "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "alpha": 16}}}},
    }
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def start(recipe: Path, trace: Path, log: Path, hold_at: int | None = None) -> subprocess.Popen:
    trace.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ckpt.TRACE_HOLD_ENV)}
    env[ckpt.TRACE_DIR_ENV] = str(trace)
    if hold_at is not None:
        env[ckpt.TRACE_HOLD_ENV] = str(hold_at)
    return subprocess.Popen([RAYDPO, "train", str(recipe)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=recipe.parent, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"raydpo train did not finish in {WAIT_S} s:\n{log.read_text()[-3000:]}")
    return log.read_text()


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")
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


@pytest.fixture(scope="module")
def reference(workspace):
    """The uninterrupted run every failure run is compared with."""
    output = str(workspace / "out")
    log, trace = workspace / "reference.log", workspace / "trace-reference"
    proc = start(write_recipe(workspace, "reference", output), trace, log)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
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
    output = str(workspace / "out")
    log, trace = workspace / "worker-kill.log", workspace / "trace-worker-kill"
    proc = start(write_recipe(workspace, "worker-kill", output, max_failures=1), trace, log, hold_at=3)
    ray_train = f"{output}/worker-kill/ray_train"
    wait_for(lambda: held(trace) and checkpoint_step(ray_train) == 2, "a hold after step 3 with the step-2 "
             "checkpoint written", proc, log)
    victim = next(x["pid"] for x in reversed(trace_lines(trace)) if x["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]

    run_uri = f"{output}/worker-kill"
    summary = json.loads(storage.read_bytes(f"{run_uri}/summary.json"))
    assert summary["steps"] == summary["planned_steps"] == STEPS
    assert summary["worker_failures"] == 1
    assert summary["restarts"] == [{"at_step": 3, "resumed_from_step": 2, "steps_lost": 1}]
    rows = metrics(run_uri)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 3, 4, 5, 6, 7, 8]  # step 3 again
    lines = trace_lines(trace)
    rank1 = [(x["step"], x["pid"]) for x in lines if x["rank"] == 1]
    assert rank1[:3] == [(1, victim), (2, victim), (3, victim)]
    assert [s for s, _ in rank1[3:]] == [3, 4, 5, 6, 7, 8] and all(p != victim for _, p in rank1[3:])
    assert_continues_the_reference(train_losses(rows), sources_by_step(lines), reference)
    assert storage.exists(f"{run_uri}/model/adapter_model.safetensors")
    assert storage.exists(f"{run_uri}/manifest.json")


def test_a_killed_driver_reruns_from_the_latest_checkpoint_in_s3_through_a_server_restart(
        workspace, reference, s3_server):
    bucket = s3_server.make_bucket("resume-runs")
    recipe = write_recipe(workspace, "driver-kill", bucket, max_failures=0)
    run_uri = f"{bucket}/driver-kill"
    first_log, first_trace = workspace / "driver-kill-1.log", workspace / "trace-driver-kill-1"
    first = start(recipe, first_trace, first_log, hold_at=3)
    wait_for(lambda: held(first_trace) and checkpoint_step(f"{run_uri}/ray_train") == 2,
             "a hold after step 3 with the step-2 checkpoint in S3", first, first_log)
    run_processes = descendants(first.pid)  # the local Ray cluster this driver started: GCS, raylet, workers
    assert any("raylet" in " ".join(p.cmdline()) for p in run_processes)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    time.sleep(5)  # what Ray cleans up by itself when its driver dies
    for process in run_processes:  # the rest, as a lost pod would take them: by pid, nothing else
        try:
            process.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    psutil = pytest.importorskip("psutil")
    _, alive = psutil.wait_procs(run_processes, timeout=30)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"

    second_log, second_trace = workspace / "driver-kill-2.log", workspace / "trace-driver-kill-2"
    second = start(recipe, second_trace, second_log, hold_at=3)  # the same command, run again
    wait_for(lambda: held(second_trace), "the rerun's first step", second, second_log)
    s3_server.stop()  # the step-4 checkpoint goes up while the server is down ...
    (second_trace / "release").touch()
    wait_for(lambda: any(x["step"] == 4 for x in trace_lines(second_trace)), "step 4", second, second_log)
    time.sleep(2)
    s3_server.start()  # ... and lands once it is back: retried with back-off
    out = finish(second, second_log)
    assert second.returncode == 0, out[-3000:]

    assert "resuming from s3://resume-runs/driver-kill/ray_train/checkpoint_" in out
    assert f"step 2/{STEPS}, 32 pairs consumed" in out  # 2 steps × 2 workers × 2 micro-batches of 4 pairs ... per rank
    second_lines = trace_lines(second_trace)
    assert min(x["step"] for x in second_lines) == 3  # first new step = checkpoint step + 1
    assert {x["pid"] for x in second_lines}.isdisjoint({x["pid"] for x in trace_lines(first_trace)})
    summary = json.loads(storage.read_bytes(f"{run_uri}/summary.json"))
    assert summary["steps"] == STEPS and summary["resumed_from"]["step"] == 2
    rows = metrics(run_uri)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))  # the curve continues
    first_steps = {k: v for k, v in sources_by_step(trace_lines(first_trace)).items() if k[0] <= 2}
    assert_continues_the_reference(train_losses(rows), first_steps | sources_by_step(second_lines), reference)
    checkpoints = [u for u in storage.list_dirs(f"{run_uri}/ray_train") if "/checkpoint_" in u]
    assert checkpoints and all(ckpt.missing_parts(u) == [] for u in checkpoints)
    assert max(ckpt.read_state(u)["step"] for u in checkpoints) == 6
    assert storage.exists(f"{run_uri}/model/adapter_model.safetensors") and storage.exists(f"{run_uri}/manifest.json")


def test_a_bucket_that_disappears_stops_the_run_with_a_storage_error_naming_the_path(workspace, s3_server):
    bucket = s3_server.make_bucket("resume-gone")
    log, trace = workspace / "bucket-gone.log", workspace / "trace-bucket-gone"
    proc = start(write_recipe(workspace, "bucket-gone", bucket, max_failures=0), trace, log, hold_at=1)
    wait_for(lambda: held(trace), "the hold after step 1", proc, log)
    s3_server.remove_bucket("resume-gone")
    (trace / "release").touch()  # step 2 writes the first checkpoint
    out = finish(proc, log)
    assert proc.returncode == 4, out[-3000:]  # StorageError's exit code
    assert "storage error: could not upload checkpoint file" in out
    assert "s3://resume-gone/bucket-gone/ray_train/checkpoint_" in out
    assert "the bucket does not exist" in out
    assert "Traceback" not in out
