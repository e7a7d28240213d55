"""Evaluation recipes: Nova's evaluation-recipe shape (run / evaluation / inference), frozen, every error at once.

    run:
      name: my-eval                    # [a-z0-9-], at most 63 chars
      model_type: hf-causal-lm         # a free label, as Nova's
      model_name_or_path: [base, tuned] # one or more models: hub id, folder, s3://, .gguf, a LoRA adapter folder,
                                       # or a training run's output folder (its model/ is used); the first is the base
      replicas: 1                      # model actors (one per GPU, or one per replica on CPU)
      data_s3_path: data/eval.jsonl
      output_s3_path: outputs          # results under <output>/<name>/eval/, or <output>/eval/ for a run's folder
      mlflow_*: accepted as in Nova's recipes, not used by evaluation
    evaluation:
      task: gen_qa                     # gen_qa | preference | llm_judge
      strategy: gen_qa                 # gen_qa for gen_qa, logprob for preference, judge for llm_judge
      metric: all                      # all, or one or a list of the task's metric names
      ... raydpo additions: see Evaluation and Judge below
    inference:
      max_new_tokens: 256
      temperature: 0.0                 # 0 = greedy
      top_p: 1.0
      top_k: -1                        # -1 (or 0) = off
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.overrides import apply_overrides, load_yaml_text
from launcher.recipe_schema import K8S_NAME, Rule, int_range, interval, one_of
from core.errors import ConfigError

TASKS = ("gen_qa", "preference", "llm_judge")
STRATEGIES = {"gen_qa": "gen_qa", "preference": "logprob", "llm_judge": "judge"}


@dataclass(frozen=True, kw_only=True)
class EvalRun:
    name: str
    model_type: str = "hf-causal-lm"
    model_name_or_path: tuple[str, ...] = ()
    replicas: int = 1
    data_s3_path: str
    output_s3_path: str = "outputs"
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class Judge:
    model: str | None = None            # a local folder, hub id, s3:// or .gguf judge, run with Ray Data
    endpoint: str | None = None         # or an OpenAI-compatible server: http://host:port (/v1/chat/completions)
    endpoint_model: str | None = None   # the request's "model" field
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the bearer token, if set
    prompt_file: str | None = None      # null: evaluation/judge_prompt.txt; needs {question} {answer_a} {answer_b}
    compare: str = "reference"          # reference: each model vs the reference; base: each tuned model vs the base
    max_new_tokens: int = 16
    max_retries: int = 3                # endpoint retries after the first try, with exponential backoff
    timeout_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    task: str
    strategy: str | None = None         # null: the task's strategy
    metric: tuple[str, ...] = ("all",)
    format: str = "auto"                # preference rows: the data format (as training_config.data.format)
    key_map: dict = field(default_factory=dict)  # custom key names -> the format's keys
    system_prompt: str | None = None    # used where a row has no system prompt
    on_error: str = "fail"              # fail | skip: bad rows stop the evaluation, or are left out and listed
    max_rows: int | None = None         # evaluate the first N rows only
    rouge_stemmer: bool = True          # gen_qa: Porter stemmer in ROUGE (as HELM)
    beta: float | None = None           # preference: implicit-reward beta; null: the run's recipe, else 0.1
    max_length: int = 1024              # preference: prompt + answer tokens (longer pairs are cut and counted)
    judge: Judge = field(default_factory=Judge)


@dataclass(frozen=True, kw_only=True)
class Inference:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    batch_size: int = 8                 # (raydpo) rows per generation batch
    device: str = "auto"                # (raydpo) auto | cpu | gpu (auto: GPU when the cluster has one)


@dataclass(frozen=True, kw_only=True)
class EvalRecipe:
    run: EvalRun
    evaluation: Evaluation
    inference: Inference

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RULES: dict[str, Rule] = {
    "run.name": Rule(lambda v: len(v) <= 63 and bool(K8S_NAME.match(v)),
                     "a Kubernetes name: lowercase letters, digits and '-', at most 63 characters"),
    "run.replicas": int_range(1),
    "run.model_name_or_path": Rule(lambda v: all(s.strip() for s in v), "non-empty model paths"),
    "evaluation.task": one_of(*TASKS),
    "evaluation.max_rows": int_range(1),
    "evaluation.on_error": one_of("fail", "skip"),
    "evaluation.beta": interval(0.0, lo_open=True),
    "evaluation.max_length": int_range(8),
    "evaluation.judge.compare": one_of("reference", "base"),
    "evaluation.judge.max_new_tokens": int_range(1, 4096),
    "evaluation.judge.max_retries": int_range(0, 20),
    "evaluation.judge.timeout_s": interval(0.0, lo_open=True),
    "evaluation.judge.endpoint": Rule(lambda v: v.startswith(("http://", "https://")), "an http:// or https:// URL"),
    "inference.max_new_tokens": int_range(1, 32768),
    "inference.temperature": interval(0.0, 2.0),
    "inference.top_p": interval(0.0, 1.0, lo_open=True),
    "inference.top_k": Rule(lambda v: v >= -1, "-1 or 0 (off), or a positive number of tokens"),
    "inference.batch_size": int_range(1),
    "inference.device": one_of("auto", "cpu", "gpu"),
}

def task_metrics(task: str) -> tuple[str, ...]:
    if task == "gen_qa":
        from evaluation.gen_qa import METRICS
    elif task == "preference":
        from evaluation.preference import METRICS
    else:
        from evaluation.llm_judge import METRICS
    return METRICS


# ---- building the frozen recipe from a YAML tree, collecting every problem ----


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """(fits, value as the field holds it); YAML gives lists where fields hold tuples, ints where floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        return _type_ok(value, next(a for a in args if a is not type(None)))
    if origin is tuple:  # tuple[str, ...]: one string or a list of strings
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, list) and all(isinstance(s, str) for s in items)
        return ok, tuple(items) if ok else value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return "a string or a list of strings"
    base = names.get(args[0] if args else hint, str(hint))
    return base + (" or null" if type(None) in typing.get_args(hint) else "")


def _build(cls: type, tree: Any, prefix: str, problems: list[str]):
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        problems.append(f"{prefix.rstrip('.') or 'the recipe'}: must be a mapping of keys, got {tree!r}")
        tree = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in tree:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            problems.append(f"{prefix}{key}: unknown key" + (f" (did you mean {prefix}{near[0]}?)" if near else
                                                             f"; allowed: {', '.join(names)}"))
    values = {}
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, tree.get(f.name), path + ".", problems)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        # Nova's published recipes write '' for unset keys (data_s3_path: ""): missing, or null when optional.
        if f.name not in tree or (tree[f.name] == "" and (required or type(None) in typing.get_args(hint))):
            if required:
                problems.append(f"{path}: required")
            continue  # the default applies
        ok, value = _type_ok(tree[f.name], hint)
        if not ok:
            problems.append(f"{path}: must be {_type_name(hint)}, got {tree[f.name]!r}")
            continue
        rule = RULES.get(path)
        if value is not None and rule is not None and not rule.check(value):
            problems.append(f"{path}: must be {rule.allowed}, got {value!r}")
            continue
        values[f.name] = value
    try:
        return cls(**values)
    except TypeError:
        return None  # a required key is missing; already reported


def _cross_checks(models: Any, ev: Evaluation | None, problems: list[str]) -> None:
    """Checks across keys; `models` is run.model_name_or_path as written; a section that did not build (its
    problems are already listed) is skipped."""
    models = [models] if isinstance(models, str) and models else models if isinstance(models, list) else None
    if not models:
        problems.append("run.model_name_or_path: required (in the recipe or with --model)")
    if ev is None or ev.task not in TASKS:
        return
    if ev.strategy is not None and ev.strategy != STRATEGIES[ev.task]:
        problems.append(f"evaluation.strategy: task {ev.task} runs with strategy {STRATEGIES[ev.task]!r}, "
                        f"got {ev.strategy!r}")
    allowed = task_metrics(ev.task)
    if ev.metric != ("all",):
        bad = [m for m in ev.metric if m not in allowed]
        if bad or not ev.metric:
            problems.append(f"evaluation.metric: {', '.join(bad) or '[]'} not a {ev.task} metric; "
                            f"use all or some of: {', '.join(allowed)}")
    if ev.task == "llm_judge":
        judge = ev.judge
        if judge is not None and (judge.model is None) == (judge.endpoint is None):
            problems.append("evaluation.judge: set exactly one of judge.model (a local or hub model) and "
                            "judge.endpoint (an OpenAI-compatible URL)")
        if judge is not None and judge.compare == "base" and models is not None and len(models) < 2:
            problems.append("evaluation.judge.compare=base: needs two or more models (the first is the base)")


def build_eval_recipe(tree: Any, *, source: str = "the recipe") -> EvalRecipe:
    problems: list[str] = []
    if not isinstance(tree, dict):
        tree = {"": tree}  # reported as an unknown key below
    sections = {name: _build(cls, tree.get(name), name + ".", problems)
                for name, cls in (("run", EvalRun), ("evaluation", Evaluation), ("inference", Inference))}
    for key in tree:
        if key not in sections:
            problems.append(f"{key or 'the recipe'}: unknown section; allowed: run, evaluation, inference")
    run_tree = tree.get("run") if isinstance(tree.get("run"), dict) else {}
    _cross_checks(run_tree.get("model_name_or_path"), sections["evaluation"], problems)
    if problems:
        raise ConfigError(f"{source} is not a valid evaluation recipe", problems=problems,
                          fix="see recipes/eval_gen_qa.yaml for every key and its default")
    if sections["evaluation"].strategy is None:  # written out, so the results show how the task ran
        sections["evaluation"] = dataclasses.replace(sections["evaluation"],
                                                     strategy=STRATEGIES[sections["evaluation"].task])
    return EvalRecipe(**sections)


def load_eval_recipe(path: str, *, models: typing.Sequence[str] = (), output: str | None = None,
                     max_rows: int | None = None, overrides: typing.Sequence[str] = ()) -> EvalRecipe:
    """The recipe file, then dotted overrides, then --model (appended after the recipe's models), --output,
    --max-rows."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"evaluation recipe {path} does not exist", fix="give the path of an eval_*.yaml recipe")
    try:
        tree = load_yaml_text(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path} as YAML", why=str(err).splitlines()[0],
                          fix="check the file's indentation and quoting") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is not a mapping of run/evaluation/inference sections",
                          fix="see recipes/eval_gen_qa.yaml")
    tree, problems = apply_overrides(tree, overrides)
    if problems:
        raise ConfigError("overrides that cannot apply", problems=[f"{p}: {t}" for p, t in problems],
                          fix="write overrides as dotted.key=value, e.g. inference.max_new_tokens=64")
    run = tree.get("run") or {}
    if not isinstance(run, dict):
        return build_eval_recipe(tree, source=path)  # reports the broken section with everything else
    run = dict(run)
    if models:
        have = run.get("model_name_or_path") or []
        have = [have] if isinstance(have, str) else list(have)
        run["model_name_or_path"] = have + [m for m in models if m not in have]
    if output is not None:
        run["output_s3_path"] = output
    tree = {**tree, "run": run}
    if max_rows is not None and isinstance(tree.get("evaluation") or {}, dict):
        tree["evaluation"] = {**(tree.get("evaluation") or {}), "max_rows": max_rows}
    return build_eval_recipe(tree, source=path)
