"""A KubeRay RayJob retry, or a resubmission on a cluster of another size: the rendered job's entrypoint, run as the
head pod runs it (the ConfigMap's recipe where the RayJob mounts it), against the local S3 server. The first attempt
on 2 workers dies after the step-2 checkpoint reached object storage, its Ray cluster with it (a lost cluster); the
job rendered for 1 worker runs the same command and goes on from that checkpoint, resharded (training/reshard.py):
every pair of the epoch trained once, none twice.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from core import storage
from launcher.cli import main
from tests.s3server import s3_server  # noqa: F401 - fixture
from tests.training.test_resume import (PAIRS, RAYDPO, STEPS, Run, checkpoint_step, descendants, held, still_running,
                                        trace_lines, write_recipe)
from cluster import kuberay

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # `make test-faults`


def rendered(recipe: Path, replicas: int, folder: Path) -> tuple[str, str]:
    """(the RayJob's entrypoint, the ConfigMap's recipe text) as `raydpo k8s render` writes them."""
    out = folder / f"job-{replicas}.yaml"
    assert main(["k8s", "render", str(recipe), "--replicas", str(replicas), "--backoff-limit", "2",
                 "-o", str(out)]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert job["spec"]["backoffLimit"] == 2
    return job["spec"]["entrypoint"], configmap["data"][kuberay.RECIPE_FILE]


class PodRun(Run):
    """The head pod's command: the RayJob's entrypoint word for word, with the ConfigMap mounted in a local folder
    instead of RECIPE_DIR."""

    def __init__(self, entrypoint: str, text: str, folder: Path, trace: Path, hold_at: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / kuberay.RECIPE_FILE).write_text(text)
        self.words = shlex.split(entrypoint.replace(kuberay.RECIPE_DIR, str(folder)))
        assert self.words[:3] == ["raydpo", "train", str(folder / kuberay.RECIPE_FILE)]
        self.words[0] = RAYDPO
        super().__init__(folder / kuberay.RECIPE_FILE, trace, folder / "pod.log", hold_at=hold_at)

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.words, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.recipe.parent, start_new_session=True)


def kill_with_its_cluster(run: Run) -> None:
    """The driver and the local Ray cluster it started, by pid, as a lost head pod takes them."""
    processes = descendants(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.proc.wait(timeout=30)
    time.sleep(5)
    for process in processes:
        try:
            process.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    deadline = time.time() + 30
    while [p for p in processes if still_running(p)] and time.time() < deadline:
        time.sleep(0.5)


def test_a_rayjob_rerun_on_another_cluster_size_continues_from_the_newest_complete_checkpoint(
        tmp_path, s3_server, monkeypatch):
    from core.data.synthetic import answer_format_pairs
    from tests.tiny import build_tiny_model_dir

    bucket = s3_server.make_bucket("rayjob-retry")
    build_tiny_model_dir(tmp_path / "model")
    storage.upload_dir(str(tmp_path / "model"), f"{bucket}/models/tiny")
    storage.write_bytes(f"{bucket}/data/train.jsonl", "".join(
        json.dumps(row) + "\n" for row in answer_format_pairs(PAIRS, seed=1)).encode())
    recipe = write_recipe(tmp_path, "retry", f"{bucket}/runs", max_failures=0)
    tree = yaml.safe_load(recipe.read_text())
    tree["run"] |= {"model_name_or_path": f"{bucket}/models/tiny", "data_s3_path": f"{bucket}/data/train.jsonl"}
    tree["training_config"]["model"]["peft"]["lora_tuning"]["adapter_dropout"] = 0.0
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    run_uri = f"{bucket}/runs/retry"

    # attempt 1: the job rendered for 2 replicas, lost after its step-2 checkpoint landed
    entry, text = rendered(recipe, 2, tmp_path)
    assert entry.endswith("--replicas 2")
    first_trace = tmp_path / "trace-first"
    first = PodRun(entry, text, tmp_path / "pod-1", first_trace, hold_at=3)
    first.wait_for(lambda: held(first_trace) and checkpoint_step(f"{run_uri}/ray_train") == 2,
                   "a hold after step 3 with the step-2 checkpoint in S3")
    kill_with_its_cluster(first)

    # attempt 2: the same command on a cluster of 1 worker (the job rendered again for 1 replica)
    entry, text = rendered(recipe, 1, tmp_path)
    assert entry.endswith("--replicas 1")
    second_trace = tmp_path / "trace-second"
    second = PodRun(entry, text, tmp_path / "pod-2", second_trace)
    out = second.finish()
    assert second.proc.returncode == 0, out[-3000:]
    assert "resuming from s3://rayjob-retry/runs/retry/ray_train/checkpoint_" in out
    assert f"step 2/{STEPS}, 16 pairs consumed" in out
    assert "the checkpoint was written by 2 worker(s), this run has 1" in out

    first_lines = [x for x in trace_lines(first_trace) if x["step"] <= 2]
    second_lines = trace_lines(second_trace)
    assert sorted({x["step"] for x in second_lines}) == list(range(3, STEPS + 1))
    trained = [s for x in first_lines + second_lines for s in x["sources"]]
    assert len(trained) == PAIRS == len(set(trained))  # the epoch: each pair once, none twice, none skipped
    summary = json.loads(storage.read_bytes(f"{run_uri}/summary.json"))
    assert summary["steps"] == STEPS and summary["resumed_from"]["step"] == 2
    lost = max(x["step"] for x in trace_lines(first_trace)) - 2
    print(f"failure-record: RayJob attempt on 2 workers lost with its cluster after step 3; the job rendered for 1 "
          f"worker, same command | survived: {summary['steps']}/{STEPS} steps | went on from the step-2 checkpoint "
          f"in S3, resharded 2 -> 1 | steps lost: {lost}")
