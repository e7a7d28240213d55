"""A run's recipe.yaml reads back as the typed Recipe it was written from (training/export.py and serving read the
base model of an adapter through it, with attributes, not dict lookups)."""
from __future__ import annotations

import yaml

from core.config import (DpoCfg, LoraTuning, ModelCfg, Peft, Recipe, Run, TrainingConfig, as_dict, from_dict,
                         saved_recipe)


def test_a_saved_recipe_reads_back_as_the_recipe_it_was_written_from(tmp_path):
    recipe = Recipe(run=Run(name="r", model_name_or_path="/models/base", data_s3_path="d", output_s3_path="o"),
                    training_config=TrainingConfig(model=ModelCfg(
                        dpo_cfg=DpoCfg(beta=0.25, loss_type="ipo"),
                        peft=Peft(peft_scheme="lora", lora_tuning=LoraTuning(target_modules=("q_proj", "v_proj"))))))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(as_dict(recipe), sort_keys=False))  # as the driver does
    back = saved_recipe(tmp_path)
    assert back == recipe
    assert back.training_config.model.dpo_cfg.beta == 0.25
    assert back.training_config.model.peft.lora_tuning.target_modules == ("q_proj", "v_proj")  # a list: a tuple


def test_absent_keys_take_their_defaults():
    back = from_dict(Recipe, {"run": {"name": "r", "model_name_or_path": "m", "data_s3_path": "d",
                                      "output_s3_path": "o"}})
    assert back.training_config == TrainingConfig()
