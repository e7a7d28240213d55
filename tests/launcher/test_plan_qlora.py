"""`raydpo plan` with QLoRA: quantized base weights at their real size, by hand (training/memory_plan.py)."""
from __future__ import annotations

import pytest

from core.config import Quantization
from core.quantization import bytes_per_param
from launcher.cli import main
from tests.launcher.test_plan_cli import write_plan_recipe
from training.memory_plan import ModelShape, RunShape, base_weight_bytes, frozen_base_bytes, inference_stage

RUN = RunShape(gpus_per_node=2, nodes=1, micro_batch_pairs=2, max_length=8, dtype_bytes=2,
               gradient_checkpointing=False, reference="adapter_disabled", logprob_chunk=5)


def test_quantized_base_weights_hand_worked():
    qlora = ModelShape(params=1000, largest_layer_params=100, layers=3, hidden=4, vocab=10, adapter_params=10,
                       quantized_params=800, quantized_bytes=0.5, quant_label="nf4")
    # 800 weights at 0.5 byte + the 200 others (norms, embeddings, head) in 16-bit: 400 + 400
    assert base_weight_bytes(qlora, 2) == 800
    assert frozen_base_bytes(qlora, RUN) == 800 / 2  # over the 2 GPUs
    plain = ModelShape(params=1000, largest_layer_params=100, layers=3, hidden=4, vocab=10, adapter_params=10)
    assert frozen_base_bytes(plain, RUN) == 2 * 1000 / 2  # unchanged without quantization
    # the generator evaluates the adapter on the same 4-bit base: 400 + 200 x 2 = 800 bytes of weights (one GPU)
    gpus, per_gpu = inference_stage(qlora, RUN, gpu_memory_gb=80)
    assert gpus == 1 and per_gpu - inference_stage(plain, RUN, gpu_memory_gb=80)[1] == 800 - 2000


@pytest.fixture
def qlora_recipe(tmp_path, tiny_model_dir):
    return write_plan_recipe(tmp_path, tiny_model_dir, "plan-qlora",
                             model={"peft": {"peft_scheme": "lora", "quantization": "4bit"}})


def test_plan_counts_the_linear_weights_but_the_head_as_quantized(qlora_recipe):
    from launcher.commands.plan import shapes
    from launcher.recipe import load_recipe

    model, _ = shapes(load_recipe(qlora_recipe), gpus_per_node=1)
    # tests/tiny.py: hidden 32, 4 heads of 8, 2 KV heads, MLP 64, 2 layers. Per layer q 32x32 + k 32x16 + v 32x16
    # + o 32x32 = 3072, gate + up + down 3 x 32x64 = 6144: 9216; x 2 layers. lm_head and embeddings stay unquantized.
    assert model.quantized_params == 2 * 9216
    assert model.quantized_bytes == pytest.approx(bytes_per_param(Quantization(bits=4)))
    assert model.quant_label == "nf4"


def test_plan_names_the_quantized_base(qlora_recipe, capsys):
    assert main(["plan", str(qlora_recipe), "--gpus-per-node", "1", "--gpu-memory-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "on a nf4 base (0.0M weights at 0.5159 bytes)" in out
    assert "LoRA adapters + frozen base in nf4)" in out
