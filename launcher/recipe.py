"""Load, check and resolve a recipe: YAML (Nova's DPO shape) or PAI-QuickStart hyperparameters -> a frozen Recipe.

Order: the file (a PAI file is translated first), then `--overrides` JSON, then each dotted override, then
`--replicas`; later wins. Every problem is collected and raised at once as one ConfigError (exit code 2).
Local paths are made absolute against `base_dir` (default: the working directory), because Ray Train workers run
in another working directory; URIs (anything with "://") are kept as written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from launcher import pai, validation
from launcher.overrides import Problem, apply_overrides, load_yaml_text, set_path, show
from launcher.recipe_schema import (
    EMPTY_MEANS_NULL,
    LOCAL_PATH_KEYS,
    MODEL_PATH_KEY,
    REQUIRED_HELP,
    RULES,
    SCHEMA,
    SHORTHANDS,
    Checkpoint,
    Data,
    DpoCfg,
    LoraTuning,
    ModelCfg,
    Optim,
    Peft,
    Recipe,
    Run,
    Sched,
    Trainer,
    TrainingConfig,
)
from core.config import as_dict
from core.errors import ConfigError
from launcher.validation import RecipeKind, kind_of
from training.loss_rules import label_smoothing_problem

__all__ = [
    "Recipe", "Run", "TrainingConfig", "Trainer", "Data", "Checkpoint", "ModelCfg", "Optim", "Sched", "DpoCfg",
    "Peft", "LoraTuning", "load_recipe", "load_recipe_with_explanation", "read_recipe_source", "recipe_to_dict",
    "dump_recipe_yaml", "divisors_up_to",
]

REPLICAS = "run.replicas"
VAL_PATH = "run.validation_data_s3_path"
MAX_LENGTH = "training_config.max_length"
GBS = "training_config.global_batch_size"
MICRO = "training_config.micro_batch_size"
VAL_CHECK = "training_config.trainer.val_check_interval"
MAX_PROMPT = "training_config.data.max_prompt_length"
VAL_FRACTION = "training_config.data.validation_fraction"
LR = "training_config.model.optim.lr"
MIN_LR = "training_config.model.optim.sched.min_lr"
LOSS = "training_config.model.dpo_cfg.loss_type"
SMOOTHING = "training_config.model.dpo_cfg.label_smoothing"
REFERENCE = "training_config.model.dpo_cfg.reference"
PEFT_SCHEME = "training_config.model.peft.peft_scheme"
QUANT = "training_config.model.peft.quantization"
BITS = QUANT + ".bits"
ZERO_STAGE = "training_config.zero_stage"
LORA_PREFIX = "training_config.model.peft.lora_tuning."


# ---- public API ----


def load_recipe(
    source: str | Path | dict,
    overrides: Sequence[str] = (),
    overrides_json: str | dict | None = None,
    replicas: int | None = None,
    base_dir: Path | None = None,
) -> Recipe:
    return load_recipe_with_explanation(source, overrides, overrides_json, replicas, base_dir)[0]


def load_recipe_with_explanation(
    source: str | Path | dict,
    overrides: Sequence[str] = (),
    overrides_json: str | dict | None = None,
    replicas: int | None = None,
    base_dir: Path | None = None,
) -> tuple[Recipe, list[str]]:
    """As load_recipe, plus the PAI translation lines ([] for a Nova-shaped recipe)."""
    label, raw = read_recipe_source(source)
    problems: list[Problem] = []
    origins: dict[str, str] = {}
    explanation: list[str] = []
    if pai.is_pai(raw):
        translation = pai.translate_pai_collect(  # the file's stem names a run PAI's file leaves unnamed
            raw, replicas, source_stem=Path(source).stem if isinstance(source, (str, Path)) else None)
        raw, explanation, origins = translation.nova, translation.explanation, translation.origins
        problems += translation.problems
    raw = validation.expand_shorthands(TRAIN, raw)  # `quantization: 4bit`: its keys can be overridden one by one
    before = raw
    raw, sub = apply_overrides(raw, overrides, overrides_json, resolve=resolve_override_key)
    problems += sub
    # a key an override changed no longer comes from the PAI file
    origins = {path: o for path, o in origins.items() if _get(before, path) == _get(raw, path)}
    if replicas is not None:
        raw, sub = set_path(raw, REPLICAS.split("."), replicas)
        problems += sub
        origins[REPLICAS] = "--replicas"
    values, _given, sub = validation.validate(TRAIN, raw)
    validation.raise_problems(TRAIN, label, problems + sub, origins)
    values = resolve_local_paths(values, Path(base_dir) if base_dir is not None else Path.cwd())
    return validation.build(TRAIN, values), explanation


def read_recipe_source(source: str | Path | dict) -> tuple[str, dict]:
    """(a label for messages, the raw mapping) from a YAML/JSON file or a dict."""
    if isinstance(source, dict):
        return "recipe", source
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} not found", fix="pass the path of a recipe YAML, "
                          "e.g. recipes/reference.yaml") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the recipe is not UTF-8 text", why=str(err),
                          fix="save the recipe as UTF-8 (YAML files are UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"cannot read recipe file {path}", why=str(err)) from None
    try:
        raw = load_yaml_text(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: the recipe is not valid YAML", why=str(getattr(err, "problem", err)),
                          fix="fix the YAML there: indentation, quoting, or a key given twice") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping with run: and training_config:, got {kind_of(raw)}",
            fix="start from recipes/reference.yaml",
        )
    return str(path), raw


recipe_to_dict = as_dict  # the plain nested dict, shaped as reference.yaml (core/config.py)


class _Dumper(yaml.SafeDumper):
    """Block mappings as in reference.yaml, short lists inline (`betas: [0.9, 0.999]`)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def dump_recipe_yaml(recipe: Recipe) -> str:
    return yaml.dump(recipe_to_dict(recipe), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=120)


def _get(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def resolve_override_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], list[Problem]]:
    """Short override keys (`beta`, `dpo_cfg.beta`) to their full path in the training recipe."""
    return validation.resolve_override_key(TRAIN, path)


# ---- checks across keys (each pure: values by dotted path -> problems) ----


def divisors_up_to(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _have(values: dict, *paths: str) -> bool:
    return all(p in values for p in paths)


def check_min_lr(values: dict, given: set) -> list[Problem]:
    if _have(values, LR, MIN_LR) and values[MIN_LR] >= values[LR]:
        return [(MIN_LR, f"{show(values[MIN_LR])} is not below optim.lr={show(values[LR])}; "
                         "allowed: 0 <= min_lr < lr")]
    return []


def check_batch_split(values: dict, given: set) -> list[Problem]:
    """A global batch the replicas cannot divide is split unevenly (training/ds_config.py batch_split: Nova Pro's
    recipes run 32 pairs on 6 or 12 replicas); fewer pairs than replicas leaves a replica nothing to train."""
    if not _have(values, GBS, REPLICAS):
        return []
    total, replicas = values[GBS], values[REPLICAS]
    if total < replicas:
        counts = f"1..{total}" if total > 1 else "1"
        return [(GBS, f"global_batch_size {total} is below run.replicas={replicas}: every replica trains at least "
                      f"one pair per step; use {counts} replicas, or make global_batch_size {replicas} or more")]
    micro = values.get(MICRO)
    busiest = -(-total // replicas)  # the busiest replica's share of a step
    if micro is not None and busiest % micro:
        sizes = ", ".join(map(str, divisors_up_to(busiest)))
        share = "per-replica batch" if total % replicas == 0 else "busiest replica's share"
        return [(MICRO, f"{micro} does not divide the {share} {busiest} (global_batch_size {total} / "
                        f"run.replicas {replicas}); micro batch sizes that divide it: {sizes}")]
    return []


def check_lora_only(values: dict, given: set) -> list[Problem]:
    """Settings that only mean something with LoRA; with full-rank training they would be silently ignored."""
    if not (PEFT_SCHEME in values and values[PEFT_SCHEME] is None):
        return []
    fix = "set training_config.model.peft.peft_scheme: lora, or remove it"
    problems = []
    if values.get(BITS) is not None:
        problems.append((QUANT, f"{values[BITS]}-bit needs LoRA (quantized base weights are frozen; only an "
                                f"adapter trains) but peft_scheme is null; {fix}"))
    if values.get(REFERENCE) == "adapter_disabled":
        problems.append((REFERENCE, f"'adapter_disabled' needs a LoRA adapter but peft_scheme is null; {fix}, or "
                                    "use reference: auto"))
    for path in sorted(p for p in given if p.startswith(LORA_PREFIX)):
        if path in values and values[path] != SCHEMA[path].default:
            what = "LoRA+ " if path.endswith("loraplus_lr_ratio") else ""
            problems.append((path, f"{what}{show(values[path])} is set but peft_scheme is null (full-rank), so it "
                                   f"would be ignored; {fix}"))
    return problems


def check_quantization(values: dict, given: set) -> list[Problem]:
    """QLoRA's reference is its own quantized base with the adapters off; 8-bit cannot be partitioned by ZeRO-3
    (core/quantization.py; the driver checks again with the workers it found: several GPUs on one replica)."""
    from core.quantization import stage_problem

    bits = values.get(BITS)
    if bits is None:
        return []
    problems = []
    if values.get(REFERENCE) in ("precompute", "engine"):
        problems.append((REFERENCE, f"{show(values[REFERENCE])} would score the reference with a full-precision base "
                                    f"while the policy trains on a {bits}-bit one; allowed with quantization: auto "
                                    "or adapter_disabled (the quantized base with the adapters off)"))
    if _have(values, REPLICAS, ZERO_STAGE):
        stage = values[ZERO_STAGE] if values[ZERO_STAGE] is not None else (3 if values[REPLICAS] > 1 else 0)
        why = stage_problem(bits, stage)
        if why:
            problems.append((BITS, f"8 with ZeRO-3 (run.replicas={values[REPLICAS]}, zero_stage="
                                   f"{show(values[ZERO_STAGE])}): {why}; use bits: 4, or one worker with "
                                   "zero_stage 0"))
    return problems


def check_label_smoothing(values: dict, given: set) -> list[Problem]:
    if not _have(values, LOSS, SMOOTHING):
        return []
    problem = label_smoothing_problem(values[LOSS], values[SMOOTHING])  # the one rule, also the loss's
    return [(SMOOTHING, problem)] if problem else []


def check_prompt_length(values: dict, given: set) -> list[Problem]:
    if _have(values, MAX_PROMPT, MAX_LENGTH) and values[MAX_PROMPT] is not None:
        if values[MAX_PROMPT] >= values[MAX_LENGTH]:
            return [(MAX_PROMPT, f"{values[MAX_PROMPT]} leaves no room for the response within max_length="
                                 f"{values[MAX_LENGTH]}; allowed: below max_length, or null (max_length // 2)")]
    return []


def check_validation_source(values: dict, given: set) -> list[Problem]:
    if not _have(values, VAL_PATH, VAL_FRACTION):
        return []
    has_file, fraction = values[VAL_PATH] is not None, values[VAL_FRACTION]
    if has_file and fraction > 0:
        return [(VAL_FRACTION, f"{show(fraction)} would be ignored: run.validation_data_s3_path is set; allowed: "
                               "0.0 when a validation file is given")]
    if values.get(VAL_CHECK) is not None and not has_file and fraction == 0:
        return [(VAL_CHECK, f"{values[VAL_CHECK]} but there is no validation data; set "
                            "run.validation_data_s3_path, or training_config.data.validation_fraction > 0, or "
                            "val_check_interval: null")]
    return []


# the training recipe as a kind of recipe for the one validator engine (launcher/validation.py)
TRAIN = RecipeKind(
    what="recipe", root=Recipe, rules=RULES, required_help=REQUIRED_HELP,
    empty_means_null=frozenset(EMPTY_MEANS_NULL),
    cross_checks=(check_min_lr, check_batch_split, check_lora_only, check_quantization, check_label_smoothing,
                  check_prompt_length, check_validation_source),
    shorthands=SHORTHANDS,
    fix="fix each key listed; recipes/reference.yaml lists every key with its default and allowed values")


# ---- paths and building ----


def resolve_local_paths(values: dict, base: Path) -> dict:
    out = dict(values)
    for key in LOCAL_PATH_KEYS:
        if out.get(key) is not None:
            out[key] = absolute_path(out[key], base)
    if is_local_model(out[MODEL_PATH_KEY], base):
        out[MODEL_PATH_KEY] = absolute_path(out[MODEL_PATH_KEY], base)
    return out


def absolute_path(value: str, base: Path) -> str:
    """URIs as written; local paths absolute against `base` (normalised, symlinks kept)."""
    if "://" in value:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def is_local_model(value: str, base: Path) -> bool:
    """A model path on this machine (vs a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)."""
    if "://" in value:
        return False
    explicit = value in (".", "..") or value.startswith(("./", "../", "/", "~"))
    return explicit or (base / value).exists()
