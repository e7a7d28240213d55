"""The final model of a run, written by rank 0 and uploaded to <run>/model/ (a collective: every rank calls it).

LoRA writes the adapter only: under ZeRO-3 the trainable parameters alone are gathered (GatheredParameters over them:
a 70B LoRA run gathers its ~100 MB of adapters, not the 140 GB base that _zero3_consolidated_16bit_state_dict would
assemble on rank 0), and peft's save_pretrained writes adapter_model.safetensors + adapter_config.json.

Full-rank under ZeRO-3 streams shard by shard: parameters are gathered a group of at most SHARD_BYTES at a time, rank
0 writes that group as one safetensors file and lets it go, and an index names the file of every tensor (the layout
from_pretrained reads). Host memory holds one shard, never the model. Without partitioning the weights are already
whole on every rank: transformers' own sharded save_pretrained writes them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

SHARD_BYTES = 2 * 1024**3


def save_final_model(engine, tokenizer, model_uri: str, rank: int, lora: bool) -> None:
    from core import storage

    with tempfile.TemporaryDirectory() as tmp:
        if lora:
            save_adapter(engine.module, tmp, rank, partitioned=engine.zero_optimization_partition_weights())
        elif engine.zero_optimization_partition_weights():
            save_streamed(engine.module, tmp, rank)
        elif rank == 0:
            engine.module.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_BYTES)
        if rank == 0:
            tokenizer.save_pretrained(tmp)
            storage.upload_dir(tmp, model_uri)


def save_adapter(model, folder: str, rank: int, *, partitioned: bool) -> None:
    """The PEFT adapter of `model` into folder (rank 0), gathering only the trainable parameters under ZeRO-3."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named], partitioned):
        if rank == 0:
            state = {n: p.detach().to("cpu", copy=True) for n, p in named}
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)


def shard_groups(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Names in order, grouped so each group's bytes stay within limit (a tensor larger than limit goes alone)."""
    groups: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if groups and used + size <= limit:
            groups[-1].append(name)
            used += size
        else:
            groups.append([name])
            used = size
    return groups


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def save_streamed(model, folder: str, rank: int, limit: int | None = None) -> None:
    """A ZeRO-3 partitioned model as safetensors shards + model.safetensors.index.json, one shard in memory at a time.
    Tied weights are written once (named_parameters yields each parameter once); from_pretrained ties them again."""
    from safetensors.torch import save_file

    limit = limit or SHARD_BYTES
    params = dict(model.named_parameters())
    sizes = [(n, full_numel(p) * p.element_size()) for n, p in params.items()]
    groups = shard_groups(sizes, limit)
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        with gathered([params[n] for n in names], True):
            if rank == 0:
                shard = {n: params[n].detach().to("cpu", copy=True).contiguous() for n in names}
                save_file(shard, str(Path(folder) / shard_name(index, len(groups))), metadata={"format": "pt"})
                total += sum(t.numel() * t.element_size() for t in shard.values())
                weight_map |= dict.fromkeys(names, shard_name(index, len(groups)))
                del shard
    if rank == 0:
        buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()
                   if n in model.state_dict()}  # persistent buffers only
        if buffers:
            save_file(buffers, str(Path(folder) / "buffers.safetensors"), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(buffers, "buffers.safetensors")
        index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)


def full_numel(param) -> int:
    """A parameter's element count whole: ZeRO-3 keeps the full count in ds_numel while the tensor holds a shard."""
    return int(getattr(param, "ds_numel", param.numel()))


def gathered(params: list, partitioned: bool):
    """deepspeed.zero.GatheredParameters over params (read-only) under ZeRO-3; nothing otherwise."""
    from contextlib import nullcontext

    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
