"""Checkpoints: data-position arithmetic, completeness markers, finding the latest complete one, resuming rules,
uploads with storage faults (local S3 server), and a DeepSpeed ZeRO-3 LoRA save/restore round trip."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from core.config import LoraTuning
from tests.s3server import s3_server  # noqa: F401
from training import checkpoint as ckpt
from training import reshard
from training.plan import RunPlan
from core import storage
from core.errors import ConfigError, StorageError

PLAN = RunPlan(workers=2, use_gpu=False, placement_strategy="PACK", zero_stage=3, rank_pairs=(4, 4), micro_batch=4,
               accum=1,
               micro_steps_per_epoch=6, steps_per_epoch=6, total_steps=6, train_pairs=50, validation_pairs=0,
               has_validation=False, val_every=None, checkpoint_every=None, log_every=1, reference="precompute",
               shuffle_buffer=1000, group_buffer=1000, run_uri="unused", model_uri="unused/model",
               ray_train_uri="unused/ray_train")
FAST = storage.RetryPolicy(tries=3, first_delay_s=0.01, max_delay_s=0.02)


# ---------------------------------------------------------------- pure rules

def test_samples_consumed_counts_global_batches_and_finished_epochs():
    # epoch 1 done (6 steps), 3 more this epoch: (6 + 3) steps * 8 pairs = 72, on any number of workers
    assert ckpt.samples_consumed(1, 3, steps_per_epoch=6, global_batch_size=8) == 72
    assert ckpt.samples_consumed(0, 0, steps_per_epoch=6, global_batch_size=8) == 0
    assert ckpt.samples_consumed(0, 5, steps_per_epoch=6, global_batch_size=32) == 160


def test_restarts_read_from_the_steps_and_failures_the_driver_saw():
    assert ckpt.restarts([1, 2, 3, 4]) == []
    # step 3 reported, then the failure; the restart went on from the checkpoint at step 2: step 3 again
    assert ckpt.restarts([1, 2, 3, None, 3, 4]) == [
        {"last_reported_step": 3, "resumed_from_step": 2, "reported_steps_redone": 1}]
    # steps 2 and 3 never reached the driver, the step-2 checkpoint did: nothing reported was trained again
    assert ckpt.restarts([1, None, 3, 4]) == [
        {"last_reported_step": 1, "resumed_from_step": 2, "reported_steps_redone": 0}]
    # the dead worker's last report never arrived: the driver saw step 2 last
    assert ckpt.restarts([1, 2, None, 3, 4]) == [
        {"last_reported_step": 2, "resumed_from_step": 2, "reported_steps_redone": 0}]
    # a resumed run (from step 4) failing before its first report, then again after step 7
    assert ckpt.restarts([None, 5, 6, 7, None, 7], resumed_from=4) == [
        {"last_reported_step": 4, "resumed_from_step": 4, "reported_steps_redone": 0},
        {"last_reported_step": 7, "resumed_from_step": 6, "reported_steps_redone": 1}]
    # the last failure ended the run
    assert ckpt.restarts([1, None]) == [{"last_reported_step": 1, "resumed_from_step": None,
                                         "reported_steps_redone": None}]


def test_a_checkpoint_registered_by_this_run_wins_over_the_drivers_choice():
    pick = ckpt.checkpoint_to_restore
    # a worker-group restart: Ray hands over a checkpoint this run wrote
    assert pick("checkpoint_b", "/r/checkpoint_b", "checkpoint_a", "/r/checkpoint_a") == "/r/checkpoint_b"
    assert pick("checkpoint_b", "/r/checkpoint_b", None, None) == "/r/checkpoint_b"
    # the start of a rerun: Ray hands over its snapshot's latest; the driver's choice (--resume-from) wins
    assert pick("checkpoint_a", "/r/checkpoint_a", "checkpoint_a", "/old/checkpoint_x") == "/old/checkpoint_x"
    # the driver found nothing complete: from scratch even though Ray's snapshot names one
    assert pick("checkpoint_a", "/r/checkpoint_a", "checkpoint_a", None) is None
    assert pick(None, None, None, None) is None
    # a worker died after its step-4 checkpoint was uploaded but before Ray's controller registered it: the newest
    # complete checkpoint this run wrote wins over Ray's older one and over the driver's choice
    assert pick("checkpoint_b", "/r/checkpoint_b", "checkpoint_a", "/r/checkpoint_a",
                "/r/checkpoint_c") == "/r/checkpoint_c"
    assert pick(None, None, None, "/r/checkpoint_a", "/r/checkpoint_c") == "/r/checkpoint_c"


def test_another_worker_count_resumes_resharded_but_not_another_zero_stage():
    saved = {"plan": ckpt.plan_fingerprint(PLAN, seed=42)}
    ckpt.check_resumable(saved, PLAN, 42, "/r/ck")  # same plan: fine
    four = replace(PLAN, **{"workers": 4, "rank_pairs": (2, 2, 2, 2), "micro_batch": 2})
    ckpt.check_resumable(saved, four, 42, "/r/ck")  # the data position is in global batches: fine on 4 workers
    assert reshard.needs_universal(saved["plan"], 4, 3) and not reshard.needs_universal(saved["plan"], 2, 3)
    three = replace(PLAN, **{"workers": 3, "rank_pairs": (3, 3, 2), "micro_batch": 3})  # uneven: fine too
    ckpt.check_resumable(saved, three, 42, "/r/ck")
    with pytest.raises(ConfigError) as err:
        ckpt.check_resumable(saved, replace(four, zero_stage=1), 42, "/r/ck")
    assert "zero_stage: the checkpoint was written at ZeRO stage 3 on 2 worker(s)" in str(err.value)
    assert "training_config.zero_stage=3" in err.value.fix
    old_one_worker = {"plan": ckpt.plan_fingerprint(replace(PLAN, workers=1, rank_pairs=(8,), zero_stage=0), 42)}
    with pytest.raises(ConfigError, match="stage 0 writes plain torch state"):
        ckpt.check_resumable(old_one_worker, four, 42, "/r/ck")


def test_resuming_under_another_data_plan_is_refused():
    saved = {"plan": ckpt.plan_fingerprint(PLAN, seed=42)}
    with pytest.raises(ConfigError) as err:
        ckpt.check_resumable(saved, replace(PLAN, **{"total_steps": 12}), 42, "/r/ck")
    assert err.value.problems == ["total_steps: the checkpoint was written with 6, this run has 12"]
    with pytest.raises(ConfigError, match="seed: the checkpoint was written with 42, this run has 7"):
        ckpt.check_resumable(saved, PLAN, 7, "/r/ck")


def test_each_rank_fetches_the_shared_files_and_only_its_own_shards():
    names = ["latest", "raydpo_state.json", "zero_to_fp32.py", "rng_rank0.pt", "rng_rank1.pt", "complete_rank0.json",
             "complete_rank1.json", "state/zero_pp_rank_0_mp_rank_00_model_states.pt",
             "state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "state/zero_pp_rank_1_mp_rank_00_model_states.pt",
             "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "state/zero_pp_rank_10_mp_rank_00_model_states.pt"]
    assert ckpt.files_for_rank(names, 1) == ["complete_rank1.json", "latest", "raydpo_state.json", "rng_rank1.pt",
                                             "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                             "state/zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    assert "state/zero_pp_rank_10_mp_rank_00_model_states.pt" in ckpt.files_for_rank(names, 10)


def test_recipe_differences_name_each_changed_leaf():
    before = {"run": {"name": "a"}, "training_config": {"model": {"optim": {"lr": 1e-5}}, "seed": 1}}
    now = {"run": {"name": "a"}, "training_config": {"model": {"optim": {"lr": 2e-5}}, "seed": 1, "x": True}}
    assert ckpt.recipe_differences(before, now) == ["training_config.model.optim.lr: 1e-05 then, 2e-05 now",
                                                    "training_config.x: None then, True now"]
    assert ckpt.recipe_differences(before, before) == []


# ---------------------------------------------------------------- writing and finding checkpoints

class FakeEngine:
    """Writes files shaped like DeepSpeed's ZeRO-3 ones; records how it was asked to save."""

    def __init__(self, rank: int, payload: bytes = b"x" * 100):
        self.rank, self.payload, self.calls = rank, payload, []

    def save_checkpoint(self, folder, tag, exclude_frozen_parameters):
        self.calls.append({"tag": tag, "exclude_frozen_parameters": exclude_frozen_parameters})
        state = Path(folder) / tag
        state.mkdir(parents=True, exist_ok=True)
        (state / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").write_bytes(self.payload)
        (state / f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt").write_bytes(self.payload[:10])
        if self.rank == 0:
            (Path(folder) / "latest").write_text(tag)


def write_complete_checkpoint(uri: str, step: int, tmp_path: Path, world: int = 2, retry=FAST) -> None:
    state = {"step": step, "epoch": 0, "batches_in_epoch": step}
    for rank in range(world):
        local = tmp_path / f"local-{step}-{rank}"
        local.mkdir()
        ckpt.write_checkpoint(FakeEngine(rank), str(local), state, rank=rank, world=world, plan=PLAN, seed=42,
                              lora=True)
        ckpt.upload_folder(str(local), uri, retry=retry)


def test_written_checkpoint_records_state_position_and_each_ranks_files(tmp_path):
    engine = FakeEngine(0)
    ckpt.write_checkpoint(engine, str(tmp_path), {"step": 4, "epoch": 0, "batches_in_epoch": 4}, rank=0, world=2,
                          plan=PLAN, seed=42, lora=True)
    assert engine.calls == [{"tag": "state", "exclude_frozen_parameters": True}]  # LoRA: no frozen base
    saved = json.loads((tmp_path / ckpt.STATE_FILE).read_text())
    assert saved["step"] == 4 and saved["world_size"] == 2
    assert saved["samples_consumed"] == 4 * 8  # 4 steps of the global batch of 8
    assert saved["plan"]["workers"] == 2 and saved["plan"]["seed"] == 42
    marker = json.loads((tmp_path / ckpt.marker_name(0)).read_text())
    assert marker["files"]["state/zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 100
    assert set(marker["files"]) == {"latest", "rng_rank0.json", ckpt.STATE_FILE,
                                    "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "state/zero_pp_rank_0_mp_rank_00_model_states.pt"}
    rank1 = tmp_path / "rank1"
    rank1.mkdir()
    full = FakeEngine(1)
    ckpt.write_checkpoint(full, str(rank1), {"step": 4, "epoch": 0, "batches_in_epoch": 4}, rank=1, world=2,
                          plan=PLAN, seed=42, lora=False)
    assert full.calls[0]["exclude_frozen_parameters"] is False
    assert not (rank1 / ckpt.STATE_FILE).exists()  # rank 0 alone writes the shared state


def test_upload_sends_the_marker_after_every_other_file(tmp_path, monkeypatch):
    ckpt.write_checkpoint(FakeEngine(0), str(tmp_path), {"step": 1, "epoch": 0, "batches_in_epoch": 1}, rank=0,
                          world=1, plan=PLAN, seed=42, lora=True)
    order = []

    class Recorder:
        def put_file(self, source, target):
            order.append(target.rsplit("/", 1)[-1])

    monkeypatch.setattr(storage, "filesystem_for", lambda uri: (Recorder(), "/dest"))
    ckpt.upload_folder(str(tmp_path), "/dest")
    assert order[-1] == ckpt.marker_name(0) and len(order) == 6


def test_completeness_needs_every_ranks_marker_and_full_files(tmp_path):
    uri = str(tmp_path / "ray_train" / "checkpoint_a")
    write_complete_checkpoint(uri, 2, tmp_path)
    assert ckpt.missing_parts(uri) == []
    Path(uri, "state", "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 40)  # cut off mid-file
    assert ckpt.missing_parts(uri) == ["state/zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1: truncated)"]
    Path(uri, ckpt.marker_name(1)).unlink()
    assert ckpt.missing_parts(uri) == ["complete_rank1.json (rank 1 did not finish writing)"]
    assert ckpt.missing_parts(str(tmp_path / "nothing")) == ["raydpo_state.json (rank 0's step and data position)"]


def test_latest_complete_skips_a_half_written_newer_checkpoint(tmp_path):
    ray_train = tmp_path / "ray_train"
    write_complete_checkpoint(str(ray_train / "checkpoint_2026-01-01_00-00-01"), 2, tmp_path)
    write_complete_checkpoint(str(ray_train / "checkpoint_2026-01-01_00-00-02"), 4, tmp_path)
    half = ray_train / "checkpoint_2026-01-01_00-00-03"
    write_complete_checkpoint(str(half), 6, tmp_path)
    (half / ckpt.marker_name(0)).unlink()
    (ray_train / "not_a_checkpoint").mkdir()
    uri, saved = ckpt.latest_complete(str(ray_train))
    assert uri.endswith("checkpoint_2026-01-01_00-00-02") and saved["step"] == 4
    assert ckpt.latest_complete(str(tmp_path / "empty")) is None


def test_newest_written_since_start_leaves_out_what_was_there(tmp_path):
    ray_train = tmp_path / "ray_train"
    write_complete_checkpoint(str(ray_train / "checkpoint_2026-01-01_00-00-01"), 2, tmp_path)
    at_start = ckpt.checkpoint_names(str(ray_train))
    assert at_start == ["checkpoint_2026-01-01_00-00-01"]
    assert ckpt.newest_written_since(str(ray_train), at_start) is None  # nothing new: the driver's choice stands
    write_complete_checkpoint(str(ray_train / "checkpoint_2026-01-01_00-00-05"), 4, tmp_path)
    assert ckpt.newest_written_since(str(ray_train), at_start).endswith("checkpoint_2026-01-01_00-00-05")
    assert ckpt.checkpoint_names(str(tmp_path / "nothing")) == []


def test_resume_point_explicit_and_found(tmp_path, monkeypatch):
    ray_train = tmp_path / "run" / "ray_train"
    write_complete_checkpoint(str(ray_train / "checkpoint_a"), 2, tmp_path)
    write_complete_checkpoint(str(ray_train / "checkpoint_b"), 4, tmp_path)
    (ray_train / ckpt.SNAPSHOT_FILE).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_b", "metrics": {}}}))
    found = ckpt.resume_point(str(ray_train), None)
    assert found["uri"] == str(ray_train / "checkpoint_b") and found["state"]["step"] == 4
    assert found["ray_latest"] == "checkpoint_b"
    monkeypatch.chdir(tmp_path)  # a relative --resume-from becomes absolute: workers run in other folders
    chosen = ckpt.resume_point(str(ray_train), "run/ray_train/checkpoint_a/")
    assert chosen["uri"] == str(ray_train / "checkpoint_a") and chosen["state"]["step"] == 2
    (ray_train / "checkpoint_b" / ckpt.marker_name(1)).unlink()
    with pytest.raises(ConfigError) as err:
        ckpt.resume_point(str(ray_train), str(ray_train / "checkpoint_b"))
    assert "is not a complete checkpoint" in str(err.value)
    assert err.value.problems == ["complete_rank1.json (rank 1 did not finish writing)"]
    with pytest.raises(StorageError, match="nothing there"):
        ckpt.resume_point(str(ray_train), str(ray_train / "checkpoint_zzz"))
    assert ckpt.resume_point(str(tmp_path / "fresh" / "ray_train"), None) == {"uri": None, "state": None,
                                                                             "ray_latest": None}


def test_metrics_until_keeps_the_curve_up_to_the_checkpoint(tmp_path):
    rows = [{"step": 1, "split": "train"}, {"step": 2, "split": "train"}, {"step": 2, "split": "validation"},
            {"step": 3, "split": "train"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ckpt.metrics_until(str(tmp_path), 2) == rows[:3]
    assert ckpt.metrics_until(str(tmp_path), 0) == []
    assert ckpt.metrics_until(str(tmp_path / "none"), 2) == []


def test_a_finished_run_is_returned_refused_or_reopened(tmp_path):
    recipe = {"run": {"name": "r"}, "training_config": {"seed": 1, "betas": (0.9, 0.99)}}
    assert ckpt.finished_run(str(tmp_path), recipe, None) is None  # nothing there yet
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 6}))
    assert ckpt.finished_run(str(tmp_path), recipe, None) is None  # no manifest: not finished
    (tmp_path / "manifest.json").write_text("{}")
    assert ckpt.finished_run(str(tmp_path), recipe, None) == {"steps": 6}
    changed = recipe | {"training_config": {"seed": 2, "betas": (0.9, 0.99)}}
    with pytest.raises(ConfigError) as err:
        ckpt.finished_run(str(tmp_path), changed, None)
    assert err.value.problems == ["training_config.seed: 1 then, 2 now"] and "run.name" in err.value.fix
    assert ckpt.finished_run(str(tmp_path), recipe, "/some/checkpoint") is None
    assert not (tmp_path / "manifest.json").exists()  # being rewritten: no longer claims to be finished


def test_trace_writes_a_line_per_step_and_holds_once(tmp_path, monkeypatch):
    ckpt.trace_step(1, 0, ["a:1"])  # off: nothing written anywhere
    monkeypatch.setenv(ckpt.TRACE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(ckpt.TRACE_HOLD_ENV, "2")
    ckpt.trace_step(1, 0, ["a:1", "a:2"])
    worker = threading.Thread(target=ckpt.trace_step, args=(2, 0, ["a:3"]))
    worker.start()
    deadline = time.time() + 10
    while not (tmp_path / "held_rank0").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert worker.is_alive()  # held after step 2
    (tmp_path / "release").touch()
    worker.join(timeout=10)
    assert not worker.is_alive()
    (tmp_path / "release").unlink()
    ckpt.trace_step(2, 0, ["a:3"])  # a restarted worker passes step 2 again without holding
    lines = [json.loads(x) for x in (tmp_path / "trace_rank0.jsonl").read_text().splitlines()]
    assert [(x["step"], x["sources"]) for x in lines] == [(1, ["a:1", "a:2"]), (2, ["a:3"]), (2, ["a:3"])]
    assert lines[0]["pid"] == os.getpid()


def test_traced_steps_are_written_from_outside_the_step_loop(tmp_path, monkeypatch):
    """ckpt.traced wraps the loop's micro-batches: a line per ended step (2 micro-batches each here), the last one
    too when the loop stops asking, none for a step an error cut short; off, it hands the batches back as they are."""
    batches = [{"sources": [f"a:{i}"]} for i in range(1, 9)]
    state = {"step": 0}
    assert ckpt.traced(batches, state, 0, sources_of=lambda b: b["sources"]) is batches  # off
    monkeypatch.setenv(ckpt.TRACE_DIR_ENV, str(tmp_path))

    def train(stop_at: int, fail_at: int | None = None) -> None:
        for i, batch in enumerate(ckpt.traced(iter(batches), state, 0, sources_of=lambda b: b["sources"]), 1):
            if i == fail_at:
                raise RuntimeError("the worker fails mid-step")
            if i % 2 == 0:
                state["step"] += 1  # the optimizer step, at every second micro-batch
            if state["step"] == stop_at:
                break

    train(stop_at=3)
    state["step"] = 0
    with pytest.raises(RuntimeError):
        train(stop_at=4, fail_at=5)  # steps 1 and 2 end, step 3 does not
    lines = [json.loads(x) for x in (tmp_path / "trace_rank0.jsonl").read_text().splitlines()]
    assert [(x["step"], x["sources"]) for x in lines] == [
        (1, ["a:1", "a:2"]), (2, ["a:3", "a:4"]), (3, ["a:5", "a:6"]),  # the last step traced after the break
        (1, ["a:1", "a:2"]), (2, ["a:3", "a:4"])]


def test_train_takes_resume_from_after_the_recipe():
    from launcher.cli import build_parser
    from launcher.recipe_args import parse_rest

    args = parse_rest(build_parser().parse_args(["train", "r.yaml", "beta=0.2", "--resume-from", "s3://b/ck"]))
    assert args.resume_from == "s3://b/ck" and args.overrides == ["beta=0.2"]
    assert parse_rest(build_parser().parse_args(["train", "r.yaml"])).resume_from is None


# ---------------------------------------------------------------- object storage: the local S3 server

def test_checkpoints_in_s3_found_and_checked(s3_server, tmp_path):
    bucket = s3_server.make_bucket("ckpt-find")
    ray_train = f"{bucket}/run/ray_train"
    write_complete_checkpoint(f"{ray_train}/checkpoint_a", 2, tmp_path)
    write_complete_checkpoint(f"{ray_train}/checkpoint_b", 4, tmp_path)
    s3_server.client().delete_object(Bucket="ckpt-find", Key="run/ray_train/checkpoint_b/complete_rank0.json")
    uri, saved = ckpt.latest_complete(ray_train)
    assert uri == f"{ray_train}/checkpoint_a" and saved["step"] == 2


def test_a_rank_restoring_from_s3_downloads_its_own_files(s3_server, tmp_path):
    bucket = s3_server.make_bucket("ckpt-fetch")
    uri = f"{bucket}/run/ray_train/checkpoint_a"
    write_complete_checkpoint(uri, 2, tmp_path)
    with ckpt.local_copy(uri, rank=1) as folder:
        got = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
        assert json.loads(Path(folder, ckpt.STATE_FILE).read_text())["step"] == 2
    assert got == ["complete_rank1.json", "latest", "raydpo_state.json", "rng_rank1.json",
                   "state/zero_pp_rank_1_mp_rank_00_model_states.pt", "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not Path(folder).exists()  # the copy is removed after loading


def test_upload_rides_out_a_server_restart(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket("ckpt-restart")
    local = tmp_path / "local"
    local.mkdir()
    ckpt.write_checkpoint(FakeEngine(0), str(local), {"step": 2, "epoch": 0, "batches_in_epoch": 2}, rank=0, world=1,
                          plan=PLAN, seed=42, lora=True)
    calls, real = [], storage.filesystem_for

    class RestartAfterTheFirstFailure:  # the server comes back only once raydpo's first try has failed for good:
        def __init__(self, fs):         # botocore's and s3fs's own retries cannot ride the outage out
            self.fs = fs

        def put_file(self, source, target):
            calls.append(target)
            try:
                return self.fs.put_file(source, target)
            finally:
                if len(calls) == 1:
                    s3_server.start()

    monkeypatch.setattr(storage, "filesystem_for", lambda uri: (RestartAfterTheFirstFailure(real(uri)[0]),
                                                                real(uri)[1]))
    s3_server.stop()
    try:
        ckpt.upload_folder(str(local), f"{bucket}/run/ray_train/checkpoint_a",
                           retry=storage.RetryPolicy(tries=4, first_delay_s=0.5))
    finally:
        s3_server.start()
    monkeypatch.setattr(storage, "filesystem_for", real)
    assert calls[0] == calls[1]  # the first file, tried again by raydpo's retry
    assert ckpt.missing_parts(f"{bucket}/run/ray_train/checkpoint_a") == []


def test_a_permanent_error_names_the_path_and_keeps_the_last_complete_checkpoint(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket("ckpt-denied")
    ray_train = f"{bucket}/run/ray_train"
    write_complete_checkpoint(f"{ray_train}/checkpoint_a", 2, tmp_path)
    real = storage.filesystem_for

    class DeniedAfterTwoFiles:  # the store starts refusing writes mid-checkpoint
        def __init__(self, fs):
            self.fs, self.puts = fs, 0

        def put_file(self, source, target):
            self.puts += 1
            if self.puts > 2:
                raise PermissionError(13, "Access Denied")
            return self.fs.put_file(source, target)

    monkeypatch.setattr(storage, "filesystem_for", lambda uri: (DeniedAfterTwoFiles(real(uri)[0]), real(uri)[1]))
    with pytest.raises(StorageError) as err:
        write_complete_checkpoint(f"{ray_train}/checkpoint_b", 4, tmp_path)
    monkeypatch.undo()
    assert f"{ray_train}/checkpoint_b/" in err.value.what and "access denied" in err.value.why
    uri, saved = ckpt.latest_complete(ray_train)  # the half-written one is never resumed from
    assert uri == f"{ray_train}/checkpoint_a" and saved["step"] == 2
    assert ckpt.missing_parts(f"{ray_train}/checkpoint_b")


def test_a_bucket_that_disappears_stops_the_upload_with_a_storage_error(s3_server, tmp_path):
    bucket = s3_server.make_bucket("ckpt-gone")
    local = tmp_path / "local"
    local.mkdir()
    ckpt.write_checkpoint(FakeEngine(0), str(local), {"step": 2, "epoch": 0, "batches_in_epoch": 2}, rank=0, world=1,
                          plan=PLAN, seed=42, lora=True)
    s3_server.remove_bucket("ckpt-gone")
    with pytest.raises(StorageError) as err:
        ckpt.upload_folder(str(local), f"{bucket}/run/ray_train/checkpoint_a", retry=FAST)
    assert "s3://ckpt-gone/run/ray_train/checkpoint_a/" in err.value.what
    assert "the bucket does not exist" in err.value.why


# ---------------------------------------------------------------- DeepSpeed ZeRO-3 with LoRA, one process

LORA = LoraTuning(alpha=16, adapter_dim=4, adapter_dropout=0.0)  # training_config.model.peft.lora_tuning
OPTIM = {"lr": 1e-2, "name": "adamw", "adam_w_mode": True, "eps": 1e-8, "weight_decay": 0.0, "betas": (0.9, 0.999)}


@pytest.fixture
def single_process_group(monkeypatch):
    import socket

    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    yield deepspeed
    dist.destroy_process_group()
    forget_deepspeed_groups()


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it made from the process group; the next test's process group needs new ones."""
    from deepspeed.utils import groups

    groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = groups._MODEL_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])  # 0: what a one-worker run uses (ds_config.zero_stage)
def test_lora_checkpoint_holds_adapters_only_and_resumes_exactly(single_process_group, tiny_model_dir, tmp_path,
                                                                  stage):
    import torch

    from training import ds_config
    from training.loop import load_under_zero_init, wrap_lora
    from training.optim import build_optimizer

    deepspeed = single_process_group

    def new_engine():
        config = ds_config.deepspeed_config(micro_batch=2, accum=1, workers=1, precision="fp32", stage=stage)
        config["zero_allow_untested_optimizer"] = True
        model, _hf = load_under_zero_init(str(tiny_model_dir), torch.float32, config, {})
        model = wrap_lora(model, LORA, torch.float32, gradient_checkpointing=False)
        optimizer = build_optimizer(model, **OPTIM, on_gpu=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        return engine

    def train_step(engine, seed: int) -> float:
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    torch.manual_seed(0)
    first = new_engine()
    for seed in range(3):
        train_step(first, seed)
    state = {"step": 3, "epoch": 0, "batches_in_epoch": 3}
    rows = [{"step": s, "split": "train", "loss": 0.7 - 0.1 * s} for s in (2, 3)]  # reported since the last one
    ckpt.write_checkpoint(first, str(tmp_path / "lora"), state, rank=0, world=1, plan=replace(PLAN, **{"workers": 1, "zero_stage": stage}),
                          seed=42, lora=True, rows=rows)
    ckpt.write_checkpoint(first, str(tmp_path / "whole"), state, rank=0, world=1, plan=replace(PLAN, **{"workers": 1, "zero_stage": stage}),
                          seed=42, lora=False)
    torch.manual_seed(123)  # the checkpoint's RNG state must come back, whatever happened since
    expected = [train_step(first, seed) for seed in range(3, 6)]
    lr_after = first.lr_scheduler.get_last_lr()

    torch.manual_seed(1)  # other adapter initialisation: the checkpoint must overwrite it
    second = new_engine()
    assert ckpt.restore(second, str(tmp_path / "lora"), rank=0) == state | {"rows": rows}  # rows: replayed
    saved_rng = json.loads((tmp_path / "lora" / "rng_rank0.json").read_text())
    assert torch.equal(torch.get_rng_state(), ckpt._tensor(saved_rng["torch"]))
    got = [train_step(second, seed) for seed in range(3, 6)]
    assert got == pytest.approx(expected, abs=1e-6)  # same weights, optimizer moments and schedule
    assert second.lr_scheduler.get_last_lr() == pytest.approx(lr_after)

    states = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    adapters_only = ckpt.load_tensors_only(str(tmp_path / "lora" / "state" / states))
    whole = ckpt.load_tensors_only(str(tmp_path / "whole" / "state" / states))
    if stage == 3:
        assert whole["frozen_param_fragments"]  # without the exclusion the frozen base partitions are saved too
        assert not adapters_only.get("frozen_param_fragments")
    else:
        assert any("lora_" not in key for key in whole["module"])  # without the exclusion the base is saved too
    assert adapters_only["module"] and all("lora_" in key for key in adapters_only["module"])
    lora_bytes = sum(p.stat().st_size for p in (tmp_path / "lora").rglob("*") if p.is_file())
    whole_bytes = sum(p.stat().st_size for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert lora_bytes < whole_bytes

    # a file planted in the checkpoint store (here: the optimizer states DeepSpeed loads) runs nothing on restore
    proof = tmp_path / "ran"
    planted = "zero_pp_rank_0_mp_rank_00_optim_states.pt" if stage == 3 else states
    torch.save(Planted(str(proof)), tmp_path / "lora" / "state" / planted)
    with pytest.raises(StorageError) as err:
        ckpt.restore(new_engine(), str(tmp_path / "lora"), rank=0)
    assert not proof.exists()
    assert f"{planted} holds objects other than tensors" in err.value.what


class Planted:
    """A pickle that runs a shell command when unpickled (what a crafted checkpoint file would do)."""

    def __init__(self, proof: str):
        self.proof = proof

    def __reduce__(self):
        return os.system, (f"touch {self.proof}",)


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np
    import torch

    saved = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(5)
    ckpt.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == expected


def test_restore_never_unpickles_a_planted_file(tmp_path):
    """An old-style rng_rank0.pt and a DeepSpeed state file, both crafted to run a command: neither runs."""
    import torch

    ckpt.write_checkpoint(FakeEngine(0), str(tmp_path), {"step": 2, "epoch": 0, "batches_in_epoch": 2}, rank=0,
                          world=1, plan=PLAN, seed=42, lora=True)
    proof = tmp_path / "ran"
    (tmp_path / ckpt.rng_name(0)).unlink()
    torch.save(Planted(str(proof)), tmp_path / "rng_rank0.pt")  # where raydpo kept RNG state before
    torch.save(Planted(str(proof)), tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt")

    class LoadsLikeDeepSpeed:  # DeepSpeed's load_checkpoint reads every state file through its checkpoint engine
        class checkpoint_engine:  # noqa: N801
            @staticmethod
            def load(path, map_location=None):
                return torch.load(path, map_location=map_location, weights_only=False)

        def load_checkpoint(self, folder, **_):
            for path in sorted(Path(folder, "state").glob("*.pt")):
                self.checkpoint_engine.load(str(path))

    engine = LoadsLikeDeepSpeed()
    with pytest.raises(StorageError) as err:
        ckpt.restore(engine, str(tmp_path), rank=0)
    assert not proof.exists()
    assert "state/zero_pp_rank_0_mp_rank_00_optim_states.pt holds objects other than tensors" in err.value.what
    assert "os.system" in err.value.why or "posix.system" in err.value.why  # what it would have called


def test_cuda_rng_states_are_saved_as_json_and_restored_per_device(monkeypatch):
    """Every CUDA device's generator goes into rng_rank<r>.json (base64 bytes, no pickle) and comes back as plain
    uint8 tensors; on CPU, with torch.cuda faked (what a GPU worker's checkpoint holds)."""
    import torch

    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    saved = json.loads(json.dumps(ckpt.rng_state()))
    assert len(saved["cuda"]) == 2 and all(isinstance(s, str) for s in saved["cuda"])
    ckpt.set_rng_state(saved)
    assert [t.dtype for t in restored] == [torch.uint8, torch.uint8]
    assert [t.tolist() for t in restored] == [s.tolist() for s in states]
