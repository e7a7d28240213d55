"""The run plan and the progress line: pure functions of the recipe and the counts."""
import math

import yaml

from tests.conftest import ROOT
from training.trainer import eta_seconds, format_progress, plan_run, run_uri


def recipe(**changes):
    r = yaml.safe_load((ROOT / "recipes" / "reference.yaml").read_text())
    r["run"].update(name="t", output_s3_path="s3://bucket/runs/", replicas=changes.pop("replicas", 2))
    r["training_config"]["global_batch_size"] = changes.pop("global_batch_size", 8)
    r["training_config"]["model"]["peft"]["peft_scheme"] = changes.pop("peft", None)
    return r


def test_plan_on_cpu_one_worker_per_replica():
    plan = plan_run(recipe(), train_pairs=50, validation_pairs=10, on_gpu=False)
    assert (plan["workers"], plan["micro_batch"], plan["accum"]) == (2, 4, 1)
    assert plan["zero_stage"] == 3  # several workers: ZeRO-3 shards across them
    assert plan_run(recipe(replicas=1), train_pairs=50, validation_pairs=10, on_gpu=False)["zero_stage"] == 0
    assert plan["total_steps"] == 6 and plan["micro_steps_per_epoch"] == 6  # 50 // 8 steps, 1 micro step each
    assert plan["has_validation"] and plan["run_uri"] == "s3://bucket/runs/t"
    assert plan["model_uri"] == "s3://bucket/runs/t/model"


def test_plan_on_gpu_nodes_one_worker_per_gpu():
    plan = plan_run(recipe(replicas=2, global_batch_size=64), train_pairs=640, validation_pairs=0, on_gpu=True,
                    gpus_per_node=8)
    assert (plan["workers"], plan["micro_batch"], plan["accum"]) == (16, 4, 1)
    assert plan["total_steps"] == 10 and not plan["has_validation"]


def test_reference_defaults():
    assert plan_run(recipe(peft="lora"), train_pairs=8, validation_pairs=0, on_gpu=False)["reference"] == \
        "adapter_disabled"
    r = recipe()
    r["training_config"]["model"]["dpo_cfg"]["reference"] = "engine"
    assert plan_run(r, train_pairs=8, validation_pairs=0, on_gpu=False)["reference"] == "engine"


def test_validation_needs_a_batch_per_worker():
    # 2 workers × micro batch 4: 7 validation pairs cannot give every worker a batch
    assert not plan_run(recipe(), train_pairs=16, validation_pairs=7, on_gpu=False)["has_validation"]


def test_progress_line_and_eta():
    assert eta_seconds(2, 10, 20.0) == 80.0
    assert math.isinf(eta_seconds(0, 10, 5.0))
    line = format_progress({"step": 3, "total_steps": 10, "loss": 0.5, "rewards/accuracies": 0.75,
                            "rewards/margins": 0.25, "tokens_per_s": 1234.4, "elapsed_s": 30.0})
    assert line == "step 3/10 | loss 0.5000 | reward acc 0.75 | margin +0.250 | 1234 tok/s | ETA 1m10s"
    assert run_uri({"run": {"output_s3_path": "out/", "name": "x"}}) == "out/x"
