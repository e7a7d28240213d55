"""`ray job submit --working-dir .` against a `ray start --head` cluster, with the real `ray` CLI, token auth on.

The job runs this checkout's code on the cluster (cluster.session from the uploaded working dir) and shows that a
Ray job's entrypoint uses the cluster it runs in (started_here false) rather than starting one of its own.
"""
from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time

import pytest
import yaml

from tests.cluster.headnode import BIN, ROOT_OF_REPO, SHARED_CPUS as HEAD_CPUS

JOB = textwrap.dedent("""
    import json, tempfile
    from pathlib import Path
    import ray
    from cluster.session import ray_session
    with ray_session(num_cpus=None, num_gpus=None, log_file=Path(tempfile.mkdtemp()) / "ray.log") as info:
        squares = ray.get([ray.remote(lambda x: x * x).remote(i) for i in range(5)])
        print("JOB-RESULT " + json.dumps({"info": info, "squares": squares}))
""")


@pytest.fixture(scope="module")
def head(ray_cluster):
    """The tests' shared head (conftest.py); that it is stopped, port and processes, is checked when it stops."""
    return ray_cluster


def submit(head, *entrypoint: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = head.client_env() if token is None else head.client_env(RAY_AUTH_TOKEN=token)
    for _ in range(20):
        run = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir",
                              ".", "--", *entrypoint], cwd=ROOT_OF_REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        # A head that has just started may not have its job agent yet; Ray says to try again.
        if "No available agent to submit job" not in run.stderr + run.stdout:
            return run
        time.sleep(5)
    return run


@pytest.mark.slow
def test_ray_job_submit_runs_the_working_dir_on_the_head(head):
    run = submit(head, "python", "-c", JOB)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("JOB-RESULT "))
    result = json.loads(line.removeprefix("JOB-RESULT "))
    assert result["squares"] == [0, 1, 4, 9, 16]
    assert result["info"]["started_here"] is False  # inside a Ray job: the cluster's, not a new one
    assert result["info"]["resources"]["CPU"] == HEAD_CPUS  # this head's --num-cpus
    assert "succeeded" in run.stdout
    assert head.process.poll() is None  # the job left the cluster running


@pytest.mark.slow
def test_ray_job_submit_without_the_token_is_refused(head):
    run = submit(head, "python", "-c", "print('should not run')", token="wrong-token")
    said = run.stdout + run.stderr
    assert run.returncode != 0
    # the dashboard's answer to a wrong token (HTTP 403), not some other failure (no agent, no cluster, a timeout)
    assert "Authentication failed" in said and "authentication token is invalid or incorrect" in said, said[-3000:]
    # and no job was made of it: the cluster's own job list, read with the right token, does not hold it
    listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.dashboard_url], cwd=ROOT_OF_REPO,
                            env=head.client_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-3000:]
    assert "should not run" not in listed.stdout


@pytest.mark.slow
def test_ray_job_submit_raydpo_train_runs_the_recipe_on_the_cluster(head, tmp_path):
    """The README's command: `ray job submit --address URL --working-dir . -- raydpo train RECIPE --replicas 2`."""
    from tests.tiny import build_tiny_model_dir
    from core.data.synthetic import answer_format_pairs

    model_dir = build_tiny_model_dir(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answer_format_pairs(32, 3)))
    recipe = tmp_path / "job.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "job-run", "model_name_or_path": str(model_dir), "replicas": 1,
                "data_s3_path": str(tmp_path / "data"), "output_s3_path": str(tmp_path / "out")},
        "training_config": {"max_length": 128, "global_batch_size": 8, "data": {"validation_fraction": 0.0},
                            "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                                      "peft": {"peft_scheme": "lora"}}}}))
    run = submit(head, "raydpo", "train", str(recipe), "--replicas", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "succeeded" in run.stdout
    # the run joined this head's cluster (its GCS port) instead of starting one of its own
    assert re.search(rf"cluster: [\d.]+:{head.gcs_port}, 1 node\(s\)", run.stdout), run.stdout[-3000:]
    assert "started here" not in run.stdout
    summary = json.loads((tmp_path / "out" / "job-run" / "summary.json").read_text())
    assert summary["plan"]["workers"] == 2  # --replicas 2 overrode the recipe's 1
    assert summary["steps"] == summary["planned_steps"] == 4  # 32 pairs / 8 per step
    assert (tmp_path / "out" / "job-run" / "model" / "adapter_model.safetensors").exists()
    assert head.process.poll() is None  # the run used the cluster and left it running
