"""The driver side of a training run: check the data, plan, run the Ray Train job, write the run's outputs.

Called by `raydpo train` inside a Ray session. Takes the resolved recipe as a plain dict.
"""
from __future__ import annotations

import json
import os
import queue as queue_module
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

from training import checkpoint as ckpt
from core import storage, tracking
from core.data import pipeline
from core.errors import DataError, RaydpoError
from core.manifest import write_manifest
from training.trainer import (RAY_TRAIN_DIR, ProgressCallback, build_trainer, format_progress, format_validation,
                              plan_run, run_uri)

PROBE_PAIRS = 4
METRIC_KEYS = ("step", "epoch", "split", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s",
               "padding_waste", "real_tokens", "elapsed_s")


def run_recipe(recipe: dict, *, say: Callable[[str], None], on_gpu: bool = False, gpus_per_node: int = 1,
               placement_strategy: str = "PACK", resume_from: str | None = None,
               plan_overrides: dict | None = None) -> dict:
    """plan_overrides: plan keys to replace (benchmarks/vs_trl.py turns the optimisations off with it)."""
    tc = recipe["training_config"]
    data_cfg = tc["data"]
    uri = run_uri(recipe)
    finished = ckpt.finished_run(uri, recipe, resume_from)  # a rerun of a finished run (a job retry): nothing to do
    if finished is not None:
        say(f"run {recipe['run']['name']} is already complete at {uri} (manifest.json): nothing to train")
        return finished
    # local outputs are written in place (MLflow's file store records absolute paths); remote ones staged, uploaded
    staging = Path(tempfile.mkdtemp(prefix="raydpo-run-")) if storage.is_remote(uri) else Path(uri)
    staging.mkdir(parents=True, exist_ok=True)

    # ---- data: every file listed, every row parsed once, bad rows reported before any training starts
    train_files = storage.list_data_files(recipe["run"]["data_s3_path"])
    val_path = recipe["run"]["validation_data_s3_path"]
    val_files = storage.list_data_files(val_path) if val_path else []
    fraction = 0.0 if val_files else data_cfg["validation_fraction"]
    say(f"checking data: {len(train_files)} training file(s), {len(val_files)} validation file(s)")
    summary = pipeline.preflight(train_files, data_cfg, tc["seed"], fraction)
    if val_files:
        val_summary = pipeline.preflight(val_files, data_cfg, tc["seed"], 0.0)
        summary.validation_pairs = val_summary.train_pairs
        summary.bad_rows += val_summary.bad_rows
    write_jsonl(staging / "skipped_rows.jsonl", [{"source": s, "reason": r} for s, r in summary.bad_rows])
    if summary.bad_rows and data_cfg["on_error"] == "fail":
        shown = [f"{s}: {r}" for s, r in summary.bad_rows[:20]]
        more = len(summary.bad_rows) - len(shown)
        raise DataError(f"{len(summary.bad_rows)} bad row(s) in the training data",
                        problems=shown + ([f"... and {more} more"] if more else []),
                        why="training_config.data.on_error is 'fail'",
                        fix="fix these rows (`raydpo data validate PATH` lists them all), or set "
                            "training_config.data.on_error=skip to train without them")
    if summary.bad_rows:
        say(f"skipping {len(summary.bad_rows)} bad row(s); listed in {uri}/skipped_rows.jsonl")
    say(f"data: {summary.train_pairs} training pairs, {summary.validation_pairs} validation pairs")

    train_ds = pipeline.tokenized_dataset(train_files, recipe, "train", fraction)
    datasets = {"train": train_ds}
    if summary.validation_pairs:
        datasets["validation"] = (pipeline.tokenized_dataset(val_files, recipe, "train", 0.0) if val_files
                                  else pipeline.tokenized_dataset(train_files, recipe, "validation", fraction))
    probe = probe_pairs(train_files, recipe, fraction)
    plan = plan_run(recipe, train_pairs=summary.train_pairs, validation_pairs=summary.validation_pairs,
                    on_gpu=on_gpu, gpus_per_node=gpus_per_node, probe=probe) | (plan_overrides or {})
    if plan["total_steps"] == 0:
        raise DataError(f"{summary.train_pairs} training pairs make no full step of "
                        f"global_batch_size={tc['global_batch_size']}",
                        fix="add data or lower training_config.global_batch_size")
    if "validation" in datasets and not plan["has_validation"]:
        del datasets["validation"]
    say(f"plan: {plan['workers']} worker(s) × micro batch {plan['micro_batch']} × accumulation {plan['accum']} = "
        f"{tc['global_batch_size']} pairs per step, {plan['total_steps']} steps, reference: {plan['reference']}")
    if plan["reference"] == "precompute":  # reference log-probs ahead of training, cached (training/reference.py)
        from training.reference import file_fingerprints, precompute_reference

        datasets, plan["reference_precompute"] = precompute_reference(
            datasets, recipe, key_parts={"train": file_fingerprints(train_files), "validation":
                                         file_fingerprints(val_files)},
            on_gpu=on_gpu, actors=plan["workers"] if on_gpu else 1, chunk_size=plan["logprob_chunk"], say=say,
            share_prompt=plan["share_prompt"])

    # ---- resume: the latest complete checkpoint under the run (or --resume-from), with its step and data position
    resume = ckpt.resume_point(f"{uri}/{RAY_TRAIN_DIR}", resume_from)
    plan |= {"resume_from": resume["uri"], "ray_checkpoint_at_start": resume["ray_latest"],
             "ray_train_uri": f"{uri}/{RAY_TRAIN_DIR}", "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
             "checkpoints_at_start": ckpt.checkpoint_names(f"{uri}/{RAY_TRAIN_DIR}")}
    resumed_step = resume["state"]["step"] if resume["uri"] else 0
    if resume["uri"]:
        ckpt.check_resumable(resume["state"], plan, tc["seed"], resume["uri"])
        say(f"resuming from {resume['uri']}: step {resumed_step}/{plan['total_steps']}, "
            f"{resume['state']['samples_consumed']} pairs consumed")
    earlier_rows = ckpt.metrics_until(uri, resumed_step)  # the interrupted run's curve up to the checkpoint

    # ---- train: the workers report every step; the driver prints and records
    (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (staging / "data_summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
    storage_fs, storage_path = storage.pyarrow_filesystem_for(uri)
    import ray.util.queue

    progress = ray.util.queue.Queue()
    trainer = build_trainer(recipe, plan, datasets, storage_path=storage_path, storage_filesystem=storage_fs,
                            callbacks=[ProgressCallback(progress)], placement_strategy=placement_strategy)
    started = time.time()
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(fit(trainer)), daemon=True)
    runner.start()
    metrics_rows, final, worker_failures = list(earlier_rows), {}, 0
    step_events: list[int | None] = []  # train steps as reported, None where a worker failure was
    trackers = tracking.open_trackers(str(staging), recipe)
    with open(staging / "metrics.jsonl", "w") as metrics_file:
        metrics_file.writelines(json.dumps(row) + "\n" for row in earlier_rows)
        metrics_file.flush()
        while runner.is_alive() or not progress.empty():
            try:
                event = progress.get(timeout=0.5)
            except queue_module.Empty:
                continue
            if "exception" in event:
                worker_failures += 1
                step_events.append(None)
                restart = ("no restart left" if -1 < tc["max_failures"] < worker_failures else
                           "restarting from the last complete checkpoint")
                say(f"worker failure {worker_failures} ({restart}; max_failures={tc['max_failures']}): "
                    f"{list(event['exception'].values())[0][:300]}")
                continue
            report = event["metrics"]
            replayed = bool(report.get("replayed"))  # rows from the checkpoint a restart went on from
            seen = {(r["split"], r["step"]) for r in metrics_rows} if replayed else set()
            for row in report.get("reports", []):
                row = {k: row[k] for k in METRIC_KEYS if k in row} | {"total_steps": plan["total_steps"]}
                if (row["split"], row["step"]) in seen:
                    continue  # replayed, but it did arrive
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                metrics_rows.append(row)
                tracking.log_metrics(trackers, tracking.row_metrics(row), row["step"])
                if replayed:
                    say(f"step {row['step']} ({row['split']}): its metrics came back with the checkpoint")
                    continue
                step_events += [row["step"]] if row["split"] == "train" else []
                say(format_progress(row | {"elapsed_s": row.get("elapsed_s", time.time() - started)})
                    if row["split"] == "train" else format_validation(row))
            if event.get("checkpoint") and storage.is_remote(uri):  # the curve so far survives a driver failure
                storage.write_bytes(f"{uri}/metrics.jsonl", (staging / "metrics.jsonl").read_bytes())
            if report.get("final"):
                final = report
    runner.join()
    tracking.close(trackers, status="FAILED" if "error" in outcome else "FINISHED")
    if "error" in outcome:
        raise outcome["error"]

    # ---- outputs: small files from the driver, the model from rank 0, the manifest last
    train_rows = [r for r in metrics_rows if r["split"] == "train"]
    result = {"run_uri": uri, "steps": final.get("step", 0), "planned_steps": plan["total_steps"],
              "wall_s": time.time() - started, "train_pairs": summary.train_pairs,
              "final_train": train_rows[-1] if train_rows else None,
              "final_validation": next((r for r in reversed(metrics_rows) if r["split"] == "validation"), None),
              "plan": {k: v for k, v in plan.items() if k != "probe"},
              "resumed_from": {"checkpoint": resume["uri"], "step": resumed_step} if resume["uri"] else None,
              "worker_failures": worker_failures, "restarts": ckpt.restarts(step_events, resumed_step)}
    (staging / "summary.json").write_text(json.dumps(result, indent=2))
    (staging / "probe_logps.json").write_text(json.dumps({"pairs": probe, "logps": final.get("probe_logps")}))
    if storage.is_remote(uri):
        storage.upload_dir(str(staging), uri)
    write_report_quietly(uri, say)
    write_manifest(uri)
    return result


def probe_pairs(files: list[str], recipe: dict, fraction: float) -> dict:
    """The first few training pairs, tokenised here: the workers report their final log-probabilities on them so
    that a reloaded model can be checked against the trained one."""
    from core.data.formats import iter_raw_rows, parse_line
    from core.data.tokenize import tokenize_record
    from core.models import load_tokenizer

    tc = recipe["training_config"]
    data_cfg = tc["data"]
    tokenizer = load_tokenizer(recipe["run"]["model_name_or_path"])
    pairs, detected = [], {}
    for path in files:
        for text, source in iter_raw_rows(path):
            record, error = parse_line(text, source, data_cfg["format"], data_cfg["key_map"] or None, detected)
            if error or pipeline.split_of(source, fraction, tc["seed"]) != "train":
                continue
            pairs.append(tokenize_record(record, tokenizer, max_length=tc["max_length"],
                                         max_prompt_length=data_cfg["max_prompt_length"],
                                         keep=data_cfg["prompt_truncation"], default_system=data_cfg["system_prompt"]))
            if len(pairs) == PROBE_PAIRS:
                return {k: [p[k] for p in pairs] for k in pipeline.TOKEN_COLUMNS}
    return {k: [p[k] for p in pairs] for k in pipeline.TOKEN_COLUMNS}


def write_report_quietly(run_uri: str, say) -> None:
    from evaluation.report import write_report

    try:
        md, html = write_report(run_uri)
        say(f"report: {html}")
    except Exception as err:  # noqa: BLE001 - a report problem must not fail a finished training run
        say(f"report not written: {err}")


def fit(trainer) -> dict:
    try:
        return {"result": trainer.fit()}
    except RaydpoError as err:
        return {"error": err}
    except Exception as err:  # noqa: BLE001 - Ray wraps worker errors; unwrap ours, keep the rest whole
        cause = find_raydpo_error(err)
        return {"error": cause or err}


def find_raydpo_error(err: BaseException) -> RaydpoError | None:
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if id(current) in seen or current is None:
            continue
        seen.add(id(current))
        if isinstance(current, RaydpoError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        stack += list(getattr(current, "worker_failures", {}).values()) if isinstance(
            getattr(current, "worker_failures", None), dict) else []
    return None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
