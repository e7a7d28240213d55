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
import typing
from pathlib import Path
from typing import Any

import yaml

from core.config import EvalRecipe, EvalRun, Evaluation, Inference, Judge  # noqa: F401 - the kind's shape
from core.errors import ConfigError
from launcher import validation
from launcher.overrides import Problem, apply_overrides, load_yaml_text
from launcher.validation import RUN_NAME, RecipeKind, Rule, int_range, interval, one_of

TASKS = ("gen_qa", "preference", "llm_judge")
STRATEGIES = {"gen_qa": "gen_qa", "preference": "logprob", "llm_judge": "judge"}

RULES: dict[str, Rule] = {
    "run.name": RUN_NAME,
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
REQUIRED_HELP = {
    "run.name": "a Kubernetes-style name for the evaluation, e.g. my-eval",
    "run.data_s3_path": "a JSONL file, a folder or an s3:// prefix of evaluation rows",
    "evaluation.task": "one of " + ", ".join(TASKS),
}
MODELS = "run.model_name_or_path"


def task_metrics(task: str) -> tuple[str, ...]:
    if task == "gen_qa":
        from evaluation.gen_qa import METRICS
    elif task == "preference":
        from evaluation.preference import METRICS
    else:
        from evaluation.llm_judge import METRICS
    return METRICS


# ---- checks across keys (each pure: values by dotted path -> problems)

def check_models(values: dict, given: set) -> list[Problem]:
    if MODELS in values and not values[MODELS]:
        return [(MODELS, "missing (required): one or more models, in the recipe or with --model (the first is "
                         "the base)")]
    return []


def check_strategy(values: dict, given: set) -> list[Problem]:
    task, strategy = values.get("evaluation.task"), values.get("evaluation.strategy")
    if task in STRATEGIES and strategy is not None and strategy != STRATEGIES[task]:
        return [("evaluation.strategy", f"{strategy!r} is not allowed: task {task} runs with strategy "
                                        f"{STRATEGIES[task]!r}; allowed: {STRATEGIES[task]} or null")]
    return []


def check_metric(values: dict, given: set) -> list[Problem]:
    task, metric = values.get("evaluation.task"), values.get("evaluation.metric")
    if task not in TASKS or metric is None or metric == ("all",):
        return []
    allowed = task_metrics(task)
    bad = [m for m in metric if m not in allowed]
    if bad or not metric:
        return [("evaluation.metric", f"{', '.join(bad) or '[]'} not a {task} metric; allowed: all, or some of: "
                                      f"{', '.join(allowed)}")]
    return []


def check_judge(values: dict, given: set) -> list[Problem]:
    if values.get("evaluation.task") != "llm_judge":
        return []
    problems = []
    model, endpoint = values.get("evaluation.judge.model"), values.get("evaluation.judge.endpoint")
    if (model is None) == (endpoint is None):
        problems.append(("evaluation.judge", "set exactly one of judge.model (a local or hub model) and "
                                             "judge.endpoint (an OpenAI-compatible URL)"))
    models = values.get(MODELS)
    if values.get("evaluation.judge.compare") == "base" and models is not None and len(models) < 2:
        problems.append(("evaluation.judge.compare", "base needs two or more models (the first is the base)"))
    return problems


# the evaluation recipe as a kind of recipe for the one validator engine (launcher/validation.py)
EVAL = RecipeKind(
    what="evaluation recipe", root=EvalRecipe, rules=RULES, required_help=REQUIRED_HELP,
    # Nova's published recipes write '' for unset keys (mlflow_tracking_uri: ''): null where a key may be null
    empty_means_null=validation.optional_paths(EvalRecipe),
    cross_checks=(check_models, check_strategy, check_metric, check_judge),
    fix="fix each key listed; recipes/eval_gen_qa.yaml shows every key with its default")


def build_eval_recipe(tree: Any, *, source: str = "the recipe") -> EvalRecipe:
    values, _given, problems = validation.validate(EVAL, tree)
    validation.raise_problems(EVAL, source, problems)
    recipe = validation.build(EVAL, values)
    if recipe.evaluation.strategy is None:  # written out, so the results show how the task ran
        recipe = dataclasses.replace(recipe, evaluation=dataclasses.replace(
            recipe.evaluation, strategy=STRATEGIES[recipe.evaluation.task]))
    return recipe


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
