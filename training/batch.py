"""Loss inputs: tokenised pairs -> one batch with chosen rows first, then rejected rows.

Two layouts: padded (collate_pairs: [2B, T], right-padded) and packed (collate_packed: the 2B sequences end to end in
one row [1, L] with position ids restarting at each sequence: no padding at all; transformers then attends within each
sequence only, which is efficient with FlashAttention's variable-length kernels, and correct, if slower, elsewhere).
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
            **reference_tensors(batch)}


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
