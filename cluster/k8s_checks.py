"""Checks for rendered KubeRay manifests: KubeRay's CRD schemas (jsonschema, Draft 7) and the rules the operator
and Kubernetes enforce that those schemas cannot express (submission modes, TTL only with shutdown, name rules).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml

from cluster.kuberay import MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME, SUBMISSION_MODES

CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayService": "ray.io_rayservices.yaml"}
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")


@functools.lru_cache(maxsize=4)
def crd_schema(schema_dir: str, kind: str) -> dict:
    """The v1 openAPIV3Schema of KubeRay's CRD for `kind`."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB: the C parser is 10x faster
    crd = yaml.load((Path(schema_dir) / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def schema_problems(manifest: dict, schema_dir: str | Path) -> list[str]:
    import jsonschema

    kind = manifest.get("kind")
    if kind not in CRD_FILES:
        return []
    validator = jsonschema.Draft7Validator(crd_schema(str(schema_dir), kind))
    return [f"{kind} {'.'.join(str(p) for p in err.absolute_path) or '(top)'}: {err.message}"
            for err in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def name_problems(kind: str, name: str) -> list[str]:
    """Kubernetes' and KubeRay's rules for object names."""
    if kind in ("RayJob", "RayCluster"):
        limit = MAX_RAYJOB_NAME if kind == "RayJob" else MAX_RAYCLUSTER_NAME
        problems = []
        if len(name) > limit:
            problems.append(f"{kind} name {name!r} is {len(name)} characters; KubeRay allows at most {limit}")
        if not DNS1035_LABEL.fullmatch(name):
            problems.append(f"{kind} name {name!r} must be a DNS-1035 label: lowercase letters, digits and '-', "
                            "starting with a letter and ending with a letter or digit")
        return problems
    if len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
        return [f"{kind} name {name!r} must be a DNS-1123 subdomain (lowercase letters, digits, '-', '.'; at most "
                "253 characters)"]
    return []


def cluster_spec_problems(where: str, spec: dict) -> list[str]:
    problems = []
    head_containers = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers", [])
    if not head_containers:
        problems.append(f"{where}.headGroupSpec: the head pod needs at least one container")
    groups = spec.get("workerGroupSpecs", [])
    for i, group in enumerate(groups):
        label = f"{where}.workerGroupSpecs[{i}]"
        if not DNS1123_LABEL.fullmatch(str(group.get("groupName", ""))) or len(group.get("groupName", "")) > 63:
            problems.append(f"{label}.groupName {group.get('groupName')!r} must be a DNS-1123 label")
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 0)
        if not lo <= n <= hi:
            problems.append(f"{label}: minReplicas {lo} <= replicas {n} <= maxReplicas {hi} does not hold")
        if not group.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{label}: the worker pod needs at least one container")
    for container in head_containers + [c for g in groups
                                        for c in g.get("template", {}).get("spec", {}).get("containers", [])]:
        if not DNS1123_LABEL.fullmatch(str(container.get("name", ""))):
            problems.append(f"{where}: container name {container.get('name')!r} must be a DNS-1123 label")
        for env in container.get("env", []):
            if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", env.get("name", "")) and "value" in env:
                problems.append(f"{where}: {env['name']} is written inline in container {container.get('name')!r}; "
                                "credentials must come from a Secret (valueFrom.secretKeyRef)")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: must be 'token' (Ray token authentication stays on)")
    return problems


def rayjob_problems(spec: dict) -> list[str]:
    """The operator's RayJob rules (ray-operator/controllers/ray/utils/validation.go) the CRD schema lacks."""
    problems = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"RayJob spec.submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished")
    if ttl is not None and not shutdown:
        problems.append("RayJob spec.ttlSecondsAfterFinished is set but shutdownAfterJobFinishes is not true: the "
                        "TTL only applies to a cluster that is shut down after the job")
    if ttl is not None and ttl < 0:
        problems.append(f"RayJob spec.ttlSecondsAfterFinished must be >= 0, got {ttl}")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and deadline <= 0:
        problems.append(f"RayJob spec.activeDeadlineSeconds must be > 0, got {deadline}")
    backoff = spec.get("backoffLimit")
    if backoff is not None and backoff < 0:
        problems.append(f"RayJob spec.backoffLimit must be >= 0, got {backoff}")
    if mode == "InteractiveMode" and (backoff or 0) > 0:
        problems.append("RayJob spec.backoffLimit > 0 is not allowed with submissionMode InteractiveMode")
    if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
        problems.append("RayJob spec: one of rayClusterSpec or clusterSelector must be set")
    if spec.get("suspend") and not shutdown:
        problems.append("RayJob spec.suspend needs shutdownAfterJobFinishes: true")
    if not str(spec.get("entrypoint", "")).strip():
        problems.append("RayJob spec.entrypoint is empty")
    return problems


def operator_problems(manifest: dict, others: list[dict] = ()) -> list[str]:
    kind, meta = manifest.get("kind"), manifest.get("metadata", {})
    problems = name_problems(kind, str(meta.get("name", "")))
    if kind == "ConfigMap":
        problems += [f"ConfigMap key {key!r} must match [-._a-zA-Z0-9]+" for key in manifest.get("data", {})
                     if not CONFIGMAP_KEY.fullmatch(key)]
        return problems
    spec = manifest.get("spec", {})
    cluster = spec.get("rayClusterSpec") if kind == "RayJob" else \
        spec.get("rayClusterConfig") if kind == "RayService" else spec
    if kind == "RayJob":
        problems += rayjob_problems(spec)
    if kind == "RayService":
        from cluster.rayservice import rayservice_problems

        problems += rayservice_problems(manifest)
    if cluster:
        problems += cluster_spec_problems(f"{kind} {'spec.rayClusterSpec' if kind == 'RayJob' else 'spec'}",
                                          cluster)
        configmaps = {m["metadata"]["name"] for m in others if m.get("kind") == "ConfigMap"}
        pods = [cluster.get("headGroupSpec", {})] + cluster.get("workerGroupSpecs", [])
        for group in pods:
            for volume in group.get("template", {}).get("spec", {}).get("volumes", []):
                ref = volume.get("configMap", {}).get("name")
                if ref and others and ref not in configmaps:
                    problems.append(f"{kind}: volume {volume['name']!r} uses ConfigMap {ref!r}, which is not "
                                    "among the rendered manifests")
    return problems


def manifest_problems(manifests: list[dict], schema_dir: str | Path) -> list[str]:
    problems = []
    for manifest in manifests:
        problems += schema_problems(manifest, schema_dir)
        problems += operator_problems(manifest, manifests)
    return problems
