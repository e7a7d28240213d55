"""Attention masks of the shared-prompt and packed layouts (core/batch.py), built on the model's device, once per batch,
and the attention implementation a model is loaded with.

The collate functions send only per-token segment ids and per-row lengths (a few KB), never a [B, T, T] mask: a 4k-token
micro-batch of 4 rows would be 64 MB of booleans through Ray's object store and a host-to-device copy per forward.
Here the mask is made where the model runs, from those ids:
- flex attention (torch.nn.attention.flex_attention, in torch itself): a BlockMask from a mask_mod. Its kernel skips
  fully masked blocks (the rejected answer never reads the chosen one) and reads K/V once per group of query heads
  (no repeat_kv copy for grouped-query attention); no dense mask exists at all.
- eager and SDPA: the dense additive [B, 1, T, T] mask in the model dtype (SDPA then runs its memory-efficient or math
  kernel: its flash kernel takes no mask).
The result is cached in the batch dict (`on_device` keeps one device copy per batch), so the policy's forward and the
live reference's share it.

Which implementation (attention_for): flex on GPU for the shared and packed layouts where the architecture supports
it; SDPA otherwise (plain padded rows: SDPA picks its flash kernel where a row has no padding); on CPU SDPA, since flex
compiles its kernels per shape there (tens of seconds) for no gain.
"""
from __future__ import annotations

import torch

FLEX = "flex_attention"
MASK_KEY = "_attention_mask"


def attention_for(layout: str, on_gpu: bool, supports_flex: bool) -> str:
    """The attn_implementation to load the model with for a batch layout (the table above)."""
    if on_gpu and supports_flex and layout in ("shared", "packed"):
        return FLEX
    return "sdpa"


def attention_for_model(config, *, packing: bool, share_prompt: bool, on_gpu: bool) -> str:
    """attention_for a model's config before it is loaded (transformers' own default there is SDPA); a sliding-window
    model keeps padded rows whatever the implementation (core/batch.mask_attention)."""
    from core.batch import batch_layout, mask_attention

    layout = batch_layout(packing, share_prompt, mask_attention(config) or "sdpa")
    return attention_for(layout, on_gpu, supports_flex(config))


def supports_flex(config) -> bool:
    """Whether transformers' causal-LM class of this config takes attn_implementation="flex_attention"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return False
    return bool(getattr(model_class, "_supports_flex_attn", False))


def shared_dense_mask(segments: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool on the segments' device."""
    width = segments.shape[1]
    index = torch.arange(width, device=segments.device)
    q, kv = index[None, :, None], index[None, None, :]
    hidden = (segments[:, None, :] == 1) | (kv == prompt_lengths[:, None, None] - 1)
    return (kv <= q) & (kv < lengths[:, None, None]) & ~((segments[:, :, None] == 2) & hidden)


def packed_dense_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[1, L, L] bool: causal within each packed sequence."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    return (index[None, None, :] <= index[None, :, None]) & (segment_ids[:, :, None] == segment_ids[:, None, :])


def shared_mask_mod(segments, prompt_lengths, lengths):
    def mask_mod(b, h, q, kv):
        hidden = (segments[b, kv] == 1) | (kv == prompt_lengths[b] - 1)
        return (kv <= q) & (kv < lengths[b]) & ~((segments[b, q] == 2) & hidden)
    return mask_mod


def packed_mask_mod(segment_ids):
    def mask_mod(b, h, q, kv):
        return (kv <= q) & (segment_ids[b, q] == segment_ids[b, kv])
    return mask_mod


def block_mask(batch: dict):
    """flex attention's BlockMask of a shared or packed batch, on the batch's device."""
    from torch.nn.attention.flex_attention import create_block_mask

    if "segments" in batch:
        rows, width = batch["segments"].shape
        mod = shared_mask_mod(batch["segments"], batch["prompt_lengths"], batch["lengths"])
    else:
        rows, width = batch["segment_ids"].shape
        mod = packed_mask_mod(batch["segment_ids"])
    return create_block_mask(mod, rows, None, width, width, device=batch["input_ids"].device)


def additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where allowed, the dtype's lowest value elsewhere (eager and SDPA take it)."""
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def implementation_of(model) -> str | None:
    """The model's attention implementation, through a DeepSpeed engine (whose own .config is its DeepSpeed config)."""
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def attention_mask(batch: dict, model):
    """The attention_mask argument for a shared-prompt batch, or a packed one under flex (None: no mask needed, the
    model finds packed sequences from position_ids). Made once per batch and implementation, cached in the batch."""
    implementation = implementation_of(model)
    if "segments" not in batch and implementation != FLEX:
        return None
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    key = (MASK_KEY, implementation, dtype)
    if key not in batch:
        if implementation == FLEX:
            batch[key] = block_mask(batch)
        else:
            batch[key] = additive(shared_dense_mask(batch["segments"], batch["prompt_lengths"], batch["lengths"]),
                                  dtype)
    return batch[key]


def on_device(batch: dict, device) -> dict:
    """The batch's tensors on device, copied once per batch (non-blocking): the policy's and the reference's forwards
    of one micro-batch share the copy, and with it the attention mask cached there."""
    key = ("_on_device", str(device))
    if key not in batch:
        batch[key] = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
                      if not isinstance(k, tuple)}
    return batch[key]
