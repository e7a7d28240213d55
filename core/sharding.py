"""Inference models (the reference stage, the generator) on as many of a node's GPUs as their weights need.

A model whose 16-bit weights fit one GPU's budget stays whole on one GPU (one actor per GPU: the most throughput).
A larger one (above ~35B parameters in bf16 on an 80 GB GPU) is split by layers across k GPUs of one node with
accelerate's device_map="auto" under a max_memory budget per GPU: the budget leaves room for the forward's
activations and the log-prob head's logits. Each actor then asks Ray for k GPUs, and Ray's CUDA_VISIBLE_DEVICES hands
it exactly those. Pure arithmetic here, with hand-worked tests; transformers and accelerate do the placing.
"""
from __future__ import annotations

import math

GIB = 1024**3
WEIGHT_BUDGET = 0.8  # of a GPU's memory for weights; the rest: activations, logits, CUDA context


def gpus_for_weights(weight_bytes: float, gpu_bytes: float, budget: float = WEIGHT_BUDGET) -> int:
    """GPUs whose weight budgets together hold the weights (at least one)."""
    return max(1, math.ceil(weight_bytes / (budget * gpu_bytes)))


def load_kwargs(gpus: int, gpu_bytes: float, budget: float = WEIGHT_BUDGET) -> dict:
    """from_pretrained arguments that place the model on this actor's `gpus` GPUs (0..gpus-1 as Ray numbers them):
    whole on GPU 0 when one is enough, else device_map="auto" with max_memory per GPU and none on the CPU (a layer
    offloaded to host memory would make every forward crawl: better to fail and say so)."""
    if gpus <= 1:
        return {"device_map": {"": 0}}
    per_gpu = int(budget * gpu_bytes)
    return {"device_map": "auto", "max_memory": {index: per_gpu for index in range(gpus)} | {"cpu": 0}}


def actors_for(node_gpus: int, gpus_per_actor: int, requested: int) -> int:
    """Model actors on a node of node_gpus GPUs when each takes gpus_per_actor: at most what was asked, at least one."""
    return max(1, min(requested, node_gpus // max(gpus_per_actor, 1)))


def weight_bytes(config, dtype_bytes: int) -> int:
    """The model's weights in the load dtype, counted on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dtype_bytes * sum({id(p): p.numel() for p in model.parameters()}.values())


def gpu_memory_bytes() -> int:
    """Total memory of this process's first GPU (run inside a Ray task or actor that holds one)."""
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def input_device(model):
    """Where a (possibly device-mapped) model takes its inputs: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


def gpus_per_actor(model_source: str, dtype_bytes: int) -> tuple[int, int]:
    """(GPUs each inference actor needs, one GPU's memory in bytes), measured on the cluster by a one-GPU task: the
    driver (a CPU head node) has no GPU to ask."""
    import ray

    from core.models import load_config

    memory = ray.get(ray.remote(num_gpus=1)(gpu_memory_bytes).remote())
    return gpus_for_weights(weight_bytes(load_config(model_source), dtype_bytes), memory), memory
