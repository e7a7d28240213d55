"""`raydpo validate RECIPE [dotted.key=value ...] [--overrides JSON] [--replicas N] [--explain]`

Prints the resolved recipe as YAML, then `# recipe OK: ...`. The status line and the PAI translation lines are
YAML comments, so stdout stays a valid recipe (`raydpo validate r.yaml > resolved.yaml`). On problems, every one
is printed at once and the exit code is 2. Imports no torch, ray or deepspeed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from launcher import pai
from launcher.recipe import Recipe, dump_recipe_yaml, load_recipe, read_recipe_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML in Nova's DPO shape, or a PAI-QuickStart hyperparameter file")
    _add_options(parser)
    # argparse (3.11) cannot take positionals after an option (`r.yaml --replicas 2 beta=0.05`) in a subcommand:
    # everything after RECIPE is collected here and parsed again, intermixed, in run()
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="dotted.key=value",
        help="override a key, e.g. training_config.model.dpo_cfg.beta=0.05 (or the short dpo_cfg.beta=0.05, "
             "beta=0.05); values are YAML: betas=[0.9,0.95], peft_scheme=null. Applied after --overrides, in order; "
             "options may come between them",
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overrides", dest="overrides_json", metavar="JSON",
        help='a JSON object shaped like the recipe, deep-merged first, e.g. \'{"run": {"replicas": 2}}\'; '
             "@FILE reads it from a file",
    )
    parser.add_argument("--replicas", type=int, metavar="N", help="set run.replicas (applied last)")
    parser.add_argument("--explain", action="store_true",
                        help="for a PAI-QuickStart file, show how each key is translated")


def _rest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydpo validate RECIPE")
    _add_options(parser)
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    return parser


def run(args: argparse.Namespace) -> int:
    rest = _rest_parser().parse_intermixed_args(args.rest or [])
    overrides_json = rest.overrides_json if rest.overrides_json is not None else args.overrides_json
    replicas = rest.replicas if rest.replicas is not None else args.replicas
    if overrides_json is not None and overrides_json.startswith("@"):
        overrides_json = _read_json_file(overrides_json[1:])
    if args.explain or rest.explain:
        # shown before loading, so that the translation is visible even when the recipe has problems
        for line in explanation_lines(args.recipe, replicas):
            print(f"# {line}")
    recipe = load_recipe(args.recipe, rest.overrides, overrides_json, replicas)
    print(dump_recipe_yaml(recipe), end="")
    print(f"# {summary(recipe)}")
    return 0


def explanation_lines(source: str, replicas: int | None) -> list[str]:
    _, raw = read_recipe_source(source)
    if not pai.is_pai(raw):
        return ["(a Nova-shaped recipe: nothing to translate)"]
    return ["PAI-QuickStart hyperparameters translated:"] + pai.translate_pai_collect(raw, replicas).explanation


def summary(recipe: Recipe) -> str:
    run, tc = recipe.run, recipe.training_config
    lora = tc.model.peft.lora_tuning
    mode = f"LoRA r={lora.adapter_dim} alpha={lora.alpha}" if tc.model.peft.peft_scheme == "lora" else "full-rank"
    if tc.model.peft.quantization:
        mode += f" on a {tc.model.peft.quantization}-quantized base"
    return (f"recipe OK: {run.name}, {run.replicas} replicas, global batch {tc.global_batch_size} "
            f"({tc.global_batch_size // run.replicas} pairs per replica per step), {mode}, "
            f"max_length {tc.max_length}, beta {tc.model.dpo_cfg.beta:g}")


def _read_json_file(path: str) -> str:
    from training.errors import ConfigError

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read --overrides file {path}", why=str(err)) from None
