"""Loss inputs: tokenised pairs -> one batch whose log-probabilities come out chosen first, then rejected.

Three layouts (batch_layout picks one): padded (collate_pairs: [2B, T], right-padded); packed (collate_packed: the 2B
sequences end to end in one row [1, L] with position ids restarting at each sequence: no padding at all; transformers
then attends within each sequence only, which is efficient with FlashAttention's variable-length kernels, and correct,
if slower, elsewhere); and shared (collate_shared: one row per pair, prompt + chosen + rejected, with a 4D attention
mask that keeps the answers apart, so the prompt is computed once instead of twice).
Precomputed reference log-probabilities, when the rows carry them, ride along as [B] float32 tensors.
"""
from __future__ import annotations

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_sequences(prompt_ids, chosen_ids, rejected_ids) -> tuple[list[list[int]], list[int]]:
    """2B sequences (chosen first) and each one's prompt length (where the response starts)."""
    sequences, prompt_lengths = [], []
    for responses in (chosen_ids, rejected_ids):
        for prompt, response in zip(prompt_ids, responses):
            sequences.append(list(prompt) + list(response))
            prompt_lengths.append(len(prompt))
    return sequences, prompt_lengths


def reference_tensors(batch: dict) -> dict:
    """The precomputed reference log-probs of the batch's pairs, if the rows carry them."""
    import torch

    return {k: torch.as_tensor([float(v) for v in batch[k]], dtype=torch.float32)
            for k in REFERENCE_COLUMNS if k in batch}


def collate_pairs(batch: dict, pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-padded input_ids, attention_mask and loss_mask (1 on response tokens) as torch tensors.

    loss_mask is aligned with input_ids; the loss uses logits[:, :-1] against input_ids[:, 1:] masked by
    loss_mask[:, 1:].
    """
    import torch

    sequences, prompt_lengths = pair_sequences(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
    width = max(len(s) for s in sequences)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, start) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        loss_mask[row, start: len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "real_tokens": int(attention_mask.sum()), "computed_tokens": int(input_ids.numel()),
            **reference_tensors(batch), **vision_tensors(batch, width)}


def vision_tensors(batch: dict, width: int) -> dict:
    """A vision-language model's image inputs for the padded rows, when the pairs carry them (core/vision.py)."""
    if "vision" not in batch:
        return {}
    from core.vision import collate_vision

    return collate_vision(list(batch["vision"]), width)


def packed_layout(lengths: list[int], prompt_lengths: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(position ids, segment ids, loss mask) of sequences laid end to end.

    The loss mask is 0 on each sequence's first token even when its prompt is empty: in a padded row that token is
    never predicted either (nothing precedes it), and here the previous sequence's last token must not predict it.
    """
    positions, segments, mask = [], [], []
    for index, (length, start) in enumerate(zip(lengths, prompt_lengths)):
        positions += range(length)
        segments += [index] * length
        mask += [0 if t < max(start, 1) else 1 for t in range(length)]
    return positions, segments, mask


def collate_packed(batch: dict) -> dict:
    """The 2B sequences in one row [1, L] (chosen first, then rejected), with position_ids and segment_ids."""
    import torch

    sequences, prompt_lengths = pair_sequences(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
    positions, segments, mask = packed_layout([len(s) for s in sequences], prompt_lengths)
    input_ids = torch.as_tensor([t for s in sequences for t in s], dtype=torch.long).unsqueeze(0)
    return {"input_ids": input_ids, "position_ids": torch.as_tensor([positions], dtype=torch.long),
            "segment_ids": torch.as_tensor([segments], dtype=torch.long),
            "loss_mask": torch.as_tensor([mask], dtype=torch.long), "sequences": len(sequences),
            "real_tokens": input_ids.shape[1], "computed_tokens": input_ids.shape[1], **reference_tensors(batch)}


def shared_prompt_row(prompt: list[int], chosen: list[int], rejected: list[int]):
    """(tokens, positions, segments, loss mask) of one pair as one row: prompt, chosen answer, rejected answer.

    The prompt is computed once for both answers (raydpo issue 7: on HH about 40% fewer computed tokens). The rejected
    answer starts with a copy of the prompt's last token at that token's position, seeing the prompt before it and
    nothing of the chosen answer: its hidden state is the one the prompt's last token has in a row of its own, so it
    predicts the rejected answer's first token (one position cannot hold two labels). Segments: 0 prompt, 1 chosen,
    2 rejected (with the copy).
    """
    p, c, r = len(prompt), len(chosen), len(rejected)
    copy = [prompt[-1]] if p else []
    tokens = list(prompt) + list(chosen) + copy + list(rejected)
    positions = list(range(p + c)) + ([p - 1] if p else []) + list(range(p, p + r))
    segments = [0] * p + [1] * c + [2] * (len(copy) + r)

    def answer_mask(n):  # as in a row of its own, an answer's first token is a label only after a prompt
        return [1 if p or i else 0 for i in range(n)]

    loss_mask = [0] * p + answer_mask(c) + [0] * len(copy) + answer_mask(r)
    return tokens, positions, segments, loss_mask


def collate_shared(batch: dict, pad_id: int) -> dict:
    """B pairs as B right-padded rows [B, T] (shared_prompt_row) with position_ids, segment ids (-1 on padding), and
    each row's prompt length and length: core/attention.py makes the attention mask from these on the model's device
    (no [B, T, T] mask travels from here). real_tokens counts what a padded layout holds (the prompt twice):
    the same work measured the same way; computed_tokens is what the forward computes."""
    import torch

    rows = [shared_prompt_row(p, c, r) for p, c, r in
            zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])]
    width = max(len(tokens) for tokens, *_ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (tokens, positions, segs, mask) in enumerate(rows):
        n = len(tokens)
        input_ids[row, :n] = torch.as_tensor(tokens, dtype=torch.long)
        position_ids[row, :n] = torch.as_tensor(positions, dtype=torch.long)
        segments[row, :n] = torch.as_tensor(segs, dtype=torch.long)
        loss_mask[row, :n] = torch.as_tensor(mask, dtype=torch.long)
    real = sum(2 * len(p) + len(c) + len(r) for p, c, r in
               zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]))
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segments, "loss_mask": loss_mask,
            "prompt_lengths": torch.as_tensor([len(p) for p in batch["prompt_ids"]], dtype=torch.long),
            "lengths": torch.as_tensor([len(tokens) for tokens, *_ in rows], dtype=torch.long), "real_tokens": real, "computed_tokens": int(input_ids.numel()),
            **reference_tensors(batch)}


SHARED_PROMPT_ATTENTION = ("sdpa", "eager", "flex_attention")  # take a custom mask (4D, or a flex BlockMask)


def mask_attention(config) -> str | None:
    """The attention implementation, as batch_layout reads it; "sliding_window" for a model with sliding-window
    layers (Mistral, Gemma 2/3): a custom 4D mask would bypass its window, so its pairs keep padded rows; "vision"
    for a vision-language model, whose pairs keep padded rows too (core/vision.py says why)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "vision_config", None) is not None:  # padded rows: image tokens and mrope (core/vision.py)
        return "vision"
    if getattr(text, "sliding_window", None) or "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "sliding_window"
    return getattr(config, "_attn_implementation", None)


def batch_layout(packing: bool, share_prompt: bool, attention: str | None) -> str:
    """"packed" (collate_packed), "shared" (collate_shared: the prompt once per pair) or "padded" (collate_pairs).
    FlashAttention takes no 4D mask: there the prompt is not shared (packing is its padding-free layout)."""
    if packing:
        return "packed"
    return "shared" if share_prompt and attention in SHARED_PROMPT_ATTENTION else "padded"


def model_layout(config, *, packing: bool = False, share_prompt: bool) -> str:
    """batch_layout for a loaded model: the one place that reads its attention (and sliding window) from its config,
    for the training loop, the reference stage and the preference evaluation alike."""
    return batch_layout(packing, share_prompt, mask_attention(config))


def unique_tokens(batch: dict) -> int:
    """The pairs' real tokens with each prompt counted once (prompt + chosen + rejected): what the data holds, the
    measure of padding a user pays for (computed / unique), whatever the layout."""
    return sum(len(p) + len(c) + len(r) for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"],
                                                          batch["rejected_ids"]))


def collate_for(layout: str, pad_id: int):
    """The collate function of a batch_layout result; its batches also say their unique_tokens."""
    from functools import partial

    collate = {"packed": collate_packed, "shared": partial(collate_shared, pad_id=pad_id),
               "padded": partial(collate_pairs, pad_id=pad_id)}[layout]

    def counted(batch: dict) -> dict:
        return collate(batch) | {"unique_tokens": unique_tokens(batch)}

    return counted
