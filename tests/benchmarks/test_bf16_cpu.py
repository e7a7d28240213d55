"""The bf16-on-CPU benchmark's agreement figures and decision (benchmarks/bf16_cpu.py), against hand-worked runs."""
from __future__ import annotations

import pytest

from benchmarks import bf16_cpu


def run(losses, tokens_per_s, train_s, accuracy, margin, real_tokens=1000):
    return {"losses": losses, "tokens_per_s": tokens_per_s, "train_s": train_s, "real_tokens": real_tokens,
            "accuracies": [0.5] * (len(losses) - 1) + [accuracy], "margins": [0.0] * (len(losses) - 1) + [margin]}


def test_agreement_hand_worked():
    fp32 = run([0.6931, 0.6800, 0.6500], tokens_per_s=100.0, train_s=8.0, accuracy=0.75, margin=0.12)
    bf16 = run([0.6931, 0.6850, 0.6470], tokens_per_s=150.0, train_s=5.0, accuracy=1.0, margin=0.13)
    agreed = bf16_cpu.agreement(fp32, bf16)
    # differences 0, 0.005, 0.003: max 0.005, mean 0.008 / 3
    assert agreed["loss_max_abs_diff"] == pytest.approx(0.005)
    assert agreed["loss_mean_abs_diff"] == pytest.approx(0.008 / 3)
    assert agreed["final_accuracy"] == {"fp32": 0.75, "bf16": 1.0}
    assert agreed["final_margin"] == {"fp32": 0.12, "bf16": 0.13}
    assert agreed["speedup"] == pytest.approx(1.5)  # 150 / 100 tokens/s, reference stage counted
    assert agreed["train_speedup"] == pytest.approx(1.6)  # 1000/5 over 1000/8
    assert bf16_cpu.bf16_by_default(agreed)


def test_bf16_is_the_default_only_when_both_agreement_and_speed_hold():
    fp32 = run([0.69, 0.60], tokens_per_s=100.0, train_s=8.0, accuracy=1.0, margin=0.1)
    drifting = run([0.69, 0.64], tokens_per_s=200.0, train_s=4.0, accuracy=1.0, margin=0.1)  # mean diff 0.02
    slow = run([0.69, 0.60], tokens_per_s=110.0, train_s=7.0, accuracy=1.0, margin=0.1)  # 1.1x
    assert not bf16_cpu.bf16_by_default(bf16_cpu.agreement(fp32, drifting))
    assert not bf16_cpu.bf16_by_default(bf16_cpu.agreement(fp32, slow))
