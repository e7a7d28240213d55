"""A LoRA run with `reference: precompute` and no cache yet computes its reference in the loop (the base with the
adapters off, no stage ahead of step 1) and leaves the cache behind; the next run on the same data reads it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launcher.recipe import load_recipe
from training.driver import fills_as_it_trains
from training.reference import with_reference_columns

ROOT = Path(__file__).resolve().parents[2]


def lora_recipe(**peft_extra) -> dict:
    r = yaml.safe_load((ROOT / "recipes" / "reference.yaml").read_text())
    r["run"] |= {"model_name_or_path": "m", "output_s3_path": "/tmp/out"}
    r["training_config"]["model"]["peft"] = {"peft_scheme": "lora", **peft_extra}
    return r


def test_only_an_unquantized_text_lora_run_from_the_start_fills_the_cache():
    assert fills_as_it_trains(load_recipe(lora_recipe()), vlm=False, resuming=False)
    assert not fills_as_it_trains(load_recipe(lora_recipe()), vlm=True, resuming=False)
    assert not fills_as_it_trains(load_recipe(lora_recipe()), vlm=False, resuming=True)
    assert not fills_as_it_trains(load_recipe(lora_recipe(quantization={"bits": 4})), vlm=False, resuming=False)
    full = lora_recipe()
    full["training_config"]["model"]["peft"] = {"peft_scheme": None}
    assert not fills_as_it_trains(load_recipe(full), vlm=False, resuming=False)


def test_reference_columns_are_looked_up_by_source():
    batch = {"source": np.array(["f:2", "f:1"], dtype=object), "prompt_ids": np.array([1, 2])}
    out = with_reference_columns(batch, {"f:1": [-1.5, -2.5], "f:2": [-3.0, -4.0]})
    assert out["ref_chosen_logps"].tolist() == [-3.0, -1.5] and out["ref_rejected_logps"].tolist() == [-4.0, -2.5]
    assert out["prompt_ids"] is batch["prompt_ids"]
    with pytest.raises(KeyError):  # a pair the run never reached is never given a made-up value
        with_reference_columns({"source": np.array(["f:3"], dtype=object)}, {"f:1": [0.0, 0.0]})


@pytest.mark.slow
def test_a_lora_run_fills_the_cache_and_the_next_run_trains_the_same_from_it(tiny_model_dir, tmp_path, ray_cluster):
    from core.data.synthetic import answer_format_pairs

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in answer_format_pairs(16, seed=5)))
    losses, outputs, summaries = {}, {}, {}
    for name in ("fills", "reads"):
        r = {"run": {"name": name, "model_name_or_path": str(tiny_model_dir), "replicas": 1,
                     "data_s3_path": str(tmp_path / "data"), "output_s3_path": str(tmp_path / "out")},
             "training_config": {"max_length": 128, "global_batch_size": 4, "precision": "fp32",
                                 "model": {"optim": {"lr": 5e-3, "name": "adamw",
                                                     "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                                           "peft": {"peft_scheme": "lora"},
                                           "dpo_cfg": {"reference": "precompute"}}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=ROOT,
                              env=ray_cluster.driver_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs[name] = proc.stdout + proc.stderr
        run = tmp_path / "out" / name
        losses[name] = [(row["step"], row["loss"], row["rewards/margins"]) for row in
                        map(json.loads, (run / "metrics.jsonl").open()) if row["split"] == "train"]
        summaries[name] = json.loads((run / "summary.json").read_text())["plan"]
    assert "no cache yet" in outputs["fills"] and "computing with" not in outputs["fills"]
    assert summaries["fills"]["fill_reference_cache"] and summaries["fills"]["reference"] == "adapter_disabled"
    assert summaries["fills"]["reference_precompute"]["filled"] == ["train"]
    assert "kept by run fills as it trained" in outputs["reads"]
    assert summaries["reads"]["reference"] == "precompute" and summaries["reads"]["reference_precompute"]["reused"]
    assert len(losses["fills"]) == 4 and [s for s, _, _ in losses["reads"]] == [s for s, _, _ in losses["fills"]]
    for (_, filled, filled_margin), (_, read, read_margin) in zip(losses["fills"], losses["reads"]):
        assert read == pytest.approx(filled, abs=1e-4) and read_margin == pytest.approx(filled_margin, abs=1e-4)
    assert losses["fills"][-1][1] != losses["fills"][0][1]  # it trained: the comparison is not of constants
