"""The recipe's shape: one frozen dataclass per section, and one table of what each key allows.

The defaults are those of recipes/reference.yaml (the contract); the fields come in the same order, so a recipe
dumped from these classes reads like that file. Fields without a default are required. `RULES` maps a dotted path
to the values it allows beyond its type; the type itself comes from the field's annotation.
`training_config.model.peft.quantization` is a raydpo addition that reference.yaml does not list yet.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable


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
class Peft:
    peft_scheme: str | None = None
    quantization: str | None = None
    lora_tuning: LoraTuning = field(default_factory=LoraTuning)


@dataclass(frozen=True, kw_only=True)
class ModelCfg:
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    ffn_dropout: float = 0.0
    optim: Optim = field(default_factory=Optim)
    dpo_cfg: DpoCfg = field(default_factory=DpoCfg)
    peft: Peft = field(default_factory=Peft)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    max_length: int = 1024
    global_batch_size: int = 8
    micro_batch_size: int | None = None
    seed: int = 42
    precision: str = "auto"
    max_failures: int = 0
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


# ---- what each key allows beyond its type ----


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    allowed: str
    choices: tuple = ()  # for enums: lets an error suggest the nearest choice


def interval(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def check(v):
        above = v > lo if lo_open else v >= lo
        below = True if hi is None else (v < hi if hi_open else v <= hi)
        return above and below

    if hi is None:
        return Rule(check, f"{'>' if lo_open else '>='} {lo:g}")
    return Rule(check, f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def int_range(lo: int, hi: int | None = None) -> Rule:
    if hi is None:
        return Rule(lambda v: v >= lo, f">= {lo}")
    return Rule(lambda v: lo <= v <= hi, f"{lo}..{hi}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices), choices)


def each(rule: Rule) -> Rule:
    return Rule(lambda v: all(rule.check(x) for x in v), f"each {rule.allowed}")


K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
DATA_FORMATS = ("auto", "nova", "trl", "hh", "sharegpt", "openai", "nemo", "when2call")
DROPOUT = interval(0.0, 1.0)
# "s3://s3://bucket" (a scheme pasted twice) lists through s3fs but fails on read: catch it here
ONE_SCHEME = Rule(lambda v: v.count("://") <= 1 and v.strip() != "", "a path or URI with at most one scheme "
                  "(s3://bucket/prefix, /local/folder)")

RULES: dict[str, Rule] = {
    "run.name": Rule(
        lambda v: len(v) <= 63 and bool(K8S_NAME.match(v)),
        "a Kubernetes name: lowercase letters, digits and '-', starting and ending with a letter or digit, "
        "at most 63 characters",
    ),
    "run.model_name_or_path": Rule(lambda v: v.strip() != "", "a hub id, local folder, s3:// URI or .gguf file"),
    "run.replicas": int_range(1),
    "run.data_s3_path": ONE_SCHEME,
    "run.validation_data_s3_path": ONE_SCHEME,
    "run.output_s3_path": ONE_SCHEME,
    "training_config.max_length": int_range(128, 32768),
    "training_config.global_batch_size": int_range(1),
    "training_config.micro_batch_size": int_range(1),
    "training_config.seed": int_range(0, 2**32 - 1),  # numpy's seed range
    "training_config.precision": one_of("auto", "bf16", "fp32"),
    "training_config.zero_stage": Rule(lambda v: v in (0, 3),
                                       "0 (no partitioning) or 3 (ZeRO-3); null: 3 with several workers, 0 with one"),
    "training_config.max_failures": Rule(lambda v: v >= -1, ">= 0, or -1 to retry forever (Ray's FailureConfig)"),
    "training_config.trainer.max_epochs": int_range(1, 5),
    "training_config.trainer.max_steps": int_range(1),
    "training_config.trainer.log_every_n_steps": int_range(1),
    "training_config.trainer.val_check_interval": int_range(1),
    "training_config.data.format": one_of(*DATA_FORMATS),
    "training_config.data.on_error": one_of("fail", "skip"),
    "training_config.data.prompt_truncation": one_of("keep_end", "keep_start"),
    "training_config.data.max_prompt_length": int_range(1),
    "training_config.data.validation_fraction": interval(0.0, 0.5),
    "training_config.data.shuffle_buffer": int_range(1),
    "training_config.checkpoint.every_n_steps": int_range(1),
    "training_config.checkpoint.keep_last": int_range(1),
    "training_config.model.hidden_dropout": DROPOUT,
    "training_config.model.attention_dropout": DROPOUT,
    "training_config.model.ffn_dropout": DROPOUT,
    "training_config.model.optim.lr": interval(0.0, 1.0, lo_open=True),
    "training_config.model.optim.name": one_of("distributed_fused_adam", "adamw"),
    "training_config.model.optim.eps": interval(0.0, 1.0, lo_open=True, hi_open=True),
    "training_config.model.optim.weight_decay": interval(0.0, 1.0),
    # Adam needs beta < 1 (torch rejects 1.0), hence the open upper end
    "training_config.model.optim.betas": each(interval(0.0, 1.0, hi_open=True)),
    "training_config.model.optim.sched.warmup_steps": int_range(1, 20),
    "training_config.model.optim.sched.constant_steps": int_range(0),
    "training_config.model.optim.sched.min_lr": interval(0.0),
    "training_config.model.dpo_cfg.beta": interval(0.001, 0.5),
    "training_config.model.dpo_cfg.loss_type": one_of(*LOSS_TYPES),
    "training_config.model.dpo_cfg.label_smoothing": interval(0.0, 0.5),
    "training_config.model.dpo_cfg.rpo_alpha": interval(0.0),
    "training_config.model.dpo_cfg.reference": one_of("auto", "precompute", "engine", "adapter_disabled"),
    "training_config.model.peft.peft_scheme": one_of("lora"),
    "training_config.model.peft.quantization": one_of("4bit", "8bit"),
    "training_config.model.peft.lora_tuning.loraplus_lr_ratio": interval(0.0, 100.0),
    "training_config.model.peft.lora_tuning.alpha": int_range(1),
    "training_config.model.peft.lora_tuning.adapter_dim": int_range(1),
    "training_config.model.peft.lora_tuning.adapter_dropout": DROPOUT,
    "training_config.model.peft.lora_tuning.target_modules": Rule(
        lambda v: v == "all-linear" if isinstance(v, str) else len(v) > 0 and all(s.strip() for s in v),
        '"all-linear" or a non-empty list of module names',
    ),
}

# Required keys and what to put there; a required key given as "" counts as missing.
REQUIRED_HELP = {
    "run.name": "a Kubernetes-style name for the run, e.g. my-dpo-run",
    "run.model_name_or_path": "a hub id, local folder, s3:// URI or .gguf file",
    "run.data_s3_path": "a JSONL file, a folder or an s3:// prefix",
    "run.output_s3_path": "a local folder or an s3:// prefix",
}

# Nova's published recipes write '' for unset optional run keys (mlflow_tracking_uri: ''); they mean null.
EMPTY_MEANS_NULL = {
    "run.validation_data_s3_path",
    "run.mlflow_tracking_uri",
    "run.mlflow_experiment_name",
    "run.mlflow_run_name",
}

# Paths resolved against the caller's working directory (Ray Train workers run elsewhere).
LOCAL_PATH_KEYS = ("run.data_s3_path", "run.validation_data_s3_path", "run.output_s3_path")
MODEL_PATH_KEY = "run.model_name_or_path"


# ---- the schema as a flat table, derived from the dataclasses ----


@dataclass(frozen=True)
class FieldSpec:
    path: str
    hint: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING when required
    section: type | None  # the dataclass when this key is a section


def _walk(cls: type, prefix: str, out: dict[str, FieldSpec]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out[path] = FieldSpec(path, hint, dataclasses.MISSING, hint)
            _walk(hint, path + ".", out)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out[path] = FieldSpec(path, hint, default, None)


def _schema() -> dict[str, FieldSpec]:
    out: dict[str, FieldSpec] = {}
    _walk(Recipe, "", out)
    return out


SCHEMA: dict[str, FieldSpec] = _schema()
assert set(RULES) <= set(SCHEMA), set(RULES) - set(SCHEMA)
assert set(REQUIRED_HELP) == {p for p, s in SCHEMA.items() if s.section is None and s.default is dataclasses.MISSING}


def section_keys(prefix: str) -> list[str]:
    """The key names directly under a section ('' for the top level)."""
    depth = prefix.count(".") + 1 if prefix else 0
    start = prefix + "." if prefix else ""
    return [p.rsplit(".", 1)[-1] for p in SCHEMA if p.startswith(start) and p.count(".") == depth]
