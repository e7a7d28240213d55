"""The training recipe's rules: one table of what each key allows beyond its type.

The shape itself (one frozen dataclass per section, defaults of recipes/reference.yaml) is core/config.py, where
training can import it. `RULES` maps a dotted path to the values it allows beyond its type; the type itself comes
from the field's annotation. The engine that applies them is launcher/validation.py.
`training_config.model.peft.quantization` (QLoRA) is a raydpo addition that reference.yaml does not list; it may be
written as one word (SHORTHANDS: `quantization: 4bit`).
"""
from __future__ import annotations

from core.config import (Checkpoint, Data, DpoCfg, LoraTuning, ModelCfg, Optim, Peft, Recipe, Run, Sched, Trainer,
                         TrainingConfig)
from launcher.validation import RUN_NAME, FieldSpec, Rule, each, fields_of, int_range, interval, one_of
from training.loss_rules import LABEL_SMOOTHING_MAX, LOSS_TYPES
from core.quantization import SHORTHANDS as QUANT_SHORTHANDS
from core.storage import check_uri


# ---- what each key allows beyond its type ----


DATA_FORMATS = ("auto", "nova", "trl", "hh", "sharegpt", "openai", "nemo", "when2call")
DROPOUT = interval(0.0, 1.0)
# "s3://s3://bucket" (a scheme pasted twice) lists through s3fs but fails on read: catch it here
ONE_SCHEME = Rule(lambda v: v.count("://") <= 1 and v.strip() != "" and check_uri(v) is None,
                  "a path or URI with at most one scheme, an s3:// URI with a bucket (s3://bucket/prefix, "
                  "/local/folder)")
OUTPUT_PATH = Rule(lambda v: ONE_SCHEME.check(v) and check_uri(v, output=True) is None,
                   "an s3:// URI with a bucket (s3://bucket/runs) or a folder path without '..' (/data/runs, runs)")
MODEL_PATH = Rule(lambda v: v.strip() != "" and check_uri(v) is None,
                  "a hub id, local folder, s3:// URI with a bucket or .gguf file")

RULES: dict[str, Rule] = {
    "run.name": RUN_NAME,
    "run.model_name_or_path": MODEL_PATH,
    "run.replicas": int_range(1),
    "run.data_s3_path": ONE_SCHEME,
    "run.validation_data_s3_path": ONE_SCHEME,
    "run.output_s3_path": OUTPUT_PATH,
    "training_config.max_length": int_range(128, 32768),
    "training_config.global_batch_size": int_range(1),
    "training_config.micro_batch_size": int_range(1),
    "training_config.seed": int_range(0, 2**32 - 1),  # numpy's seed range
    "training_config.precision": one_of("auto", "bf16", "fp32"),
    "training_config.zero_stage": Rule(lambda v: v in (0, 3),
                                       "0 (no partitioning) or 3 (ZeRO-3); null: 3 with several workers, 0 with one"),
    "training_config.max_failures": Rule(lambda v: v >= -1, ">= 0, or -1 to retry forever (Ray's FailureConfig)"),
    "training_config.node_wait_timeout_s": int_range(30),
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
    "training_config.model.dpo_cfg.label_smoothing": interval(0.0, LABEL_SMOOTHING_MAX),  # per loss: loss_rules
    "training_config.model.dpo_cfg.rpo_alpha": interval(0.0),
    "training_config.model.dpo_cfg.reference": one_of("auto", "precompute", "engine", "adapter_disabled"),
    "training_config.model.peft.peft_scheme": one_of("lora"),
    "training_config.model.peft.quantization.bits": Rule(lambda v: v in (4, 8), "4 or 8"),
    "training_config.model.peft.quantization.quant_type": one_of("nf4", "fp4"),
    "training_config.model.peft.quantization.compute_dtype": one_of("auto", "bf16", "fp16", "fp32"),
    "training_config.model.peft.lora_tuning.loraplus_lr_ratio": interval(0.0, 100.0),
    "training_config.model.peft.lora_tuning.alpha": int_range(1),
    "training_config.model.peft.lora_tuning.adapter_dim": int_range(1),
    "training_config.model.peft.lora_tuning.adapter_dropout": DROPOUT,
    "training_config.model.peft.lora_tuning.target_modules": Rule(
        lambda v: v == "all-linear" if isinstance(v, str) else len(v) > 0 and all(s.strip() for s in v),
        '"all-linear" or a non-empty list of module names',
    ),
}

# sections that may be written as one word (launcher/validation.py RecipeKind.shorthands)
SHORTHANDS = {"training_config.model.peft.quantization": QUANT_SHORTHANDS}

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


# ---- the schema as a flat table, derived from the dataclasses (launcher/validation.py)

SCHEMA: dict[str, FieldSpec] = fields_of(Recipe)


def section_keys(prefix: str) -> list[str]:
    """The key names directly under a section of the training recipe ('' for the top level)."""
    depth = prefix.count(".") + 1 if prefix else 0
    start = prefix + "." if prefix else ""
    return [p.rsplit(".", 1)[-1] for p in SCHEMA if p.startswith(start) and p.count(".") == depth]
