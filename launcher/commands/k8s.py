"""`raydpo k8s render RECIPE [dotted.key=value ...] [--replicas N] [--image IMAGE] [-o FILE]` and
`raydpo k8s check FILE ... [--schemas DIR]`

render writes KubeRay manifests for a recipe: by default a ConfigMap (the resolved recipe) and a RayJob that creates
its cluster for the run and deletes it after; `--kind raycluster` writes a RayCluster for interactive use instead.
`--replicas N` sets the worker group's size (and run.replicas, keeping global_batch_size fixed). check validates
manifests against KubeRay's CRD schemas plus the rules the operator enforces. k8s/README.md has the kubectl side.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from cluster import kuberay
from cluster.k8s_checks import CRD_FILES, manifest_problems, operator_problems
from core.errors import ConfigError
from core.tracking import redact
from launcher.commands.k8s_serve import render_service
from launcher.commands.launch import local_path_problems
from launcher.recipe_args import add_recipe_arguments, load_from_args, parse_rest

DEFAULT_IMAGE = "raydpo:0.1.0-gpu"  # what the Dockerfile builds by default; push it where your cluster pulls from
DEFAULT_SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "k8s-schemas" / "kuberay-v1.7.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", metavar="SUBCOMMAND")
    sub.required = True
    render = sub.add_parser("render", help="write a RayJob (or RayCluster) and the recipe's ConfigMap",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(render, extra_options=_render_options)
    check = sub.add_parser("check", help="validate manifests against KubeRay's CRDs and the operator's rules")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS,
                       help="folder with KubeRay's ray.io_rayjobs.yaml and ray.io_rayclusters.yaml CRDs "
                            "(default: %(default)s)")


def _render_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--kind", choices=("rayjob", "raycluster", "rayservice"), help="rayjob (default): one run, "
                        "its cluster deleted after; raycluster: a cluster that stays for interactive use; rayservice: "
                        "serve trained runs (RECIPE is then RUN [RUN ...], s3:// run folders or hub ids)")
    parser.add_argument("--image", help=f"the worker image (default {DEFAULT_IMAGE}); a tag with gpu or cuNNN in it "
                        "means GPU pods")
    parser.add_argument("--name", help="the RayJob's name (default: the recipe's run.name)")
    parser.add_argument("--namespace", help="metadata.namespace (default: kubectl's current namespace)")
    parser.add_argument("--gpus-per-worker", type=int, help="GPUs per worker pod (default 1 on a GPU image, else 0)")
    parser.add_argument("--worker-cpus", type=int, help="CPUs per worker pod (default 8 per GPU, 4 on CPU)")
    parser.add_argument("--worker-memory", help="memory per worker pod, a Kubernetes quantity (default 64Gi per "
                        "GPU, 16Gi on CPU); the node's allocatable memory less what else runs there")
    parser.add_argument("--secret", help="the Secret holding object-storage credentials (AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL); "
                        "default raydpo-object-storage; 'none' for none (IAM roles for service accounts)")
    parser.add_argument("--token-secret", help="the Secret holding hub and MLflow tokens (HF_TOKEN, "
                        "MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN; each optional), "
                        "default raydpo-tokens; 'none' for none. A password in run.mlflow_tracking_uri is left out of "
                        "the ConfigMap: put it here")
    parser.add_argument("--service-account", help="serviceAccountName of the Ray pods")
    parser.add_argument("--submission-mode", help="K8sJobMode (default), HTTPMode, InteractiveMode or SidecarMode")
    parser.add_argument("--deadline-hours", type=float, help="activeDeadlineSeconds in hours (default 24)")
    parser.add_argument("--ttl-seconds", type=int, help="seconds the finished job's cluster stays (default 300)")
    parser.add_argument("--backoff-limit", type=int, help="job retries (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.k8s_command == "check":
        return run_check(args.files, args.schemas)
    return run_render(args)


def run_render(args: argparse.Namespace) -> int:
    if parse_rest(args).kind == "rayservice":  # RECIPE and the rest are runs to serve (launcher/commands/k8s_serve.py)
        return render_service(parse_rest(args), options_from_args=options_from_args, render_command=render_command)
    recipe, args = load_from_args(args)
    check_pod_paths(recipe.run)
    opts = options_from_args(args, name=recipe.run.name, replicas=recipe.run.replicas)
    render = kuberay.render_raycluster if args.kind == "raycluster" else kuberay.render_rayjob
    manifests = render(recipe, opts)
    problems = [p for m in manifests for p in operator_problems(m, manifests)]
    if problems:
        raise ConfigError("the rendered manifests would be refused by Kubernetes or KubeRay", problems=problems,
                          fix="change the options named (--name, --submission-mode, --ttl-seconds, ...)")
    header = (f"# Rendered by: {render_command(args)}\n"
              f"# Apply: kubectl apply -f {args.output or 'FILE'}   (see k8s/README.md)\n")
    text = kuberay.dump_all(manifests, header)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        kinds = ", ".join(f"{m['kind']} {m['metadata']['name']}" for m in manifests)
        print(f"wrote {args.output}: {kinds}; {opts.replicas} worker pod(s) of {opts.worker.cpus} CPU, "
              f"{opts.worker.gpus} GPU, {opts.worker.memory}")
    else:
        print(text, end="")
    return 0


def render_command(args: argparse.Namespace) -> str:
    """The command line that renders this again (output file left out), with a URI's password shown as ***: the
    header is read by whoever reads the manifests."""
    words = ["raydpo", "k8s", "render", str(args.recipe), *(args.overrides or [])]
    for option in ("overrides_json", "replicas", "kind", "image", "name", "namespace", "gpus_per_worker",
                   "worker_cpus", "worker_memory", "secret", "token_secret", "service_account", "submission_mode", "deadline_hours",
                   "ttl_seconds", "backoff_limit"):
        value = getattr(args, option, None)
        if value is not None:
            words += ["--overrides" if option == "overrides_json" else "--" + option.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(redact(w)) for w in words)


def options_from_args(args: argparse.Namespace, *, name: str, replicas: int):
    """The rendering options: the run's name and replica count (the recipe's, after --replicas) and the flags."""
    image = args.image or DEFAULT_IMAGE
    gpu = kuberay.is_gpu_image(image)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else int(gpu)
    mode = args.submission_mode or "K8sJobMode"
    if mode not in kuberay.SUBMISSION_MODES:
        raise ConfigError(f"--submission-mode {mode!r} is not a KubeRay submission mode",
                          fix=f"use one of {', '.join(kuberay.SUBMISSION_MODES)}")
    secret = None if (args.secret or "").lower() == "none" else (args.secret or "raydpo-object-storage")
    tokens = getattr(args, "token_secret", None)
    token_secret = None if (tokens or "").lower() == "none" else (tokens or "raydpo-tokens")
    return kuberay.K8sOptions(
        name=args.name or name, replicas=replicas, image=image,
        worker=kuberay.worker_size(gpus, args.worker_cpus, args.worker_memory),
        namespace=args.namespace, secret=secret, token_secret=token_secret, service_account=args.service_account, submission_mode=mode,
        active_deadline_s=int((args.deadline_hours or 24) * 3600),
        backoff_limit=args.backoff_limit if args.backoff_limit is not None else 0,
        ttl_after_finished_s=args.ttl_seconds if args.ttl_seconds is not None else 300)


def check_pod_paths(run) -> None:
    """Pods see object storage and their image, not this machine's files: local paths cannot work there."""
    problems = local_path_problems(run)  # the same check as `raydpo launch` on a cluster of several machines
    if problems:
        raise ConfigError("the recipe reads or writes local paths, which pods on Kubernetes cannot reach",
                          problems=problems,
                          fix="use object storage, e.g. run.data_s3_path=s3://bucket/train.jsonl "
                              "run.output_s3_path=s3://bucket/runs (and a hub id or s3:// for the model)")


def run_check(files: list[Path], schemas: Path) -> int:
    if not all((schemas / f).is_file() for f in CRD_FILES.values()):
        raise ConfigError(f"KubeRay CRD schemas not found in {schemas}",
                          fix="pass --schemas with the folder holding ray.io_rayjobs.yaml and ray.io_rayclusters.yaml "
                              "(KubeRay's ray-operator/config/crd/bases)")
    failed = 0
    for path in files:
        try:
            manifests = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        except UnicodeDecodeError as err:
            raise ConfigError(f"cannot read manifests from {path}", why=f"it is not UTF-8 text (byte {err.start}: "
                              f"{err.object[err.start:err.start + 1]!r}); Kubernetes manifests are UTF-8 YAML",
                              fix="give the YAML file `raydpo k8s render -o FILE` wrote") from None
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read manifests from {path}", why=str(err)) from None
        if not all(isinstance(m, dict) for m in manifests):
            raise ConfigError(f"cannot read manifests from {path}", why="it holds YAML that is not a mapping per "
                              "document (a Kubernetes manifest is one)", fix="give the YAML file `raydpo k8s render "
                              "-o FILE` wrote")
        problems = manifest_problems(manifests, schemas)
        print(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'} "
              f"({', '.join(m.get('kind', '?') for m in manifests)})")
        for problem in problems:
            print(f"  - {problem}")
        failed += bool(problems)
    return 1 if failed else 0
