"""Alibaba PAI-QuickStart DPO hyperparameters -> a Nova-shaped recipe dict.

A PAI file is flat: the QuickStart hyperparameters (training_strategy, learning_rate, ...) beside
model_name_or_path, train, validation, output and, optionally, name and replicas. PAI passes hyperparameters as
strings ("5e-5", "true"); numbers and flags are read as YAML scalars. The result is validated like any recipe, and
each line of the explanation says "pai.key=value -> dotted.path=value".
"""
from __future__ import annotations

import difflib
import re
from typing import Any, NamedTuple

from launcher.overrides import Problem, parse_value, show
from core.errors import ConfigError

# PAI key -> the Nova path it sets unchanged.
DIRECT = {
    "learning_rate": "training_config.model.optim.lr",
    "num_train_epochs": "training_config.trainer.max_epochs",
    "seq_length": "training_config.max_length",
    "dpo_beta": "training_config.model.dpo_cfg.beta",
    "lora_alpha": "training_config.model.peft.lora_tuning.alpha",
    "system_prompt": "training_config.data.system_prompt",
    "model_name_or_path": "run.model_name_or_path",
    "train": "run.data_s3_path",
    "validation": "run.validation_data_s3_path",
    "output": "run.output_s3_path",
    "name": "run.name",
}
# Keys whose values stay text; the others may arrive as strings ("5e-5", "true") and are read as YAML scalars.
TEXT_KEYS = ("training_strategy", "system_prompt", "model_name_or_path", "train", "validation", "output", "name")
# Keys translated by a rule of their own below.
SPECIAL = (
    "training_strategy",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "replicas",
    "lora_dim",
    "apply_chat_template",
    "load_in_4bit",
    "load_in_8bit",
)
PAI_KEYS = tuple(DIRECT) + SPECIAL
# Names other tools use for the same hyperparameter, so that an unknown key gets the right suggestion.
SYNONYMS = {
    "lora_rank": "lora_dim", "lora_r": "lora_dim", "rank": "lora_dim", "beta": "dpo_beta", "pref_beta": "dpo_beta",
    "max_length": "seq_length", "max_seq_length": "seq_length", "epochs": "num_train_epochs", "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size", "model": "model_name_or_path", "output_dir": "output",
}
# A PAI file is recognised by these (it has no run:/training_config: sections).
MARKERS = ("training_strategy", "per_device_train_batch_size", "num_train_epochs", "lora_dim", "dpo_beta")


class Translation(NamedTuple):
    nova: dict
    explanation: list[str]
    problems: list[Problem]
    origins: dict[str, str]  # Nova dotted path -> the PAI key(s) it came from, to label validation problems


def is_pai(raw: Any) -> bool:
    return (
        isinstance(raw, dict)
        and "run" not in raw
        and "training_config" not in raw
        and any(k in raw for k in MARKERS)
    )


def global_batch_size(per_device: int, accumulation: int, replicas: int) -> int:
    """PAI counts its batch per device and step; Nova's global batch is what one optimizer step sees."""
    return per_device * accumulation * replicas


def translate_pai(raw: dict, replicas: int | None = None) -> tuple[dict, list[str]]:
    """(Nova-shaped dict, explanation lines); a ConfigError lists every problem of the PAI set."""
    result = translate_pai_collect(raw, replicas)
    if result.problems:
        raise ConfigError(
            f"the PAI-QuickStart hyperparameters have {len(result.problems)} problem(s)",
            fix="fix each key listed; `raydpo validate FILE --explain` shows how each key is translated",
            problems=[f"{path}: {text}" for path, text in result.problems],
        )
    return result.nova, result.explanation


def run_name_from(stem: str) -> str | None:
    """A run name (a Kubernetes name) made from a file's stem: "DPO_Qwen2.5 hyperparams" -> "dpo-qwen2-5-hyperparams";
    None when nothing usable is left."""
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:63].strip("-")
    return name or None


def translate_pai_collect(raw: dict, replicas: int | None = None, source_stem: str | None = None) -> Translation:
    """As translate_pai, returning the problems instead of raising. `replicas` (from --replicas) wins over
    the file's `replicas` key, so that the per-device batch keeps its PAI meaning. source_stem: the file's name
    without its suffix; PAI's job carries the run's name, its hyperparameter file has none, so the stem names it."""
    values = {k: _read(k, v) for k, v in raw.items()}
    nova: dict = {}
    lines: list[str] = []
    problems: list[Problem] = []
    origins: dict[str, str] = {}

    def put(path: str, value: Any, origin: str, line: str | None = None) -> None:
        node = nova
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        origins[path] = origin
        lines.append(line or f"{origin}={show(value)} -> {path}={show(value)}")

    for key in raw:
        if key not in PAI_KEYS:
            near = [SYNONYMS[key]] if key in SYNONYMS else difflib.get_close_matches(key, PAI_KEYS, n=1)
            hint = f"did you mean pai.{near[0]}? " if near else ""
            problems.append((f"pai.{key}", f"unknown PAI-QuickStart key (value {show(raw[key])}); {hint}"
                                           f"known keys: {', '.join(PAI_KEYS)}"))

    strategy = values.get("training_strategy", "dpo")
    if strategy != "dpo":
        problems.append(("pai.training_strategy",
                         f"{show(strategy)} is not supported; allowed: dpo (raydpo trains DPO only)"))
    elif "training_strategy" in raw:
        lines.append("pai.training_strategy='dpo' -> (raydpo trains DPO; nothing to set)")

    for key, path in DIRECT.items():
        if key in raw:
            put(path, values[key], f"pai.{key}")
        elif key == "name" and source_stem and run_name_from(source_stem):
            derived = run_name_from(source_stem)
            put(path, derived, "pai.name", f"pai.name not given -> run.name={show(derived)} (the file's name; PAI's "
                                           "job names the run, its hyperparameter file does not)")
        else:
            origins[path] = f"pai.{key}"  # a required key left out is reported under its PAI name too

    _batch(values, replicas, put, problems)
    _lora(values, put, problems)
    _quantization(values, put, problems, lines)
    _chat_template(values, problems, lines)
    if "learning_rate" in raw:
        # PAI sets no floor for the rate; Nova's default min_lr 1e-6 would exceed a PAI rate such as 5e-7
        put("training_config.model.optim.sched.min_lr", 0.0, "pai.learning_rate",
            f"pai.learning_rate={show(values['learning_rate'])} -> training_config.model.optim.sched.min_lr=0.0 "
            "(PAI sets no min_lr; 0 stays below any learning rate)")
    return Translation(nova, lines, problems, origins)


def _read(key: str, value: Any) -> Any:
    if key in TEXT_KEYS or not isinstance(value, str):
        return value
    try:
        return parse_value(value)
    except ConfigError:
        return value  # reported by the rule that expects a number or a flag


def _positive_int(values: dict, key: str, default: int, problems: list[Problem]) -> int | None:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append((f"pai.{key}", f"{show(value)} is not allowed; allowed: an integer >= 1"))
        return None
    return value


def _batch(values: dict, replicas: int | None, put, problems: list[Problem]) -> None:
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "replicas")
    if replicas is not None:
        values = {**values, "replicas": replicas}
    if not any(k in values for k in keys):
        return
    per_device = _positive_int(values, "per_device_train_batch_size", 1, problems)
    accumulation = _positive_int(values, "gradient_accumulation_steps", 1, problems)
    count = _positive_int(values, "replicas", 1, problems)
    if count is not None and "replicas" in values:
        source = "--replicas" if replicas is not None else "pai.replicas"
        put("run.replicas", count, source, f"{source}={count} -> run.replicas={count}")
    if None in (per_device, accumulation, count):
        return
    total = global_batch_size(per_device, accumulation, count)
    origin = "pai.per_device_train_batch_size × pai.gradient_accumulation_steps × replicas"
    put("training_config.global_batch_size", total, origin,
        f"pai.per_device_train_batch_size={per_device} × pai.gradient_accumulation_steps={accumulation} × "
        f"replicas={count} -> training_config.global_batch_size={total}")
    put("training_config.micro_batch_size", per_device, "pai.per_device_train_batch_size",
        f"pai.per_device_train_batch_size={per_device} -> training_config.micro_batch_size={per_device} "
        "(pairs per worker forward)")


def _lora(values: dict, put, problems: list[Problem]) -> None:
    if "lora_dim" not in values:
        return
    dim = values["lora_dim"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
        problems.append(("pai.lora_dim", f"{show(dim)} is not allowed; allowed: an integer >= 0 (0 = full-rank)"))
        return
    if dim == 0:
        put("training_config.model.peft.peft_scheme", None, "pai.lora_dim",
            "pai.lora_dim=0 -> training_config.model.peft.peft_scheme=null (full-rank)")
        return
    put("training_config.model.peft.peft_scheme", "lora", "pai.lora_dim",
        f"pai.lora_dim={dim} -> training_config.model.peft.peft_scheme='lora'")
    put("training_config.model.peft.lora_tuning.adapter_dim", dim, "pai.lora_dim",
        f"pai.lora_dim={dim} -> training_config.model.peft.lora_tuning.adapter_dim={dim}")


def _quantization(values: dict, put, problems: list[Problem], lines: list[str]) -> None:
    given = [k for k in ("load_in_4bit", "load_in_8bit") if k in values]
    for key in given:
        if not isinstance(values[key], bool):
            problems.append((f"pai.{key}", f"{show(values[key])} is not allowed; allowed: true or false"))
    on = [k for k in given if values[k] is True]
    if len(on) == 2:
        problems.append(("pai.load_in_4bit", "load_in_4bit and load_in_8bit are both true; allowed: at most one"))
    elif on:
        mode = on[0].removeprefix("load_in_")
        put("training_config.model.peft.quantization", mode, f"pai.{on[0]}",
            f"pai.{on[0]}=true -> training_config.model.peft.quantization={mode!r}")
    for key in given:
        if values[key] is False:
            lines.append(f"pai.{key}=false -> (no quantization; training_config.model.peft.quantization stays null)")


def _chat_template(values: dict, problems: list[Problem], lines: list[str]) -> None:
    if "apply_chat_template" not in values:
        return
    value = values["apply_chat_template"]
    if value is True:
        lines.append("pai.apply_chat_template=true -> (always: raydpo renders every prompt with the model's "
                     "chat template; nothing to set)")
    elif value is False:
        problems.append(("pai.apply_chat_template", "false is not supported; raydpo always renders prompts with "
                         "the model's chat template, so that pairs are scored as the model will be prompted; "
                         "allowed: true (or leave the key out)"))
    else:
        problems.append(("pai.apply_chat_template", f"{show(value)} is not allowed; allowed: true"))
