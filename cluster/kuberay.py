"""KubeRay manifests for a recipe: a RayJob that makes its cluster for the run and deletes it after, the recipe in
a ConfigMap, and a RayCluster for interactive use. Pure functions from the typed recipe (core/config.py) and the
options to plain dicts.

Replicas are worker pods, one per replica (a replica is a node): `--replicas N` sets the worker group's replicas
(min = max = N: a training run neither grows nor shrinks). The head pod runs the job's driver and no training
(num-cpus 0). Object-storage credentials come from a Secret by reference (secretKeyRef), never inline. Token
authentication is on through `authOptions: {mode: token}` (KubeRay >= 1.5.1, Ray >= 2.52): the operator makes a
Secret with a random token and sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in every Ray container, the submitter's too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from core.config import Recipe, as_dict
from core.tracking import redacted, without_credentials

RAY_VERSION = "2.60.0"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
RECIPE_DIR = "/home/ray/raydpo"  # where the ConfigMap's recipe.yaml appears in the head pod
RECIPE_FILE = "recipe.yaml"
WORKER_GROUP = "replicas"
# Object-storage settings read from the Secret: (environment variable, key in the Secret, required)
SECRET_KEYS = (
    ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", True),
    ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", True),
    ("AWS_SESSION_TOKEN", "AWS_SESSION_TOKEN", False),
    ("AWS_DEFAULT_REGION", "AWS_DEFAULT_REGION", False),
    ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL", False),  # S3-compatible stores (MinIO, ...)
)
# Hub and MLflow tokens, read from a second Secret, each optional (the recipe never holds them): (variable, key)
TOKEN_KEYS = (("HF_TOKEN", "HF_TOKEN"), ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME"),
              ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD"), ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_TOKEN"))
# KubeRay's own limits: it appends 6 characters to a RayJob's name for its RayCluster, whose name must fit 53.
MAX_RAYJOB_NAME, MAX_RAYCLUSTER_NAME = 47, 53


SHM_VOLUME = "dshm"
# per-GPU share of a GPU node (p4d/p5: 96-192 vCPUs and 1.1-2 TiB for 8 GPUs; g5.12xlarge: 48 vCPUs, 192 GiB for 4)
CPUS_PER_GPU, MEMORY_GI_PER_GPU = 8, 64
CPU_POD = (4, "16Gi")


@dataclass(frozen=True)
class PodSize:
    cpus: int
    memory: str      # a Kubernetes quantity, e.g. "32Gi"
    gpus: int = 0


@dataclass(frozen=True)
class K8sOptions:
    name: str                      # the RayJob's name (the recipe's run.name by default)
    replicas: int
    image: str
    worker: PodSize
    head: PodSize = PodSize(cpus=2, memory="8Gi")
    namespace: str | None = None
    secret: str | None = "raydpo-object-storage"   # None: no credentials (e.g. IAM roles for service accounts)
    service_account: str | None = None
    submission_mode: str = "K8sJobMode"
    active_deadline_s: int = 24 * 3600
    backoff_limit: int = 0         # a DPO run retried from scratch would redo hours of GPU time: retry by hand
    ttl_after_finished_s: int = 300
    token_secret: str | None = "raydpo-tokens"   # HF_TOKEN, MLFLOW_TRACKING_*; None: no such Secret


def worker_size(gpus: int, cpus: int | None = None, memory: str | None = None) -> PodSize:
    """A worker pod's size: what --worker-cpus/--worker-memory say, else a share of the node that grows with its
    GPUs (a pod of 8 GPUs loads 8 workers' model shards and data: 64 CPUs, 512Gi, not one GPU's 8 and 64Gi)."""
    default_cpus, default_memory = (CPUS_PER_GPU * gpus, f"{MEMORY_GI_PER_GPU * gpus}Gi") if gpus else CPU_POD
    return PodSize(cpus=cpus or default_cpus, memory=memory or default_memory, gpus=gpus)


def is_gpu_image(image: str) -> bool:
    """Ray's images name their CUDA variants in the tag: 2.60.0-py311-gpu, 2.60.0-py311-cu128."""
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    return bool(re.search(r"(^|-)(gpu|cu\d+)($|-)", tag))


def recipe_configmap(name: str, recipe: Recipe, namespace: str | None = None) -> dict:
    # a password in a URI (run.mlflow_tracking_uri) stays out of the ConfigMap: the pods read it from token_secret
    text = yaml.safe_dump(redacted(as_dict(recipe), without_credentials), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=120)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(f"{name}-recipe", name, namespace),
            "data": {RECIPE_FILE: text}}


def entrypoint(replicas: int) -> str:
    return f"raydpo train {RECIPE_DIR}/{RECIPE_FILE} --replicas {replicas}"


def ray_cluster_spec(opts: K8sOptions, configmap: str) -> dict:
    head_container = {
        "name": "ray-head", "image": opts.image,
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}],
        "resources": _resources(opts.head),
        "env": _secret_env(opts.secret) + _token_env(opts.token_secret),
        "volumeMounts": [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}],
    }
    worker_container = {
        "name": "ray-worker", "image": opts.image,
        "resources": _resources(opts.worker),
        "env": _secret_env(opts.secret) + _token_env(opts.token_secret),
    }
    head_pod = {"containers": [_drop_empty(head_container)],
                "volumes": [{"name": "recipe", "configMap": {"name": configmap}}]}
    # /dev/shm as a memory-backed volume: a container's own is 64 MB, too small for NCCL's shared-memory transport
    # between the GPUs of one pod (it fails or falls back to slower paths) and for Ray's object store. It counts
    # against the pod's memory limit, so no sizeLimit of its own.
    worker_container["volumeMounts"] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    worker_pod = {"containers": [_drop_empty(worker_container)],
                  "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]}
    if opts.service_account:
        head_pod["serviceAccountName"] = worker_pod["serviceAccountName"] = opts.service_account
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": head_pod}},
        "workerGroupSpecs": [{
            "groupName": WORKER_GROUP,
            "replicas": opts.replicas, "minReplicas": opts.replicas, "maxReplicas": opts.replicas,
            "rayStartParams": {},
            "template": {"spec": worker_pod},
        }],
    }


def render_rayjob(recipe: Recipe, opts: K8sOptions) -> list[dict]:
    """[ConfigMap, RayJob]: the job's own cluster is created for the run and deleted after it."""
    configmap = recipe_configmap(opts.name, recipe, opts.namespace)
    spec = {
        "entrypoint": entrypoint(opts.replicas),
        "submissionMode": opts.submission_mode,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_after_finished_s,
        "activeDeadlineSeconds": opts.active_deadline_s,
        "backoffLimit": opts.backoff_limit,
        "rayClusterSpec": ray_cluster_spec(opts, configmap["metadata"]["name"]),
    }
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(opts.name, opts.name, opts.namespace),
           "spec": spec}
    return [configmap, job]


def render_raycluster(recipe: Recipe, opts: K8sOptions) -> list[dict]:
    """[ConfigMap, RayCluster]: a cluster that stays up; run the recipe in it with `ray job submit` (README)."""
    configmap = recipe_configmap(opts.name, recipe, opts.namespace)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
               "metadata": _metadata(f"{opts.name}-cluster", opts.name, opts.namespace),
               "spec": ray_cluster_spec(opts, configmap["metadata"]["name"])}
    return [configmap, cluster]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the recipe in the ConfigMap) as readable `|` blocks rather than quoted lines."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text
                                                      else None))


def dump_all(manifests: list[dict], header: str = "") -> str:
    docs = [yaml.dump(m, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)
            for m in manifests]
    return header + "---\n".join(docs)


def _metadata(name: str, run: str, namespace: str | None) -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/name": "raydpo", "raydpo/run": run}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _resources(size: PodSize) -> dict:
    """Requests = limits: Guaranteed pods, which KubeRay recommends for Ray (no eviction under memory pressure)."""
    amounts = {"cpu": str(size.cpus), "memory": size.memory}
    if size.gpus:
        amounts["nvidia.com/gpu"] = str(size.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _secret_env(secret: str | None) -> list[dict]:
    if not secret:
        return []
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, **({} if required else
                                                                                        {"optional": True})}}}
            for env, key, required in SECRET_KEYS]


def _token_env(secret: str | None) -> list[dict]:
    """Hub and MLflow tokens by reference, each optional: a pod starts whether or not the Secret holds it."""
    if not secret:
        return []
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for env, key in TOKEN_KEYS]


def _drop_empty(container: dict) -> dict:
    return {k: v for k, v in container.items() if v not in ([], {}, None)}
