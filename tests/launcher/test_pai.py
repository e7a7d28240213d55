"""PAI-QuickStart hyperparameters -> Nova-shaped recipe: hand-worked batch arithmetic, each mapping, each error."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.pai import global_batch_size, is_pai, translate_pai
from launcher.recipe import load_recipe, load_recipe_with_explanation
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# As PAI-QuickStart's DPO hyperparameters are set (values as strings, the way PAI passes them), beside the
# model, the data channels and the output.
PAI = {
    "training_strategy": "dpo",
    "learning_rate": "5e-5",
    "num_train_epochs": "2",
    "per_device_train_batch_size": "2",
    "gradient_accumulation_steps": "4",
    "seq_length": "2048",
    "lora_dim": "32",
    "lora_alpha": "64",
    "dpo_beta": "0.1",
    "apply_chat_template": "true",
    "system_prompt": "You are a helpful assistant",
    "load_in_4bit": "false",
    "load_in_8bit": "false",
    "model_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
    "train": "s3://bucket/dpo/train.jsonl",
    "validation": "s3://bucket/dpo/val.jsonl",
    "output": "s3://bucket/dpo/out",
    "name": "qwen2-dpo",
    "replicas": 3,
}


def pai(**changes) -> dict:
    raw = {**PAI, **changes}
    return {k: v for k, v in raw.items() if v is not ...}  # `key=...` removes a key


def problems_of(raw, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(raw, **kwargs)
    return info.value.problems


def test_global_batch_size_hand_worked():
    assert global_batch_size(2, 4, 3) == 24  # 2 pairs × 4 accumulation steps × 3 replicas
    assert global_batch_size(1, 1, 1) == 1
    assert global_batch_size(4, 8, 2) == 64


def test_is_pai():
    assert is_pai(PAI)
    assert not is_pai(yaml.safe_load((ROOT / "recipes" / "reference.yaml").read_text()))
    assert not is_pai({"run": {}, "training_strategy": "dpo"})  # a Nova recipe with a stray key stays Nova


def test_translation_of_every_key():
    nova, lines = translate_pai(PAI)
    assert nova == {
        "run": {
            "model_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
            "data_s3_path": "s3://bucket/dpo/train.jsonl",
            "validation_data_s3_path": "s3://bucket/dpo/val.jsonl",
            "output_s3_path": "s3://bucket/dpo/out",
            "name": "qwen2-dpo",
            "replicas": 3,
        },
        "training_config": {
            "max_length": 2048,
            "global_batch_size": 24,
            "micro_batch_size": 2,
            "trainer": {"max_epochs": 2},
            "data": {"system_prompt": "You are a helpful assistant"},
            "model": {
                "optim": {"lr": 5e-5, "sched": {"min_lr": 0.0}},
                "dpo_cfg": {"beta": 0.1},
                "peft": {"peft_scheme": "lora", "lora_tuning": {"alpha": 64, "adapter_dim": 32}},
            },
        },
    }
    assert "pai.dpo_beta=0.1 -> training_config.model.dpo_cfg.beta=0.1" in lines
    assert "pai.learning_rate=5e-05 -> training_config.model.optim.lr=5e-05" in lines
    assert "pai.seq_length=2048 -> training_config.max_length=2048" in lines
    assert ("pai.per_device_train_batch_size=2 × pai.gradient_accumulation_steps=4 × replicas=3 -> "
            "training_config.global_batch_size=24") in lines
    assert "pai.lora_dim=32 -> training_config.model.peft.lora_tuning.adapter_dim=32" in lines
    assert all(line.startswith("pai.") for line in lines)
    # every PAI key given is accounted for in some line: nothing dropped silently
    assert all(any(line.startswith(f"pai.{key}") or f"pai.{key}=" in line for line in lines) for key in PAI)


def test_replicas_flag_wins_and_keeps_the_per_device_meaning():
    nova, lines = translate_pai(PAI, replicas=4)
    assert nova["run"]["replicas"] == 4
    assert nova["training_config"]["global_batch_size"] == 2 * 4 * 4
    assert "--replicas=4 -> run.replicas=4" in lines


def test_batch_keys_default_to_one_when_only_some_are_given():
    nova, _ = translate_pai(pai(gradient_accumulation_steps=..., replicas=...))
    assert (nova["training_config"]["global_batch_size"], nova["run"].get("replicas")) == (2, None)
    nova, _ = translate_pai(pai(per_device_train_batch_size=..., gradient_accumulation_steps=..., replicas=...))
    assert "global_batch_size" not in nova["training_config"]  # the recipe default (8) applies


def test_load_recipe_from_a_pai_file(tmp_path):
    path = tmp_path / "pai.yaml"
    path.write_text(yaml.safe_dump(pai(train="data/train.jsonl", load_in_4bit=True)))
    recipe, lines = load_recipe_with_explanation(path, base_dir=tmp_path)
    tc = recipe.training_config
    assert recipe.run.data_s3_path == str(tmp_path / "data" / "train.jsonl")
    assert (tc.global_batch_size, tc.micro_batch_size, recipe.run.replicas) == (24, 2, 3)
    assert tc.model.optim.lr == 5e-5 and tc.model.optim.sched.min_lr == 0.0
    assert (tc.model.peft.peft_scheme, tc.model.peft.quantization.bits) == ("lora", 4)
    assert (tc.model.peft.lora_tuning.adapter_dim, tc.model.peft.lora_tuning.alpha) == (32, 64)
    assert tc.data.system_prompt == "You are a helpful assistant"
    assert tc.trainer.max_epochs == 2 and tc.max_length == 2048
    assert "pai.load_in_4bit=true -> training_config.model.peft.quantization='4bit'" in lines


def test_learning_rate_below_novas_default_min_lr_still_loads():
    assert load_recipe(pai(learning_rate=5e-7)).training_config.model.optim.lr == 5e-7


def test_lora_dim_zero_is_full_rank():
    nova, lines = translate_pai(pai(lora_dim=0, lora_alpha=...))
    assert nova["training_config"]["model"]["peft"] == {"peft_scheme": None}
    assert "pai.lora_dim=0 -> training_config.model.peft.peft_scheme=null (full-rank)" in lines
    assert load_recipe(pai(lora_dim=0, lora_alpha=...)).training_config.model.peft.peft_scheme is None


def test_lora_alpha_without_lora_is_reported_with_its_pai_key():
    (problem,) = problems_of(pai(lora_dim=0))
    assert problem.startswith("training_config.model.peft.lora_tuning.alpha (from pai.lora_alpha): 64 is set but "
                              "peft_scheme is null")


def test_quantization_without_lora():
    (problem,) = problems_of(pai(lora_dim=0, lora_alpha=..., load_in_4bit=True))
    assert problem.startswith("training_config.model.peft.quantization (from pai.load_in_4bit): 4-bit needs LoRA")


def test_apply_chat_template_false_explains_why():
    (problem,) = problems_of(pai(apply_chat_template="false"))
    assert problem.startswith("pai.apply_chat_template: false is not supported; raydpo always renders prompts "
                              "with the model's chat template")


def test_translate_pai_raises_every_pai_problem_at_once():
    with pytest.raises(ConfigError) as info:
        translate_pai(pai(training_strategy="sft", lora_rank=8, load_in_4bit=True, load_in_8bit=True,
                          apply_chat_template=False, per_device_train_batch_size=0, lora_dim=-1))
    paths = [p.split(":")[0] for p in info.value.problems]
    assert sorted(paths) == sorted([
        "pai.lora_rank", "pai.training_strategy", "pai.per_device_train_batch_size", "pai.lora_dim",
        "pai.load_in_4bit", "pai.apply_chat_template"])
    text = "\n".join(info.value.problems)
    assert "pai.lora_rank: unknown PAI-QuickStart key (value 8); did you mean pai.lora_dim?" in text
    assert "pai.training_strategy: 'sft' is not supported; allowed: dpo" in text
    assert "pai.per_device_train_batch_size: 0 is not allowed; allowed: an integer >= 1" in text
    assert "load_in_4bit and load_in_8bit are both true" in text


def test_pai_values_are_checked_by_the_recipe_rules_with_their_origin():
    problems = problems_of(pai(dpo_beta=0.9, num_train_epochs=2.5, seq_length=64, name=...))
    assert problems == [
        "run.name (from pai.name): missing (required): a Kubernetes-style name for the run, e.g. my-dpo-run",
        "training_config.max_length (from pai.seq_length): 64 is not allowed; allowed: 128..32768",
        "training_config.trainer.max_epochs (from pai.num_train_epochs): 2.5 is a number; expected an integer "
        "(1..5)",
        "training_config.model.dpo_cfg.beta (from pai.dpo_beta): 0.9 is not allowed; allowed: [0.001, 0.5]",
    ]


def test_pai_and_recipe_problems_come_in_one_error():
    problems = problems_of(pai(apply_chat_template=False, dpo_beta=5), overrides=["warmup_steps=50"])
    assert [p.split(":")[0] for p in problems] == [
        "pai.apply_chat_template",
        "training_config.model.optim.sched.warmup_steps",
        "training_config.model.dpo_cfg.beta (from pai.dpo_beta)",
    ]


def test_overrides_apply_to_the_translated_recipe():
    recipe = load_recipe(pai(), overrides=["loss_type=ipo", "warmup_steps=5"])
    assert recipe.training_config.model.dpo_cfg.loss_type == "ipo"
    assert recipe.training_config.model.optim.sched.warmup_steps == 5


def test_a_key_changed_by_an_override_is_not_labelled_as_from_pai():
    (problem,) = problems_of(pai(), overrides=["beta=0.9"])
    assert problem.startswith("training_config.model.dpo_cfg.beta: 0.9 is not allowed")


def test_a_pai_file_without_a_name_is_named_after_the_file_and_says_so(tmp_path, capsys):
    """PAI writes no run name into the hyperparameter file (PAI's job has one): the file's stem names the run."""
    from launcher.cli import main

    path = tmp_path / "DPO_Qwen2.5 hyperparams.json"
    path.write_text(yaml.safe_dump(pai(name=...)))
    recipe, lines = load_recipe_with_explanation(path)
    assert recipe.run.name == "dpo-qwen2-5-hyperparams"
    assert any(line.startswith("pai.name not given -> run.name='dpo-qwen2-5-hyperparams' (the file's name")
               for line in lines)
    assert main(["validate", str(path), "--explain"]) == 0
    assert "pai.name not given -> run.name='dpo-qwen2-5-hyperparams'" in capsys.readouterr().out
    named = tmp_path / "other.yaml"
    named.write_text(yaml.safe_dump(pai()))
    assert load_recipe(named).run.name == "qwen2-dpo"  # a name given wins
    with pytest.raises(ConfigError, match="run.name"):  # a dict has no file name: still required
        load_recipe(pai(name=...))
