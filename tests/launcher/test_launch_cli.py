"""`raydpo launch`: what it checks before `ray up`, and what it hands the launcher (the real `ray up` run is in
tests/cluster/test_ray_up_local.py)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

import cluster.ray_up
from launcher.cli import main
from core.errors import ClusterError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """run_on_new_cluster replaced: records its arguments, "fetches" a summary.json, and succeeds."""
    seen = []

    def fake(config, **kwargs):
        seen.append({"config": config, **kwargs})
        for local in (kwargs.get("fetch") or {}).values():
            Path(local).write_text(json.dumps({"steps": 5, "planned_steps": 5, "run_uri": "x"}))
        return {"job_id": "raysubmit_1", "status": "SUCCEEDED", "message": ""}

    monkeypatch.setattr(cluster.ray_up, "run_on_new_cluster", fake)
    monkeypatch.chdir(ROOT)
    return seen


def test_launch_hands_the_scaled_cluster_and_the_train_command_to_the_launcher(calls, capsys):
    code = main(["launch", "recipes/reference.yaml", "dpo_cfg.beta=0.05", "--cluster", "cluster/local.yaml",
                 "--replicas", "2", "--keep-cluster"])
    assert code == 0
    (call,) = calls
    assert (call["config"]["min_workers"], call["config"]["max_workers"]) == (2, 2)
    assert call["replicas"] == 2 and call["keep_cluster"] is True
    assert call["working_dir"] == ROOT
    words = shlex.split(call["entrypoint"])
    assert words[:7] == ["python", "-m", "launcher.cli", "train", "recipes/reference.yaml", "--replicas", "2"]
    assert "dpo_cfg.beta=0.05" in words
    # a local output folder goes as an absolute path, and its summary.json is fetched before `ray down`
    assert f"run.output_s3_path={ROOT / 'outputs'}" in words
    (remote,) = call["fetch"]
    assert remote == f"{ROOT / 'outputs'}/my-dpo-run/summary.json"
    out = capsys.readouterr().out
    assert "job raysubmit_1 succeeded" in out
    assert 'summary: {"steps": 5, "planned_steps": 5, "run_uri": "x"}' in out


def test_replicas_that_cannot_split_the_batch_stop_before_any_cluster(calls, capsys):
    assert main(["launch", "recipes/reference.yaml", "--cluster", "cluster/local.yaml", "--replicas", "16"]) == 2
    assert "use 1..8 replicas, or make global_batch_size 16 or more" in capsys.readouterr().err
    assert calls == []


def test_more_replicas_than_the_local_cluster_has_nodes(calls, capsys):
    assert main(["launch", "recipes/reference.yaml", "--cluster", "cluster/local.yaml", "--replicas", "4"]) == 3
    err = capsys.readouterr().err
    assert "--replicas 4 needs 4 worker nodes, the local provider lists 2 worker_ips" in err
    assert calls == []


def test_a_broken_cluster_yaml_is_reported_before_ray_up(calls, capsys, tmp_path):
    config = yaml.safe_load((ROOT / "cluster/launcher_aws_gpu.yaml").read_text())
    config["available_node_types"]["ray.worker.cpu"] = {"node_config": {}, "resources": {}}
    config["cluster_name"] = "Bad Name"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["launch", "recipes/reference.yaml", "--cluster", str(path)]) == 3
    err = capsys.readouterr().err
    assert "2 problem(s) in the cluster YAML" in err
    assert "cluster_name: 'Bad Name'" in err and "exactly one worker node type, found 2" in err
    assert "fix:" in err
    assert calls == []


def test_missing_cluster_option(calls, capsys):
    assert main(["launch", "recipes/reference.yaml"]) == 2
    assert "raydpo launch needs --cluster YAML" in capsys.readouterr().err


def test_recipe_outside_the_working_dir(calls, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes/reference.yaml").read_text())
    assert main(["launch", str(recipe), "--cluster", "cluster/local.yaml", "--replicas", "1"]) == 2
    assert "is outside the working dir" in capsys.readouterr().err
    assert calls == []


def test_a_failed_job_is_a_cluster_error_with_exit_code_3(monkeypatch, capsys):
    def failing(config, **kwargs):
        raise ClusterError("job raysubmit_2 failed on the cluster", why="Job entrypoint command failed with exit "
                           "code 2", fix="read the log above")

    monkeypatch.setattr(cluster.ray_up, "run_on_new_cluster", failing)
    monkeypatch.chdir(ROOT)
    assert main(["launch", "recipes/reference.yaml", "--cluster", "cluster/local.yaml", "--replicas", "2"]) == 3
    err = capsys.readouterr().err
    assert "cluster error: job raysubmit_2 failed on the cluster" in err and "fix: read the log above" in err


def test_local_paths_are_refused_for_a_cluster_of_several_machines(calls, capsys):
    # the AWS launcher YAML: head and workers are separate machines, so outputs/ and a local data file are not shared
    assert main(["launch", "recipes/reference.yaml", "--cluster", "cluster/launcher_aws_gpu.yaml",
                 "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "local paths, which the cluster's other nodes cannot reach" in err
    assert "run.output_s3_path:" in err and "is a path on this machine" in err and "s3://bucket/runs" in err
    assert calls == []


def test_object_storage_paths_pass_on_a_cluster_of_several_machines(calls):
    assert main(["launch", "recipes/reference.yaml", "--cluster", "cluster/launcher_aws_gpu.yaml", "--replicas", "2",
                 "run.data_s3_path=s3://b/train.jsonl", "run.output_s3_path=s3://b/runs"]) == 0
    assert len(calls) == 1


def test_one_machine_is_a_local_provider_on_loopback_addresses_only():
    from launcher.commands.launch import one_machine

    local = yaml.safe_load((ROOT / "cluster/local.yaml").read_text())
    assert one_machine(local)
    local["provider"]["worker_ips"] = ["127.0.0.2", "10.0.0.7"]  # one real machine among them
    assert not one_machine(local)
    local["provider"]["worker_ips"] = ["worker-1.example"]
    assert not one_machine(local)
    assert not one_machine(yaml.safe_load((ROOT / "cluster/launcher_aws_gpu.yaml").read_text()))
