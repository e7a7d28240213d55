"""Recipe overrides: `dotted.key=value` strings and a JSON object deep-merged into the recipe.

Order (later wins): the recipe file, then the JSON object (`--overrides`, shaped like the recipe, as SageMaker's
recipe_overrides), then each `dotted.key=value` in the order given, then `--replicas` (applied by load_recipe).
Values are YAML scalars or flow collections: `beta=0.05`, `betas=[0.9, 0.95]`, `peft_scheme=null`, `lr=1e-5`.
All functions are pure: they return new dicts and never change their inputs. Problems are (dotted path, text) pairs.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable, Sequence

import yaml

from core.errors import ConfigError

Problem = tuple[str, str]

_KEY_PART = re.compile(r"^[A-Za-z0-9_\-]+$")


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `1e-5` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-5`); Nova's published recipes write `lr: 1e-5` and
    `eps: 1e-08`, which plain safe_load returns as strings. YAML 1.2 (and every JSON reader) reads them as floats.
    """


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: RecipeLoader, node: yaml.MappingNode) -> dict:
    # PyYAML keeps the last of two equal keys without a word; in a recipe that silently drops a setting
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` entries may be overridden, as YAML intends
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # an unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


RecipeLoader.add_constructor("tag:yaml.org,2002:map", _mapping_without_duplicates)


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 -- RecipeLoader is a SafeLoader


def parse_value(text: str) -> Any:
    """A value as YAML reads it: `0.05` -> 0.05, `[0.9, 0.95]` -> list, `null` -> None, `abc` -> 'abc'."""
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"cannot read the value {text!r}",
            why=str(getattr(err, "problem", "") or err),
            fix="quote strings that contain ':', '#', '[' or '{', e.g. key='a: b'",
        ) from None


def parse_dotted(item: str) -> tuple[tuple[str, ...], Any]:
    """`training_config.model.dpo_cfg.beta=0.05` -> (('training_config', 'model', 'dpo_cfg', 'beta'), 0.05)."""
    key, sep, text = item.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(_KEY_PART.match(p) for p in parts):
        raise ConfigError(
            f"override {item!r} is not of the form dotted.key=value",
            fix="write e.g. training_config.model.dpo_cfg.beta=0.05 (keys: letters, digits, '_' and '-')",
        )
    return parts, parse_value(text.strip())


def parse_overrides_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            "--overrides is not valid JSON",
            why=f"{err.msg} at line {err.lineno} column {err.colno}",
            fix='pass a JSON object shaped like the recipe, e.g. \'{"training_config": {"max_length": 2048}}\'',
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"--overrides must be a JSON object, got {type(value).__name__}",
            fix='pass a JSON object shaped like the recipe, e.g. \'{"run": {"replicas": 2}}\'',
        )
    return value


def set_path(tree: dict, path: Sequence[str], value: Any) -> tuple[dict, list[Problem]]:
    """A copy of `tree` with `value` at `path`; missing sections are created, a null section becomes one.

    A path through a value (`training_config.max_length.x` where max_length is 1024) is a problem, not a change.
    """
    node: Any = tree
    for depth, key in enumerate(path[:-1], start=1):
        node = node.get(key)
        if node is None:
            break
        if not isinstance(node, dict):
            at = ".".join(path[:depth])
            return tree, [(".".join(path), f"cannot set: {at} is the value {node!r}, not a section with keys")]
    return _with(tree, path, value), []


def _with(tree: dict, path: Sequence[str], value: Any) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    child = tree.get(path[0])
    return {**tree, path[0]: _with(child if isinstance(child, dict) else {}, path[1:], value)}


def deep_merge(base: dict, patch: dict, prefix: str = "") -> tuple[dict, list[Problem]]:
    """`patch` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    merged, problems = dict(base), []
    for key, value in patch.items():
        path = f"{prefix}{key}"
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merged[key], sub = deep_merge(old, value, path + ".")
            problems += sub
        elif isinstance(value, dict) and old is not None:
            problems.append((path, f"cannot set: {path} is the value {old!r}, not a section with keys"))
        else:
            merged[key] = value
    return merged, problems


def apply_overrides(
    tree: dict,
    dotted: Iterable[str] = (),
    overrides_json: str | dict | None = None,
    resolve: Callable[[tuple[str, ...]], tuple[tuple[str, ...], list[Problem]]] | None = None,
) -> tuple[dict, list[Problem]]:
    """The JSON object first, then each dotted override; every problem is collected, none stops the others.

    `resolve` maps a dotted key to its full path (e.g. a short `beta` to training_config.model.dpo_cfg.beta) and
    may report problems (an ambiguous short key, a path through a value); by default keys are taken as written.
    """
    problems: list[Problem] = []
    if overrides_json is not None:
        try:
            patch = overrides_json if isinstance(overrides_json, dict) else parse_overrides_json(overrides_json)
        except ConfigError as err:
            problems.append(("--overrides", _text(err).removeprefix("--overrides ").removeprefix("is ")))
        else:
            tree, sub = deep_merge(tree, patch)
            problems += sub
    for item in dotted:
        try:
            path, value = parse_dotted(item)
        except ConfigError as err:
            problems.append((item, _text(err)))
            continue
        if resolve is not None:
            path, sub = resolve(path)
            if sub:
                problems += sub
                continue
        tree, sub = set_path(tree, path, value)
        problems += sub
    return tree, problems


def _text(err: ConfigError) -> str:
    return "; ".join(part for part in (err.what, err.why, err.fix) if part)


def show(value: Any, limit: int = 80) -> str:
    """A value as a user wrote it in YAML: true/false/null, quoted strings, numbers as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value) if isinstance(value, (str, dict, list)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
