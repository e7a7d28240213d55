"""`raydpo plan RECIPE --gpus-per-node G --gpu-memory-gb M [dotted.key=value ...] [--replicas N]`

Estimates per-GPU memory for the recipe under DeepSpeed ZeRO-3 (training/memory_plan.py: DeepSpeed's estimator for
model states, plus activations, the log-prob head and the reference strategy) and says whether it fits in M GB.
Reads only the model's config (no weights). Exit code 0 when it fits, 1 when it does not.
"""
from __future__ import annotations

import argparse

from cluster.placement import placement_for
from core import devices
from core.config import Recipe
from core.errors import ConfigError
from core.models import load_config
from training.memory_plan import (GB, HEADROOM, RunShape, advice, estimate, fits, inference_stage, lora_params,
                                  model_shape)
from training.plan import build_run_plan
from launcher.recipe_args import add_recipe_arguments, load_from_args


def _plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node (one worker each)")
    parser.add_argument("--gpu-memory-gb", type=float, metavar="M", help="memory of one GPU, in GB (GiB)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, extra_options=_plan_options)


def run(args: argparse.Namespace) -> int:
    recipe, args = load_from_args(args)
    problems = [f"--{name.replace('_', '-')} must be a positive number" for name in ("gpus_per_node", "gpu_memory_gb")
                if not getattr(args, name) or getattr(args, name) <= 0]
    if problems:
        raise ConfigError("raydpo plan needs the GPUs it plans for", problems=problems,
                          fix="e.g. raydpo plan RECIPE --gpus-per-node 8 --gpu-memory-gb 80")
    model, run_shape = shapes(recipe, args.gpus_per_node)
    lines, ok = report_lines(recipe, model, run_shape, args.gpu_memory_gb)
    print("\n".join(lines))
    return 0 if ok else 1


def shapes(recipe: Recipe, gpus_per_node: int):
    tc = recipe.training_config
    config = load_config(recipe.run.model_name_or_path)
    lora = tc.model.peft.peft_scheme == "lora"
    model = model_shape(config, lora_params(config, tc.model.peft.lora_tuning) if lora else 0,
                        quant=tc.model.peft.quantization)  # QLoRA: base weights at their 4/8-bit size
    # the same placement, batch split and reference choice as the run would make (pair counts do not matter here);
    # a split the GPUs cannot share is the ConfigError the run would raise
    placement = placement_for(recipe.run.replicas, gpus_per_node, nodes_known=recipe.run.replicas)
    plan = build_run_plan(recipe, workers=placement.workers, use_gpu=True, placement_strategy=placement.strategy,
                          train_pairs=tc.global_batch_size, validation_pairs=0)
    precision = devices.precision_for(tc.precision, on_gpu=True)
    run_shape = RunShape(gpus_per_node=gpus_per_node, nodes=recipe.run.replicas,
                         micro_batch_pairs=plan.micro_batch, max_length=tc.max_length,
                         dtype_bytes=2 if precision == "bf16" else 4,
                         gradient_checkpointing=tc.gradient_checkpointing, reference=plan.reference,
                         logprob_chunk=plan.logprob_chunk)
    return model, run_shape


def report_lines(recipe: Recipe, model, run_shape, gpu_memory_gb: float) -> tuple[list[str], bool]:

    gpus = run_shape.gpus_per_node * run_shape.nodes
    lines = [f"raydpo plan: {recipe.run.name} on {run_shape.nodes} node(s) x {run_shape.gpus_per_node} GPU(s) "
             f"= {gpus} ZeRO-3 worker(s), {gpu_memory_gb:g} GB each",
             f"model: {model.params / 1e6:.1f}M parameters (largest layer {model.largest_layer_params / 1e6:.1f}M), "
             + (f"LoRA adapters {model.adapter_params / 1e6:.2f}M" if model.adapter_params else "full-rank")
             + (f" on a {model.quant_label} base ({model.quantized_params / 1e6:.1f}M weights at "
                f"{model.quantized_bytes:.4g} bytes)" if model.quant_label else "")
             + f", {'bf16' if run_shape.dtype_bytes == 2 else 'fp32'}",
             "per GPU:"]
    rows = estimate(model, run_shape)
    width = max(len(what) for what, _ in rows)
    lines += [f"  {what:<{width}}  {amount / GB:8.2f} GB" for what, amount in rows]
    total = rows[-1][1]
    budget = HEADROOM * gpu_memory_gb
    ok = fits(total, gpu_memory_gb)
    if ok:
        lines.append(f"fits: {total / GB:.2f} GB of the {budget:.1f} GB planned per GPU "
                     f"({HEADROOM:.0%} of {gpu_memory_gb:g} GB)")
    else:
        lines += ["to lower it:"] + [f"  - {tip}" for tip in advice(model, run_shape)]
        lines.append(f"does not fit: {total / GB:.2f} GB needed, {budget:.1f} GB planned per GPU "
                     f"({HEADROOM:.0%} of {gpu_memory_gb:g} GB)")
    lines[-1:-1] = inference_lines(model, run_shape, gpu_memory_gb)  # the verdict stays the last line
    return lines, ok


def inference_lines(model, run_shape, gpu_memory_gb: float) -> list[str]:
    """The reference stage's and the generator's GPUs (training/memory_plan.inference_stage): not the training
    workers' memory, but GPUs of their own, split across a node's GPUs when one cannot hold the weights."""
    gpus, per_gpu = inference_stage(model, run_shape, gpu_memory_gb)
    where = "one GPU per actor" if gpus == 1 else f"{gpus} GPUs of one node per actor (device_map across them)"
    stages = "reference stage (before training) and generator" if run_shape.reference == "precompute" \
        else "generator (evaluation)"
    return [f"{stages}: {where}, {per_gpu / GB:.2f} GB per GPU"]
