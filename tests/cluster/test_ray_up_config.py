"""The cluster launcher YAMLs: checks before `ray up`, the worker count that --replicas sets, small helpers."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cluster.ray_up import (check_cluster_config, config_problems, dashboard_port, ensure_local_token,
                              is_progress_line, load_cluster_yaml, ray_schema_problems, tail, with_replicas)
from core.errors import ClusterError, ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["cluster/local.yaml", "cluster/launcher_aws_gpu.yaml"])
def shipped(request):
    return request.param, load_cluster_yaml(ROOT / request.param)


def test_shipped_yamls_pass_our_checks_and_rays(shipped):
    label, config = shipped
    check_cluster_config(config, label)  # raises on any problem
    assert ray_schema_problems(config) == []


def test_aws_replicas_set_the_worker_type_and_nothing_else():
    config = load_cluster_yaml(ROOT / "cluster/launcher_aws_gpu.yaml")
    scaled = with_replicas(config, 6)
    gpu = scaled["available_node_types"]["ray.worker.gpu"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (6, 6)
    assert scaled["max_workers"] == 8  # was 8, still room for 6
    assert with_replicas(config, 12)["max_workers"] == 12
    untouched = copy.deepcopy(scaled)
    untouched["available_node_types"]["ray.worker.gpu"].update(min_workers=2, max_workers=2)
    assert untouched == config  # only the worker counts changed
    assert config["available_node_types"]["ray.worker.gpu"]["min_workers"] == 2  # the input is not modified


def test_local_replicas_need_enough_worker_ips():
    config = load_cluster_yaml(ROOT / "cluster/local.yaml")
    scaled = with_replicas(config, 1)
    assert (scaled["min_workers"], scaled["max_workers"]) == (1, 1)
    with pytest.raises(ClusterError, match="--replicas 3 needs 3 worker nodes, the local provider lists 2") as err:
        with_replicas(config, 3)
    assert "--replicas 2 or less" in err.value.fix
    with pytest.raises(ConfigError):
        with_replicas(config, 0)


def test_yaml_errors_are_listed_with_the_fix(tmp_path):
    config = load_cluster_yaml(ROOT / "cluster/launcher_aws_gpu.yaml")
    config["cluster_name"] = "My_Cluster"
    config["head_node_type"] = "ray.head.big"
    config["available_node_types"]["ray.worker.gpu"]["min_workers"] = 9
    assert config_problems(config) == [
        "cluster_name: 'My_Cluster' must be lowercase letters, digits and '-' (it names cloud resources)",
        "head_node_type: 'ray.head.big' is not one of available_node_types ['ray.head.default', 'ray.worker.gpu']",
        "available_node_types: raydpo scales exactly one worker node type, found 2 (ray.head.default, "
        "ray.worker.gpu); keep one",
        "available_node_types.ray.worker.gpu: min_workers 9 > max_workers 2",
    ]
    with pytest.raises(ClusterError) as err:
        check_cluster_config(config, "bad.yaml")
    assert err.value.what == "bad.yaml: 4 problem(s) in the cluster YAML"
    assert err.value.exit_code != 0


def test_rays_own_schema_catches_what_our_checks_do_not():
    config = load_cluster_yaml(ROOT / "cluster/local.yaml")
    config["head_start_ray_commands"] = "ray start --head"  # a string, where Ray wants a list
    assert config_problems(config) == []
    problems = ray_schema_problems(config)
    assert len(problems) == 1 and "head_start_ray_commands" in problems[0] and "array" in problems[0]


def test_unreadable_yaml_says_where(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("cluster_name: x\nprovider:\n  type: aws\n bad-indent: 1\n")
    with pytest.raises(ClusterError, match=r"c.yaml:4:\d+: the cluster YAML is not valid YAML"):
        load_cluster_yaml(bad)
    with pytest.raises(ClusterError, match="not found"):
        load_cluster_yaml(tmp_path / "missing.yaml")


def test_dashboard_port_comes_from_the_head_command():
    assert dashboard_port(load_cluster_yaml(ROOT / "cluster/local.yaml")) == 8266
    assert dashboard_port({"head_start_ray_commands": ["ray start --head"]}) == 8265


@pytest.mark.parametrize("line, progress", [
    ("step 3/40 | loss 0.6931 | reward acc 0.50 | margin +0.000 | 812 tok/s | ETA 1m02s", True),
    ("validation @ step 4 | loss 0.6 | reward acc 0.5 | margin +0.1", False),
    ("stepping up", False),
])
def test_progress_lines(line, progress):
    assert is_progress_line(line) is progress


def test_local_token_is_made_from_the_environment(tmp_path):
    token = tmp_path / "token"
    ensure_local_token({"file_mounts": {"~/.ray/auth_token": str(token)}}, {"RAY_AUTH_TOKEN": "abc123"})
    assert token.read_text() == "abc123" and oct(token.stat().st_mode & 0o777) == "0o600"
    ensure_local_token({"file_mounts": {"~/.ray/auth_token": str(token)}}, {"RAY_AUTH_TOKEN": "other"})
    assert token.read_text() == "abc123"  # an existing token is kept: the running cluster uses it
    ensure_local_token({"file_mounts": {}}, {})  # no token mount: nothing to do


def test_tail_shows_the_error_lines(tmp_path):
    log = tmp_path / "l.log"
    log.write_text("INFO starting\n\x1b[31mERR updater.py -- SSH command failed.\x1b[39m\nINFO more\n")
    assert tail(log) == ["ERR updater.py -- SSH command failed."]
    log.write_text("a\nb\n")
    assert tail(log) == ["a", "b"]
