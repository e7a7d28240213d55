"""`raydpo k8s render/check`: manifests validated against KubeRay's own CRD schemas (../shared/k8s-schemas) and
against the operator's rules that the schemas cannot express."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cluster import kuberay
from cluster.k8s_checks import manifest_problems, name_problems, operator_problems, schema_problems
from core.config import Recipe, Run
from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]
S3 = ["run.data_s3_path=s3://bucket/dpo/train.jsonl", "run.output_s3_path=s3://bucket/dpo/runs"]


def render(tmp_path, *args) -> list[dict]:
    out = tmp_path / "out.yaml"
    assert main(["k8s", "render", "recipes/reference.yaml", *S3, *args, "-o", str(out)]) == 0
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


def by_kind(manifests, kind):
    (found,) = [m for m in manifests if m["kind"] == kind]
    return found


def test_rayjob_follows_replicas_and_passes_the_crd_schema(tmp_path, schemas, monkeypatch):
    monkeypatch.chdir(ROOT)
    manifests = render(tmp_path, "--replicas", "4", "--image", "registry.example/raydpo:0.1.0-gpu")
    assert manifest_problems(manifests, schemas) == []
    job, configmap = by_kind(manifests, "RayJob"), by_kind(manifests, "ConfigMap")
    spec = job["spec"]
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 4)
    assert spec["entrypoint"] == "raydpo train /home/ray/raydpo/recipe.yaml --replicas 4"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 300
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 0
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    # the recipe in the ConfigMap is the resolved one, with replicas 4, and the head mounts it where the
    # entrypoint reads it
    recipe = yaml.safe_load(configmap["data"]["recipe.yaml"])
    assert recipe["run"]["replicas"] == 4 and recipe["training_config"]["global_batch_size"] == 8
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"] == [{"name": "recipe", "configMap": {"name": configmap["metadata"]["name"]}}]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/home/ray/raydpo"
    # credentials: by reference to the Secret only
    env = {e["name"]: e for e in worker["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
        "name": "raydpo-object-storage", "key": "AWS_SECRET_ACCESS_KEY"}}}
    assert all("value" not in e for e in worker["env"])


def test_cpu_image_raycluster_has_no_gpus(tmp_path, schemas, monkeypatch):
    monkeypatch.chdir(ROOT)
    manifests = render(tmp_path, "--kind", "raycluster", "--image", "raydpo:0.1.0-cpu", "--replicas", "2",
                       "--secret", "none", "--token-secret", "none", "--worker-memory", "12Gi")
    assert manifest_problems(manifests, schemas) == []
    cluster = by_kind(manifests, "RayCluster")
    assert cluster["metadata"]["name"] == "my-dpo-run-cluster"
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"cpu": "4", "memory": "12Gi"}
    assert "env" not in worker


def test_replicas_that_cannot_split_the_batch_name_those_that_can(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["k8s", "render", "recipes/reference.yaml", *S3, "--replicas", "16", "-o",
                 str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "use 1..8 replicas, or make global_batch_size 16 or more" in err
    assert not (tmp_path / "x.yaml").exists()


def test_local_paths_are_refused_for_pods(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["k8s", "render", "recipes/reference.yaml", "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "run.data_s3_path" in err and "run.output_s3_path" in err and "s3://" in err


def test_a_name_kuberay_refuses_is_reported_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    name = "a" * 48  # KubeRay: RayJob names at most 47 (it appends 6 characters for its cluster, limit 53)
    assert main(["k8s", "render", "recipes/reference.yaml", *S3, "--name", name, "-o",
                 str(tmp_path / "x.yaml")]) == 2
    assert "is 48 characters; KubeRay allows at most 47" in capsys.readouterr().err


@pytest.mark.parametrize("name, kind, ok", [
    ("dpo-run-1", "RayJob", True),
    ("1-dpo", "RayJob", False),        # DNS-1035: starts with a letter
    ("dpo_run", "RayJob", False),
    ("Dpo", "RayCluster", False),
    ("a" * 53, "RayCluster", True),
    ("a" * 54, "RayCluster", False),
    ("1-recipe.v2", "ConfigMap", True),  # DNS-1123 subdomain
    ("recipe-", "ConfigMap", False),
])
def test_name_rules(name, kind, ok):
    assert (name_problems(kind, name) == []) is ok


def base_job() -> list[dict]:
    opts = kuberay.K8sOptions(name="run", replicas=2, image="raydpo:0.1.0-gpu",
                              worker=kuberay.PodSize(cpus=8, memory="64Gi", gpus=1))
    recipe = Recipe(run=Run(name="run", model_name_or_path="org/model", data_s3_path="s3://b/train.jsonl",
                            output_s3_path="s3://b/runs"))
    return kuberay.render_rayjob(recipe, opts)


def test_operator_rules_the_schema_cannot_check(schemas):
    configmap, job = base_job()
    assert operator_problems(job, [configmap, job]) == []

    bad = copy.deepcopy(job)
    bad["spec"]["submissionMode"] = "BatchMode"
    bad["spec"]["shutdownAfterJobFinishes"] = False
    bad["spec"]["activeDeadlineSeconds"] = 0
    env = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env[1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "inline-secret"}
    bad["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "disabled"}
    assert schema_problems(bad, schemas) == []  # all of it passes the CRD schema...
    problems = operator_problems(bad, [configmap, bad])
    assert problems == [  # ...and each is caught here
        "RayJob spec.submissionMode 'BatchMode' is not one of K8sJobMode, HTTPMode, InteractiveMode, SidecarMode",
        "RayJob spec.ttlSecondsAfterFinished is set but shutdownAfterJobFinishes is not true: the TTL only applies "
        "to a cluster that is shut down after the job",
        "RayJob spec.activeDeadlineSeconds must be > 0, got 0",
        "RayJob spec.rayClusterSpec: AWS_SECRET_ACCESS_KEY is written inline in container 'ray-worker'; credentials "
        "must come from a Secret (valueFrom.secretKeyRef)",
        "RayJob spec.rayClusterSpec.authOptions.mode: must be 'token' (Ray token authentication stays on)",
    ]
    assert any("ConfigMap 'run-recipe'" in p for p in operator_problems(job, [job, {"kind": "RayJob"}]))


def test_schema_catches_type_errors(schemas):
    configmap, job = base_job()
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    problems = schema_problems(bad, schemas)
    assert len(problems) == 2
    assert any("shutdownAfterJobFinishes: 'yes' is not of type 'boolean'" in p for p in problems)
    assert any("workerGroupSpecs.0.replicas: 'two' is not of type 'integer'" in p for p in problems)


def test_committed_examples_pass_the_checks(schemas, capsys):
    files = sorted((ROOT / "k8s").glob("*.yaml"))
    assert {f.name for f in files} >= {"rayjob.yaml", "raycluster.yaml"}
    assert main(["k8s", "check", *map(str, files), "--schemas", str(schemas)]) == 0
    kinds = {m["kind"] for f in files for m in yaml.safe_load_all(f.read_text()) if m}
    assert kinds == {"ConfigMap", "RayJob", "RayCluster"}


def test_check_reports_problems_with_exit_code_1(tmp_path, schemas, capsys):
    configmap, job = base_job()
    job["spec"]["submissionMode"] = "Nope"
    path = tmp_path / "bad.yaml"
    path.write_text(kuberay.dump_all([configmap, job]))
    assert main(["k8s", "check", str(path), "--schemas", str(schemas)]) == 1
    assert "submissionMode 'Nope'" in capsys.readouterr().out


def test_gpu_image_detection():
    assert kuberay.is_gpu_image("rayproject/ray:2.60.0-py311-gpu")
    assert kuberay.is_gpu_image("reg.io:5000/raydpo:1.0-cu128")
    assert not kuberay.is_gpu_image("rayproject/ray:2.60.0-py311")
    assert not kuberay.is_gpu_image("reg.io:5000/raydpo")  # the registry's port is not a tag


def test_worker_pods_have_a_memory_backed_dev_shm_and_memory_that_grows_with_their_gpus(tmp_path, schemas,
                                                                                          monkeypatch):
    monkeypatch.chdir(ROOT)
    manifests = render(tmp_path, "--replicas", "2", "--image", "registry.example/raydpo:0.1.0-gpu",
                       "--gpus-per-worker", "8")
    assert manifest_problems(manifests, schemas) == []
    pod = by_kind(manifests, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # 8 GPUs: 8 x (8 CPUs, 64Gi), not one GPU's share
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    flagged = render(tmp_path, "--replicas", "2", "--image", "registry.example/raydpo:0.1.0-gpu",
                     "--gpus-per-worker", "8", "--worker-memory", "1000Gi", "--worker-cpus", "90")
    pod = by_kind(flagged, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "90", "memory": "1000Gi", "nvidia.com/gpu": "8"}


def test_worker_size_defaults():
    assert kuberay.worker_size(0) == kuberay.PodSize(cpus=4, memory="16Gi", gpus=0)
    assert kuberay.worker_size(1) == kuberay.PodSize(cpus=8, memory="64Gi", gpus=1)
    assert kuberay.worker_size(4, memory="180Gi") == kuberay.PodSize(cpus=32, memory="180Gi", gpus=4)
