"""QLoRA's recipe section (training_config.model.peft.quantization) through the one validator: the section, its
one-word shorthand (4bit/8bit, what PAI's load_in_4bit becomes), and the combinations refused before a run."""
from __future__ import annotations

import pytest

from core.config import Quantization
from core.errors import ConfigError
from launcher.recipe import load_recipe
from tests.launcher.test_recipe import minimal, problems_of

LORA = {"training_config__model__peft__peft_scheme": "lora"}
QUANT = "training_config.model.peft.quantization"


def quant_of(raw, **kwargs) -> Quantization:
    return load_recipe(raw, **kwargs).training_config.model.peft.quantization


def test_off_by_default_and_null_means_off():
    assert quant_of(minimal(**LORA)) == Quantization(bits=None)
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization=None)).bits is None


def test_the_section_and_its_one_word_shorthand():
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization="4bit")) == Quantization(bits=4)
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization="8bit")) == Quantization(bits=8)
    section = {"bits": 4, "quant_type": "fp4", "double_quant": False, "compute_dtype": "bf16"}
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization=section)) == Quantization(**section)


def test_a_shorthand_in_the_file_takes_overrides_of_its_keys():
    raw = minimal(**LORA, training_config__model__peft__quantization="4bit")
    assert quant_of(raw, overrides=["quantization.quant_type=fp4"]) == Quantization(bits=4, quant_type="fp4")
    assert quant_of(minimal(**LORA), overrides=["quantization=8bit"]).bits == 8


def test_an_unknown_word_lists_the_section_and_the_shorthands():
    (problem,) = problems_of(minimal(**LORA, training_config__model__peft__quantization="2bit"))
    assert problem == (f"{QUANT}: '2bit' is a string; expected a section with keys: bits, quant_type, double_quant, "
                       "compute_dtype; or one of 4bit, 8bit")


def test_8bit_with_several_workers_is_refused_before_the_run():
    raw = minimal(**LORA, training_config__model__peft__quantization="8bit", run__replicas=2)
    (problem,) = problems_of(raw)
    assert problem.startswith(f"{QUANT}.bits: 8 with ZeRO-3 (run.replicas=2, zero_stage=null)")
    assert problems_of(minimal(**LORA, training_config__model__peft__quantization="8bit",
                               training_config__zero_stage=3))
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization="8bit")).bits == 8  # one worker
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization="4bit", run__replicas=2)).bits == 4


def test_the_reference_of_qlora_is_its_own_quantized_base():
    for reference in ("precompute", "engine"):
        (problem,) = problems_of(minimal(**LORA, training_config__model__peft__quantization="4bit",
                                         training_config__model__dpo_cfg__reference=reference))
        assert problem.startswith(f"training_config.model.dpo_cfg.reference: '{reference}' would score the reference "
                                  "with a full-precision base")
    assert quant_of(minimal(**LORA, training_config__model__peft__quantization="4bit",
                            training_config__model__dpo_cfg__reference="adapter_disabled")).bits == 4


def test_qlora_without_lora_is_a_config_error():
    (problem,) = problems_of(minimal(training_config__model__peft__quantization={"bits": 4}))
    assert problem.startswith(f"{QUANT}: 4-bit needs LoRA")


def test_the_run_plan_refuses_8bit_on_several_gpus_of_one_replica():
    """One replica with 8 GPUs is 8 ZeRO-3 workers: only the driver, which knows the workers, can tell."""
    from training.plan import build_run_plan

    recipe = load_recipe(minimal(**LORA, training_config__model__peft__quantization="8bit"))
    with pytest.raises(ConfigError, match="bits=8 cannot train with ZeRO-3"):
        build_run_plan(recipe, workers=8, use_gpu=True, train_pairs=64, validation_pairs=0)
    plan = build_run_plan(recipe, workers=1, use_gpu=False, train_pairs=64, validation_pairs=0)
    assert plan.zero_stage != 3 and plan.reference == "adapter_disabled"  # no partitioning with one worker


def test_the_qlora_demo_recipe_loads_and_opens_with_its_command():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "demo_smollm2_qlora.yaml"
    assert path.read_text().startswith("# raydpo demo --recipe recipes/demo_smollm2_qlora.yaml")
    recipe = load_recipe(path)
    assert recipe.training_config.model.peft.quantization == Quantization(bits=4)
    assert recipe.run.replicas == 1
