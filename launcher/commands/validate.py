"""`raydpo validate RECIPE [dotted.key=value ...] [--overrides JSON] [--replicas N] [--explain]`

Prints the resolved recipe as YAML, then `# recipe OK: ...`. The status line and the PAI translation lines are
YAML comments, so stdout stays a valid recipe (`raydpo validate r.yaml > resolved.yaml`). On problems, every one
is printed at once and the exit code is 2. Imports no torch, ray or deepspeed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.quantization import label
from launcher import pai
from launcher.recipe import Recipe, dump_recipe_yaml, load_recipe, read_recipe_source
from launcher.recipe_args import add_recipe_arguments, parse_rest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, extra_options=_explain_option)


def _explain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--explain", action="store_true",
                        help="for a PAI-QuickStart file, show how each key is translated")


def run(args: argparse.Namespace) -> int:
    args = parse_rest(args)
    if args.explain:
        # shown before loading, so that the translation is visible even when the recipe has problems
        for line in explanation_lines(args.recipe, args.replicas):
            print(f"# {line}")
    recipe = load_recipe(args.recipe, args.overrides, args.overrides_json, args.replicas)
    print(dump_recipe_yaml(recipe), end="")
    print(f"# {summary(recipe)}")
    return 0


def explanation_lines(source: str, replicas: int | None) -> list[str]:
    _, raw = read_recipe_source(source)
    if not pai.is_pai(raw):
        return ["(a Nova-shaped recipe: nothing to translate)"]
    stem = Path(source).stem  # a PAI file without a name is named after the file (launcher/pai.py)
    return ["PAI-QuickStart hyperparameters translated:"] + pai.translate_pai_collect(raw, replicas,
                                                                                      source_stem=stem).explanation


def summary(recipe: Recipe) -> str:
    run, tc = recipe.run, recipe.training_config
    lora = tc.model.peft.lora_tuning
    mode = f"LoRA r={lora.adapter_dim} alpha={lora.alpha}" if tc.model.peft.peft_scheme == "lora" else "full-rank"
    if tc.model.peft.quantization.bits:
        mode += f" on a {label(tc.model.peft.quantization)}-quantized base (QLoRA)"
    return (f"recipe OK: {run.name}, {run.replicas} replicas, global batch {tc.global_batch_size} "
            f"({tc.global_batch_size // run.replicas} pairs per replica per step), {mode}, "
            f"max_length {tc.max_length}, beta {tc.model.dpo_cfg.beta:g}")
