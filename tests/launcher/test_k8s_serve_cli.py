"""`raydpo k8s render RUN --kind rayservice`: a KubeRay RayService valid against the RayService CRD schema
(../shared/k8s-schemas) and whose serveConfigV2 passes Ray Serve's own ServeDeploySchema."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.k8s_checks import manifest_problems
from cluster.rayservice import rayservice_problems, serve_config, serve_config_problems, with_serve_config
from launcher.commands.k8s_serve import service_name
from launcher.cli import main

RUNS = ["s3://bucket/runs/hh-lora", "s3://bucket/runs/hh-lora-beta0.5"]


def render(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "service.yaml"
    assert main(["k8s", "render", *RUNS, "--kind", "rayservice", "--image", "registry.example/raydpo:0.1.0-gpu",
                 *args, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Rendered by: raydpo k8s render")
    (service,) = [d for d in yaml.safe_load_all(text) if d]
    return service


def test_rayservice_serves_every_run_autoscales_to_replicas_and_passes_the_crd(tmp_path, schemas):
    service = render(tmp_path, "--replicas", "3")
    assert service["kind"] == "RayService"
    assert manifest_problems([service], schemas) == []
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:build_app"
    assert app["args"]["models"] == RUNS
    assert (app["args"]["min_replicas"], app["args"]["max_replicas"]) == (1, 3)
    assert app["args"]["device"] == "cuda" and app["args"]["num_gpus"] >= 1
    cluster = service["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]


def test_the_crd_schema_check_catches_a_wrong_field(tmp_path, schemas):
    from cluster.k8s_checks import schema_problems

    service = render(tmp_path)
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "three"
    service["spec"]["serveConfigV2"] = 5
    problems = schema_problems(service, schemas)
    assert any("workerGroupSpecs.0.maxReplicas" in p for p in problems)
    assert any("serveConfigV2" in p for p in problems)


def test_one_replica_does_not_autoscale(tmp_path, schemas):
    service = render(tmp_path)
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert manifest_problems([service], schemas) == []


def test_local_runs_are_refused_with_exit_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "service.yaml"
    assert main(["k8s", "render", "./outputs/run", "--kind", "rayservice", "--image", "x:1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "./outputs/run is a local path" in err and "s3://" in err
    assert not out.exists()


def test_serve_config_errors_are_caught_before_kubectl():
    good = serve_config(RUNS, replicas=2, gpus_per_replica=1)
    assert serve_config_problems(yaml.safe_dump(good)) == []
    bad = dict(good, applications=[dict(good["applications"][0], route_prefix=5)])
    assert serve_config_problems(yaml.safe_dump(bad))
    assert serve_config_problems("applications: [") and "not YAML" in serve_config_problems("applications: [")[0]


def test_operator_rules_name_length_and_local_model_paths():
    service = {"metadata": {"name": "x" * 41}, "spec": {"serveConfigV2": ""}}
    problems = rayservice_problems(service)
    assert any("41 characters" in p for p in problems) and any("serveConfigV2 is empty" in p for p in problems)
    local = with_serve_config({"metadata": {"name": "ok"}, "spec": {}},
                              serve_config(["/home/me/run"], replicas=1, gpus_per_replica=0))
    assert any("'/home/me/run' is a path on this machine" in p for p in rayservice_problems(local))


@pytest.mark.parametrize("runs,name", [(["s3://b/runs/HH_LoRA"], "hh-lora-serve"),
                                       (["s3://b/runs/7b"], "serve-7b-serve")])
def test_service_names_are_dns_labels(runs, name):
    assert service_name(runs) == name
