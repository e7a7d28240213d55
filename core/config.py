"""The typed recipes, frozen: what every wing reads, from the launcher that checks them to the Ray workers.

One frozen dataclass per recipe section. A training recipe (`Recipe`, Nova's DPO shape: recipes/reference.yaml) and an
evaluation recipe (`EvalRecipe`, Nova's evaluation shape: recipes/eval_gen_qa.yaml). The defaults are the
contract's; the fields come in the same order, so a recipe dumped from these classes reads like that file. Fields
without a default are required. What each key allows beyond its type, and the checks, live in the launcher
(launcher/recipe_schema.py, launcher/validation.py); training, evaluation and the workers only read attributes:
`recipe.training_config.model.dpo_cfg.beta`. Frozen dataclasses pickle, so Ray hands the object itself to workers.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# ---------------------------------------------------------------- training recipes (Nova's DPO shape)

@dataclass(frozen=True, kw_only=True)
class Run:
    name: str
    model_type: str = "hf-causal-lm"
    model_name_or_path: str
    replicas: int = 1
    data_s3_path: str
    validation_data_s3_path: str | None = None
    output_s3_path: str
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class Trainer:
    max_epochs: int = 1
    max_steps: int | None = None
    log_every_n_steps: int = 1
    val_check_interval: int | None = None


@dataclass(frozen=True, kw_only=True)
class Data:
    format: str = "auto"
    key_map: dict[str, str] = field(default_factory=dict)
    on_error: str = "fail"
    prompt_truncation: str = "keep_end"
    max_prompt_length: int | None = None
    validation_fraction: float = 0.0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    system_prompt: str | None = None


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    every_n_steps: int | None = None
    keep_last: int = 2


@dataclass(frozen=True, kw_only=True)
class Sched:
    warmup_steps: int = 10
    constant_steps: int = 0
    min_lr: float = 1.0e-6


@dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = 1.0e-5
    name: str = "distributed_fused_adam"
    adam_w_mode: bool = True
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    sched: Sched = field(default_factory=Sched)


@dataclass(frozen=True, kw_only=True)
class DpoCfg:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference: str = "auto"


@dataclass(frozen=True, kw_only=True)
class LoraTuning:
    loraplus_lr_ratio: float = 0.0
    alpha: int = 32
    adapter_dim: int = 16
    adapter_dropout: float = 0.01
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """QLoRA: the frozen base loaded in 4 or 8 bit through bitsandbytes (core/quantization.py). A raydpo addition;
    `quantization: 4bit` / `8bit` is short for `{bits: 4}` / `{bits: 8}`, PAI's load_in_4bit/load_in_8bit too."""
    bits: int | None = None            # 4 | 8; null: the base in the training dtype (no quantization)
    quant_type: str = "nf4"            # 4-bit data type: nf4 | fp4
    double_quant: bool = True          # 4-bit: quantize the blocks' absmax constants too (~0.4 bit/param less)
    compute_dtype: str = "auto"        # 4-bit matmuls: auto (the training dtype) | bf16 | fp16 | fp32


@dataclass(frozen=True, kw_only=True)
class Peft:
    peft_scheme: str | None = None
    quantization: Quantization = field(default_factory=Quantization)
    lora_tuning: LoraTuning = field(default_factory=LoraTuning)


@dataclass(frozen=True, kw_only=True)
class ModelCfg:
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    ffn_dropout: float = 0.0
    optim: Optim = field(default_factory=Optim)
    dpo_cfg: DpoCfg = field(default_factory=DpoCfg)
    peft: Peft = field(default_factory=Peft)
    # vision-language models (core/vision.py): the vision encoder stays frozen, the projector and LM train; false
    # trains it too (full-rank: its weights; LoRA: adapters on it). A raydpo addition; text models ignore it.
    freeze_vision_tower: bool = True


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    max_length: int = 1024
    global_batch_size: int = 8
    micro_batch_size: int | None = None
    seed: int = 42
    precision: str = "auto"
    max_failures: int = 0
    node_wait_timeout_s: int = 1800
    gradient_checkpointing: bool = False
    zero_stage: int | None = None
    trainer: Trainer = field(default_factory=Trainer)
    data: Data = field(default_factory=Data)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    model: ModelCfg = field(default_factory=ModelCfg)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    run: Run
    training_config: TrainingConfig = field(default_factory=TrainingConfig)


def as_dict(recipe: Any) -> dict:
    """The plain nested dict, shaped as the recipe file (tuples as lists): for YAML, JSON and MLflow parameters."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = as_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def run_uri(recipe: Recipe) -> str:
    """Where a training run's outputs go: <output_s3_path>/<run.name>."""
    return recipe.run.output_s3_path.rstrip("/") + "/" + recipe.run.name


def from_dict(cls: type, tree: dict | None) -> Any:
    """as_dict's inverse, for a recipe raydpo wrote itself (a run's recipe.yaml, checked when the run began):
    sections become their dataclasses, lists tuples, absent keys their defaults. Not a validator: a recipe a
    user wrote goes through launcher/recipe.py."""
    tree = {} if tree is None else tree
    assert isinstance(tree, dict), f"{cls.__name__}: a section, got {tree!r}"  # as_dict wrote every section whole
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        value = tree[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = from_dict(hints[f.name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def saved_recipe(run_dir: str | Path) -> Recipe:
    """The typed Recipe of a training run folder's recipe.yaml (what the model was trained from and how)."""
    return from_dict(Recipe, yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text(encoding="utf-8")))


# ---------------------------------------------------------------- evaluation recipes (Nova's evaluation shape)

@dataclass(frozen=True, kw_only=True)
class EvalRun:
    name: str
    model_type: str = "hf-causal-lm"
    model_name_or_path: tuple[str, ...] = ()
    replicas: int = 1
    data_s3_path: str
    output_s3_path: str = "outputs"
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class Judge:
    model: str | None = None            # a local folder, hub id, s3:// or .gguf judge, run with Ray Data
    endpoint: str | None = None         # or an OpenAI-compatible server: http://host:port (/v1/chat/completions)
    endpoint_model: str | None = None   # the request's "model" field
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the bearer token, if set
    prompt_file: str | None = None      # null: evaluation/judge_prompt.txt; needs {question} {answer_a} {answer_b}
    compare: str = "reference"          # reference: each model vs the reference; base: each tuned model vs the base
    max_new_tokens: int = 16
    max_retries: int = 3                # endpoint retries after the first try, with exponential backoff
    timeout_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    task: str
    strategy: str | None = None         # null: the task's strategy
    metric: tuple[str, ...] = ("all",)
    format: str = "auto"                # preference rows: the data format (as training_config.data.format)
    key_map: dict[str, str] = field(default_factory=dict)  # custom key names -> the format's keys
    system_prompt: str | None = None    # used where a row has no system prompt
    on_error: str = "fail"              # fail | skip: bad rows stop the evaluation, or are left out and listed
    max_rows: int | None = None         # evaluate the first N rows only
    rouge_stemmer: bool = True          # gen_qa: Porter stemmer in ROUGE (as HELM)
    beta: float | None = None           # preference: implicit-reward beta; null: the run's recipe, else 0.1
    max_length: int = 1024              # preference: prompt + answer tokens (longer pairs are cut and counted)
    judge: Judge = field(default_factory=Judge)


@dataclass(frozen=True, kw_only=True)
class Inference:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    batch_size: int = 8                 # (raydpo) rows per generation batch
    device: str = "auto"                # (raydpo) auto | cpu | gpu (auto: GPU when the cluster has one)


@dataclass(frozen=True, kw_only=True)
class EvalRecipe:
    run: EvalRun
    evaluation: Evaluation
    inference: Inference

    def to_dict(self) -> dict:
        return as_dict(self)
