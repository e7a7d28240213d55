"""Loss inputs: the padded and the packed layouts, by hand and against each other on a tiny model."""
from __future__ import annotations

import torch

from training.batch import collate_packed, collate_pairs, packed_layout
from training.forward import add_logps_head, sequence_logps_of

PAIRS = {"prompt_ids": [[5, 6, 7], [8]], "chosen_ids": [[9, 10], [11, 12, 13]], "rejected_ids": [[17], [18, 19]]}


def test_collate_pairs_hand_worked():
    batch = collate_pairs(PAIRS, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0], [5, 6, 7, 17, 0], [8, 18, 19, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert (batch["real_tokens"], batch["computed_tokens"]) == (5 + 4 + 4 + 3, 4 * 5)
    assert "ref_chosen_logps" not in batch
    assert collate_pairs(PAIRS, pad_id=0, pad_to_multiple=4)["input_ids"].shape == (4, 8)


def test_precomputed_reference_rides_along():
    batch = collate_pairs(PAIRS | {"ref_chosen_logps": [-1.5, -2.0], "ref_rejected_logps": [-3.0, -4.25]}, pad_id=0)
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -2.0] and batch["ref_rejected_logps"].tolist() == [-3.0, -4.25]
    assert collate_packed(PAIRS | {"ref_chosen_logps": [1.0, 2.0], "ref_rejected_logps": [3.0, 4.0]}
                          )["ref_rejected_logps"].tolist() == [3.0, 4.0]


def test_packed_layout_hand_worked():
    # lengths 3 and 2; the second has an empty prompt: its first token is still never a label
    positions, segments, mask = packed_layout([3, 2], [2, 0])
    assert positions == [0, 1, 2, 0, 1]
    assert segments == [0, 0, 0, 1, 1]
    assert mask == [0, 0, 1, 0, 1]


def test_collate_packed_hand_worked():
    batch = collate_packed(PAIRS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10, 8, 11, 12, 13, 5, 6, 7, 17, 8, 18, 19]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1]]
    assert batch["sequences"] == 4 and batch["real_tokens"] == batch["computed_tokens"] == 16


def test_packed_and_padded_give_the_same_logps_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    pairs = {"prompt_ids": [[5, 6, 7], [8], []], "chosen_ids": [[9, 10], [11, 12, 13, 14], [15, 16]],
             "rejected_ids": [[17], [18, 19], [20, 21, 22]]}
    results = []
    for collate in (lambda p: collate_pairs(p, pad_id=0), collate_packed):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        add_logps_head(model)
        logps, counts = sequence_logps_of(model, collate(pairs))
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad for n, p in model.named_parameters()}))
    (padded, padded_n, padded_grads), (packed, packed_n, packed_grads) = results
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    # the empty prompt's first response token is predicted by nothing in either layout
    assert packed_n.tolist() == padded_n.tolist() == [2, 4, 1, 1, 2, 2]
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
