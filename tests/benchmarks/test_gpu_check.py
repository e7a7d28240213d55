"""benchmarks/gpu_check.py: its arithmetic by hand, and the whole check on CPU (--dry-run) as a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(**gpu_check.SIZES["dry"]["model"])


def test_flops_per_token_hand_worked():
    config = tiny_config()  # hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, vocab 512
    # per layer: q 64x64 + k, v 2 x 64x32 + o 64x64 = 12,288; MLP 3 x 64x128 = 24,576; head 64 x 512 = 32,768
    assert gpu_check.matmul_params(config) == 2 * (12_288 + 24_576) + 32_768 == 106_496
    # 64-token sequences: each token attends to 32.5 positions on average; 2 x 2 x 4 heads x 16 x 32.5 per layer
    assert gpu_check.forward_flops_per_token(config, 64) == 2 * 106_496 + 2 * 4 * 4 * 16 * 32.5 == 229_632
    # policy forward + backward (3 forwards) and the reference forward (1)
    assert gpu_check.dpo_flops_per_token(config, 64) == 4 * 229_632


def test_mfu_and_peak_by_device_name():
    assert gpu_check.mfu(30_000, 8e9, 989e12) == pytest.approx(0.2427, abs=1e-4)
    assert gpu_check.mfu(30_000, 8e9, None) is None
    assert gpu_check.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops_of("NVIDIA H100 PCIe") == 756e12  # before the plain "H100"
    assert gpu_check.peak_flops_of("NVIDIA A10G") == 70e12 and gpu_check.peak_flops_of("NVIDIA A10") == 125e12
    assert gpu_check.peak_flops_of("cpu") is None


def test_agreement_measures_hand_worked():
    gap = gpu_check.per_token_gap(torch.tensor([-10.0, -4.0]), torch.tensor([-10.5, -4.0]), torch.tensor([5, 0]))
    assert gap == pytest.approx(0.1)  # 0.5 nats over 5 tokens; an empty answer divides by 1
    grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    assert gpu_check.relative_l2(grads, grads) == 0.0
    assert gpu_check.relative_l2({"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([5.0])}, grads) == \
        pytest.approx(1.0)  # ||(0, 0, 5)|| / ||(3, 4, 0)||


def test_random_pairs_are_seeded_and_uneven_where_asked():
    even = gpu_check.random_pairs(2, prompt=8, answer=6, vocab=50, seed=1, uneven=False)
    assert [len(x) for x in even["prompt_ids"] + even["chosen_ids"] + even["rejected_ids"]] == [8, 8, 6, 6, 6, 6]
    uneven = gpu_check.random_pairs(2, prompt=16, answer=16, vocab=50, seed=1, uneven=True)
    assert len(uneven["chosen_ids"][0]) != len(uneven["rejected_ids"][0])
    assert uneven == gpu_check.random_pairs(2, prompt=16, answer=16, vocab=50, seed=1, uneven=True)
    assert all(2 <= t < 50 for row in uneven["prompt_ids"] for t in row)  # never the pad or eos id


@pytest.mark.slow  # DeepSpeed, four engines and a dozen tiny models: 15-45 s alone on this machine
def test_dry_run_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report  # the JSON is stdout's last line
    for key in ("precision", "attention", "loraplus_fused_adam", "optimizers", "zero3_full", "zero3_lora",
                "reference", "memory", "speed"):
        assert "error" not in report[key], (key, report[key])
    assert not report["ray_imported"]
    # agreements within tolerance
    assert report["precision"]["ok"] and report["precision"]["max_gap_nats_per_token"] <= 0.05
    paths = report["attention"]["paths"]
    assert set(paths) >= {"eager/shared", "eager/packed", "sdpa/padded", "sdpa/shared", "sdpa/packed"}
    assert all(p["max_gap_nats_per_token"] <= 1e-4 and p["grad_relative_l2"] <= 1e-3 for p in paths.values())
    assert report["reference"]["ok"] and report["reference"]["max_gap_nats_per_token"] <= 1e-4
    # LoRA+ through peft with a fused-Adam class (the CPU stand-in): two groups, B at lr x 16, adapters moved
    lora_plus = report["loraplus_fused_adam"]
    assert lora_plus["ok"] and lora_plus["optimizer"] == "FusedAdamW"
    assert lora_plus["group_lrs"][1] == pytest.approx(16 * lora_plus["group_lrs"][0])
    # ZeRO-3 steps ran with the loop's optimizer class and finite losses; the trace counts are measured
    for key in ("zero3_full", "zero3_lora"):
        assert report[key]["ok"] and report[key]["optimizer"] == "FusedAdamW"
    for reference in ("adapter_disabled", "precompute"):
        assert report["zero3_lora"][reference]["steady"]["trace_invalidations"] >= 0
    assert report["memory"]["estimate_gb"] > 0 and report["memory"]["peak_allocated_gb"] is None
    speed = report["speed"]
    assert speed["tokens_per_s"] > 0 and speed["mfu"] is None  # no peak FLOP/s for a CPU
    assert speed["flops_per_real_token"] == gpu_check.dpo_flops_per_token(tiny_config(), speed["sequence_tokens"])
    assert report["optimizers"]["fastest"] in ("torch_adamw_fused", "torch_adamw_foreach")
