"""Load, check and resolve a recipe: YAML (Nova's DPO shape) or PAI-QuickStart hyperparameters -> a frozen Recipe.

Order: the file (a PAI file is translated first), then `--overrides` JSON, then each dotted override, then
`--replicas`; later wins. Every problem is collected and raised at once as one ConfigError (exit code 2).
Local paths are made absolute against `base_dir` (default: the working directory), because Ray Train workers run
in another working directory; URIs (anything with "://") are kept as written.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from launcher import pai
from launcher.overrides import Problem, apply_overrides, load_yaml_text, set_path, show
from launcher.recipe_schema import (
    EMPTY_MEANS_NULL,
    LOCAL_PATH_KEYS,
    MODEL_PATH_KEY,
    REQUIRED_HELP,
    RULES,
    SCHEMA,
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
    section_keys,
)
from core.errors import ConfigError

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
LORA_PREFIX = "training_config.model.peft.lora_tuning."

_NONE = type(None)


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
        translation = pai.translate_pai_collect(raw, replicas)
        raw, explanation, origins = translation.nova, translation.explanation, translation.origins
        problems += translation.problems
    before = raw
    raw, sub = apply_overrides(raw, overrides, overrides_json, resolve=resolve_override_key)
    problems += sub
    # a key an override changed no longer comes from the PAI file
    origins = {path: o for path, o in origins.items() if _get(before, path) == _get(raw, path)}
    if replicas is not None:
        raw, sub = set_path(raw, REPLICAS.split("."), replicas)
        problems += sub
        origins[REPLICAS] = "--replicas"
    values, given, sub = check_tree(raw)
    problems += sub
    problems += cross_field_problems(values, given)
    if problems:
        raise ConfigError(
            f"{label}: {len(problems)} problem(s) in the recipe",
            fix="fix each key listed; recipes/reference.yaml lists every key with its default and allowed values",
            problems=[_label(path, origins) + ": " + text for path, text in problems],
        )
    values = resolve_local_paths(values, Path(base_dir) if base_dir is not None else Path.cwd())
    return _build(Recipe, "", values), explanation


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
    except (OSError, UnicodeDecodeError) as err:
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
            f"{path}: a recipe must be a mapping with run: and training_config:, got {_kind(raw)}",
            fix="start from recipes/reference.yaml",
        )
    return str(path), raw


def recipe_to_dict(recipe: Any) -> dict:
    """The plain nested dict, shaped as reference.yaml: what the driver hands to the workers."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = recipe_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


class _Dumper(yaml.SafeDumper):
    """Block mappings as in reference.yaml, short lists inline (`betas: [0.9, 0.999]`)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def dump_recipe_yaml(recipe: Recipe) -> str:
    return yaml.dump(recipe_to_dict(recipe), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=120)


# ---- type and range checks ----


def check_tree(raw: dict) -> tuple[dict[str, Any], set[str], list[Problem]]:
    """(values by dotted path with defaults filled in, paths given explicitly, problems).

    A value with a problem is left out of `values`, so that cross-field checks skip it instead of piling on.
    """
    values: dict[str, Any] = {}
    given: set[str] = set()
    problems: list[Problem] = []
    _check_section("", raw, values, given, problems)
    return values, given, problems


def _check_section(prefix: str, node: Any, values: dict, given: set, problems: list[Problem]) -> None:
    keys = section_keys(prefix)
    if node is None:
        node = {}  # `peft:` with every child commented out
    if not isinstance(node, dict):
        problems.append((prefix, f"{show(node)} is {_kind(node)}; expected a section with keys: {', '.join(keys)}"))
        return
    for key, value in node.items():
        if key not in keys:
            path = f"{prefix}.{key}" if prefix else str(key)
            problems.append((path, _unknown_key_text(prefix, str(key), value)))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        spec = SCHEMA[path]
        if spec.section is not None:
            _check_section(path, node.get(key), values, given, problems)
        elif key not in node:
            if spec.default is dataclasses.MISSING:
                problems.append((path, f"missing (required): {REQUIRED_HELP[path]}"))
            else:
                values[path] = spec.default
        else:
            given.add(path)
            text = _check_value(path, node[key], values)
            if text:
                problems.append((path, text))


def _check_value(path: str, value: Any, values: dict) -> str | None:
    """A problem text, or None after storing the checked (converted) value."""
    spec = SCHEMA[path]
    if value == "" and path in EMPTY_MEANS_NULL:
        value = None
    if path in REQUIRED_HELP and value in (None, ""):
        return f"missing (required, got {show(value)}): {REQUIRED_HELP[path]}"
    rule = RULES.get(path)
    ok, converted = coerce(value, spec.hint)
    if not ok:
        allowed = f" ({rule.allowed})" if rule else ""
        return f"{show(value)} is {_kind(value)}; expected {describe(spec.hint)}{allowed}"
    if rule is not None and converted is not None and not rule.check(converted):
        null = " (or null)" if _optional(spec.hint) else ""
        near = difflib.get_close_matches(str(converted), rule.choices, n=1) if rule.choices else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{show(value)} is not allowed; allowed: {rule.allowed}{null}{hint}"
    values[path] = converted
    return None


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(True, value converted to the annotation) or (False, None). An int is a fine float; a bool is no int."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return _NONE in typing.get_args(hint), None
        for arg in typing.get_args(hint):
            if arg is not _NONE:
                ok, converted = coerce(value, arg)
                if ok:
                    return True, converted
        return False, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, None
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            return False, None
        items = [coerce(v, h) for v, h in zip(value, item_hints)]
        return (True, tuple(c for _, c in items)) if all(ok for ok, _ in items) else (False, None)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            return False, None
        ok = all(coerce(k, key_hint)[0] and coerce(v, value_hint)[0] for k, v in value.items())
        return (True, dict(value)) if ok else (False, None)
    raise AssertionError(f"annotation not handled: {hint!r}")


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) if a is not _NONE else "null" for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if args[-1] is Ellipsis:
            return f"a list of {describe(args[0]).removeprefix('a ')}s"
        return f"a list of {len(args)} {describe(args[0]).removeprefix('a ')}s"
    if origin is dict:
        return "a mapping of strings to strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and _NONE in typing.get_args(hint)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def nearest_key(prefix: str, key: str) -> list[str]:
    """Full dotted paths the user probably meant: a close sibling first, else the same or a close name elsewhere."""
    near = difflib.get_close_matches(key, section_keys(prefix), n=1, cutoff=0.6)
    if near:
        return [f"{prefix}.{near[0]}" if prefix else near[0]]
    names = sorted({p.rsplit(".", 1)[-1] for p in SCHEMA})
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.7)
    return [p for p in SCHEMA if near and p.rsplit(".", 1)[-1] == near[0]]


def _unknown_key_text(prefix: str, key: str, value: Any) -> str:
    near = nearest_key(prefix, key)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return f"unknown key (value {show(value)}); {hint}allowed keys here: {', '.join(section_keys(prefix))}"


def _get(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _label(path: str, origins: dict[str, str]) -> str:
    return f"{path} (from {origins[path]})" if path in origins else path


# ---- overrides: short keys ----


def resolve_override_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], list[Problem]]:
    """The full path of an override key. A key that is the tail of exactly one schema path may be written short
    (`beta`, `dpo_cfg.beta`); an ambiguous short key (`name`) is a problem; an unknown one passes through and is
    reported, with the nearest key, like any unknown key."""
    if path[0] in section_keys(""):
        return path, _through_value(path)
    for cut in range(len(path), 0, -1):
        head = ".".join(path[:cut])
        matches = [p for p in SCHEMA if p == head or p.endswith("." + head)]
        if len(matches) > 1:
            return path, [(".".join(path), f"ambiguous short key; write the full path: {' or '.join(matches)}")]
        if matches:
            full = tuple(matches[0].split(".")) + path[cut:]
            return full, _through_value(full)
    return path, []


def _through_value(path: tuple[str, ...]) -> list[Problem]:
    for depth in range(1, len(path)):
        spec = SCHEMA.get(".".join(path[:depth]))
        if spec is None:
            return []
        if spec.section is None and typing.get_origin(spec.hint) is not dict:
            return [(".".join(path), f"cannot set: {spec.path} is a value ({describe(spec.hint)}), "
                                     "not a section with keys")]
    return []


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
    if not _have(values, GBS, REPLICAS):
        return []
    total, replicas = values[GBS], values[REPLICAS]
    if total % replicas:
        below, above = total // replicas * replicas, (total // replicas + 1) * replicas
        multiples = f"{below} or {above}" if below else str(above)
        counts = ", ".join(map(str, divisors_up_to(total)))
        return [(GBS, f"global_batch_size {total} is not divisible by run.replicas={replicas}; replica counts that "
                      f"divide it: {counts}; or make global_batch_size a multiple of {replicas} ({multiples})")]
    micro = values.get(MICRO)
    per_replica = total // replicas
    if micro is not None and per_replica % micro:
        sizes = ", ".join(map(str, divisors_up_to(per_replica)))
        return [(MICRO, f"{micro} does not divide the per-replica batch {per_replica} (global_batch_size {total} / "
                        f"run.replicas {replicas}); micro batch sizes that divide it: {sizes}")]
    return []


def check_lora_only(values: dict, given: set) -> list[Problem]:
    """Settings that only mean something with LoRA; with full-rank training they would be silently ignored."""
    if not (PEFT_SCHEME in values and values[PEFT_SCHEME] is None):
        return []
    fix = "set training_config.model.peft.peft_scheme: lora, or remove it"
    problems = []
    if values.get(QUANT) is not None:
        problems.append((QUANT, f"{show(values[QUANT])} needs LoRA (quantized base weights are frozen; only an "
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


def check_label_smoothing(values: dict, given: set) -> list[Problem]:
    if not _have(values, LOSS, SMOOTHING) or values[SMOOTHING] == 0:
        return []
    loss, eps = values[LOSS], values[SMOOTHING]
    if loss in ("ipo", "hinge"):
        return [(SMOOTHING, f"{show(eps)} would be ignored: loss_type {loss!r} has no label smoothing; allowed: 0 "
                            "(label smoothing applies to sigmoid (cDPO) and robust)")]
    if loss == "robust" and eps >= 0.5:
        return [(SMOOTHING, f"{show(eps)} is not allowed with loss_type 'robust' (it divides by 1 - 2 × "
                            "label_smoothing); allowed: [0, 0.5)")]
    return []


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


CROSS_CHECKS = (
    check_min_lr,
    check_batch_split,
    check_lora_only,
    check_label_smoothing,
    check_prompt_length,
    check_validation_source,
)


def cross_field_problems(values: dict, given: set) -> list[Problem]:
    return [p for check in CROSS_CHECKS for p in check(values, given)]


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


def _build(cls: type, prefix: str, values: dict) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        section = SCHEMA[path].section
        kwargs[f.name] = _build(section, path, values) if section is not None else values[path]
    return cls(**kwargs)
