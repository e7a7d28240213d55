"""`raydpo k8s render RUN [RUN ...] --kind rayservice --image IMAGE [-o FILE]`: a KubeRay RayService serving runs.

The runs must live where pods can read them (s3:// run folders, or hub ids); the service's app is
serving.app:build_app with the runs as its args (cluster/rayservice.py). --replicas N: the most model replicas and
worker pods it autoscales to (default 1).
"""
from __future__ import annotations

import argparse
import re

from cluster import kuberay
from cluster.k8s_checks import operator_problems
from cluster.rayservice import render_rayservice
from core.errors import ConfigError
from serving.sources import model_name


def service_name(runs: list[str]) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", model_name(runs[0]).lower()).strip("-") or "raydpo"
    if not name[0].isalpha():
        name = "serve-" + name
    return name[:34].rstrip("-") + "-serve"


def render_service(args: argparse.Namespace, *, options_from_args, render_command) -> int:
    """options_from_args and render_command are k8s.py's, passed in so the two modules do not import each other."""
    runs = [str(args.recipe), *(args.overrides or [])]
    local = [r for r in runs if r.startswith(("/", "./", "../")) or (not r.startswith("s3://") and "/" in r
                                                                       and __import__("os").path.exists(r))]
    if local:
        raise ConfigError("pods cannot read runs on this machine", problems=[f"{r} is a local path" for r in local],
                          fix="upload the run (its output_s3_path is s3:// when trained for Kubernetes) and pass "
                              "s3://bucket/runs/RUN")
    opts = options_from_args(args, name=args.name or service_name(runs), replicas=args.replicas or 1)
    manifests = render_rayservice(runs, opts)
    problems = [p for m in manifests for p in operator_problems(m, manifests)]
    if problems:
        raise ConfigError("the rendered RayService would be refused by Kubernetes, KubeRay or Ray Serve",
                          problems=problems, fix="change the options named (--name, --replicas, ...)")
    header = (f"# Rendered by: {render_command(args)}\n"
              f"# Apply: kubectl apply -f {args.output or 'FILE'}; the OpenAI API is on the service "
              f"{opts.name}-serve-svc, port 8000 (k8s/README.md)\n")
    text = kuberay.dump_all(manifests, header)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}: RayService {opts.name} serving {', '.join(runs)}; up to {opts.replicas} "
              f"replica(s) on worker pods of {opts.worker.cpus} CPU, {opts.worker.gpus} GPU, {opts.worker.memory}")
    else:
        print(text, end="")
    return 0
