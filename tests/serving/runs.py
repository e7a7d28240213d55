"""Run folders for the serving tests, made offline: LoRA runs with random adapter weights on the tiny model."""
from __future__ import annotations

from pathlib import Path

import yaml

from core.config import Recipe, Run, as_dict


def build_lora_run(run_dir: Path, base_dir: Path, *, seed: int) -> Path:
    """<run_dir>/model (a LoRA adapter + tokenizer) and <run_dir>/recipe.yaml naming the base, as a LoRA run writes.

    init_lora_weights=False draws both LoRA matrices at random (peft's default keeps B at zero, which would be the
    base itself), and a large alpha makes the adapters move the greedy answer.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.save_pretrained(run_dir / "model")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run_dir / "model")
    recipe = Recipe(run=Run(name=run_dir.name, model_name_or_path=str(base_dir), data_s3_path="data",
                            output_s3_path=str(run_dir.parent)))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(as_dict(recipe), sort_keys=False))  # as the driver writes
    return run_dir
