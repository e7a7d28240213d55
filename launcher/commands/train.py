"""`raydpo train RECIPE [dotted.key=value ...] [--overrides JSON] [--replicas N] [--resume-from PATH]`

Checks the recipe, the model's knobs and the data before any training starts, then runs the recipe on Ray Train:
on the cluster this process is inside of (RAY_ADDRESS, or a Ray job), else on a local cluster started for the run
and stopped after. The console shows raydpo's progress; Ray's and DeepSpeed's output goes to <run>/logs/ray.log.

Running the same command again after a failure resumes from the latest complete checkpoint under the run's output
path (<output>/<run.name>/ray_train/checkpoint_*); --resume-from picks one explicitly. A rerun of a finished run
trains nothing and prints its result.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from core.config import Recipe
from launcher.recipe_args import add_recipe_arguments, load_from_args

# Logical CPUs a local cluster gets beyond one per worker, for the Ray Data stages that feed them.
DATA_CPUS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, extra_options=add_resume_option)


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume-from", metavar="PATH",
                        help="a checkpoint folder to continue from (local or s3://), e.g. "
                             "<output>/<run.name>/ray_train/checkpoint_...; without it a run continues from its "
                             "latest complete checkpoint by itself")


def run(args: argparse.Namespace) -> int:
    recipe, args = load_from_args(args)
    log_file = local_log_file(recipe)
    result = train(recipe, log_file, resume_from=getattr(args, "resume_from", None))
    final = result.get("final_train") or {}
    print(f"done: {result['steps']}/{result['planned_steps']} steps in {result['wall_s']:.0f}s, "
          f"final loss {final.get('loss', float('nan')):.4f}, reward accuracy "
          f"{final.get('rewards/accuracies', float('nan')):.2f}")
    print(f"outputs: {result['run_uri']} (model/, metrics.jsonl, report.html, manifest.json)")
    return 0


def train(recipe: Recipe, log_file: Path, resume_from: str | None = None, plan_overrides: dict | None = None,
          report: bool = True) -> dict:
    """The run on its cluster; summary.json's content. plan_overrides and report=False: benchmarks/vs_trl.py's sides
    without raydpo's optimisations, timed without the report."""
    # lazy: these start Ray and load torch; `raydpo validate` imports this package and must stay fast
    from cluster.placement import placement_for
    from cluster.session import check_resources, local_cpus, ray_session, ray_train_environment
    from core.devices import usable_cores
    from core.startup_trace import mark
    from launcher.console import user_console
    from training.driver import run_training

    mark("recipe checked, launcher imported")
    replicas = recipe.run.replicas
    check_model_knobs(recipe)  # before the console opens its log: a bad model writes nothing to the output path
    with user_console(log_file) as say:
        say(f"run {recipe.run.name}: {replicas} replica(s); Ray and DeepSpeed log to {log_file}")
        with ray_session(num_cpus=local_cpus(replicas, DATA_CPUS, usable_cores()), num_gpus=None,
                         log_file=log_file) \
                as session:
            import ray

            mark("ray cluster up")

            gpus_per_node = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
            nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
            placement = placement_for(replicas, int(gpus_per_node), max(nodes, 1))  # the run's one worker count
            check_resources({k: v * placement.workers for k, v in placement.per_worker.items()},
                            session["resources"])
            say(f"cluster: {'started here' if session['started_here'] else session['address']}, "
                f"{nodes} node(s), placement {placement.strategy}")
            with ray_train_environment(session["started_here"]):
                result = run_training(recipe, say=say, workers=placement.workers, use_gpu=placement.use_gpu,
                                      placement_strategy=placement.strategy, resume_from=resume_from,
                                      plan_overrides=plan_overrides,
                                      before_manifest=(lambda uri: write_report_quietly(uri, say)) if report
                                      else None)
    return result


def write_report_quietly(run_uri: str, say) -> None:
    """report.md and report.html beside a finished run; a report problem is said, never a failed run."""
    from evaluation.report import write_report

    try:
        md, html = write_report(run_uri)
        say(f"report: {html}")
    except Exception as err:  # noqa: BLE001 - a report problem must not fail a finished training run
        say(f"report not written: {err}")


def check_model_knobs(recipe: Recipe) -> None:
    """Model-dependent recipe errors, found before any Ray work: dropouts the model lacks."""
    from core.models import dropout_overrides, load_config

    model = recipe.training_config.model
    dropout_overrides(load_config(recipe.run.model_name_or_path),
                      {"hidden_dropout": model.hidden_dropout, "attention_dropout": model.attention_dropout,
                       "ffn_dropout": model.ffn_dropout})
    # QLoRA needs bitsandbytes on the workers, not here (a head node may lack it): each worker checks its own
    # (core/devices.require_quantization); ZeRO-3 with 8 bit is refused by the run plan (training/plan.py)


def local_log_file(recipe: Recipe) -> Path:
    from core import storage

    output = recipe.run.output_s3_path
    if storage.is_remote(output):
        return Path(tempfile.gettempdir()) / "raydpo" / recipe.run.name / "ray.log"
    return Path(output) / recipe.run.name / "logs" / "ray.log"
