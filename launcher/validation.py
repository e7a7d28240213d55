"""One validator engine for every kind of recipe: a tree of YAML values -> a frozen dataclass, every problem at once.

A kind of recipe (`RecipeKind`) is its root dataclass (core/config.py), a table of what each dotted key allows
beyond its type (`Rule`), what to put in each required key, and its checks across keys. The training recipe
(launcher/recipe.py) and the evaluation recipe (launcher/eval_recipe.py) are two kinds; a new job adds its own
kind with its own tables and gets the same rules and the same wording: unknown keys with the nearest known one,
wrong types, values out of range with what is allowed, missing required keys, each with its dotted path.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from core.errors import ConfigError
from launcher.overrides import Problem, show

_NONE = type(None)


# ---- what a key allows beyond its type

@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    allowed: str
    choices: tuple = ()  # for enums: lets an error suggest the nearest choice


def interval(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def check(v):
        above = v > lo if lo_open else v >= lo
        below = True if hi is None else (v < hi if hi_open else v <= hi)
        return above and below

    if hi is None:
        return Rule(check, f"{'>' if lo_open else '>='} {lo:g}")
    return Rule(check, f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def int_range(lo: int, hi: int | None = None) -> Rule:
    if hi is None:
        return Rule(lambda v: v >= lo, f">= {lo}")
    return Rule(lambda v: lo <= v <= hi, f"{lo}..{hi}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices), choices)


def each(rule: Rule) -> Rule:
    return Rule(lambda v: all(rule.check(x) for x in v), f"each {rule.allowed}")


K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RUN_NAME = Rule(lambda v: len(v) <= 63 and bool(K8S_NAME.match(v)),
                "a Kubernetes name: lowercase letters, digits and '-', starting and ending with a letter or digit, "
                "at most 63 characters")


# ---- the schema as a flat table, derived from the dataclasses

@dataclass(frozen=True)
class FieldSpec:
    path: str
    hint: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING when required
    section: type | None  # the dataclass when this key is a section


def fields_of(root: type) -> dict[str, FieldSpec]:
    out: dict[str, FieldSpec] = {}
    _walk(root, "", out)
    return out


def _walk(cls: type, prefix: str, out: dict[str, FieldSpec]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out[path] = FieldSpec(path, hint, dataclasses.MISSING, hint)
            _walk(hint, path + ".", out)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out[path] = FieldSpec(path, hint, default, None)


CrossCheck = Callable[[dict, set], list[Problem]]  # (values by dotted path, paths given) -> problems


@dataclass(frozen=True)
class RecipeKind:
    """One kind of recipe: its shape, what its keys allow, and where a user reads about it."""
    what: str                          # "recipe", "evaluation recipe": said in the error's first line
    root: type                         # the frozen dataclass it builds (core/config.py)
    rules: dict[str, Rule]
    required_help: dict[str, str]      # required key -> what to put there; "" given there counts as missing
    empty_means_null: frozenset[str]   # Nova's recipes write '' for unset optional keys: null
    cross_checks: tuple[CrossCheck, ...] = ()
    fix: str = ""
    # a section that may be written as one word: {section path: {word: the section's keys}} (`quantization: 4bit`)
    shorthands: dict[str, dict[str, dict]] = field(default_factory=dict)
    fields: dict[str, FieldSpec] = field(init=False)

    def __post_init__(self):
        fields = fields_of(self.root)
        object.__setattr__(self, "fields", fields)
        assert set(self.rules) <= set(fields), set(self.rules) - set(fields)
        required = {p for p, s in fields.items() if s.section is None and s.default is dataclasses.MISSING}
        assert set(self.required_help) == required, set(self.required_help) ^ required

    def section_keys(self, prefix: str) -> list[str]:
        """The key names directly under a section ('' for the top level)."""
        depth = prefix.count(".") + 1 if prefix else 0
        start = prefix + "." if prefix else ""
        return [p.rsplit(".", 1)[-1] for p in self.fields if p.startswith(start) and p.count(".") == depth]


def optional_paths(root: type) -> frozenset[str]:
    return frozenset(p for p, s in fields_of(root).items() if s.section is None and _optional(s.hint))


# ---- the engine

def validate(kind: RecipeKind, raw: Any) -> tuple[dict[str, Any], set[str], list[Problem]]:
    """(values by dotted path with defaults filled in, paths given explicitly, problems), cross-key checks
    included. A value with a problem is left out of `values`, so that the cross checks skip it."""
    values: dict[str, Any] = {}
    given: set[str] = set()
    problems: list[Problem] = []
    _check_section(kind, "", raw, values, given, problems)
    problems += [p for check in kind.cross_checks for p in check(values, given)]
    return values, given, problems


def expand_shorthands(kind: RecipeKind, raw: Any) -> Any:
    """The raw tree with each one-word section written out (`quantization: 4bit` -> `quantization: {bits: 4}`), so
    that an override of one of its keys (`quantization.quant_type=fp4`) lands in a section. A copy; raw is kept."""
    import copy

    raw = copy.deepcopy(raw)
    for path, words in kind.shorthands.items():
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(last), str) and node[last] in words:
            node[last] = dict(words[node[last]])
    return raw


def raise_problems(kind: RecipeKind, label: str, problems: list[Problem], origins: dict[str, str] = {}) -> None:
    if problems:
        raise ConfigError(f"{label}: {len(problems)} problem(s) in the {kind.what}", fix=kind.fix,
                          problems=[(f"{path} (from {origins[path]})" if path in origins else path or kind.what)
                                    + ": " + text for path, text in problems])


def build(kind: RecipeKind, values: dict, cls: type | None = None, prefix: str = "") -> Any:
    """The frozen dataclass from checked values (every path present)."""
    cls = cls or kind.root
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        section = kind.fields[path].section
        kwargs[f.name] = build(kind, values, section, path) if section is not None else values[path]
    return cls(**kwargs)


def _check_section(kind: RecipeKind, prefix: str, node: Any, values: dict, given: set,
                   problems: list[Problem]) -> None:
    keys = kind.section_keys(prefix)
    if node is None:
        node = {}  # `peft:` with every child commented out
    words = kind.shorthands.get(prefix, {})
    if isinstance(node, str) and node in words:
        node = words[node]
    if not isinstance(node, dict):
        short = f"; or one of {', '.join(words)}" if words else ""
        problems.append((prefix, f"{show(node)} is {kind_of(node)}; expected a section with keys: {', '.join(keys)}"
                                 f"{short}"))
        return
    for key, value in node.items():
        if key not in keys:
            path = f"{prefix}.{key}" if prefix else str(key)
            problems.append((path, _unknown_key_text(kind, prefix, str(key), value)))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        spec = kind.fields[path]
        if spec.section is not None:
            _check_section(kind, path, node.get(key), values, given, problems)
        elif key not in node:
            if spec.default is dataclasses.MISSING:
                problems.append((path, f"missing (required): {kind.required_help[path]}"))
            else:
                values[path] = spec.default
        else:
            given.add(path)
            text = _check_value(kind, path, node[key], values)
            if text:
                problems.append((path, text))


def _check_value(kind: RecipeKind, path: str, value: Any, values: dict) -> str | None:
    """A problem text, or None after storing the checked (converted) value."""
    spec = kind.fields[path]
    if value == "" and path in kind.empty_means_null:
        value = None
    if path in kind.required_help and value in (None, ""):
        return f"missing (required, got {show(value)}): {kind.required_help[path]}"
    rule = kind.rules.get(path)
    ok, converted = coerce(value, spec.hint)
    if not ok:
        allowed = f" ({rule.allowed})" if rule else ""
        return f"{show(value)} is {kind_of(value)}; expected {describe(spec.hint)}{allowed}"
    if rule is not None and converted is not None and not rule.check(converted):
        null = " (or null)" if _optional(spec.hint) else ""
        near = difflib.get_close_matches(str(converted), rule.choices, n=1) if rule.choices else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{show(value)} is not allowed; allowed: {rule.allowed}{null}{hint}"
    values[path] = converted
    return None


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(True, value converted to the annotation) or (False, None). An int is a fine float; a bool is no int; one
    string is a fine list of strings (`metric: all`)."""
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
        if isinstance(value, str) and args == (str, Ellipsis):
            return True, (value,)
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


def kind_of(value: Any) -> str:
    """How an error names what a value is: "a string", "a list", "null", ..."""
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


def nearest_key(kind: RecipeKind, prefix: str, key: str) -> list[str]:
    """Full dotted paths the user probably meant: a close sibling first, else the same or a close name elsewhere."""
    near = difflib.get_close_matches(key, kind.section_keys(prefix), n=1, cutoff=0.6)
    if near:
        return [f"{prefix}.{near[0]}" if prefix else near[0]]
    names = sorted({p.rsplit(".", 1)[-1] for p in kind.fields})
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.7)
    return [p for p in kind.fields if near and p.rsplit(".", 1)[-1] == near[0]]


def _unknown_key_text(kind: RecipeKind, prefix: str, key: str, value: Any) -> str:
    near = nearest_key(kind, prefix, key)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return f"unknown key (value {show(value)}); {hint}allowed keys here: {', '.join(kind.section_keys(prefix))}"


# ---- overrides: short keys

def resolve_override_key(kind: RecipeKind, path: tuple[str, ...]) -> tuple[tuple[str, ...], list[Problem]]:
    """The full path of an override key. A key that is the tail of exactly one schema path may be written short
    (`beta`, `dpo_cfg.beta`); an ambiguous short key (`name`) is a problem; an unknown one passes through and is
    reported, with the nearest key, like any unknown key."""
    if path[0] in kind.section_keys(""):
        return path, _through_value(kind, path)
    for cut in range(len(path), 0, -1):
        head = ".".join(path[:cut])
        matches = [p for p in kind.fields if p == head or p.endswith("." + head)]
        if len(matches) > 1:
            return path, [(".".join(path), f"ambiguous short key; write the full path: {' or '.join(matches)}")]
        if matches:
            full = tuple(matches[0].split(".")) + path[cut:]
            return full, _through_value(kind, full)
    return path, []


def _through_value(kind: RecipeKind, path: tuple[str, ...]) -> list[Problem]:
    for depth in range(1, len(path)):
        spec = kind.fields.get(".".join(path[:depth]))
        if spec is None:
            return []
        if spec.section is None and typing.get_origin(spec.hint) is not dict:
            return [(".".join(path), f"cannot set: {spec.path} is a value ({describe(spec.hint)}), "
                                     "not a section with keys")]
    return []
