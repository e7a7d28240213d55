"""The recipe schema: reference.yaml, Nova's published DPO recipes, and every kind of problem a user can make."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from launcher.overrides import load_yaml_text, set_path
from launcher.recipe import (
    Recipe,
    divisors_up_to,
    dump_recipe_yaml,
    load_recipe,
    recipe_to_dict,
)
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "recipes" / "reference.yaml"

# aws/sagemaker-hyperpod-recipes, recipes_collection/recipes/fine-tuning/nova/nova_micro_p5_gpu_lora_dpo.yaml:
# keys, values and their spelling (`lr: 1e-5`, `eps: 1e-08`, 4-space indent) as published; comments left out.
NOVA_MICRO_LORA_DPO = """\
## Run config
run:
    name: "my-lora-run"
    model_type: "amazon.nova-micro-v1:0:128k"
    model_name_or_path: "nova-micro/prod"
    replicas: 2

## Training specific configs
training_config:
    max_length: 16384
    global_batch_size: 64

    trainer:
        max_epochs: 2

    model:
        hidden_dropout: 0.0
        attention_dropout: 0.0
        ffn_dropout: 0.0

        optim:
            lr: 1e-5
            name: distributed_fused_adam
            adam_w_mode: true
            eps: 1e-08
            weight_decay: 0.01
            betas:
                - 0.9
                - 0.999
            sched:
                warmup_steps: 10
                constant_steps: 0
                min_lr: 1e-6

        dpo_cfg:
            beta: 0.1

        peft:
            peft_scheme: "lora"
            lora_tuning:
                loraplus_lr_ratio: 20.0
                alpha: 64
                adapter_dropout: 0.01
"""

# The same repository's later layout (nova_1_0/nova_lite/DPO/nova_lite_1_0_p5_p4d_gpu_lora_dpo.yaml), verbatim:
# data and output paths are '' there (SageMaker fills them in from the job's inputs).
NOVA_LITE_LORA_DPO = """\
run:
  data_s3_path: ''
  mlflow_experiment_name: my-lora-experiment
  mlflow_run_name: my-lora-run
  mlflow_tracking_uri: ''
  model_name_or_path: nova-lite/prod
  model_type: amazon.nova-lite-v1:0:300k
  name: my-lora-run
  output_s3_path: ''
  replicas: 4
training_config:
  global_batch_size: 64
  max_length: 16384
  model:
    attention_dropout: 0.0
    dpo_cfg:
      beta: 0.1
    ffn_dropout: 0.0
    hidden_dropout: 0.0
    optim:
      adam_w_mode: true
      betas:
      - 0.9
      - 0.999
      eps: 1.0e-08
      lr: 1.0e-05
      name: distributed_fused_adam
      sched:
        constant_steps: 0
        min_lr: 1.0e-06
        warmup_steps: 10
      weight_decay: 0.01
    peft:
      lora_tuning:
        adapter_dropout: 0.01
        alpha: 64
        loraplus_lr_ratio: 20.0
      peft_scheme: lora
  trainer:
    max_epochs: 2
"""

DATA = ["run.data_s3_path=s3://bucket/dpo/train.jsonl", "run.output_s3_path=s3://bucket/dpo/out"]


def minimal(**paths) -> dict:
    """A recipe with only the required keys, plus `paths` (dotted with '__' for '.') set."""
    raw = {"run": {"name": "t", "model_name_or_path": "org/model", "data_s3_path": "s3://b/train.jsonl",
                   "output_s3_path": "s3://b/out"}}
    for key, value in paths.items():
        raw, problems = set_path(raw, key.split("__"), value)
        assert not problems
    return raw


def with_key(path: str, value, raw: dict | None = None) -> dict:
    raw, problems = set_path(raw or minimal(), path.split("."), value)
    assert not problems
    return raw


def problems_of(source, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(source, **kwargs)
    assert info.value.exit_code == 2
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- reference.yaml and Nova recipes ----


# QLoRA's section (a raydpo addition), off
NO_QUANTIZATION = {"bits": None, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}


def test_reference_yaml_loads_with_every_value_as_written(tmp_path):
    recipe = load_recipe(REFERENCE, base_dir=tmp_path)
    expected = yaml.safe_load(REFERENCE.read_text())
    expected["run"]["data_s3_path"] = str(tmp_path / "data" / "train.jsonl")
    expected["run"]["output_s3_path"] = str(tmp_path / "outputs")
    expected["training_config"]["model"]["peft"]["quantization"] = NO_QUANTIZATION  # the one key raydpo adds
    assert recipe_to_dict(recipe) == expected


def test_dataclass_defaults_are_those_of_reference_yaml():
    """A recipe with only the required keys gets reference.yaml's value for every other key."""
    reference = yaml.safe_load(REFERENCE.read_text())
    got = recipe_to_dict(load_recipe(minimal()))
    reference["training_config"]["model"]["peft"]["quantization"] = NO_QUANTIZATION
    assert got["training_config"] == reference["training_config"]
    for key in ("model_type", "replicas", "validation_data_s3_path", "mlflow_tracking_uri"):
        assert got["run"][key] == reference["run"][key]


def test_nova_micro_lora_recipe_loads_with_data_paths_given(tmp_path):
    recipe = load_recipe(write(tmp_path, NOVA_MICRO_LORA_DPO), overrides=DATA)
    tc = recipe.training_config
    assert recipe.run.name == "my-lora-run"
    assert recipe.run.model_name_or_path == "nova-micro/prod"  # a hub-style id, not a local path
    assert recipe.run.replicas == 2
    assert (tc.max_length, tc.global_batch_size, tc.trainer.max_epochs) == (16384, 64, 2)
    assert tc.model.optim.lr == 1e-5 and isinstance(tc.model.optim.lr, float)  # `1e-5`, a string to YAML 1.1
    assert tc.model.optim.eps == 1e-8
    assert tc.model.optim.sched.min_lr == 1e-6
    assert tc.model.optim.betas == (0.9, 0.999)
    assert tc.model.optim.weight_decay == 0.01
    assert tc.model.peft.peft_scheme == "lora"
    lora = tc.model.peft.lora_tuning
    assert (lora.loraplus_lr_ratio, lora.alpha, lora.adapter_dropout, lora.adapter_dim) == (20.0, 64, 0.01, 16)
    assert recipe.run.data_s3_path == "s3://bucket/dpo/train.jsonl"


def test_nova_recipe_without_data_paths_names_exactly_those_two(tmp_path):
    problems = problems_of(write(tmp_path, NOVA_MICRO_LORA_DPO))
    assert len(problems) == 2
    assert problems[0].startswith("run.data_s3_path: missing (required)")
    assert problems[1].startswith("run.output_s3_path: missing (required)")


def test_nova_lite_recipe_verbatim_empty_strings(tmp_path):
    path = write(tmp_path, NOVA_LITE_LORA_DPO)
    problems = problems_of(path)
    assert problems == [
        "run.data_s3_path: missing (required, got ''): a JSONL file, a folder or an s3:// prefix",
        "run.output_s3_path: missing (required, got ''): a local folder or an s3:// prefix",
    ]
    recipe = load_recipe(path, overrides=DATA)
    assert recipe.run.mlflow_tracking_uri is None  # Nova's '' means unset
    assert recipe.run.mlflow_experiment_name == "my-lora-experiment"
    assert recipe.run.replicas == 4 and recipe.training_config.model.peft.lora_tuning.alpha == 64


def test_nova_full_rank_recipe_loads(tmp_path):
    text = NOVA_LITE_LORA_DPO.replace(
        "      lora_tuning:\n        adapter_dropout: 0.01\n        alpha: 64\n        loraplus_lr_ratio: 20.0\n"
        "      peft_scheme: lora\n", "      peft_scheme: null\n")
    recipe = load_recipe(write(tmp_path, text), overrides=DATA)
    assert recipe.training_config.model.peft.peft_scheme is None
    assert recipe.training_config.model.peft.lora_tuning.loraplus_lr_ratio == 0.0


# ---- one problem of each kind, with its dotted path, the value and what is allowed ----


RANGE_CASES = [
    ("training_config.model.dpo_cfg.beta", 0.9, "[0.001, 0.5]"),
    ("training_config.model.dpo_cfg.beta", 0.0005, "[0.001, 0.5]"),
    ("training_config.trainer.max_epochs", 6, "1..5"),
    ("training_config.trainer.max_epochs", 0, "1..5"),
    ("training_config.model.optim.sched.warmup_steps", 0, "1..20"),
    ("training_config.model.optim.sched.warmup_steps", 21, "1..20"),
    ("training_config.model.optim.lr", 0.0, "(0, 1]"),
    ("training_config.model.optim.lr", 1.5, "(0, 1]"),
    ("training_config.model.optim.weight_decay", 1.1, "[0, 1]"),
    ("training_config.model.hidden_dropout", 1.5, "[0, 1]"),
    ("training_config.model.attention_dropout", -0.1, "[0, 1]"),
    ("training_config.model.ffn_dropout", 2, "[0, 1]"),
    ("training_config.model.peft.lora_tuning.adapter_dropout", 1.01, "[0, 1]"),
    ("training_config.model.dpo_cfg.label_smoothing", 0.6, "[0, 0.5]"),
    ("training_config.model.dpo_cfg.loss_type", "kto", "sigmoid, ipo, hinge, robust, sigmoid_norm"),
    ("training_config.model.dpo_cfg.reference", "frozen", "auto, precompute, engine, adapter_disabled"),
    ("training_config.model.peft.peft_scheme", "qlora", "one of lora (or null)"),
    ("training_config.model.peft.quantization.bits", 2, "4 or 8 (or null)"),
    ("training_config.model.peft.quantization.quant_type", "int4", "one of nf4, fp4"),
    ("training_config.model.optim.name", "sgd", "distributed_fused_adam, adamw"),
    ("training_config.precision", "fp16", "auto, bf16, fp32"),
    ("training_config.data.format", "csv", "auto, nova, trl, hh, sharegpt, openai, nemo, when2call"),
    ("training_config.data.on_error", "ignore", "fail, skip"),
    ("training_config.data.prompt_truncation", "middle", "keep_end, keep_start"),
    ("training_config.data.validation_fraction", 0.7, "[0, 0.5]"),
    ("run.replicas", 0, ">= 1"),
    ("training_config.max_length", 127, "128..32768"),
    ("training_config.max_length", 32769, "128..32768"),
    ("training_config.global_batch_size", 0, ">= 1"),
    ("training_config.micro_batch_size", 0, ">= 1 (or null)"),
    ("training_config.model.optim.betas", [0.9, 1.0], "each [0, 1)"),
    ("training_config.model.peft.lora_tuning.target_modules", "q_proj", '"all-linear" or a non-empty list'),
    ("training_config.model.peft.lora_tuning.target_modules", [], '"all-linear" or a non-empty list'),
    ("run.name", "My_Run", "a Kubernetes name"),
    ("run.name", "a" * 64, "at most 63 characters"),
    ("run.name", "-run", "a Kubernetes name"),
    ("run.data_s3_path", "s3://s3://prefs/pairs/", "an s3:// URI with a bucket"),
    ("run.output_s3_path", "s3://s3://prefs/runs", "an s3:// URI with a bucket"),
]


@pytest.mark.parametrize("path,value,allowed", RANGE_CASES)
def test_value_out_of_range_names_path_value_and_allowed(path, value, allowed):
    problems = problems_of(with_key(path, value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: ")
    assert "is not allowed; allowed: " in problems[0]
    assert allowed in problems[0]


def test_good_edges_pass():
    recipe = load_recipe(minimal(
        run__name="a" * 63,
        training_config__max_length=32768,
        training_config__model__optim__lr=1,  # an int is a fine float; the range is (0, 1]
        training_config__model__optim__sched__warmup_steps=20,
        training_config__model__dpo_cfg__beta=0.5,
        training_config__trainer__max_epochs=5,
    ))
    assert recipe.training_config.model.optim.lr == 1.0 and isinstance(recipe.training_config.model.optim.lr, float)
    assert recipe.run.name == "a" * 63


def test_enum_typo_suggests_nearest_choice():
    (problem,) = problems_of(with_key("training_config.model.dpo_cfg.loss_type", "sigmod"))
    assert problem.endswith("did you mean 'sigmoid'?")


TYPE_CASES = [
    ("training_config.trainer.max_epochs", 2.0, "2.0 is a number; expected an integer (1..5)"),
    ("training_config.global_batch_size", True, "true is a boolean; expected an integer (>= 1)"),
    ("training_config.model.dpo_cfg.beta", "0.1", "'0.1' is a string; expected a number ([0.001, 0.5])"),
    ("training_config.gradient_checkpointing", 1, "1 is an integer; expected true or false"),
    ("training_config.model.optim.betas", [0.9], "[0.9] is a list; expected a list of 2 numbers"),
    ("training_config.model.optim.betas", 0.9, "0.9 is a number; expected a list of 2 numbers"),
    ("training_config.data.key_map", {"question": 1}, "expected a mapping of strings to strings"),
    ("training_config.data.key_map", ["question"], "expected a mapping of strings to strings"),
    ("training_config.model.peft.lora_tuning.target_modules", ["q_proj", 3],
     "expected a string or a list of strings"),
    ("training_config.seed", None, "null is null; expected an integer"),
    ("run.model_type", 5, "5 is an integer; expected a string"),
]


@pytest.mark.parametrize("path,value,text", TYPE_CASES)
def test_wrong_type_names_path_value_and_expected_type(path, value, text):
    (problem,) = problems_of(with_key(path, value))
    assert problem.startswith(f"{path}: ")
    assert text in problem


def test_int_is_a_fine_float_and_lists_become_tuples():
    recipe = load_recipe(minimal(training_config__model__optim__weight_decay=0,
                                 training_config__model__optim__betas=[0.8, 0.95],
                                 training_config__model__peft__peft_scheme="lora",
                                 training_config__model__peft__lora_tuning__target_modules=["q_proj", "v_proj"]))
    optim = recipe.training_config.model.optim
    assert optim.weight_decay == 0.0 and isinstance(optim.weight_decay, float)
    assert optim.betas == (0.8, 0.95)
    assert recipe.training_config.model.peft.lora_tuning.target_modules == ("q_proj", "v_proj")


def test_unknown_key_suggests_nearest_sibling():
    (problem,) = problems_of(with_key("training_config.model.dpo_cfg.betta", 0.2))
    assert problem == (
        "training_config.model.dpo_cfg.betta: unknown key (value 0.2); did you mean "
        "training_config.model.dpo_cfg.beta? allowed keys here: beta, loss_type, label_smoothing, rpo_alpha, "
        "reference"
    )


def test_unknown_key_in_the_wrong_section_points_to_where_it_lives():
    (problem,) = problems_of(with_key("training_config.beta", 0.2))
    assert problem.startswith("training_config.beta: unknown key (value 0.2); did you mean "
                              "training_config.model.dpo_cfg.beta?")


def test_unknown_section_typo():
    (problem,) = problems_of(with_key("training_config.model.dpo_cgf", {"beta": 0.2}))
    assert "did you mean training_config.model.dpo_cfg?" in problem


def test_section_that_is_not_a_mapping():
    (problem,) = problems_of(with_key("training_config.trainer", 3))
    assert problem.startswith("training_config.trainer: 3 is an integer; expected a section with keys: max_epochs")


def test_null_section_means_all_defaults():
    recipe = load_recipe(minimal(training_config__checkpoint=None))
    assert recipe.training_config.checkpoint.keep_last == 2


@pytest.mark.parametrize("key", ["name", "model_name_or_path", "data_s3_path", "output_s3_path"])
def test_missing_required_key(key):
    raw = minimal()
    del raw["run"][key]
    (problem,) = problems_of(raw)
    assert problem.startswith(f"run.{key}: missing (required): ")


def test_null_required_key_is_missing():
    (problem,) = problems_of(with_key("run.model_name_or_path", None))
    assert problem.startswith("run.model_name_or_path: missing (required, got null)")


def test_missing_run_section_lists_each_required_key():
    problems = problems_of({"training_config": {}})
    assert [p.split(":")[0] for p in problems] == [
        "run.name", "run.model_name_or_path", "run.data_s3_path", "run.output_s3_path"]


# ---- checks across keys ----


def test_min_lr_must_be_below_lr():
    raw = minimal(training_config__model__optim__lr=1e-6)
    (problem,) = problems_of(raw)
    assert problem == ("training_config.model.optim.sched.min_lr: 1e-06 is not below optim.lr=1e-06; "
                       "allowed: 0 <= min_lr < lr")


def test_a_batch_below_the_replica_count_is_a_problem_naming_the_counts_that_work():
    (problem,) = problems_of(minimal(run__replicas=16))
    assert problem == (
        "training_config.global_batch_size: global_batch_size 8 is below run.replicas=16: every replica trains at "
        "least one pair per step; use 1..8 replicas, or make global_batch_size 16 or more")


def test_nova_pro_recipes_split_32_pairs_unevenly_over_6_and_12_replicas():
    # aws/sagemaker-hyperpod-recipes nova_pro_1_0_p5_gpu_dpo (replicas 6) and _p4d_ (12), global_batch_size 32
    for replicas in (6, 12):
        recipe = load_recipe(minimal(run__replicas=replicas, training_config__global_batch_size=32))
        assert (recipe.run.replicas, recipe.training_config.global_batch_size) == (replicas, 32)
    # 32 over 6 is 6,6,5,5,5,5: a micro batch must divide the busiest replica's 6
    (problem,) = problems_of(minimal(run__replicas=6, training_config__global_batch_size=32,
                                     training_config__micro_batch_size=4))
    assert problem == ("training_config.micro_batch_size: 4 does not divide the busiest replica's share 6 "
                       "(global_batch_size 32 / run.replicas 6); micro batch sizes that divide it: 1, 2, 3, 6")


def test_divisors_up_to_hand_worked():
    assert divisors_up_to(8) == [1, 2, 4, 8]
    assert divisors_up_to(12) == [1, 2, 3, 4, 6, 12]
    assert divisors_up_to(7) == [1, 7]
    assert divisors_up_to(96) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]  # 96 itself is above 64
    assert divisors_up_to(1) == [1]


def test_batch_below_replicas_suggests_the_counts_that_work():
    (problem,) = problems_of(minimal(training_config__global_batch_size=2, run__replicas=3))
    assert "use 1..2 replicas, or make global_batch_size 3 or more" in problem


def test_micro_batch_must_divide_the_per_replica_batch():
    (problem,) = problems_of(minimal(run__replicas=2, training_config__micro_batch_size=3))
    assert problem == ("training_config.micro_batch_size: 3 does not divide the per-replica batch 4 "
                       "(global_batch_size 8 / run.replicas 2); micro batch sizes that divide it: 1, 2, 4")
    recipe = load_recipe(minimal(run__replicas=2, training_config__micro_batch_size=2))
    assert recipe.training_config.micro_batch_size == 2


def test_lora_settings_with_full_rank_are_problems():
    raw = minimal(training_config__model__peft__lora_tuning__loraplus_lr_ratio=16.0,
                  training_config__model__peft__lora_tuning__adapter_dim=64,
                  training_config__model__peft__quantization="4bit",
                  training_config__model__dpo_cfg__reference="adapter_disabled")
    problems = problems_of(raw)
    assert [p.split(":")[0] for p in problems] == [
        "training_config.model.peft.quantization",
        "training_config.model.dpo_cfg.reference",
        "training_config.model.peft.lora_tuning.adapter_dim",
        "training_config.model.peft.lora_tuning.loraplus_lr_ratio",
    ]
    assert all("peft_scheme is null" in p for p in problems)
    assert "LoRA+ 16.0 is set but peft_scheme is null (full-rank)" in problems[3]


def test_same_lora_settings_pass_with_lora():
    raw = minimal(training_config__model__peft__peft_scheme="lora",
                  training_config__model__peft__lora_tuning__loraplus_lr_ratio=16.0,
                  training_config__model__peft__quantization="8bit",
                  training_config__model__dpo_cfg__reference="adapter_disabled")
    peft = load_recipe(raw).training_config.model.peft
    assert (peft.peft_scheme, peft.quantization.bits, peft.lora_tuning.loraplus_lr_ratio) == ("lora", 8, 16.0)


def test_lora_defaults_written_out_with_full_rank_are_fine():
    """reference.yaml itself lists lora_tuning with peft_scheme null: default values are not flagged."""
    raw = minimal(training_config__model__peft__lora_tuning={"alpha": 32, "adapter_dim": 16})
    assert load_recipe(raw).training_config.model.peft.peft_scheme is None


@pytest.mark.parametrize("loss,eps,text", [
    ("ipo", 0.1, "would be ignored: loss_type 'ipo' has no label smoothing"),
    ("hinge", 0.2, "would be ignored: loss_type 'hinge' has no label smoothing"),
    ("robust", 0.5, "not allowed with loss_type 'robust'"),
])
def test_label_smoothing_against_loss_type(loss, eps, text):
    (problem,) = problems_of(minimal(training_config__model__dpo_cfg__loss_type=loss,
                                     training_config__model__dpo_cfg__label_smoothing=eps))
    assert problem.startswith("training_config.model.dpo_cfg.label_smoothing: ") and text in problem


def test_label_smoothing_with_sigmoid_and_robust_is_fine():
    for loss in ("sigmoid", "robust"):
        recipe = load_recipe(minimal(training_config__model__dpo_cfg__loss_type=loss,
                                     training_config__model__dpo_cfg__label_smoothing=0.1))
        assert recipe.training_config.model.dpo_cfg.label_smoothing == 0.1


def test_max_prompt_length_must_leave_room_for_the_response():
    (problem,) = problems_of(minimal(training_config__data__max_prompt_length=1024))
    assert problem.startswith("training_config.data.max_prompt_length: 1024 leaves no room for the response "
                              "within max_length=1024")


def test_validation_sources():
    (problem,) = problems_of(minimal(run__validation_data_s3_path="s3://b/val.jsonl",
                                     training_config__data__validation_fraction=0.1))
    assert problem.startswith("training_config.data.validation_fraction: 0.1 would be ignored")
    (problem,) = problems_of(minimal(training_config__trainer__val_check_interval=10))
    assert problem.startswith("training_config.trainer.val_check_interval: 10 but there is no validation data")
    recipe = load_recipe(minimal(training_config__trainer__val_check_interval=10,
                                 training_config__data__validation_fraction=0.05))
    assert recipe.training_config.trainer.val_check_interval == 10


def test_every_problem_is_reported_in_one_error():
    raw = minimal(
        run__name="Bad_Name",
        run__replicas=16,
        training_config__trainer__max_epochs=9,
        training_config__model__dpo_cfg__beta="high",
        training_config__model__dpo_cfg__loss_tpye="ipo",
        training_config__model__optim__lr=1e-7,
    )
    del raw["run"]["output_s3_path"]
    with pytest.raises(ConfigError) as info:
        load_recipe(raw)
    paths = [p.split(":")[0] for p in info.value.problems]
    # per key in schema order, then the checks across keys
    assert paths == [
        "run.name",
        "run.output_s3_path",
        "training_config.trainer.max_epochs",
        "training_config.model.dpo_cfg.loss_tpye",
        "training_config.model.dpo_cfg.beta",
        "training_config.model.optim.sched.min_lr",
        "training_config.global_batch_size",
    ]
    text = str(info.value)
    assert "7 problem(s)" in text and all(f"  - {p}" in text for p in info.value.problems)


# ---- paths ----


def test_local_paths_become_absolute_uris_stay(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    raw = minimal(run__data_s3_path="data/train.jsonl", run__validation_data_s3_path="../val.jsonl",
                  run__output_s3_path="s3://bucket/out", run__model_name_or_path="models/tiny")
    run = load_recipe(raw, base_dir=tmp_path).run
    assert run.data_s3_path == str(tmp_path / "data" / "train.jsonl")
    assert run.validation_data_s3_path == str(tmp_path.parent / "val.jsonl")
    assert run.output_s3_path == "s3://bucket/out"
    assert run.model_name_or_path == str(tmp_path / "models" / "tiny")  # exists here, so it is a local folder


@pytest.mark.parametrize("model,expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # hub id, not on disk
    ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("./m.gguf", "{base}/m.gguf"),
    ("../up/model", "{parent}/up/model"),
    ("/abs/model", "/abs/model"),
    ("s3://bucket/model", "s3://bucket/model"),
])
def test_model_path_resolved_only_when_local(tmp_path, model, expected):
    run = load_recipe(minimal(run__model_name_or_path=model), base_dir=tmp_path).run
    assert run.model_name_or_path == expected.format(base=tmp_path, parent=tmp_path.parent)


def test_default_base_dir_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe(minimal(run__data_s3_path="d.jsonl")).run.data_s3_path == str(tmp_path / "d.jsonl")


# ---- round trips, immutability, reading files ----


def test_dict_and_yaml_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, NOVA_MICRO_LORA_DPO), overrides=DATA + ["training_config.data.key_map="
                                                                                  "{question: prompt}"])
    assert load_recipe(recipe_to_dict(recipe)) == recipe
    dumped = dump_recipe_yaml(recipe)
    assert yaml.safe_load(dumped) == recipe_to_dict(recipe)  # plain safe_load reads what we write
    assert load_recipe(write(tmp_path, dumped, "dumped.yaml")) == recipe
    assert "betas: [0.9, 0.999]" in dumped


def test_recipe_to_dict_is_plain_and_detached():
    recipe = load_recipe(minimal())
    out = recipe_to_dict(recipe)
    assert isinstance(out["training_config"]["model"]["optim"]["betas"], list)
    out["training_config"]["data"]["key_map"]["x"] = "y"
    assert recipe.training_config.data.key_map == {}


def test_recipe_is_frozen():
    recipe = load_recipe(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.training_config.max_length = 4  # type: ignore[misc]
    assert isinstance(recipe, Recipe)


def test_input_dict_is_not_changed():
    raw = minimal(training_config__max_length=2048)
    before = copy.deepcopy(raw)
    load_recipe(raw, overrides=["beta=0.2"], replicas=2)
    assert raw == before


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"recipe.yaml:3:\d+: the recipe is not valid YAML"):
        load_recipe(write(tmp_path, "run:\n  name: a\n   bad: [\n"))
    with pytest.raises(ConfigError, match="a recipe must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="got null"):
        load_recipe(write(tmp_path, "# nothing\n"))


def test_yaml_reads_exponent_floats_as_numbers():
    assert load_yaml_text("a: 1e-5\nb: 3E2\nc: 1.5\nd: 7\ne: '1e-5'") == {
        "a": 1e-5, "b": 300.0, "c": 1.5, "d": 7, "e": "1e-5"}
    assert yaml.safe_load("a: 1e-5") == {"a": "1e-5"}  # plain safe_load is left as it is


def test_a_key_given_twice_is_an_error_not_a_silent_choice(tmp_path):
    path = write(tmp_path, "run:\n  name: a\n  replicas: 1\n  name: b\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:4:3: the recipe is not valid YAML") as info:
        load_recipe(path)
    assert info.value.why == "duplicate key 'name' (first at line 2)"


def test_yaml_anchors_and_merge_keys_still_work():
    assert load_yaml_text("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n") == {"a": {"p": 1, "q": 2},
                                                                          "b": {"p": 1, "q": 3}}
