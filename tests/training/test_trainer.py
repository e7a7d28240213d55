"""The run plan and the progress line: pure functions of the recipe, the placement and the counts."""
import dataclasses
import math

import pytest
import yaml

from cluster.placement import placement_for
from core.config import run_uri
from core.errors import ConfigError
from launcher.recipe import load_recipe
from tests.conftest import ROOT
from training.plan import build_run_plan, logs_at
from training.trainer import eta_seconds, format_progress


def recipe(**changes):
    r = yaml.safe_load((ROOT / "recipes" / "reference.yaml").read_text())
    r["run"].update(name="t", output_s3_path="s3://bucket/runs/", replicas=changes.pop("replicas", 2))
    r["training_config"]["global_batch_size"] = changes.pop("global_batch_size", 8)
    r["training_config"]["model"]["peft"]["peft_scheme"] = changes.pop("peft", None)
    r["training_config"]["model"]["dpo_cfg"]["reference"] = changes.pop("reference", "auto")
    return load_recipe(r)


def plan_for(r, *, gpus_per_node=0, **counts):
    placement = placement_for(r.run.replicas, gpus_per_node, nodes_known=1)
    return build_run_plan(r, workers=placement.workers, use_gpu=placement.use_gpu,
                          placement_strategy=placement.strategy, **counts)


def test_plan_on_cpu_one_worker_per_replica():
    plan = plan_for(recipe(), train_pairs=50, validation_pairs=10)
    assert (plan.workers, plan.micro_batch, plan.accum, plan.use_gpu) == (2, 4, 1, False)
    assert plan.zero_stage == 3  # several workers: ZeRO-3 shards across them
    assert plan_for(recipe(replicas=1), train_pairs=50, validation_pairs=10).zero_stage == 1
    assert plan.total_steps == 6 and plan.micro_steps_per_epoch == 6  # 50 // 8 steps, 1 micro step each
    assert plan.has_validation and plan.run_uri == "s3://bucket/runs/t"
    assert plan.model_uri == "s3://bucket/runs/t/model" and plan.ray_train_uri == "s3://bucket/runs/t/ray_train"


def test_plan_on_gpu_nodes_one_worker_per_gpu():
    plan = plan_for(recipe(replicas=2, global_batch_size=64), gpus_per_node=8, train_pairs=640, validation_pairs=0)
    assert (plan.workers, plan.micro_batch, plan.accum, plan.use_gpu) == (16, 4, 1, True)
    assert plan.total_steps == 10 and not plan.has_validation


def test_a_split_the_gpus_cannot_share_is_a_config_error():
    # valid for 2 replicas (8 / 2), but 2 replicas of 8 GPUs are 16 workers
    with pytest.raises(ConfigError, match="does not split over 16 workers"):
        plan_for(recipe(replicas=2, global_batch_size=8), gpus_per_node=8, train_pairs=64, validation_pairs=0)


def test_the_plan_is_frozen_and_overrides_apply_before():
    plan = build_run_plan(recipe(), workers=2, use_gpu=False, train_pairs=50, validation_pairs=0,
                          overrides={"share_prompt": False})
    assert plan.share_prompt is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 1


def test_reference_defaults():
    assert plan_for(recipe(peft="lora"), train_pairs=8, validation_pairs=0).reference == "adapter_disabled"
    assert plan_for(recipe(), train_pairs=8, validation_pairs=0).reference == "precompute"
    assert plan_for(recipe(reference="engine"), train_pairs=8, validation_pairs=0).reference == "engine"


def test_validation_needs_a_batch_per_worker():
    # 2 workers × micro batch 4: 7 validation pairs cannot give every worker a batch
    assert not plan_for(recipe(), train_pairs=16, validation_pairs=7).has_validation


def test_log_every_reports_every_nth_step_and_the_last():
    assert [s for s in range(1, 11) if logs_at(s, 10, 3)] == [3, 6, 9, 10]
    assert [s for s in range(1, 5) if logs_at(s, 4, 1)] == [1, 2, 3, 4]


def test_progress_line_and_eta():
    assert eta_seconds(2, 10, 20.0) == 80.0
    assert math.isinf(eta_seconds(0, 10, 5.0))
    line = format_progress({"step": 3, "total_steps": 10, "loss": 0.5, "rewards/accuracies": 0.75,
                            "rewards/margins": 0.25, "tokens_per_s": 1234.4, "elapsed_s": 30.0})
    assert line == "step 3/10 | loss 0.5000 | reward acc 0.75 | margin +0.250 | 1234 tok/s | ETA 1m10s"
    assert run_uri(recipe()) == "s3://bucket/runs/t"
