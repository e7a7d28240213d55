"""`raydpo eval EVAL_RECIPE [--model PATH]... [key=value...]`: evaluate base and tuned models side by side.

Tasks (evaluation.task): gen_qa (answers scored against references), preference (log-probability ranking of held-out
pairs, implicit rewards of tuned models), llm_judge (a judge model compares answers in both orders). Models are the
recipe's run.model_name_or_path followed by each --model; the first is the base, the others are tuned models.

Results land in <output_s3_path>/<run.name>/eval/, or in <output_s3_path>/eval/ when output_s3_path is a training
run's folder (it holds manifest.json or recipe.yaml), where `raydpo report` reads them: results.json and rows.jsonl
(the latest evaluation), and the same two files under eval/<task>/ so that each task's latest results are kept.

results.json:
    {
      "task": "gen_qa" | "preference" | "llm_judge",
      "name": run.name,
      "base": label of the base model, "tuned": [labels of the other models],
      "models": {label: {"path": str, "metrics": {metric: float}, "n": rows scored, ...task extras}},
          gen_qa:     "truncated": answers that hit max_new_tokens, "truncated_rate"
          preference: "reference": its reference ("adapter_disabled", a model, or null), "beta", "truncated_pairs"
          llm_judge:  "compared_with": "reference" or the base's label; metrics carry *_ci_low/*_ci_high (Wilson
                      95%), wins/ties/losses and unparseable_verdicts
      "relative_change": {metric: (tuned - base) / |base|} for the first tuned model (null where base is 0),
      "relative_change_by_model": {tuned label: {metric: change}},
      "examples": [{"prompt", "reference", label: prediction, ...}] (the first 5 rows),
      "data": {"path", "rows", "skipped", "skipped_rows": [{"source", "reason"}]},
      "recipe": the resolved evaluation recipe,
      "partial": false (true when a judge endpoint failed part-way; "error" then says why),
      "rows_file": "rows.jsonl"
    }
|base| rather than base: log-probabilities are negative, and a better tuned model must read as a positive change.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from cluster.session import ray_session
from core import storage
from core.config import Recipe
from core.errors import ConfigError, DataError
from core.generate import GenerationSettings
from core.models import load_config, resolve_model_source, resolved_location
from core.tracking import redacted
from evaluation import gen_qa, llm_judge, preference
from evaluation.preference import ADAPTER_DISABLED
from launcher.console import user_console
from launcher.eval_recipe import load_eval_recipe
from launcher.recipe import load_recipe

EXAMPLES = 5
SHOWN_SKIPPED = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="EVAL_RECIPE", help="an evaluation recipe (see recipes/eval_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. inference.max_new_tokens=64")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a model to evaluate after the recipe's models (repeatable): a folder, a LoRA adapter "
                             "folder, a training run's output folder, a hub id, s3:// or .gguf")
    parser.add_argument("--output", metavar="PATH", help="replaces run.output_s3_path")
    parser.add_argument("--max-rows", type=int, metavar="N", help="evaluate the first N rows only")


# ---- small pure helpers (hand-worked tests in tests/launcher/test_eval_cli.py) ----


def model_labels(n: int) -> list[str]:
    """One model: "model"; two: "base", "tuned"; more: "base", "tuned_1", "tuned_2", ..."""
    if n == 1:
        return ["model"]
    if n == 2:
        return ["base", "tuned"]
    return ["base"] + [f"tuned_{i}" for i in range(1, n)]


def relative_change(base: dict, tuned: dict) -> dict:
    """{metric: (tuned - base) / |base|} over the numeric metrics both have; None where base is 0."""
    out = {}
    for name, b in base.items():
        t = tuned.get(name)
        if isinstance(b, (int, float)) and isinstance(t, (int, float)) and not isinstance(b, bool):
            out[name] = None if b == 0 else (t - b) / abs(b)
    return out


def select_metrics(metrics: dict, wanted: tuple[str, ...]) -> dict:
    """The metrics the recipe asks for (with their confidence bounds); everything for ("all",)."""
    if wanted == ("all",):
        return dict(metrics)
    return {k: v for k, v in metrics.items() if any(k == w or k.startswith(w + "_ci_") for w in wanted)}


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def build_results(task: str, name: str, recipe: dict | None, labels: list[str], models: dict, examples: list[dict],
                  data: dict, *, partial: bool = False, error: str | None = None) -> dict:
    base = labels[0] if len(labels) > 1 else None
    tuned = labels[1:] if base else []
    by_model = {t: relative_change(models[base]["metrics"], models[t]["metrics"]) for t in tuned if t in models}
    return {"task": task, "name": name, "base": base or labels[0], "tuned": tuned, "models": models,
            "relative_change": by_model.get(tuned[0], {}) if tuned else {}, "relative_change_by_model": by_model,
            "examples": examples[:EXAMPLES], "data": data, "recipe": recipe, "partial": partial,
            "error": error, "rows_file": "rows.jsonl"}


# ---- where things are ----


def is_run_folder(uri: str) -> bool:
    return storage.exists(join(uri, "manifest.json")) or storage.exists(join(uri, "recipe.yaml"))


def eval_output_dir(output: str, name: str) -> str:
    return join(output, "eval") if is_run_folder(output) else join(output, name, "eval")


def write_results(out_dir: str, results: dict, rows: list[dict], *, per_task_copy: bool = True) -> None:
    """results.json and rows.jsonl in out_dir (and in out_dir/<task>/, which the next task does not overwrite)."""
    body = json.dumps(results, indent=2, ensure_ascii=False).encode()
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    for folder in (out_dir, join(out_dir, results["task"])) if per_task_copy else (out_dir,):
        storage.write_bytes(join(folder, "rows.jsonl"), lines)
        storage.write_bytes(join(folder, "results.json"), body)


def resolve_model(source: str) -> tuple[str, Path | None]:
    """(the model to load, the training run folder it came from or None); a missing model is a ConfigError."""
    path = Path(source).expanduser()
    if not source.startswith("s3://") and path.is_dir():
        if (path / "recipe.yaml").is_file() and (path / "model").is_dir():
            return str((path / "model").resolve()), path.resolve()
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise ConfigError(f"model folder {source} holds neither config.json nor adapter_config.json",
                              fix="give a model folder, a LoRA adapter folder, or a training run's output folder")
        run = path.resolve().parent
        return str(path.resolve()), run if (run / "recipe.yaml").is_file() else None
    # A hub id is org/name; a deeper path, or one whose parent folder exists here, is a local folder that is missing
    # (asking the hub for it would only add a minute of retries before the same answer).
    looks_local = source.count("/") > 1 or source.startswith((".", "~", "/")) or (
        "/" in source and path.parent.is_dir())
    if "://" not in source and not source.endswith(".gguf") and looks_local:
        raise ConfigError(f"model folder {source} does not exist",
                          fix="check the path (--model or run.model_name_or_path); a hub id has the form org/name")
    resolved = resolve_model_source(source)  # a missing local file or folder raises here
    if not source.startswith("s3://"):
        load_config(resolved)  # a hub id that cannot be reached raises here, before any worker starts
    return source, None


def resolve_models(sources: list[str]) -> list[tuple[str, Path | None]]:
    """resolve_model for each; every model that cannot be loaded is listed in one ConfigError."""
    resolved, problems = [], []
    for source in sources:
        try:
            resolved.append(resolve_model(source))
        except ConfigError as err:
            problems.append(err.what + (f" ({err.why})" if err.why else ""))
    if problems:
        raise ConfigError(f"{len(problems)} of {len(sources)} model(s) cannot be loaded", problems=problems,
                          fix="check run.model_name_or_path and --model: a model folder, a LoRA adapter folder, a "
                              "training run's output folder, an s3:// folder, a .gguf file or a hub id (org/name)")
    return resolved


def trained_recipe(run: str | None) -> Recipe | None:
    """The typed recipe a training run folder holds (its resolved recipe.yaml), or None for a model without one."""
    if run is None:
        return None
    return load_recipe(Path(run) / "recipe.yaml")


ROW_NEEDS = {
    "preference": "every row must be a preference pair in a training data format",
    "gen_qa": "every row needs a prompt (prompt, messages, query or question) and a reference answer (reference, "
              "response or answer), or must be a preference pair (its chosen answer is the reference)",
}


def _check_rows(rows: list, bad: list, path: str, on_error: str, task: str) -> dict:
    if bad and on_error == "fail" or not rows:
        shown = [f"{source}: {reason}" for source, reason in bad[:20]]
        more = [f"... and {len(bad) - 20} more"] if len(bad) > 20 else []
        raise DataError(f"{path}: {len(bad)} bad row(s), {len(rows)} usable", problems=shown + more,
                        why=ROW_NEEDS.get(task, ROW_NEEDS["gen_qa"]),
                        fix="fix the rows, or set evaluation.on_error=skip to leave them out (they are listed in "
                            "the results)")
    return {"path": path, "rows": len(rows), "skipped": len(bad),
            "skipped_rows": [{"source": s, "reason": r} for s, r in bad[:SHOWN_SKIPPED]]}


def eval_log_file(out_dir: str) -> Path:
    """Where Ray's output goes: beside the results when they are local, else under the temp folder."""
    if storage.is_remote(out_dir):
        return Path(tempfile.gettempdir()) / "raydpo" / out_dir.removeprefix("s3://").replace("/", "_") / "eval.log"
    return Path(out_dir) / "logs" / "eval.log"


def _cluster(recipe, say) -> tuple[int, bool]:
    """(model actors, use_gpu) on the Ray cluster of this session."""
    import ray  # 0.3 s: lazy, as every command module is imported when `raydpo validate` builds its parser

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    device = recipe.inference.device
    if device == "gpu" and gpus == 0:
        raise ConfigError("inference.device=gpu but the Ray cluster has no GPU",
                          fix="set inference.device=auto (or cpu), or connect to a cluster with GPUs (RAY_ADDRESS)")
    use_gpu = device == "gpu" or (device == "auto" and gpus > 0)
    limit = gpus if use_gpu else max(1, cpus)
    workers = min(recipe.run.replicas, limit)
    if workers < recipe.run.replicas:
        say(f"run.replicas={recipe.run.replicas} but the cluster has room for {workers} model actor(s); "
            f"using {workers}")
    return workers, use_gpu


def preference_reference(model: dict, first: dict, is_base: bool) -> str | None:
    """A tuned model's reference: its base with the adapter off (LoRA), the model its run trained from, or the
    recipe's base model. None for the base itself (and for a lone model with nothing to compare against)."""
    if is_base:
        return None
    if storage.exists(join(model["path"], "adapter_config.json")):
        return ADAPTER_DISABLED
    trained = trained_recipe(model["run"])
    trained_from = trained.run.model_name_or_path if trained else None
    if trained_from:
        # actors may run in another working directory: a local path travels absolute
        return str(Path(trained_from).resolve()) if Path(trained_from).exists() else trained_from
    return first["path"] if first is not model else None


def reference_scored_as(model: dict, earlier: list[dict]) -> str | None:
    """The label of a model scored before `model` whose weights are `model`'s reference (a LoRA adapter's base, the
    model a full run trained from): its log-probabilities are reused instead of a second forward pass per pair."""
    reference = model.get("reference")
    if reference == ADAPTER_DISABLED:
        config = json.loads(storage.read_bytes(join(model["path"], "adapter_config.json")))
        reference = config.get("base_model_name_or_path")
    if not reference:
        return None
    weights = resolved_location(str(reference))
    return next((m["label"] for m in earlier if resolved_location(str(m["path"])) == weights), None)


def preference_beta(recipe, model: dict) -> float:
    """evaluation.beta, else the beta the model was trained with (its run's recipe.yaml), else 0.1 (TRL's)."""
    if recipe.evaluation.beta is not None:
        return recipe.evaluation.beta
    trained = trained_recipe(model["run"])
    return trained.training_config.model.dpo_cfg.beta if trained else 0.1


def read_data(recipe) -> tuple[list[dict], dict]:
    ev = recipe.evaluation
    path = recipe.run.data_s3_path
    read = preference.read_pairs if ev.task == "preference" else gen_qa.read_qa_rows
    rows, bad = read(path, fmt=ev.format, key_map=dict(ev.key_map), max_rows=ev.max_rows)
    return rows, _check_rows(rows, bad, path, ev.on_error, ev.task)


def run(args: argparse.Namespace) -> int:
    recipe = load_eval_recipe(args.recipe, models=args.model, output=args.output, max_rows=args.max_rows,
                              overrides=args.overrides)
    ev, task = recipe.evaluation, recipe.evaluation.task
    # Everything a user can get wrong is checked before Ray starts: models, judge, prompt file, data.
    sources = list(recipe.run.model_name_or_path)
    labels = model_labels(len(sources))
    models = [{"label": label, "source": source, "path": path, "run": str(run_dir) if run_dir else None}
              for label, source, (path, run_dir) in zip(labels, sources, resolve_models(sources))]
    judge = ev.judge
    if task == "llm_judge":
        llm_judge.load_judge_prompt(judge.prompt_file)
        if judge.model:
            judge = dataclasses.replace(judge, model=resolve_model(judge.model)[0])
    rows, data = read_data(recipe)
    if task == "preference":
        for i, model in enumerate(models):
            model["reference"] = preference_reference(model, models[0], is_base=i == 0 and len(models) > 1)
            model["beta"] = preference_beta(recipe, model)
            model["reference_scored_as"] = reference_scored_as(model, models[:i])
    out_dir = eval_output_dir(recipe.run.output_s3_path, recipe.run.name)
    log_file = eval_log_file(out_dir)
    shown_recipe = redacted(recipe.to_dict())  # results.json is read by many: a URI's password shows as ***

    # Ray's and the models' chatter goes to the log file; the console gets raydpo's lines and the table
    with user_console(log_file) as say, ray_session(num_cpus=None, num_gpus=None, log_file=log_file):
        say(f"{task}: {len(rows)} row(s), {len(models)} model(s); Ray's log: {log_file}")

        def keep_partial(entries: dict, judged: list[dict], examples: list[dict], error: str) -> None:
            results = build_results(task, recipe.run.name, shown_recipe, labels, _selected(entries, ev.metric),
                                    examples, data, partial=True, error=error)
            write_results(out_dir, results, judged)
            say(f"partial results (judged before the error) written to {join(out_dir, 'results.json')}")

        workers, use_gpu = _cluster(recipe, say)
        entries, per_row, examples = _evaluate(recipe, task, rows, models, judge, workers, use_gpu, keep_partial)
    results = build_results(task, recipe.run.name, shown_recipe, labels, _selected(entries, ev.metric), examples,
                            data)
    write_results(out_dir, results, per_row)
    print_summary(results, join(out_dir, "results.json"))
    return 0


def _selected(entries: dict, wanted: tuple[str, ...]) -> dict:
    return {label: {**entry, "metrics": select_metrics(entry["metrics"], wanted)} for label, entry in entries.items()}


def _evaluate(recipe, task, rows, models, judge, workers, use_gpu, keep_partial):
    inf, ev = recipe.inference, recipe.evaluation
    generation = GenerationSettings(max_new_tokens=inf.max_new_tokens, temperature=inf.temperature, top_p=inf.top_p,
                                    top_k=inf.top_k, batch_size=inf.batch_size)
    if ev.system_prompt:
        rows = [{**r, "system": r.get("system") or ev.system_prompt} for r in rows]
    if task == "gen_qa":
        return gen_qa.evaluate(rows, models, generation, use_stemmer=ev.rouge_stemmer, workers=workers,
                               use_gpu=use_gpu)
    if task == "preference":
        settings = preference.PreferenceSettings(max_length=ev.max_length, system_prompt=ev.system_prompt,
                                                 batch_size=inf.batch_size)
        return preference.evaluate(rows, models, settings, workers=workers, use_gpu=use_gpu)
    return llm_judge.evaluate(rows, models, judge, generation, workers=workers, use_gpu=use_gpu,
                              on_partial=keep_partial)


def print_summary(results: dict, where: str) -> None:
    labels = list(results["models"])
    metrics = [m for m in results["models"][labels[0]]["metrics"]] if labels else []
    for label in labels[1:]:
        metrics += [m for m in results["models"][label]["metrics"] if m not in metrics]
    header = ["metric", *labels] + (["change"] if results["relative_change"] else [])
    lines = [header]
    for m in metrics:
        cells = [m] + [_fmt(results["models"][l]["metrics"].get(m)) for l in labels]
        if results["relative_change"]:
            change = results["relative_change"].get(m)
            cells.append("" if change is None else f"{change:+.1%}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"results: {where}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
