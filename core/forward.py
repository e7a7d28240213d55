"""Per-sequence log-probabilities of a collated batch, without the [B, T, V] logits (raydpo issue 7).

`add_logps_head(model)` patches a causal LM's forward (before PEFT wrapping and before deepspeed.initialize) so that
`model(input_ids=..., attention_mask=..., logps_labels=labels)` runs the backbone, projects through the output
embedding only the positions that have a label (response tokens: prompt and padding positions are never projected),
and returns their per-token log-probs [B, T] in fp32 (0 where the label is IGNORE_INDEX). The log-softmax of those
logits is chunked (training/logprobs.token_logps): only the [N, V] logits of the N labelled positions are held, never
an fp32 log-softmax of them. Without `logps_labels` the model's own forward runs (generation is unchanged).

Hand-written rather than TRL's add_fused_lm_head: TRL's head scores every position (prompt and padding too) off
Triton devices. Here the output embedding is called once per forward as a module, so ZeRO-3 gathers its weight and
reduces its gradient through its own hooks, with the same number of collectives on every rank whatever the batch.

`sequence_logps_of(model, batch, ...)` is the one function the worker loop and the reference stage share: the same
inputs give the same log-probabilities whether the reference runs live or ahead of training.
"""
from __future__ import annotations

import types

import torch

from core.attention import attention_mask
from core.logprobs import IGNORE_INDEX, sequence_logps, token_logps
from core.vision import VISION_KWARGS, blank_image_forward

HEAD_FLAG = "_raydpo_logps_head"
# a vision-language model's backbone takes its image inputs too (pixel_values, image_grid_thw, ...)
BACKBONE_KWARGS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", *VISION_KWARGS)


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that the model applies to its logits (Cohere's logit_scale, Gemma 2's softcapping)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def add_logps_head(model) -> None:
    """Adds the `logps_labels=` path to a transformers causal LM, in place. Idempotent."""
    if getattr(model, HEAD_FLAG, False):
        return
    original_forward = model.forward
    backbone_name = model.base_model_prefix
    scale, softcap = logit_transform(model.config)

    def forward(self, *args, logps_labels=None, logps_chunk: int = 1024, **kwargs):
        if logps_labels is None:
            return original_forward(*args, **kwargs)
        backbone_kwargs = {k: kwargs[k] for k in BACKBONE_KWARGS if kwargs.get(k) is not None}
        hidden = getattr(self, backbone_name)(*args, use_cache=False, **backbone_kwargs).last_hidden_state
        labelled = logps_labels != IGNORE_INDEX
        logits = fp32_logits(self.get_output_embeddings(), hidden[labelled])  # [N, V]: response positions only
        if scale != 1.0:
            logits = logits * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        picked = token_logps(logits.unsqueeze(0), logps_labels[labelled].unsqueeze(0), logps_chunk)[0]
        # masked_scatter keeps the graph connected even when no position has a label (a zero, not an error)
        return picked.new_zeros(logps_labels.shape).masked_scatter(labelled, picked)

    model.forward = types.MethodType(forward, model)
    setattr(model, HEAD_FLAG, True)


def fp32_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output embedding's logits in fp32 whatever the weights' dtype. In bf16 a logit near 20 is held to the
    nearest 0.125, and DPO's loss reads the small difference between the policy's and the reference's sums of those.
    Still called as the module, with an fp32 forward for that one call: ZeRO-3's hooks gather its weight."""
    if head.weight.dtype == torch.float32:
        return head(hidden)
    own = head.__dict__.get("forward")
    head.forward = types.MethodType(_linear_in_fp32, head)
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _linear_in_fp32(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    bias = None if head.bias is None else head.bias.float()
    return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def shifted_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = the token that position t predicts (input_ids[b, t + 1]) where it is a response token, else
    IGNORE_INDEX; the last position predicts nothing. Same shape as input_ids, so no [:, :-1] slice is ever copied."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)
    return labels


def sequence_logps_of(model, batch: dict, *, chunk_size: int = 1024, head: bool = True):
    """(summed response log-probs, response token counts) per sequence of a collated batch: ([S], [S]).

    batch: collate_pairs' padded batch, collate_packed's packed one (then "segment_ids" says which sequence each
    position belongs to, and S is the number of sequences), or collate_shared's one row per pair (then "segments"
    keep the answers apart; S is twice the rows, chosen first). head=False takes the model's full logits instead (the
    unoptimised path, kept for comparison and for models that cannot take the head).
    """
    labels = shifted_labels(batch["input_ids"], batch["loss_mask"])
    inputs = {"input_ids": batch["input_ids"]}
    if "segments" in batch or "segment_ids" in batch:  # shared prompt or packed: positions restart per answer
        inputs["position_ids"] = batch["position_ids"]
        mask = attention_mask(batch, model)  # made on the device once per batch (core/attention.py)
        if mask is not None:  # packed without flex: none, the model finds the sequences from position_ids
            inputs["attention_mask"] = mask
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    inputs.update({k: batch[k] for k in VISION_KWARGS if k in batch})  # a VLM's images (core/vision.py)
    with blank_image_forward(model, batch):  # a VLM's micro-batch without images, for ZeRO-3 (core/vision.py)
        if head:
            per_token = model(**inputs, logps_labels=labels, logps_chunk=chunk_size)
        else:
            per_token = token_logps(model(**inputs).logits, labels, chunk_size)
    if "segments" in batch:  # shared: each label belongs to the answer of the token it predicts
        predicted = torch.full_like(batch["segments"], -1)
        predicted[:, :-1] = batch["segments"][:, 1:]
        labelled = labels != IGNORE_INDEX
        (chosen, chosen_n), (rejected, rejected_n) = (sequence_logps(per_token, labelled & (predicted == segment))
                                                      for segment in (1, 2))
        return torch.cat([chosen, rejected]), torch.cat([chosen_n, rejected_n])
    if "segment_ids" not in batch:
        return sequence_logps(per_token, labels != IGNORE_INDEX)
    return segment_sums(per_token[0], batch["segment_ids"][0], batch["sequences"],
                        labels[0] != IGNORE_INDEX)


def segment_sums(values: torch.Tensor, segment_ids: torch.Tensor, segments: int, mask: torch.Tensor):
    """(sum of values where mask, count of mask) per segment id 0..segments-1, for a packed row."""
    picked = torch.where(mask, values, torch.zeros_like(values))
    totals = picked.new_zeros(segments).index_add(0, segment_ids, picked)
    counts = torch.zeros(segments, dtype=torch.long, device=values.device).index_add(0, segment_ids, mask.long())
    return totals, counts
