"""Loss inputs: tokenised pairs -> one padded batch with chosen rows first, then rejected rows."""
from __future__ import annotations


def pair_sequences(prompt_ids, chosen_ids, rejected_ids) -> tuple[list[list[int]], list[int]]:
    """2B sequences (chosen first) and each one's prompt length (where the response starts)."""
    sequences, prompt_lengths = [], []
    for responses in (chosen_ids, rejected_ids):
        for prompt, response in zip(prompt_ids, responses):
            sequences.append(list(prompt) + list(response))
            prompt_lengths.append(len(prompt))
    return sequences, prompt_lengths


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
            "real_tokens": int(attention_mask.sum()), "computed_tokens": int(input_ids.numel())}
