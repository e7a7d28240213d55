"""QLoRA's quantized base: the recipe's `training_config.model.peft.quantization` -> transformers' BitsAndBytesConfig,
and what a quantized weight costs in memory. Shared by training (the worker's load), export (the merge into a
dequantized base), evaluation (the adapter on the base it was trained on) and `raydpo plan`.

bitsandbytes 0.49+ runs 4-bit and 8-bit layers on CPU as well as CUDA, so a worker never refuses QLoRA for lack of a
GPU; a worker without bitsandbytes does (core/devices.require_quantization).
"""
from __future__ import annotations

from typing import Any

from core.config import Quantization
from core.errors import ConfigError

KEY = "training_config.model.peft.quantization"
SHORTHANDS = {"4bit": {"bits": 4}, "8bit": {"bits": 8}}  # `quantization: 4bit`, and PAI's load_in_4bit
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# 4-bit: blocks of 64 weights share one absmax constant (fp32); double quantization stores those constants in
# 8 bit, with one fp32 constant per 256 of them (Dettmers et al. 2023, QLoRA, section 3; bitsandbytes' defaults)
BLOCK = 64
NESTED_BLOCK = 256


def quantized(quant: Quantization) -> bool:
    return quant.bits is not None


def label(quant: Quantization) -> str | None:
    """How outputs name the base's format: nf4 | fp4 | int8 (None: not quantized)."""
    if quant.bits == 4:
        return quant.quant_type
    return "int8" if quant.bits == 8 else None


def bnb_kwargs(quant: Quantization, precision: str, *, partitioned: bool) -> dict[str, Any]:
    """BitsAndBytesConfig's keyword arguments (dtypes by torch name). precision: the training dtype (bf16 | fp32).
    partitioned: ZeRO-3 shards the base across workers; it flattens parameters of one float dtype, so the 4-bit
    weights are stored packed in that dtype (bnb_4bit_quant_storage) instead of uint8."""
    assert quantized(quant)
    if quant.bits == 8:
        return {"load_in_8bit": True}
    compute = precision if quant.compute_dtype == "auto" else quant.compute_dtype
    kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": quant.quant_type,
              "bnb_4bit_use_double_quant": quant.double_quant, "bnb_4bit_compute_dtype": DTYPES[compute]}
    if partitioned:
        kwargs["bnb_4bit_quant_storage"] = DTYPES[precision]
    return kwargs


def bnb_config(quant: Quantization, precision: str, *, partitioned: bool = False):
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = bnb_kwargs(quant, precision, partitioned=partitioned)
    return BitsAndBytesConfig(**{k: getattr(torch, v) if k.endswith(("_dtype", "_storage")) else v
                                 for k, v in kwargs.items()})


def stage_problem(bits: int | None, zero_stage: int) -> str | None:
    """Why this quantization cannot train under this ZeRO stage, None when it can. 8-bit weights (int8 with
    per-row scales in separate tensors) cannot be flattened and partitioned by ZeRO-3; 4-bit can, stored in the
    training dtype."""
    if bits == 8 and zero_stage == 3:
        return ("8-bit base weights cannot be partitioned by ZeRO-3 (int8 data with per-row scales), and ZeRO-3 is "
                "what several workers train with")
    return None


def require_stage(bits: int | None, zero_stage: int) -> None:
    why = stage_problem(bits, zero_stage)
    if why:
        raise ConfigError(f"{KEY}.bits=8 cannot train with ZeRO-3", why=why,
                          fix=f"use {KEY}.bits=4 (4-bit weights are partitioned in the training dtype), or one "
                              "worker (run.replicas=1 on one device, training_config.zero_stage=0)")


def bytes_per_param(quant: Quantization) -> float:
    """Memory of one quantized weight, its share of the scaling constants included.
    4-bit: 0.5 byte + an fp32 absmax per 64 weights (4/64 = 0.0625), or with double quantization an 8-bit absmax
    per 64 (1/64) plus an fp32 constant per 64 x 256 (4/16384): 0.5625 or 0.515869. 8-bit: 1 byte (the fp32
    scale of each output row is negligible)."""
    if quant.bits == 8:
        return 1.0
    assert quant.bits == 4
    absmax = 1 / BLOCK + 4 / (BLOCK * NESTED_BLOCK) if quant.double_quant else 4 / BLOCK
    return 0.5 + absmax


def inference_kwargs(quant: Quantization, precision: str) -> dict[str, Any]:
    """from_pretrained's extra arguments for the base in 4/8 bit on this machine, for inference or a merge (core/models
    load_causal_lm): on CPU, or on the first GPU, where bitsandbytes quantizes as it loads."""
    import torch

    kwargs: dict[str, Any] = {"quantization_config": bnb_config(quant, precision)}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return kwargs


def load_kwargs(quant: Quantization, precision: str, *, zero_stage: int, device) -> dict[str, Any]:
    """from_pretrained's extra arguments for a training worker's base: none without quantization. On a GPU without
    partitioning the weights are quantized straight onto the worker's device (TRL's get_kbit_device_map); under
    ZeRO-3 zero.Init places them and the 4-bit data is stored in the training dtype (bnb_kwargs)."""
    if not quantized(quant):
        return {}
    kwargs = {"quantization_config": bnb_config(quant, precision, partitioned=zero_stage == 3)}
    if device.type == "cuda" and zero_stage != 3:
        kwargs["device_map"] = {"": device.index or 0}
    return kwargs


def prepare_for_training(model, *, gradient_checkpointing: bool, partitioned: bool):
    """peft's prepare_model_for_kbit_training (norms and embeddings in fp32, inputs that require grad for
    checkpointing), as TRL does, except for a ZeRO-3-partitioned 4-bit base, where TRL skips it too: the fp32 cast
    would break the one float dtype that ZeRO-3 flattens."""
    keep_constants_out_of_state_dict(model)
    for module in model.modules():
        # bitsandbytes' CPU inference path (eval mode, no grad: validation, the probe) repacks each 4-bit weight in
        # place with its absmax in bf16. Under ZeRO-3 the repacked data is then partitioned as if it were the stored
        # weight, and the base changes (measured: the adapters-off loss moved after one eval-mode forward); without
        # partitioning eval-mode log-probs would differ from the training-mode reference. Training keeps one path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if partitioned:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True} if gradient_checkpointing else None)


def keep_constants_out_of_state_dict(model) -> None:
    """A QLoRA checkpoint holds the adapters alone: DeepSpeed leaves out the frozen weights
    (exclude_frozen_parameters), and this drops what bitsandbytes adds beside each of them (the 4-bit absmax and
    quantization maps, the 8-bit scales: ~1/32 of the 4-bit weights), which the base's load gives back on resume."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    def drop(module, state_dict, prefix, _metadata):
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias")]:
            del state_dict[key]

    for module in model.modules():
        if isinstance(module, (Linear4bit, Linear8bitLt)):
            module._register_state_dict_hook(drop)


def run_quantization(model_dir) -> Quantization:
    """The quantization a run's model/ was trained on, from the run's recipe.yaml beside it (none without one)."""
    from pathlib import Path

    from core.config import saved_recipe

    if not (Path(model_dir).parent / "recipe.yaml").is_file():
        return Quantization()
    return saved_recipe(Path(model_dir).parent).training_config.model.peft.quantization


def precision_of(dtype) -> str:
    """A torch dtype (or None: fp32) as the recipe's precision name."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
