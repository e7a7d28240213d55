"""The optimizer and learning-rate schedule of a worker: construction only, no training.

LoRA+ (peft's create_loraplus_optimizer) puts the adapters' A and B matrices in separate parameter groups, B at
lr x ratio. Two things break that under DeepSpeed, both fixed here:
- DeepSpeed drops parameter groups without parameters from a client optimizer (engine._configure_optimizer;
  LoRA+ always makes four, two are usually empty), so a LambdaLR built on the optimizer beforehand keeps a learning
  rate per group for four groups and its first step() fails (`zip() argument 2 is longer than argument 1`). Empty
  groups are dropped here, and the scheduler is handed to deepspeed.initialize as a callable, built on the
  optimizer DeepSpeed kept.
- peft reads optimizer_cls.__name__; a functools.partial has none. DeepSpeed's fused Adam comes as a named
  subclass with its adam_w_mode bound.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from training import ds_config


def fused_adam_class(adam_w_mode: bool, base: type | None = None) -> type:
    """DeepSpeed's FusedAdam with adam_w_mode bound, as a class with a name (peft's LoRA+ reads __name__).
    base: the class to bind (tests pass a CPU stand-in with FusedAdam's signature)."""
    if base is None:
        from deepspeed.ops.adam import FusedAdam as base  # noqa: N813 - CUDA only

    def __init__(self, params, **kwargs):
        base.__init__(self, params, adam_w_mode=adam_w_mode, **kwargs)

    name = "FusedAdamW" if adam_w_mode else "FusedAdamL2"
    return type(name, (base,), {"__init__": __init__, "__qualname__": name})


def optimizer_class(name: str, adam_w_mode: bool, on_gpu: bool, fused_base: type | None = None) -> type:
    if ds_config.optimizer_choice(name, on_gpu) == "fused_adam":
        return fused_adam_class(adam_w_mode, fused_base)
    return torch.optim.AdamW


def build_optimizer(model, *, name: str, lr: float, eps: float, betas, weight_decay: float, adam_w_mode: bool,
                    loraplus_lr_ratio: float | None = None, on_gpu: bool | None = None,
                    fused_base: type | None = None) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters; LoRA+ groups when loraplus_lr_ratio is set (> 0)."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    cls = optimizer_class(name, adam_w_mode, on_gpu, fused_base)
    decay = weight_decay if adam_w_mode else 0.0
    kwargs = dict(lr=lr, eps=eps, betas=tuple(betas), weight_decay=decay)
    if loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        # loraplus_weight_decay: peft's groups carry their own weight decay (0 unless given), the recipe's here
        optimizer = create_loraplus_optimizer(model=model, optimizer_cls=cls, loraplus_lr_ratio=loraplus_lr_ratio,
                                              loraplus_weight_decay=decay, **kwargs)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]  # as DeepSpeed will
        return optimizer
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def lr_factor(step: int, *, lr: float, min_lr: float, warmup_steps: int, constant_steps: int, total: int) -> float:
    """The schedule as a multiple of the base lr: each group's own lr (LoRA+'s B at lr x ratio) scales by it."""
    return ds_config.lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, constant_steps=constant_steps,
                           total=total) / lr


def scheduler_factory(**schedule) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """For deepspeed.initialize(lr_scheduler=...): DeepSpeed calls it with the optimizer it kept, so the scheduler
    has one lr per group DeepSpeed steps."""
    return partial(_lambda_lr, factor=partial(lr_factor, **schedule))


def _lambda_lr(optimizer, factor):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def group_lrs(optimizer) -> list[float]:
    """The learning rate of each parameter group, in order (LoRA+: A's group first, B's after)."""
    return [float(group["lr"]) for group in optimizer.param_groups]
