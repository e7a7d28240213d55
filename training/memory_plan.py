"""Per-GPU memory of a recipe under ZeRO-3, estimated before any GPU is touched (`raydpo plan`).

Model states come from DeepSpeed's own estimator (estimate_zero3_model_states_mem_needs: 18 bytes per trained
parameter over the GPUs, plus the largest layer gathered in fp32). On top of it, what the estimator leaves out:
the frozen base of a LoRA run and a live reference engine (16-bit weights over the GPUs), activations, and the
log-prob head's logits. Every term is a small pure function of counts, with a hand-worked test.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models":
34 x hidden bytes per token per layer in 16-bit, without the attention-score term (5 x heads x seq / hidden), which
SDPA and FlashAttention never store. Gradient checkpointing keeps each layer's 16-bit input and one layer's full
activations for the recompute.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.config import LoraTuning, Quantization

GB = 1024**3
RUNTIME_OVERHEAD_BYTES = 1.5 * GB  # CUDA context, NCCL and allocator buffers: measured ~1-2 GB on recent drivers
HEADROOM = 0.9  # plan to use at most 90% of a GPU: fragmentation and spikes


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter, tied ones once
    largest_layer_params: int  # the most parameters one module holds directly (what ZeRO-3 gathers at once)
    layers: int
    hidden: int
    vocab: int
    adapter_params: int = 0  # trainable LoRA parameters (0 for full-rank)
    quantized_params: int = 0  # QLoRA: base weights held in 4/8 bit (the linear layers but the output head)
    quantized_bytes: float = 0.0  # bytes per such weight, scaling constants included (core/quantization.py)
    quant_label: str | None = None  # nf4 | fp4 | int8


@dataclass(frozen=True)
class RunShape:
    gpus_per_node: int
    nodes: int
    micro_batch_pairs: int
    max_length: int
    dtype_bytes: int  # 2 for bf16, 4 for fp32
    gradient_checkpointing: bool
    reference: str  # precompute | engine | adapter_disabled
    logprob_chunk: int = 1024


def model_states_bytes(model: ModelShape, run: RunShape) -> float:
    """Parameters, gradients and optimizer states per GPU, through DeepSpeed's ZeRO-3 estimator.

    Full-rank: the estimator as is. LoRA: the estimator over the adapters only (they alone have gradients and Adam
    states), plus the frozen base in 16-bit spread over every GPU.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    trained = model.adapter_params or model.params
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total_params=trained, largest_layer_params=model.largest_layer_params, num_gpus_per_node=run.gpus_per_node,
        num_nodes=run.nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True)
    frozen = frozen_base_bytes(model, run) if model.adapter_params else 0.0
    return float(gpu_bytes) + frozen


def base_weight_bytes(model: ModelShape, dtype_bytes: float) -> float:
    """The base's weights whole: quantized weights at their packed size (QLoRA), every other one in the dtype."""
    return model.quantized_params * model.quantized_bytes + (model.params - model.quantized_params) * dtype_bytes


def frozen_base_bytes(model: ModelShape, run: RunShape) -> float:
    """16-bit weights (QLoRA: 4/8-bit where quantized) without gradients or optimizer states, partitioned over every
    GPU."""
    return base_weight_bytes(model, 2.0) / (run.gpus_per_node * run.nodes)


def reference_bytes(model: ModelShape, run: RunShape) -> float:
    """A live reference engine is a second partitioned copy of the weights; the other strategies cost nothing here
    (adapter_disabled reuses the policy's base, precompute leaves the reference off the workers)."""
    return frozen_base_bytes(model, run) if run.reference == "engine" else 0.0


def tokens_per_forward(run: RunShape) -> int:
    """A micro-batch of pairs is 2 x pairs sequences (chosen and rejected) of up to max_length tokens."""
    return 2 * run.micro_batch_pairs * run.max_length


def activation_bytes(model: ModelShape, run: RunShape) -> float:
    scale = run.dtype_bytes / 2  # the 34 x hidden figure is for 16-bit activations
    per_token_layer = 34 * model.hidden * scale
    tokens = tokens_per_forward(run)
    if run.gradient_checkpointing:
        return tokens * (model.layers * model.hidden * run.dtype_bytes + per_token_layer)
    return tokens * model.layers * per_token_layer


def logprob_head_bytes(model: ModelShape, run: RunShape) -> float:
    """The log-prob head holds the logits of response positions and, in the backward, their gradient (both in the
    model dtype), plus an fp32 scratch of chunk x vocab. At most every position is a response position."""
    tokens = tokens_per_forward(run)
    return 2 * tokens * model.vocab * run.dtype_bytes + 2 * run.logprob_chunk * model.vocab * 4


def estimate(model: ModelShape, run: RunShape) -> list[tuple[str, float]]:
    """(what, bytes per GPU) lines, total last."""
    lines = [
        ("model states (DeepSpeed ZeRO-3 estimator" + (", LoRA adapters + frozen base" if model.adapter_params
                                                       else "")
         + (f" in {model.quant_label})" if model.quant_label else ")"), model_states_bytes(model, run)),
        (f"reference ({run.reference})", reference_bytes(model, run)),
        (f"activations ({run.micro_batch_pairs} pairs x {run.max_length} tokens"
         + (", checkpointed)" if run.gradient_checkpointing else ")"), activation_bytes(model, run)),
        ("log-prob head (response logits and their gradient)", logprob_head_bytes(model, run)),
        ("runtime (CUDA context, communication buffers)", RUNTIME_OVERHEAD_BYTES),
    ]
    return lines + [("total", sum(b for _, b in lines))]


def inference_stage(model: ModelShape, run: RunShape, gpu_memory_gb: float,
                    tokens_per_forward: int = 8192) -> tuple[int, float]:
    """(GPUs per actor, bytes per GPU) of an inference stage on its own GPUs, before or after training: the reference
    stage (reference=precompute) and the evaluation generator. Weights in 16-bit split over as many GPUs as they need
    (core/sharding.gpus_for_weights: device_map across one node's GPUs), plus one forward without gradients: one layer's
    activations at a time and the response logits ([tokens, vocab] in the model dtype and an fp32 chunk), plus the
    runtime. tokens_per_forward: training/reference.TOKENS_PER_FORWARD."""
    from core.sharding import gpus_for_weights

    weights = base_weight_bytes(model, run.dtype_bytes)  # a QLoRA run's adapter is evaluated on its quantized base
    gpus = gpus_for_weights(weights, gpu_memory_gb * GB)
    activations = tokens_per_forward * 34 * model.hidden * run.dtype_bytes / 2
    logits = tokens_per_forward * model.vocab * run.dtype_bytes + run.logprob_chunk * model.vocab * 4
    return gpus, weights / gpus + activations + logits + RUNTIME_OVERHEAD_BYTES


def fits(total_bytes: float, gpu_memory_gb: float) -> bool:
    return total_bytes <= HEADROOM * gpu_memory_gb * GB


def advice(model: ModelShape, run: RunShape) -> list[str]:
    """What would lower the estimate, biggest lever first."""
    tips = []
    if not run.gradient_checkpointing:
        tips.append("training_config.gradient_checkpointing=true (activations: one layer's input per layer)")
    if run.micro_batch_pairs > 1:
        tips.append("a smaller training_config.micro_batch_size (gradient accumulation keeps the global batch)")
    if run.reference == "engine":
        tips.append("training_config.model.dpo_cfg.reference=precompute (no reference weights on the workers)")
    if not model.adapter_params:
        tips.append("training_config.model.peft.peft_scheme=lora (optimizer states for the adapters only)")
    tips.append("more GPUs (run.replicas, or --gpus-per-node): model states are divided among them")
    return tips


def model_shape(config, adapter_params: int = 0, quant: Quantization | None = None) -> ModelShape:
    """Counts from a transformers config, by building the model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from core import quantization

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quantized = {}
    if quant is not None and quantization.quantized(quant):
        # what transformers' bitsandbytes integration converts: every nn.Linear but the output head
        head = model.get_output_embeddings()
        quantized = {"quantized_params": sum(m.weight.numel() for m in model.modules()
                                             if isinstance(m, torch.nn.Linear) and m is not head),
                     "quantized_bytes": quantization.bytes_per_param(quant), "quant_label": quantization.label(quant)}
    return ModelShape(params=params, largest_layer_params=largest, layers=text.num_hidden_layers,
                      hidden=text.hidden_size, vocab=text.vocab_size, adapter_params=adapter_params, **quantized)


def lora_params(config, lora: LoraTuning) -> int:
    """Trainable parameters that peft's LoRA adds to this model (counted on the meta device)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from core.models import lora_config

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(lora))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
