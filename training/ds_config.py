"""Pure arithmetic of a run: batch split, learning-rate schedule, DeepSpeed config, step counts.

Nothing here touches torch or DeepSpeed, so every function has a hand-worked test.
"""
from __future__ import annotations

import math

from core.errors import ConfigError


def batch_plan(global_batch_size: int, workers: int, micro_batch_size: int | None = None, *,
               replicas: int | None = None) -> tuple[int, int]:
    """(micro batch per worker, gradient accumulation steps) for the busiest worker's share of a step.

    The global batch is split as evenly as the workers allow (batch_split: 32 over 6 is 6, 6, 5, 5, 5, 5); the
    busiest share is micro × accum exactly, and a lighter worker's last micro-batch holds a pair fewer (micro_sizes).
    Without a requested micro batch, the largest one up to 4 pairs that divides the busiest share: more pairs per
    forward is faster until memory runs out, and 4 pairs of 1k tokens fit a small GPU. A split that cannot work is
    a ConfigError: the recipe check sees replicas, not workers (replicas x GPUs per node on GPU nodes).
    """
    where = f"{workers} workers" + (f" (run.replicas={replicas} × {workers // replicas} GPUs per node)"
                                    if replicas and workers != replicas else "")
    if global_batch_size < workers:
        multiples = ", ".join(str(workers * k) for k in (1, 2, 4))
        raise ConfigError(f"training_config.global_batch_size={global_batch_size} does not split over {where}",
                          why="every worker trains at least one pair per step",
                          fix=f"set global_batch_size to {workers} or more (a multiple of {workers} splits evenly: "
                              f"{multiples}, ...), or run on at most {global_batch_size} workers")
    busiest = max(batch_split(global_batch_size, workers))
    if micro_batch_size is None:
        micro_batch_size = max(m for m in range(1, min(busiest, 4) + 1) if busiest % m == 0)
    if busiest % micro_batch_size:
        sizes = ", ".join(str(m) for m in range(1, busiest + 1) if busiest % m == 0)
        raise ConfigError(f"training_config.micro_batch_size={micro_batch_size} does not divide the "
                          f"{busiest} pairs each of {where} trains per step"
                          + ("" if global_batch_size % workers == 0 else " (the busiest worker's share)"),
                          fix=f"set micro_batch_size to one of {sizes}, or null to let raydpo choose")
    return micro_batch_size, busiest // micro_batch_size


def batch_split(global_batch_size: int, workers: int) -> tuple[int, ...]:
    """Pairs each rank trains per step: as even as it gets, the first ranks take one more (32 over 6: 6,6,5,5,5,5)."""
    share, extra = divmod(global_batch_size, workers)
    return tuple(share + (rank < extra) for rank in range(workers))


def rank_offset(global_batch_size: int, workers: int, rank: int) -> int:
    """Where rank's pairs start in a step's global batch: the ranks before it take theirs first."""
    return sum(batch_split(global_batch_size, workers)[:rank])


def micro_sizes(share: int, micro_batch: int, accum: int) -> tuple[int, ...]:
    """Real pairs in each of a rank's accum micro-steps: full micro-batches first. Every rank runs accum micro-steps
    (ZeRO reduces gradients at each backward, a collective), so a rank with fewer pairs may have an empty last one:
    it trains one pair at loss weight 0 (a padding pair: its gradient is zero, its collectives run)."""
    assert share <= micro_batch * accum, (share, micro_batch, accum)
    return tuple(min(micro_batch, max(share - i * micro_batch, 0)) for i in range(accum))


def loss_weight(pairs: int, *, workers: int, accum: int, global_batch_size: int) -> float:
    """The factor on a micro-batch's mean loss over its `pairs` real pairs, so that the step's gradient is the mean
    over the global batch, as one worker training on all of it would have.

    DeepSpeed divides each backward by accum and averages the ranks' gradients (divides by workers), so the step's
    gradient is 1/(workers·accum) × Σ over every micro-batch of grad(weight × mean loss). Each pair's loss must
    count 1/global_batch_size: weight = workers·accum·pairs / global_batch_size (1 when the split is even)."""
    return workers * accum * pairs / global_batch_size


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




def zero_stage(workers: int, requested: int | None = None, checkpoint_stage: int | None = None) -> int:
    """ZeRO-3 across several workers; with one there is nothing to shard across, and ZeRO-3's per-module gather and
    release hooks only cost time (measured here: a LoRA step on SmolLM2-135M took twice as long as without them), so
    stage 1: no hooks, and a checkpoint DeepSpeed's universal converter reads (stage 0's is plain torch state; a bf16
    run gets stage 1 anyway, engine_stage). A run resumed from a checkpoint keeps its stage (checkpoint_stage):
    universal checkpoints load across worker counts, not across stages (training/reshard.py)."""
    if requested is not None:
        return requested
    if checkpoint_stage is not None:
        return checkpoint_stage
    return 3 if workers > 1 else 1


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
        # micro x accum x workers: DeepSpeed checks this product and uses it for nothing else. With an uneven split
        # it is more than the global batch (the light ranks' missing pairs); the loop drives accumulation with the
        # same accum micro-steps on every rank and weights each one's loss (loss_weight), which DeepSpeed never sees
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
    """The frozen reference engine: the same parameter partitioning, no optimizer, no gradient settings that need
    one. ZeRO stages 1 and 2 partition only optimizer state and gradients, which a reference has none of (DeepSpeed
    refuses them without an optimizer): below stage 3 the reference is a plain engine."""
    ref = {k: v for k, v in config.items() if k not in ("gradient_clipping",)}
    ref["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    if ref["zero_optimization"].get("stage", 0) < 3:
        ref["zero_optimization"]["stage"] = 0
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



