"""`raydpo launch RECIPE [dotted.key=value ...] --cluster cluster/NAME.yaml [--replicas N] [--keep-cluster]`

Brings a cluster up with Ray's cluster launcher (`ray up`), with as many worker nodes as replicas, submits
`raydpo train RECIPE` to it as a Ray job (this directory uploaded as the job's working dir), streams the job's log
with the progress line, fetches the run's summary.json, and brings the cluster down (`ray down`) when the job ends,
fails, or is interrupted; --keep-cluster leaves it up. `--replicas N` sets the worker node count, the Ray Train
worker count and run.replicas (global_batch_size stays; gradient accumulation follows).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from launcher.recipe_args import add_recipe_arguments, load_from_args
from core.errors import ConfigError

SUMMARY_KEYS = ("steps", "planned_steps", "wall_s", "final_train", "run_uri")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, extra_options=_options)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", type=Path, metavar="YAML",
                        help="a Ray cluster launcher YAML: cluster/launcher_aws_gpu.yaml, cluster/local.yaml, or yours")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the cluster up after the job")
    parser.add_argument("--working-dir", type=Path, help="the folder uploaded as the job's working dir "
                        "(default: the current one); the recipe must be inside it")


def run(args: argparse.Namespace) -> int:
    from cluster.ray_up import check_cluster_config, job_entrypoint, load_cluster_yaml, run_on_new_cluster, \
        with_replicas

    recipe_obj, args = load_from_args(args)  # every recipe problem (and a --replicas that cannot split the batch)
    if args.cluster is None:
        raise ConfigError("raydpo launch needs --cluster YAML",
                          fix="pass --cluster cluster/launcher_aws_gpu.yaml (AWS GPU nodes), cluster/local.yaml, "
                              "or a Ray cluster launcher YAML of your own")
    replicas = recipe_obj.run.replicas
    config = load_cluster_yaml(args.cluster)
    check_cluster_config(config, str(args.cluster))
    config = with_replicas(config, replicas)
    check_paths_reach_every_node(config, recipe_obj.run)
    working_dir = (args.working_dir or Path.cwd()).resolve()
    command, fetch, local_summary, summary_uri = train_command(args, recipe_obj, working_dir, replicas)
    log_dir = Path(tempfile.gettempdir()) / "raydpo" / recipe_obj.run.name / f"launch-{time.strftime('%Y%m%d-%H%M%S')}"

    def say(line: str) -> None:
        print(line, flush=True)

    result = run_on_new_cluster(config, entrypoint=job_entrypoint(command), working_dir=working_dir,
                                replicas=replicas, keep_cluster=args.keep_cluster, log_dir=log_dir, say=say,
                                fetch=fetch)
    say(f"job {result['job_id']} {result['status'].lower()}")
    show_summary(read_summary(local_summary, summary_uri), say)
    return 0


def one_machine(config: dict) -> bool:
    """Whether every node of the cluster is this machine: Ray's local provider with loopback addresses only (as
    cluster/local.yaml is written). Then local paths are the same files on every node."""
    import ipaddress

    provider = config.get("provider", {})
    if provider.get("type") != "local":
        return False
    ips = [provider.get("head_ip", ""), *provider.get("worker_ips", [])]
    try:
        return all(ipaddress.ip_address(ip).is_loopback for ip in ips)
    except ValueError:  # a host name: another machine, as far as we can tell
        return False


def local_path_problems(run) -> list[str]:
    """The recipe's data, output and model paths that name files on this machine rather than object storage."""
    problems = [f"run.{key}: {getattr(run, key)!r} is a path on this machine"
                for key in ("data_s3_path", "validation_data_s3_path", "output_s3_path")
                if getattr(run, key, None) and "://" not in str(getattr(run, key))]
    if str(run.model_name_or_path).startswith("/"):
        problems.append(f"run.model_name_or_path: {run.model_name_or_path!r} is a path on this machine")
    return problems


def check_paths_reach_every_node(config: dict, run) -> None:
    """On a cluster of several machines each worker reads the data and writes checkpoints on its own node: a local
    path there is another folder (or none), so the run would fail after `ray up` or scatter its outputs. Refused, as
    `raydpo k8s render` refuses them for pods."""
    problems = [] if one_machine(config) else local_path_problems(run)
    if problems:
        raise ConfigError("the recipe reads or writes local paths, which the cluster's other nodes cannot reach",
                          problems=problems,
                          fix="use object storage every node reaches, e.g. run.data_s3_path=s3://bucket/train.jsonl "
                              "run.output_s3_path=s3://bucket/runs (and a hub id or s3:// for the model)")


def train_command(args: argparse.Namespace, recipe, working_dir: Path, replicas: int):
    """(the job's command, files to fetch before `ray down`, local summary path or None, summary URI or None).

    The recipe goes by its path inside the working dir, with the same overrides, so the head resolves it as this
    machine did. A local output folder is passed as an absolute path: it is on the head node (the same path here
    for a cluster of this machine), and summary.json is copied back from it before the cluster goes.
    """
    recipe_path = Path(args.recipe).resolve()
    try:
        relative = recipe_path.relative_to(working_dir)
    except ValueError:
        raise ConfigError(f"the recipe {args.recipe} is outside the working dir {working_dir}",
                          why="only the working dir is uploaded to the cluster",
                          fix="move the recipe into it, or pass --working-dir with a folder that holds both the "
                              "code and the recipe") from None
    command = ["python", "-m", "launcher.cli", "train", str(relative), "--replicas", str(replicas)]
    if args.overrides_json:
        command += ["--overrides", args.overrides_json]
    command += list(args.overrides or [])
    output = recipe.run.output_s3_path
    run_dir = f"{output.rstrip('/')}/{recipe.run.name}"
    if "://" in output:
        return command, {}, None, f"{run_dir}/summary.json"
    command.append(f"run.output_s3_path={output}")  # absolute already (load_recipe made it so)
    local = Path(tempfile.mkdtemp(prefix="raydpo-summary-")) / "summary.json"
    return command, {f"{run_dir}/summary.json": local}, local, None


def read_summary(local: Path | None, uri: str | None) -> dict | None:
    try:
        if local is not None:
            return json.loads(local.read_text()) if local.is_file() else None
        from core import storage
        return json.loads(storage.read_bytes(uri))
    except Exception:  # noqa: BLE001 - a missing summary is reported, not fatal: the job already succeeded
        return None


def show_summary(summary: dict | None, say) -> None:
    if summary is None:
        say("summary.json: not found (see the job's log above)")
        return
    shown = {k: summary[k] for k in SUMMARY_KEYS if k in summary} or summary
    say("summary: " + json.dumps(shown, default=str))
