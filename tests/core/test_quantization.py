"""QLoRA's recipe -> BitsAndBytesConfig mapping and the memory a quantized weight takes (core/quantization.py)."""
from __future__ import annotations

import pytest

from core import quantization as q
from core.config import Quantization
from core.errors import ConfigError

NF4 = Quantization(bits=4)


def test_4bit_maps_to_bitsandbytes_keywords_with_the_training_dtype_for_compute():
    assert q.bnb_kwargs(NF4, "fp32", partitioned=False) == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32"}
    fp4 = Quantization(bits=4, quant_type="fp4", double_quant=False, compute_dtype="bf16")
    assert q.bnb_kwargs(fp4, "fp32", partitioned=False) == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "bfloat16"}


def test_zero3_stores_4bit_weights_in_the_training_dtype():
    kwargs = q.bnb_kwargs(NF4, "bf16", partitioned=True)
    assert kwargs["bnb_4bit_quant_storage"] == "bfloat16" and kwargs["bnb_4bit_compute_dtype"] == "bfloat16"
    assert "bnb_4bit_quant_storage" not in q.bnb_kwargs(NF4, "bf16", partitioned=False)


def test_8bit_maps_to_load_in_8bit_only():
    assert q.bnb_kwargs(Quantization(bits=8), "fp32", partitioned=False) == {"load_in_8bit": True}


def test_bnb_config_is_built_with_torch_dtypes():
    import torch

    config = q.bnb_config(NF4, "bf16", partitioned=True)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.bnb_4bit_quant_storage == torch.bfloat16


def test_bytes_per_param_hand_worked():
    # 4 bits = 0.5 byte; an fp32 absmax per 64 weights = 4/64 = 0.0625
    assert q.bytes_per_param(Quantization(bits=4, double_quant=False)) == pytest.approx(0.5625)
    # double quantization: an 8-bit absmax per 64 (1/64 = 0.015625) + an fp32 one per 64*256 (4/16384 = 0.000244)
    assert q.bytes_per_param(NF4) == pytest.approx(0.5 + 0.015625 + 0.000244140625)
    assert q.bytes_per_param(Quantization(bits=8)) == 1.0


def test_8bit_under_zero3_is_refused_before_the_run():
    assert q.stage_problem(8, 3) and q.stage_problem(8, 0) is None
    assert q.stage_problem(4, 3) is None and q.stage_problem(None, 3) is None
    with pytest.raises(ConfigError, match="bits=8 cannot train with ZeRO-3") as err:
        q.require_stage(8, 3)
    assert "bits=4" in err.value.fix


def test_labels():
    assert (q.label(NF4), q.label(Quantization(bits=4, quant_type="fp4")), q.label(Quantization(bits=8)),
            q.label(Quantization())) == ("nf4", "fp4", "int8", None)


def test_a_run_folder_names_its_quantization(tmp_path):
    from core.config import Peft, Recipe, Run, as_dict, ModelCfg, TrainingConfig
    import yaml

    (tmp_path / "model").mkdir()
    assert q.run_quantization(tmp_path / "model") == Quantization()  # no recipe.yaml: not quantized
    recipe = Recipe(run=Run(name="r", model_name_or_path="m", data_s3_path="d", output_s3_path="o"),
                    training_config=TrainingConfig(model=ModelCfg(peft=Peft(peft_scheme="lora", quantization=NF4))))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(as_dict(recipe)))
    assert q.run_quantization(tmp_path / "model") == NF4


def test_training_load_arguments(tmp_path):
    import torch

    assert q.load_kwargs(Quantization(), "fp32", zero_stage=0, device=torch.device("cpu")) == {}
    cpu = q.load_kwargs(NF4, "fp32", zero_stage=0, device=torch.device("cpu"))
    assert set(cpu) == {"quantization_config"}  # bitsandbytes quantizes on the CPU as it loads
    gpu = q.load_kwargs(NF4, "bf16", zero_stage=0, device=torch.device("cuda", 1))
    assert gpu["device_map"] == {"": 1}  # quantized straight onto the worker's GPU
    sharded = q.load_kwargs(NF4, "bf16", zero_stage=3, device=torch.device("cuda", 1))
    assert "device_map" not in sharded and sharded["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
