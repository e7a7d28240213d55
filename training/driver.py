"""The driver side of a training run: check the data, plan once, run the Ray Train job, write the run's outputs.

Called by `raydpo train` inside a Ray session, with the frozen Recipe and where the workers go (the launcher asks
cluster/placement.py). Builds one frozen RunPlan (training/plan.py) and hands both objects to the workers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue as queue_module
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import ray.util.queue
import yaml

from core import storage, tracking, vision
from core.config import Recipe, as_dict, run_uri
from core.data import pipeline
from core.data.formats import parse_line
from core.data.images import check_image_data_limits
from core.data.raw_rows import iter_raw_rows
from core.data.tokenize import tokenize_record
from core.errors import DataError, RaydpoError
from core.manifest import write_manifest
from core.startup_trace import mark
from core.models import load_config, load_tokenizer
from training import checkpoint as ckpt
from training import ds_config, failures, reshard
from training.plan import RAY_TRAIN_DIR, ResumeAt, RunPlan, build_run_plan
from training.trainer import ProgressCallback, build_trainer, format_progress, format_validation

PROBE_PAIRS = 4
METRIC_KEYS = ("step", "epoch", "split", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "lr", "lr_groups", "grad_norm", "tokens_per_s",
               "padding_waste", "padding_unique", "real_tokens", "elapsed_s")


def run_training(recipe: Recipe, *, say: Callable[[str], None], workers: int, use_gpu: bool = False,
                 placement_strategy: str = "PACK", resume_from: str | None = None,
                 plan_overrides: dict | None = None,
                 before_manifest: Callable[[str], None] | None = None) -> dict:
    """Trains the recipe and writes the run's outputs; returns summary.json's content.

    workers, use_gpu, placement_strategy: from cluster/placement.py. plan_overrides: plan fields to replace
    (benchmarks/vs_trl.py turns the optimisations off with it). before_manifest(run_uri): the caller's last
    outputs (the launcher's report), written before the manifest lists every artifact.
    """
    tc = recipe.training_config
    data_cfg = tc.data
    # a batch split the workers cannot share is a ConfigError now, not after the data check (the plan repeats it)
    ds_config.batch_plan(tc.global_batch_size, workers, tc.micro_batch_size, replicas=recipe.run.replicas)
    uri = run_uri(recipe)
    recipe_tree = as_dict(recipe)
    finished = ckpt.finished_run(uri, recipe_tree, resume_from)  # a rerun of a finished run: nothing to do
    if finished is not None:
        say(f"run {recipe.run.name} is already complete at {uri} (manifest.json): nothing to train")
        return finished
    # local outputs are written in place (MLflow's file store records absolute paths); remote ones staged, uploaded
    staging = Path(tempfile.mkdtemp(prefix="raydpo-run-")) if storage.is_remote(uri) else Path(uri)
    staging.mkdir(parents=True, exist_ok=True)

    # ---- data: every file listed, every row parsed once, bad rows reported before any training starts
    train_files = storage.list_data_files(recipe.run.data_s3_path)
    val_path = recipe.run.validation_data_s3_path
    val_files = storage.list_data_files(val_path) if val_path else []
    fraction = 0.0 if val_files else data_cfg.validation_fraction
    say(f"checking data: {len(train_files)} training file(s), {len(val_files)} validation file(s)")
    # a vision-language model (core/vision.py): its rows' images are checked here and processed in the data stages
    vlm = vision.is_vision_config(load_config(recipe.run.model_name_or_path)) or None
    summary = pipeline.preflight(train_files, data_cfg, tc.seed, fraction, vision=vlm)
    if vlm:  # Nova's limits for image data (max_length, pairs): as soon as the pre-flight knows it holds images
        check_image_data_limits(summary.train_pairs + summary.validation_pairs, summary.images, tc.max_length,
                                "training data")
    if val_files:
        val_summary = pipeline.preflight(val_files, data_cfg, tc.seed, 0.0, vision=vlm)
        if vlm:
            check_image_data_limits(val_summary.train_pairs, val_summary.images, tc.max_length, "validation data")
        summary.validation_pairs = val_summary.train_pairs
        summary.images += val_summary.images
        summary.bad_rows += val_summary.bad_rows
    write_jsonl(staging / "skipped_rows.jsonl", [{"source": s, "reason": r} for s, r in summary.bad_rows])
    if summary.bad_rows and data_cfg.on_error == "fail":
        shown = [f"{s}: {r}" for s, r in summary.bad_rows[:20]]
        more = len(summary.bad_rows) - len(shown)
        raise DataError(f"{len(summary.bad_rows)} bad row(s) in the training data",
                        problems=shown + ([f"... and {more} more"] if more else []),
                        why="training_config.data.on_error is 'fail'",
                        fix="fix these rows (`raydpo data validate PATH` lists them all), or set "
                            "training_config.data.on_error=skip to train without them")
    if summary.bad_rows:
        say(f"skipping {len(summary.bad_rows)} bad row(s); listed in {uri}/skipped_rows.jsonl")
    mark("data checked")
    say(f"data: {summary.train_pairs} training pairs, {summary.validation_pairs} validation pairs"
        + (f", {summary.images} images" if vlm else ""))

    # ---- resume: the latest complete checkpoint under the run (or --resume-from), with its step and data position
    ray_train_uri = f"{uri}/{RAY_TRAIN_DIR}"
    resume = ckpt.resume_point(ray_train_uri, resume_from)
    probe = None if vlm else probe_pairs(train_files, recipe, fraction)  # a VLM's probe would need its images

    # ---- the plan, once: nothing edits it afterwards
    plan = build_run_plan(
        recipe, workers=workers, use_gpu=use_gpu, placement_strategy=placement_strategy,
        train_pairs=summary.train_pairs, validation_pairs=summary.validation_pairs, probe=probe,
        resume=ResumeAt(checkpoint=resume["uri"], ray_checkpoint_at_start=resume["ray_latest"],
                        checkpoints_at_start=tuple(ckpt.checkpoint_names(ray_train_uri)),
                        zero_stage=resume["state"]["plan"].get("zero_stage") if resume["uri"] else None),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), overrides=(plan_overrides or {}) | (
            {"reference": vision.reference_for(tc.model.dpo_cfg.reference, tc.model.peft.peft_scheme == "lora")}
            if vlm else {}))
    if plan.total_steps == 0:
        raise DataError(f"{summary.train_pairs} training pairs make no full step of "
                        f"global_batch_size={tc.global_batch_size}",
                        fix="add data or lower training_config.global_batch_size")
    resumed_step = resume["state"]["step"] if resume["uri"] else 0
    if resume["uri"]:
        ckpt.check_resumable(resume["state"], plan, tc.seed, resume["uri"])
        say(f"resuming from {resume['uri']}: step {resumed_step}/{plan.total_steps}, "
            f"{resume['state']['samples_consumed']} pairs consumed")
        if reshard.needs_universal(resume["state"]["plan"], plan.workers, plan.zero_stage):
            say(f"the checkpoint was written by {resume['state']['plan']['workers']} worker(s), this run has "
                f"{plan.workers}: the same global batch, step and data position, resharded")
            # the one change to the plan after it is built, before any worker sees it
            plan = dataclasses.replace(plan, resume=dataclasses.replace(
                plan.resume, universal=reshard.convert_to_universal(resume["uri"], say)))
    split = (f"{plan.workers} worker(s) × micro batch {plan.micro_batch} × accumulation {plan.accum}"
             if len(set(plan.rank_pairs)) == 1 else
             f"{plan.workers} workers taking {'+'.join(map(str, plan.rank_pairs))} pairs (micro batch "
             f"{plan.micro_batch} × accumulation {plan.accum} at most, the lighter ranks' loss weighted)")
    say(f"plan: {split} = {tc.global_batch_size} pairs per step, {plan.total_steps} steps, "
        f"reference: {plan.reference}")

    datasets = {"train": pipeline.tokenized_dataset(train_files, recipe, "train", fraction, vision=vlm)}
    if plan.has_validation:
        datasets["validation"] = (pipeline.tokenized_dataset(val_files, recipe, "train", 0.0, vision=vlm)
                                  if val_files else
                                  pipeline.tokenized_dataset(train_files, recipe, "validation", fraction, vision=vlm))
    reference_stage = None
    if plan.reference == "precompute":  # reference log-probs ahead of training, cached (training/reference.py)
        from training import reference as ref  # loads torch and transformers

        key_parts = {"train": ref.file_fingerprints(train_files), "validation": ref.file_fingerprints(val_files)}
        cache_uri = ref.cache_uri_for(recipe, key_parts, plan.use_gpu)
        if fills_as_it_trains(recipe, vlm=bool(vlm), resuming=bool(resume["uri"])) and \
                ref.cache_missing(cache_uri, datasets):
            # LoRA's reference is its own base: computed in the loop, no stage ahead of step 1, cached at the end
            plan = dataclasses.replace(plan, reference="adapter_disabled", fill_reference_cache=True)
            reference_stage = {"cache_uri": cache_uri, "seconds": 0.0, "reused": [], "filled": []}
            say("reference log-probs: no cache yet; the LoRA base computes them as the run trains, kept for the "
                "next run on this data")
        else:
            datasets, reference_stage = ref.precompute_reference(
                datasets, recipe, key_parts=key_parts, on_gpu=plan.use_gpu,
                actors=plan.workers if plan.use_gpu else 1, chunk_size=plan.logprob_chunk, say=say,
                share_prompt=plan.share_prompt, vision=bool(vlm))
    datasets["train"] = in_file_order(datasets["train"])
    mark("data tokenised, reference ready")
    earlier_rows = ckpt.metrics_until(uri, resumed_step)  # the interrupted run's curve up to the checkpoint

    # ---- train: the workers report every log_every_n_steps steps; the driver prints and records
    # redacted: an MLflow URI's password must not sit in the run folder, the report or its copies (core/tracking.py)
    (staging / "recipe.yaml").write_text(yaml.safe_dump(tracking.redacted(recipe_tree), sort_keys=False))
    (staging / "data_summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
    started = time.time()
    metrics_rows, final, worker_failures, step_events, outcome = follow_training(
        recipe, plan, datasets, staging=staging, uri=uri, earlier_rows=earlier_rows, say=say, started=started)
    if "error" in outcome:  # Ray's own errors become a ClusterError naming rank, node, checkpoint, log (failures.py)
        raise failures.user_error(outcome["error"], ray_train_uri=ray_train_uri, max_failures=tc.max_failures)

    if plan.fill_reference_cache:
        reference_stage["filled"] = ref.fill_cache(
            reference_stage["cache_uri"], datasets, final.get("reference_logps"), run_name=recipe.run.name,
            key_parts=key_parts, say=say)

    # ---- outputs: small files from the driver, the model from rank 0, the manifest last
    train_rows = [r for r in metrics_rows if r["split"] == "train"]
    result = {"run_uri": uri, "steps": final.get("step", 0), "planned_steps": plan.total_steps,
              "wall_s": time.time() - started, "train_pairs": summary.train_pairs,
              "final_train": train_rows[-1] if train_rows else None,
              "final_validation": next((r for r in reversed(metrics_rows) if r["split"] == "validation"), None),
              "plan": plan.summary() | {"reference_precompute": reference_stage},
              "resumed_from": {"checkpoint": resume["uri"], "step": resumed_step} if resume["uri"] else None,
              "worker_failures": worker_failures, "restarts": ckpt.restarts(step_events, resumed_step)}
    (staging / "summary.json").write_text(json.dumps(result, indent=2))
    (staging / "probe_logps.json").write_text(json.dumps({"pairs": probe, "logps": final.get("probe_logps")}))
    if storage.is_remote(uri):
        storage.upload_dir(str(staging), uri)
    if before_manifest is not None:
        before_manifest(uri)
    write_manifest(uri)
    return result


def follow_training(recipe: Recipe, plan: RunPlan, datasets: dict, *, staging: Path, uri: str,
                    earlier_rows: list[dict], say, started: float):
    """Runs the Ray Train job in a thread and records what the workers report: metrics.jsonl, the trackers, the
    console. Returns (metrics rows, the final report, worker failures, train steps as reported with None where a
    worker failure was, {"error": ...} when the job failed)."""
    tc = recipe.training_config
    storage_fs, storage_path = storage.pyarrow_filesystem_for(uri)
    progress = progress_queue()
    trainer = build_trainer(recipe, plan, datasets, storage_path=storage_path, storage_filesystem=storage_fs,
                            callbacks=[ProgressCallback(progress)])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(fit(trainer)), daemon=True)
    runner.start()
    metrics_rows, final, worker_failures = list(earlier_rows), {}, 0
    step_events: list[int | None] = []
    trackers = tracking.open_trackers(str(staging), as_dict(recipe))
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
                restart = ("no restart left" if -1 < tc.max_failures < worker_failures else
                           "restarting from the last complete checkpoint")
                say(f"worker failure {worker_failures} ({restart}; max_failures={tc.max_failures}): "
                    f"{failures.last_error_line(list(event['exception'].values())[0])}")
                continue
            report = event["metrics"]
            replayed = bool(report.get("replayed"))  # rows from the checkpoint a restart went on from
            seen = {(r["split"], r["step"]) for r in metrics_rows} if replayed else set()
            for row in report.get("reports", []):
                row = {k: row[k] for k in METRIC_KEYS if k in row} | {"total_steps": plan.total_steps}
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
    return metrics_rows, final, worker_failures, step_events, outcome


def fills_as_it_trains(recipe: Recipe, *, vlm: bool, resuming: bool) -> bool:
    """Whether a `precompute` run whose cache is missing computes its reference in the loop instead of a stage: a
    LoRA run's reference is the base it holds anyway. Not full-rank (a second model), QLoRA (the cache keeps
    unquantized numbers), VLMs (image rows) or a resumed run (the pairs before the checkpoint would be missing)."""
    peft = recipe.training_config.model.peft
    return peft.peft_scheme == "lora" and not peft.quantization.bits and not vlm and not resuming


def progress_queue() -> ray.util.queue.Queue:
    """The queue the controller's ProgressCallback writes to, on this driver's node: an actor Ray places anywhere
    can land on a worker node, and when that node is lost (test_node_loss: its raylet killed) the driver's next
    read raised ActorUnavailableError and the run ended with a traceback instead of restarting its workers."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.util.queue.Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def in_file_order(dataset):
    """The training set materialised once, in file order: every worker reads it whole (training/batch_split.py), so
    it is tokenised here once, not once per worker. preserve_order: without it Ray Data hands blocks over as its
    tasks finish, and a resumed run would number the pairs otherwise."""
    dataset.context.execution_options.preserve_order = True
    return dataset.materialize()


def probe_pairs(files: list[str], recipe: Recipe, fraction: float) -> dict:
    """The first few training pairs, tokenised here: the workers report their final log-probabilities on them so
    that a reloaded model can be checked against the trained one."""
    tc = recipe.training_config
    data_cfg = tc.data
    tokenizer = load_tokenizer(recipe.run.model_name_or_path)
    pairs, detected = [], {}
    for path in files:
        for text, source in iter_raw_rows(path):
            record, error = parse_line(text, source, data_cfg.format, dict(data_cfg.key_map) or None, detected)
            if error or pipeline.split_of(source, fraction, tc.seed) != "train":
                continue
            pairs.append(tokenize_record(record, tokenizer, max_length=tc.max_length,
                                         max_prompt_length=data_cfg.max_prompt_length,
                                         keep=data_cfg.prompt_truncation, default_system=data_cfg.system_prompt))
            if len(pairs) == PROBE_PAIRS:
                return {k: [p[k] for p in pairs] for k in pipeline.TOKEN_COLUMNS}
    return {k: [p[k] for p in pairs] for k in pipeline.TOKEN_COLUMNS}


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
