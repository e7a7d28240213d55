"""`raydpo plan`: per-GPU memory under ZeRO-3, term by term by hand, and the command a user runs."""
from __future__ import annotations

import pytest
import yaml

from launcher.cli import main
from training.memory_plan import (GB, ModelShape, RunShape, activation_bytes, estimate, fits, logprob_head_bytes,
                                  model_states_bytes, reference_bytes, tokens_per_forward)

MODEL = ModelShape(params=1000, largest_layer_params=100, layers=3, hidden=4, vocab=10)
RUN = RunShape(gpus_per_node=2, nodes=1, micro_batch_pairs=2, max_length=8, dtype_bytes=2,
               gradient_checkpointing=False, reference="precompute", logprob_chunk=5)


def test_model_states_full_rank_is_deepspeeds_estimate():
    # DeepSpeed ZeRO-3 without offload: 4 x largest layer + 18 bytes x params / GPUs = 400 + 9000
    assert model_states_bytes(MODEL, RUN) == 9400


def test_model_states_lora_adapters_plus_frozen_base():
    lora = ModelShape(params=1000, largest_layer_params=100, layers=3, hidden=4, vocab=10, adapter_params=10)
    # estimator over the 10 adapter weights: 400 + 18 x 10 / 2 = 490; the frozen base in 16-bit: 2 x 1000 / 2
    assert model_states_bytes(lora, RUN) == 490 + 1000


def test_reference_strategies():
    assert reference_bytes(MODEL, RUN) == 0  # precompute: not on the workers
    assert reference_bytes(MODEL, RunShape(**{**RUN.__dict__, "reference": "adapter_disabled"})) == 0
    assert reference_bytes(MODEL, RunShape(**{**RUN.__dict__, "reference": "engine"})) == 2 * 1000 / 2


def test_activations_hand_worked():
    assert tokens_per_forward(RUN) == 2 * 2 * 8
    # 32 tokens x 3 layers x 34 x hidden 4 (16-bit)
    assert activation_bytes(MODEL, RUN) == 32 * 3 * 136
    # checkpointed: each layer's input (3 x 4 x 2 bytes) + one layer's full activations (136) per token
    assert activation_bytes(MODEL, RunShape(**{**RUN.__dict__, "gradient_checkpointing": True})) == 32 * (24 + 136)
    # fp32 doubles the 16-bit figure
    assert activation_bytes(MODEL, RunShape(**{**RUN.__dict__, "dtype_bytes": 4})) == 32 * 3 * 272


def test_logprob_head_hand_worked():
    # logits and their gradient for 32 positions x 10 words in 16-bit, plus 2 fp32 scratch chunks of 5 x 10
    assert logprob_head_bytes(MODEL, RUN) == 2 * 32 * 10 * 2 + 2 * 5 * 10 * 4


def test_total_and_fits():
    lines = estimate(MODEL, RUN)
    assert lines[-1][0] == "total" and lines[-1][1] == sum(b for _, b in lines[:-1])
    assert fits(0.9 * GB, 1.0) and not fits(0.9 * GB + 1, 1.0)


def write_plan_recipe(folder, model_dir, name: str, model: dict | None = None):
    """A recipe `raydpo plan` reads: the tiny model, batch 8, max_length 256, and `model` as training_config.model."""
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": name, "model_name_or_path": str(model_dir), "data_s3_path": str(folder),
                "output_s3_path": str(folder / "out")},
        "training_config": {"max_length": 256, "global_batch_size": 8, **({"model": model} if model else {})}}))
    return path


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir):
    return write_plan_recipe(tmp_path, tiny_model_dir, "plan-me")


def test_plan_fits_a_big_gpu(recipe_file, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert main(["plan", str(recipe_file), "--gpus-per-node", "2", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "1 node(s) x 2 GPU(s) = 2 ZeRO-3 worker(s)" in out
    assert f"model: {params / 1e6:.1f}M parameters" in out and "full-rank, bf16" in out
    assert "reference (precompute)" in out  # full-rank default
    assert "activations (4 pairs x 256 tokens)" in out  # 8 pairs over 2 workers
    assert out.strip().splitlines()[-1].startswith("fits:")


def test_plan_says_what_to_change_when_it_does_not_fit(recipe_file, capsys):
    code = main(["plan", str(recipe_file), "--gpus-per-node", "1", "--gpu-memory-gb", "0.5",
                 "training_config.model.dpo_cfg.reference=engine", "max_length=4096"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("does not fit:")
    assert "gradient_checkpointing=true" in out and "reference=precompute" in out


def test_plan_needs_the_gpus(recipe_file, capsys):
    assert main(["plan", str(recipe_file), "--gpu-memory-gb", "80"]) == 2
    err = capsys.readouterr().err
    assert "--gpus-per-node must be a positive number" in err and "fix:" in err


def test_plan_refuses_a_batch_the_gpus_cannot_share(recipe_file, capsys):
    # valid for 2 replicas (8 pairs / 2), but 2 replicas of 8 GPUs are 16 workers for 8 pairs
    code = main(["plan", str(recipe_file), "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--replicas", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "global_batch_size=8 does not split over 16 workers (run.replicas=2 × 8 GPUs per node)" in err
    assert "fix:" in err and "multiple of 16" in err
    assert "Traceback" not in err and "AssertionError" not in err


def test_inference_stage_hand_worked():
    from training.memory_plan import RUNTIME_OVERHEAD_BYTES, inference_stage

    # 1000 params in bf16 = 2000 B; on a GPU of 1e-6 GB (1073.7 B) at 80%: 858.99 B per GPU -> ceil(2.33) = 3 GPUs
    gpus, per_gpu = inference_stage(MODEL, RUN, gpu_memory_gb=1e-6, tokens_per_forward=16)
    assert gpus == 3
    # 2000 / 3 weights + 16 x 34 x 4 activations (one layer, bf16) + 16 x 10 x 2 logits + 5 x 10 x 4 fp32 chunk
    assert per_gpu == pytest.approx(2000 / 3 + 2176 + 320 + 200 + RUNTIME_OVERHEAD_BYTES)
    assert inference_stage(MODEL, RUN, gpu_memory_gb=80)[0] == 1  # fits one GPU: no split


def test_sharding_decisions_hand_worked():
    from core.sharding import actors_for, gpus_for_weights, load_kwargs

    # a 70B model in bf16 (140e9 B) on 80 GiB GPUs at 80% (68.7e9 B each): 3 GPUs; a 7B one (14e9 B): 1
    assert gpus_for_weights(140e9, 80 * 2**30) == 3
    assert gpus_for_weights(14e9, 80 * 2**30) == 1
    assert load_kwargs(1, 80 * 2**30) == {"device_map": {"": 0}}
    budget = int(0.8 * 80 * 2**30)
    assert load_kwargs(3, 80 * 2**30) == {"device_map": "auto", "max_memory": {0: budget, 1: budget, 2: budget,
                                                                               "cpu": 0}}
    # an 8-GPU node: 8 one-GPU actors, or 2 of 3 GPUs each (2 GPUs idle); never zero actors
    assert (actors_for(8, 1, 8), actors_for(8, 3, 8), actors_for(2, 3, 2)) == (8, 2, 1)


def test_plan_counts_the_reference_stage(recipe_file, capsys):
    assert main(["plan", str(recipe_file), "--gpus-per-node", "2", "--gpu-memory-gb", "80"]) == 0
    assert "reference stage (before training) and generator: one GPU per actor" in capsys.readouterr().out
