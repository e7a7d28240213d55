"""Checkpoints through Ray Train: every rank's ZeRO-3 shard, optimizer, scheduler, RNG, step and data position.

Layout of one checkpoint (a folder Ray Train names checkpoint_<time> under <run>/ray_train/):
  state/...                 DeepSpeed's files: each rank's ZeRO-3 partition of the trainable weights, optimizer
                            and scheduler (LoRA: the adapters only; the frozen base comes from the model source)
  rng_rank<r>.json          each rank's Python, NumPy, torch and CUDA RNG state, as JSON (nothing unpickled)
  raydpo_state.json         (rank 0) step, epoch, micro-batches consumed this epoch, samples consumed, world size,
                            and the plan the data position depends on
  complete_rank<r>.json     each rank's files with their sizes, uploaded after all of them: the completeness marker

A checkpoint is complete when every rank's marker is there and every file it lists has the listed size. Ray Train
registers a checkpoint in its run snapshot only after every rank has uploaded; the markers make the same check
possible for a folder named by hand (`--resume-from`) or found by listing (a driver that died before Ray wrote its
snapshot). A half-written checkpoint is never resumed from.

Uploads run in Ray Train's background thread (CheckpointUploadMode.ASYNC): training goes on while a checkpoint is
written. Each file is retried on transient errors; a permanent one becomes a StorageError naming the path.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import random
import re
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from core import storage
from core.errors import ConfigError, StorageError
from training import reshard
from training.plan import RunPlan

TAG = "state"
STATE_FILE = "raydpo_state.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the registered checkpoints
CHECKPOINT_PREFIX = "checkpoint_"
# What the saved data position (global batches, training/batch_split.py) means: resuming under a different value
# would skip the wrong pairs. The worker count is not one of them: the position is the same on any number of workers.
PLAN_KEYS = ("global_batch_size", "steps_per_epoch", "total_steps", "train_pairs", "shuffle_buffer", "length_grouping",
             "group_buffer", "seed")


def marker_name(rank: int) -> str:
    return f"complete_rank{rank}.json"


def rng_name(rank: int) -> str:
    return f"rng_rank{rank}.json"


# ---------------------------------------------------------------- pure arithmetic

def samples_consumed(epoch: int, batches_in_epoch: int, steps_per_epoch: int, global_batch_size: int) -> int:
    """Training pairs consumed since the run began, across all workers: the data position, in global pairs."""
    return (epoch * steps_per_epoch + batches_in_epoch) * global_batch_size


def restarts(events: list[int | None], resumed_from: int = 0) -> list[dict]:
    """One entry per worker failure in the driver's event stream (the train steps reported, None where a failure
    was): the last step reported before it, the checkpoint step training went on from (the next step reported,
    less one) and how many reported steps were trained again. A step the dead worker trained but never reported
    is not in the stream: the figures are what the driver saw."""
    found, last = [], resumed_from
    for i, event in enumerate(events):
        if event is not None:
            last = event
            continue
        following = next((e for e in events[i + 1:] if e is not None), None)
        resumed = None if following is None else following - 1
        # a restart can go on from a checkpoint newer than the last report (the reports died with the worker)
        found.append({"last_reported_step": last, "resumed_from_step": resumed,
                      "reported_steps_redone": None if resumed is None else max(0, last - resumed)})
    return found


def plan_fingerprint(plan: RunPlan, seed: int) -> dict:
    fixed = {"seed": seed, "global_batch_size": sum(plan.rank_pairs)}
    # and what the files' layout depends on: a change means a conversion (training/reshard.py)
    layout = {"workers": plan.workers, "zero_stage": plan.zero_stage}
    return {k: getattr(plan, k) for k in PLAN_KEYS if k not in fixed} | fixed | layout


def plan_mismatches(saved: dict, current: dict) -> list[str]:
    """The plan values a checkpoint was written under that differ now, one line each."""
    return [f"{k}: the checkpoint was written with {saved[k]!r}, this run has {current[k]!r}"
            for k in PLAN_KEYS if k in saved and k in current and saved[k] != current[k]]


def checkpoint_to_restore(ray_checkpoint_name: str | None, ray_checkpoint_uri: str | None,
                          name_at_start: str | None, resume_from: str | None,
                          newest_written_here: str | None = None) -> str | None:
    """Which checkpoint a worker loads. After a worker-group restart, the newest complete checkpoint this run wrote
    (found by listing: Ray registers a checkpoint only once its controller has polled the report, and a worker that
    dies between the upload and that poll leaves a complete checkpoint Ray does not know), else one Ray hands over
    that this run registered; otherwise the one the driver chose (found by itself, or --resume-from), else none.
    Ray also hands over the latest checkpoint of an earlier run under the same name: the driver's choice covers it."""
    if newest_written_here is not None:
        return newest_written_here
    if ray_checkpoint_name is not None and ray_checkpoint_name != name_at_start:
        return ray_checkpoint_uri
    return resume_from


def newest_written_since(ray_train_uri: str, names_at_start: list[str]) -> str | None:
    """The complete checkpoint with the highest step among those not there when the run started."""
    found = latest_complete(ray_train_uri, skip=set(names_at_start))
    return found[0] if found else None


# ---------------------------------------------------------------- worker side: save

def write_checkpoint(engine, folder: str, state: dict, *, rank: int, world: int, plan: RunPlan, seed: int,
                     lora: bool, rows: list[dict] = ()) -> None:
    """Writes this rank's part of a checkpoint into a local folder, its completeness marker last. rows: the metrics
    rows since the previous checkpoint, replayed to the driver after a restart (it may never have received them)."""
    engine.save_checkpoint(folder, tag=TAG, exclude_frozen_parameters=lora)  # collective; LoRA: adapters only
    (Path(folder) / rng_name(rank)).write_text(json.dumps(rng_state()))
    if rank == 0:
        saved = state | {"samples_consumed": samples_consumed(state["epoch"], state["batches_in_epoch"],
                                                              plan.steps_per_epoch, sum(plan.rank_pairs)),
                         "world_size": world, "lora": lora, "plan": plan_fingerprint(plan, seed),
                         "rows": list(rows)}
        (Path(folder) / STATE_FILE).write_text(json.dumps(saved, indent=1))
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    listing = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
    (Path(folder) / marker_name(rank)).write_text(json.dumps({"rank": rank, "files": listing}))


def save_and_report(engine, state: dict, reports: list[dict], *, rank: int, world: int, plan: RunPlan, seed: int,
                    lora: bool, unsaved_rows: list[dict] = ()) -> None:
    """Saves a checkpoint and reports it with this step's metrics; the upload runs while training goes on.
    unsaved_rows: the rows reported since the previous checkpoint, kept in this one with this step's."""
    import ray.train

    folder = tempfile.mkdtemp(prefix="raydpo-ckpt-")  # Ray deletes it once uploaded
    write_checkpoint(engine, folder, state, rank=rank, world=world, plan=plan, seed=seed, lora=lora,
                     rows=[*unsaved_rows, *reports])
    ray.train.report({"reports": reports, "checkpoint_step": state["step"]},
                     checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True,
                     checkpoint_upload_fn=partial(upload_checkpoint, run_uri=plan.run_uri))


def send_metrics(metrics: dict) -> None:
    """Metrics to the driver, without a checkpoint. ASYNC too: Ray keeps reports in order, and a synchronous report
    would wait for a checkpoint upload still in flight."""
    import ray.train

    ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def upload_checkpoint(checkpoint, dir_name: str, *, run_uri: str):
    """Ray Train's checkpoint_upload_fn: copies this rank's files with retries, its marker after all of them."""
    import ray.train

    run_storage = ray.train.get_context().get_storage()
    target = run_storage.build_checkpoint_path_from_name(dir_name)
    upload_folder(checkpoint.path, storage.uri_for(target, run_uri))
    return ray.train.Checkpoint(path=target, filesystem=run_storage.storage_filesystem)


def upload_folder(local_dir: str, uri: str, *, retry: storage.RetryPolicy = storage.DEFAULT_RETRY) -> None:
    """Every file under local_dir to uri, each retried on its own; marker files go last, so a folder whose markers
    are all there holds everything they list."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    markers = [p for p in files if p.name.startswith("complete_rank")]
    fs, root = storage.filesystem_for(uri)
    for source in [p for p in files if p not in markers] + markers:
        relative = source.relative_to(local_dir).as_posix()
        target_uri = uri.rstrip("/") + "/" + relative
        storage.with_retries(f"upload checkpoint file {source.name} to", target_uri,
                             partial(fs.put_file, str(source), root.rstrip("/") + "/" + relative), retry=retry)


# ---------------------------------------------------------------- worker side: restore

def checkpoint_to_resume(plan: RunPlan, rank: int) -> str | None:
    """The checkpoint every worker starts from (see checkpoint_to_restore); None: from scratch. A collective: rank
    0 lists, the others receive its choice."""
    import ray.train
    import torch.distributed as dist

    handed = ray.train.get_checkpoint()
    # rank 0 lists, every rank loads the same one: a listing per rank could differ while uploads land
    newest = [newest_written_since(plan.ray_train_uri, plan.resume.checkpoints_at_start) if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(newest, src=0)
    chosen = checkpoint_to_restore(Path(handed.path).name if handed else None,
                                   storage.uri_for(handed.path, plan.run_uri) if handed else None,
                                   plan.resume.ray_checkpoint_at_start, plan.resume.checkpoint, newest[0])
    return chosen


def restore(engine, uri: str, rank: int, universal: str | None = None) -> dict:
    """Loads weights, optimizer, scheduler and this rank's RNG from a checkpoint URI; returns the loop state.
    universal: the checkpoint's universal form (another worker count, reshard.py), which the engine was configured
    to load (`checkpoint.load_universal`); the step, data position and RNG still come from the checkpoint itself."""
    source = universal or uri
    with local_copy(source, None if universal else rank) as folder:
        if universal:  # DeepSpeed reads universal files with its own torch.load: each one is checked first
            for path in sorted(Path(folder).rglob("*.pt")):
                load_tensors_only(str(path), uri=source)
        engine.checkpoint_engine.load = partial(load_tensors_only, uri=source)  # DeepSpeed's own load unpickles
        engine.load_checkpoint(folder, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                               load_module_strict=False)  # LoRA checkpoints hold no frozen base weights
    saved = read_state(uri)
    rng_uri = f"{uri.rstrip('/')}/{rng_name(rank)}"
    if storage.exists(rng_uri):
        set_rng_state(json.loads(storage.read_bytes(rng_uri)))
    else:  # a rank the checkpoint's run did not have, or a checkpoint from before RNG went to JSON
        print(f"raydpo: {uri} has no {rng_name(rank)}: the random state starts from the seed", flush=True)
    return {k: saved[k] for k in ("step", "epoch", "batches_in_epoch")} | {"rows": saved.get("rows", [])}


@contextmanager
def local_copy(uri: str, rank: int) -> Iterator[str]:
    """The checkpoint as a local folder: the folder itself when local; else a copy of the files this rank loads
    (DeepSpeed reads only its own rank's ZeRO-3 files), removed after."""
    uri = uri.rstrip("/")
    if not storage.is_remote(uri):
        yield storage.filesystem_for(uri)[1]
        return
    fs, root = storage.filesystem_for(uri)
    names = [path[len(root) + 1:] for path in storage.with_retries("list", uri, lambda: fs.find(root))]
    with tempfile.TemporaryDirectory(prefix="raydpo-restore-") as tmp:
        for name in files_for_rank(names, rank):
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.with_retries(f"download {uri}/{name} to", str(target),
                                 partial(fs.get_file, f"{root}/{name}", str(target)))
        yield tmp


RANK_FILE = re.compile(r"(?:^|/)(?:[a-z0-9]+_)?(?:zero_pp_rank_|rng_rank|complete_rank)(\d+)[_.]")


def files_for_rank(names: list[str], rank: int | None) -> list[str]:
    """The checkpoint files one rank needs: the shared ones and its own, not the other ranks' shards nor the
    universal conversion (reshard.py). rank None: every file (a universal checkpoint: each rank reads them all)."""
    if rank is None:
        return sorted(names)
    return sorted(n for n in names if not n.startswith(reshard.UNIVERSAL_DIR + "/")
                  and ((m := RANK_FILE.search(n)) is None or int(m.group(1)) == rank))


def deepspeed_safe_globals() -> list:
    """The non-tensor objects DeepSpeed's ZeRO optimizer states hold (checked on a saved ZeRO-3 checkpoint): plain
    enum and loss-scaler records. Everything else in a checkpoint must be tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1's param slice map: two ints (numel, start)

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_tensors_only(path: str, map_location=None, *, uri: str = ""):
    """DeepSpeed's checkpoint-engine load with weights_only=True: a file planted in the checkpoint store cannot run
    code on the workers; one that holds anything else is refused, naming it."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise StorageError(f"checkpoint file {uri.rstrip('/')}/{Path(path).parent.name}/{Path(path).name} holds "
                           "objects other than tensors", why=f"it is not loaded with unpickling ({first_line(err)})",
                           fix="resume from a checkpoint raydpo wrote (--resume-from), and check who can write to "
                               "the checkpoint store") from None


def first_line(err: BaseException) -> str:
    lines = [x for x in str(err).splitlines() if "GLOBAL" in x or "WeightsUnpickler" in x]
    return (lines or str(err).splitlines() or [type(err).__name__])[0].strip()[:200]


def _b64(tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _tensor(text: str):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG a worker draws from, in JSON: Python's, NumPy's (MT19937 keys), torch's and each CUDA device's."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(saved: dict) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(saved["torch"]))
    if saved.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in saved["cuda"]][:torch.cuda.device_count()])


# ---------------------------------------------------------------- driver side: find, check

def missing_parts(uri: str) -> list[str]:
    """What keeps the checkpoint at uri from being complete; [] when it is complete."""
    fs, root = storage.filesystem_for(uri)
    root = root.rstrip("/")
    found = storage.with_retries("list", uri, lambda: _sizes(fs, root))
    if STATE_FILE not in found:
        return [f"{STATE_FILE} (rank 0's step and data position)"]
    saved = json.loads(storage.read_bytes(f"{uri.rstrip('/')}/{STATE_FILE}"))
    problems = []
    for rank in range(saved["world_size"]):
        if marker_name(rank) not in found:
            problems.append(f"{marker_name(rank)} (rank {rank} did not finish writing)")
            continue
        listing = json.loads(storage.read_bytes(f"{uri.rstrip('/')}/{marker_name(rank)}"))["files"]
        problems += [f"{name} (rank {rank}: {'missing' if name not in found else 'truncated'})"
                     for name, size in sorted(listing.items()) if found.get(name) != size]
    return problems


def _sizes(fs, root: str) -> dict[str, int]:
    try:
        return {path[len(root) + 1:]: info["size"] for path, info in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        return {}


def read_state(uri: str) -> dict:
    return json.loads(storage.read_bytes(f"{uri.rstrip('/')}/{STATE_FILE}"))


def snapshot_latest(ray_train_uri: str) -> str | None:
    """The folder name of the latest checkpoint in Ray Train's run snapshot (what Ray hands the workers)."""
    snapshot_uri = f"{ray_train_uri.rstrip('/')}/{SNAPSHOT_FILE}"
    if not storage.exists(snapshot_uri):
        return None
    latest = json.loads(storage.read_bytes(snapshot_uri)).get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def checkpoint_names(ray_train_uri: str) -> list[str]:
    """The checkpoint folders under the run's Ray Train folder, complete or not."""
    names = [uri.rstrip("/").rsplit("/", 1)[-1] for uri in storage.list_dirs(ray_train_uri)]
    return sorted(n for n in names if n.startswith(CHECKPOINT_PREFIX))


def latest_complete(ray_train_uri: str, skip: set[str] = frozenset()) -> tuple[str, dict] | None:
    """(uri, saved state) of the complete checkpoint with the highest step under the run's Ray Train folder,
    leaving out the folder names in skip."""
    best = None
    for uri in storage.list_dirs(ray_train_uri):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(CHECKPOINT_PREFIX) or name in skip or missing_parts(uri):
            continue
        saved = read_state(uri)
        if best is None or (saved["step"], uri) > (best[1]["step"], best[0]):
            best = (uri, saved)
    return best


def resume_point(ray_train_uri: str, explicit: str | None) -> dict:
    """What a run starts from: {"uri", "state"} of the checkpoint to load (None: from scratch) and "ray_latest", the
    checkpoint Ray's snapshot would hand over (the workers tell it apart from the ones this run writes)."""
    ray_latest = snapshot_latest(ray_train_uri)
    if explicit:
        # workers run elsewhere (another directory, another node): a local path must be absolute
        explicit = explicit.rstrip("/") if storage.is_remote(explicit) else storage.filesystem_for(explicit)[1]
        if not storage.exists(explicit):
            raise StorageError(f"--resume-from {explicit}: nothing there", why="the path does not exist",
                               fix=f"give a checkpoint folder, e.g. one of {ray_train_uri}/checkpoint_*")
        missing = missing_parts(explicit)
        if missing:
            raise ConfigError(f"--resume-from {explicit} is not a complete checkpoint", problems=missing,
                              why="its writing was cut off (or it is not a raydpo checkpoint); a half-written "
                                  "checkpoint is never resumed from",
                              fix=f"pick another checkpoint_* folder under {ray_train_uri}, or leave --resume-from "
                                  "out to resume from the latest complete one")
        return {"uri": explicit, "state": read_state(explicit), "ray_latest": ray_latest}
    found = latest_complete(ray_train_uri)
    return {"uri": found[0] if found else None, "state": found[1] if found else None, "ray_latest": ray_latest}


def check_resumable(saved: dict, plan: RunPlan, seed: int, uri: str) -> None:
    """ConfigError when the checkpoint cannot continue under this plan (batch, data, replica count)."""
    if "micro_in_epoch" in saved:
        raise ConfigError(f"cannot resume from {uri}", why="it was written by an earlier raydpo, whose data position "
                          "counted each worker's micro-batches (now: global batches, the same on any worker count)",
                          fix="start a new run (a new run.name), or finish this one with the raydpo that began it")
    current = plan_fingerprint(plan, seed)
    problems = plan_mismatches(saved.get("plan", {}), current)
    if problems:
        raise ConfigError(f"cannot resume from {uri}", problems=problems,
                          why="the data position saved in the checkpoint only means the same thing under the same "
                              "plan", fix="resume with the recipe the checkpoint was written under, or start a new "
                                          "run (a new run.name)")
    before = saved["plan"]
    if reshard.needs_universal(before, plan.workers, plan.zero_stage) and before.get("zero_stage") != plan.zero_stage:
        # a universal checkpoint loads on any worker count, not at another ZeRO stage (training/reshard.py)
        was = f"ZeRO stage {before.get('zero_stage')} on {before.get('workers')} worker(s)"
        raise ConfigError(f"cannot resume from {uri} at ZeRO stage {plan.zero_stage}",
                          problems=[f"zero_stage: the checkpoint was written at {was}"],
                          why="DeepSpeed loads a checkpoint on another worker count only at the stage it was "
                              "written at" + (" (stage 0 writes plain torch state, which its converter does not "
                                              "read)" if before.get("zero_stage") == 0 else ""),
                          fix=f"set training_config.zero_stage={before.get('zero_stage')} (or leave it out), resume "
                              f"on {before.get('workers')} worker(s), or start a new run (a new run.name)")


def metrics_until(run_uri: str, step: int) -> list[dict]:
    """The rows of the run's metrics.jsonl up to and including `step`: the curve a resumed run continues."""
    metrics_uri = f"{run_uri.rstrip('/')}/metrics.jsonl"
    if step <= 0 or not storage.exists(metrics_uri):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(metrics_uri).decode().splitlines() if line.strip()]
    return [row for row in rows if row["step"] <= step]


# ---------------------------------------------------------------- driver side: a finished run

def flat_items(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every leaf of a nested dict."""
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items |= flat_items(value, f"{prefix}{key}.")
        else:
            items[f"{prefix}{key}"] = value
    return items


def recipe_differences(before: dict, now: dict) -> list[str]:
    old, new = flat_items(before), flat_items(now)
    return [f"{key}: {old.get(key)!r} then, {new.get(key)!r} now" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def finished_run(run_uri: str, recipe: dict, resume_from: str | None) -> dict | None:
    """The summary of the finished run at run_uri when this is a rerun of it (a job retry); None when there is none
    or --resume-from asks to train again. ConfigError when another recipe finished under the same run.name."""
    import yaml

    run_uri = run_uri.rstrip("/")
    if not storage.exists(f"{run_uri}/manifest.json"):
        return None
    if resume_from:
        storage.remove(f"{run_uri}/manifest.json")  # the folder is being rewritten: no longer a finished run
        return None
    saved = yaml.safe_load(storage.read_bytes(f"{run_uri}/recipe.yaml"))
    from core.tracking import redacted

    # recipe.yaml is written redacted (no passwords): compare it with this recipe redacted alike
    changed = recipe_differences(saved, yaml.safe_load(yaml.safe_dump(redacted(recipe), sort_keys=False)))
    if changed:
        raise ConfigError(f"{run_uri} already holds a finished run of another recipe", problems=changed,
                          why="run.name names one run: its outputs and checkpoints belong to the recipe that "
                              "wrote them",
                          fix="choose a new run.name (or output_s3_path), or delete that folder to train again")
    return json.loads(storage.read_bytes(f"{run_uri}/summary.json"))


# ---------------------------------------------------------------- test instrumentation (off unless asked for)

TRACE_DIR_ENV = "RAYDPO_TRACE_DIR"            # a local folder: each rank appends one line per step
TRACE_HOLD_ENV = "RAYDPO_TRACE_HOLD_AT_STEP"  # pause once after this step until <dir>/release exists


def trace_step(step: int, rank: int, sources: list[str], *, hold_timeout_s: float = 300.0) -> None:
    """Lets failure tests see which pairs each step trained on and which process to kill; a no-op unless
    RAYDPO_TRACE_DIR is set in the workers' environment."""
    folder = os.environ.get(TRACE_DIR_ENV)
    if not folder:
        return
    line = {"step": step, "rank": rank, "pid": os.getpid(), "sources": [str(s) for s in sources],
            "time": time.time()}
    with open(Path(folder) / f"trace_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    held = Path(folder) / f"held_rank{rank}"
    if os.environ.get(TRACE_HOLD_ENV) == str(step) and not held.exists():
        held.touch()
        deadline = time.time() + hold_timeout_s
        while not (Path(folder) / "release").exists() and time.time() < deadline:
            time.sleep(0.2)


def traced(micro_batches: Iterator, state: dict, rank: int, sources_of) -> Iterator:
    """The training micro-batches as they come, with the failure tests' tracer (trace_step) around them when
    RAYDPO_TRACE_DIR is set: the step loop itself holds no test hook. A step has ended when state["step"] has moved
    on by the time the loop asks for its next micro-batch (or stops asking); sources_of(item) names its pairs."""
    if not os.environ.get(TRACE_DIR_ENV):
        return micro_batches
    return _traced(micro_batches, state, rank, sources_of)


def _traced(micro_batches: Iterator, state: dict, rank: int, sources_of) -> Iterator:
    sources, step = [], state["step"]

    def after_a_step() -> None:
        nonlocal sources, step
        if state["step"] != step:  # only a step that ended: a worker that fails mid-step traces nothing for it
            trace_step(state["step"], rank, sources)
            sources, step = [], state["step"]

    items = iter(micro_batches)
    try:
        while True:
            after_a_step()  # before the next micro-batch is read: a hold stops the worker right after its step
            item = next(items, None)
            if item is None:
                return
            sources += sources_of(item)
            yield item
    finally:  # the loop stopped asking (its last step, or an error): the step that ended last is traced too
        after_a_step()
