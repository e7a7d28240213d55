"""`raydpo serve RUN_OR_MODEL... [--port 8000] [--host 127.0.0.1] [--replicas N | --min-replicas A --max-replicas B]
[--engine auto|transformers|vllm]`: an OpenAI-compatible endpoint (and a chat page at /) on Ray Serve.

Each argument is a run folder (<output>/<run.name>, local or s3://), a model folder, a hub id or
smollm2-135m-instruct; LoRA runs of one base share it as adapters, chosen by the request's `model`. Without a
cluster (no RAY_ADDRESS, not a Ray job) a local Ray cluster is started and stopped on Ctrl-C or SIGTERM, leaving no
Ray process; on an existing cluster the app is deployed there and the command returns.
"""
from __future__ import annotations

import argparse
import os
import time

ENGINES = ("auto", "transformers", "vllm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="RUN_OR_MODEL",
                        help="a run folder or s3:// URI, a model folder, a hub id, or smollm2-135m-instruct")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine "
                        "only; 0.0.0.0 to accept other machines)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default %(default)s)")
    parser.add_argument("--replicas", type=int, metavar="N", help="a fixed number of replicas per model")
    parser.add_argument("--min-replicas", type=int, default=1, metavar="N", help="autoscaling lower bound (default 1)")
    parser.add_argument("--max-replicas", type=int, default=1, metavar="N", help="autoscaling upper bound (default 1; "
                        "above --min-replicas turns autoscaling on)")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="transformers (CPU or GPU), vllm (GPU, "
                        "Ray Serve LLM), or auto: vllm where it is installed, else transformers")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per batched generate (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits to fill "
                        "(default 20 ms)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per model replica (default 0)")
    parser.add_argument("--threads", type=int, help="torch threads per CPU replica (default: the usable cores)")


def pick_engine(engine: str, vllm_installed: bool) -> str:
    if engine == "auto":
        return "vllm" if vllm_installed else "transformers"
    if engine == "vllm" and not vllm_installed:
        from core.errors import ConfigError

        raise ConfigError("--engine vllm needs vLLM, which is not installed here",
                          fix="pip install 'ray[llm]==2.60.0' on a GPU machine, or use --engine transformers")
    return engine


def check_port_free(host: str, port: int) -> None:
    """ConfigError before a cluster starts when the address is taken: Serve's proxy would fail to bind later."""
    import socket

    from core.errors import ConfigError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}", why=str(err),
                              fix="stop what uses the port, or pick another with --port") from None


def app_args(args: argparse.Namespace) -> dict:
    gpus = args.gpus_per_replica
    return {"models": list(args.models), "replicas": args.replicas, "min_replicas": args.min_replicas,
            "max_replicas": max(args.max_replicas, args.min_replicas), "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_ms / 1000, "threads": args.threads,
            "device": "cuda" if gpus else "cpu", "num_cpus": 1.0, "num_gpus": gpus}


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from cluster.session import cluster_address_from_env, ray_session
    from core.models import cache_root

    engine = pick_engine(args.engine, importlib.util.find_spec("vllm") is not None)
    settings = app_args(args)
    if engine == "vllm":
        from serving.vllm_config import build_vllm_app

        application = build_vllm_app(settings)
    else:
        from serving.app import build_app

        application = build_app(settings)  # plans the models (and reads the runs) before a cluster starts
    if cluster_address_from_env(os.environ) is None:  # a local cluster: its proxy binds here
        check_port_free(args.host, args.port)
    log_file = cache_root() / "logs" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.log"
    replicas = settings["replicas"] or settings["max_replicas"]
    with ray_session(num_cpus=max(2, replicas * len(args.models) + 1), num_gpus=None, log_file=log_file) as session:
        from ray import serve

        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="raydpo", route_prefix="/", blocking=False)
        url = f"http://{args.host}:{args.port}"
        print(f"serving {', '.join(args.models)} ({engine}) at {url}/v1 (OpenAI API) and {url}/ (chat page); "
              f"Ray logs to {log_file}", flush=True)
        if not session["started_here"]:
            print(f"deployed to the cluster at {session['address']} as the Serve app 'raydpo'; it keeps serving after "
                  "this command; `serve delete raydpo` (or `serve shutdown`) removes it")
            return 0
        print("Ctrl-C stops the server and its Ray cluster", flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()
    return 0
