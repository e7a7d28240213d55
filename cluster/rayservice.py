"""A KubeRay RayService that serves trained runs: the Serve app (serving.app:build_app) in serveConfigV2, with its
autoscaling and the models' s3:// locations, on a cluster built by kuberay.py's helpers.

Pods read the models from object storage (credentials from the Secret, as for training); the head runs Serve's
controller and proxy and no model (num-cpus 0); worker pods hold the model replicas, and with --replicas N > 1 the
in-tree autoscaler adds worker pods as Serve adds replicas (1..N). serveConfigV2 is Serve's own config file format:
it is checked with ray.serve.schema.ServeDeploySchema, the schema `serve deploy` and the operator's Serve client
apply, besides the CRD schema (k8s_checks).
"""
from __future__ import annotations

import copy

import yaml

from cluster import kuberay

SERVE_PORT = 8000
APP_NAME = "raydpo"
IMPORT_PATH = "serving.app:build_app"
# KubeRay names the service's clusters <name>-raycluster-xxxxx and their services <name>-head-svc,
# <name>-serve-svc; a Kubernetes service name fits 63 characters
MAX_RAYSERVICE_NAME = 40


def serve_config(models: list[str], *, replicas: int, gpus_per_replica: int) -> dict:
    """Serve's config (ServeDeploySchema): one app, the models as its builder's args, replicas autoscaling 1..N."""
    args = {"models": list(models), "min_replicas": 1, "max_replicas": max(1, replicas), "num_cpus": 1.0,
            "num_gpus": float(gpus_per_replica), "device": "cuda" if gpus_per_replica else "cpu"}
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]}


def render_rayservice(models: list[str], opts: kuberay.K8sOptions) -> list[dict]:
    """[RayService]: opts.replicas is the most model replicas (and worker pods) the service scales to."""
    spec = kuberay.ray_cluster_spec(opts, configmap="unused")
    head = spec["headGroupSpec"]["template"]["spec"]
    head.pop("volumes", None)  # no recipe to mount: the models' locations are in serveConfigV2
    container = head["containers"][0]
    container.pop("volumeMounts", None)
    container["ports"] = container["ports"] + [{"containerPort": SERVE_PORT, "name": "serve"}]
    group = spec["workerGroupSpecs"][0]
    group.update({"replicas": 1, "minReplicas": 1, "maxReplicas": max(1, opts.replicas)})
    spec["enableInTreeAutoscaling"] = opts.replicas > 1
    config = serve_config(models, replicas=opts.replicas, gpus_per_replica=opts.worker.gpus)
    service = {"apiVersion": "ray.io/v1", "kind": "RayService",
               "metadata": kuberay._metadata(opts.name, opts.name, opts.namespace),
               "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False),
                        "rayClusterConfig": spec}}
    return [service]


def serve_config_problems(text: str) -> list[str]:
    """serveConfigV2 parsed as YAML and checked against Ray Serve's ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"RayService spec.serveConfigV2 is not YAML: {err}"]
    try:
        ServeDeploySchema.parse_obj(config)
    except Exception as err:  # pydantic's ValidationError (v1 or v2 API), whichever Ray's compat layer uses
        return [f"RayService spec.serveConfigV2: {line}" for line in str(err).splitlines()[1:] or [str(err)]]
    return []


def rayservice_problems(manifest: dict) -> list[str]:
    """What the operator and Serve refuse that the CRD schema cannot say."""
    problems = []
    name = str(manifest.get("metadata", {}).get("name", ""))
    if len(name) > MAX_RAYSERVICE_NAME:
        problems.append(f"RayService name {name!r} is {len(name)} characters; at most {MAX_RAYSERVICE_NAME} keep "
                        "the names KubeRay derives from it within Kubernetes' 63")
    spec = manifest.get("spec", {})
    if not spec.get("serveConfigV2"):
        problems.append("RayService spec.serveConfigV2 is empty")
    else:
        problems += serve_config_problems(spec["serveConfigV2"])
        config = yaml.safe_load(spec["serveConfigV2"]) or {}
        for app in config.get("applications", []) if isinstance(config, dict) else []:
            local = [m for m in (app.get("args") or {}).get("models", []) if "://" not in str(m)
                     and str(m).startswith(("/", "./", "../"))]
            problems += [f"RayService app {app.get('name')!r}: model {m!r} is a path on this machine; pods read "
                         "models from object storage (s3://) or the hub" for m in local]
    return problems


def with_serve_config(manifest: dict, config: dict) -> dict:
    """A copy of the RayService with serveConfigV2 replaced (tests and callers editing the app)."""
    out = copy.deepcopy(manifest)
    out["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    return out
