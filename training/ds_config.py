"""Pure arithmetic of a run: batch split, learning-rate schedule, DeepSpeed config, step counts.

Nothing here touches torch or DeepSpeed, so every function has a hand-worked test.
"""
from __future__ import annotations

import math

from core.errors import ConfigError


def batch_plan(global_batch_size: int, workers: int, micro_batch_size: int | None = None, *,
               replicas: int | None = None) -> tuple[int, int]:
    """(micro batch per worker, gradient accumulation steps) with micro × accum × workers = global batch.

    Without a requested micro batch, the largest micro batch up to 4 pairs that divides the per-worker share: more
    pairs per forward is faster until memory runs out, and 4 pairs of 1k tokens fit a small GPU. A split that cannot
    work is a ConfigError: the recipe check sees replicas, not workers (replicas x GPUs per node on GPU nodes).
    """
    where = f"{workers} workers" + (f" (run.replicas={replicas} × {workers // replicas} GPUs per node)"
                                    if replicas and workers != replicas else "")
    if global_batch_size % workers:
        counts = ", ".join(map(str, dividing_worker_counts(global_batch_size)))
        multiples = ", ".join(str(workers * k) for k in (1, 2, 4))
        raise ConfigError(f"training_config.global_batch_size={global_batch_size} does not split over {where}",
                          why="every worker trains the same number of pairs per step (micro batch × accumulation "
                              "× workers = global_batch_size)",
                          fix=f"set global_batch_size to a multiple of {workers} ({multiples}, ...), or run on a "
                              f"worker count that divides {global_batch_size}: {counts}")
    per_worker = global_batch_size // workers
    if micro_batch_size is None:
        micro_batch_size = max(m for m in range(1, min(per_worker, 4) + 1) if per_worker % m == 0)
    if per_worker % micro_batch_size:
        sizes = ", ".join(str(m) for m in range(1, per_worker + 1) if per_worker % m == 0)
        raise ConfigError(f"training_config.micro_batch_size={micro_batch_size} does not divide the "
                          f"{per_worker} pairs each of {where} trains per step",
                          fix=f"set micro_batch_size to one of {sizes}, or null to let raydpo choose")
    return micro_batch_size, per_worker // micro_batch_size


def dividing_worker_counts(global_batch_size: int, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if global_batch_size % n == 0]


def steps_per_epoch(pairs: int, global_batch_size: int) -> int:
    """Full optimizer steps in one epoch; the last partial batch is dropped so every worker sees equal work."""
    return pairs // global_batch_size


def total_steps(pairs: int, global_batch_size: int, max_epochs: int, max_steps: int | None) -> int:
    steps = steps_per_epoch(pairs, global_batch_size) * max_epochs
    return min(steps, max_steps) if max_steps else steps


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, constant_steps: int, total: int) -> float:
    """Nova's schedule: linear warmup to lr, `constant_steps` at lr, then cosine decay to min_lr at `total`.

    `step` counts optimizer steps from 0; warmup reaches lr at step == warmup_steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step < warmup_steps + constant_steps:
        return lr
    decay_steps = max(total - warmup_steps - constant_steps, 1)
    progress = min((step - warmup_steps - constant_steps) / decay_steps, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))




def zero_stage(workers: int, requested: int | None = None) -> int:
    """ZeRO-3 across several workers; with one there is nothing to shard across, and ZeRO-3's per-module gather and
    release hooks only cost time (measured here: a LoRA step on SmolLM2-135M took twice as long as without them)."""
    if requested is not None:
        return requested
    return 3 if workers > 1 else 0


def deepspeed_config(*, micro_batch: int, accum: int, workers: int, precision: str, grad_clip: float = 1.0,
                     stage: int = 3, offload_optimizer: bool = False, hidden_size: int | None = None) -> dict:
    """The DeepSpeed ZeRO config for one engine. The optimizer and scheduler are ours (passed as objects).

    ZeRO-3 keeps parameters under 10 x hidden_size whole on every worker (norms, biases: what transformers' "auto"
    does), and releases each gathered parameter right after its module ran: a reuse distance of 0 skips DeepSpeed's
    scan of the upcoming modules on every release, which took most of a LoRA step's time with ~1,000 modules (measured
    on CPU only; on a GPU, where the scan overlaps with kernels, it is still unmeasured: benchmarks/gpu_check.py).

    Gradients accumulate in fp32 (data_types.grad_accum_dtype): summing 8+ micro-batches in bf16 keeps 8 bits of
    mantissa. DeepSpeed refuses bf16 with fp32 accumulation without ZeRO (stage 0 has no fp32 master weights either),
    so a bf16 run asked for stage 0 gets stage 1 (engine_stage): on one worker it partitions nothing, and its bf16
    optimizer keeps fp32 master weights and fp32 gradients.
    """
    stage = engine_stage(stage, precision)
    config = {
        "train_batch_size": micro_batch * accum * workers,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "data_types": {"grad_accum_dtype": "fp32"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our progress line reports; DeepSpeed's own goes nowhere
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        config["zero_optimization"] |= {
            "overlap_comm": False,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
            # without a hidden size (tests' tiny models) nothing stays whole, so everything is partitioned
            "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else 0,
            "stage3_max_reuse_distance": 0,
        }
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return config


def engine_stage(stage: int, precision: str) -> int:
    """The ZeRO stage DeepSpeed runs: 1 for bf16 without ZeRO (see deepspeed_config), else the one asked for."""
    return 1 if stage == 0 and precision == "bf16" else stage


def reference_config(config: dict) -> dict:
    """The frozen reference engine: same partitioning, no optimizer, no gradient settings that need one."""
    ref = {k: v for k, v in config.items() if k not in ("gradient_clipping",)}
    ref["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    return ref


def optimizer_choice(name: str, on_gpu: bool) -> str:
    """distributed_fused_adam (Nova's name) is DeepSpeed's fused Adam on GPU; on CPU it needs CUDA, so torch AdamW.

    Kept over torch.optim.AdamW(fused=True) (both one multi-tensor kernel per step; neither measured faster here, as
    no GPU was at hand: benchmarks/gpu_check.py times both side by side) because it is the optimizer the name says
    and the one ZeRO knows (no untested-optimizer path). Its JIT build at start-up is gone: the Dockerfile prebuilds
    it (DS_BUILD_FUSED_ADAM=1)."""
    if name == "distributed_fused_adam" and on_gpu:
        return "fused_adam"
    return "torch_adamw"



