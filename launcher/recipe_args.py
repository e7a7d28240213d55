"""The recipe arguments that validate, train, launch, k8s render and plan share: RECIPE, overrides, --replicas.

argparse (3.11) cannot take positionals after an option (`r.yaml --replicas 2 beta=0.05`) in a subcommand, so
everything after RECIPE is collected and parsed again, intermixed, by `load_from_args`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from core.errors import ConfigError

OptionAdder = Callable[[argparse.ArgumentParser], None]


def add_recipe_arguments(parser: argparse.ArgumentParser, extra_options: OptionAdder = lambda p: None) -> None:
    parser.add_argument("recipe", help="a recipe YAML in Nova's DPO shape, or a PAI-QuickStart hyperparameter file")
    _options(parser, extra_options)
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="dotted.key=value",
        help="override a key, e.g. training_config.model.dpo_cfg.beta=0.05 (or the short dpo_cfg.beta=0.05, "
             "beta=0.05); values are YAML: betas=[0.9,0.95], peft_scheme=null. Applied after --overrides, in order; "
             "options may come between them")
    parser.set_defaults(_extra_options=extra_options)


def _options(parser: argparse.ArgumentParser, extra_options: OptionAdder) -> None:
    parser.add_argument("--overrides", dest="overrides_json", metavar="JSON",
                        help='a JSON object shaped like the recipe, deep-merged first, e.g. '
                             '\'{"run": {"replicas": 2}}\'; @FILE reads it from a file')
    parser.add_argument("--replicas", type=int, metavar="N", help="set run.replicas (applied last)")
    extra_options(parser)


def parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Merges the options found after RECIPE into args (an option given after RECIPE wins)."""
    rest_parser = argparse.ArgumentParser(prog=f"raydpo {args.command} RECIPE")
    _options(rest_parser, args._extra_options)
    rest_parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    rest = rest_parser.parse_intermixed_args(args.rest or [])
    merged = vars(args).copy()
    for key, value in vars(rest).items():
        if (value is not None and value is not False) or key not in merged:  # `in (None, False)` drops 0 (0 == False)
            merged[key] = value
    if merged.get("overrides_json") and merged["overrides_json"].startswith("@"):
        merged["overrides_json"] = _read_text(merged["overrides_json"][1:])
    return argparse.Namespace(**merged)


def load_from_args(args: argparse.Namespace):
    """(the Recipe, the merged args)."""
    from launcher.recipe import load_recipe

    args = parse_rest(args)
    return load_recipe(args.recipe, args.overrides, args.overrides_json, args.replicas), args


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read --overrides file {path}", why=str(err)) from None
