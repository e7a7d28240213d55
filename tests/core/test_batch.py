"""Loss inputs: the padded and the packed layouts, by hand and against each other on a tiny model."""
from __future__ import annotations

import pytest
import torch

from core.batch import (batch_layout, collate_packed, collate_pairs, collate_shared, mask_attention, model_layout,
                            packed_layout, shared_prompt_row)
from core.attention import shared_dense_mask
from core.forward import add_logps_head, sequence_logps_of

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


def test_shared_prompt_row_hand_worked():
    tokens, positions, segments, loss_mask = shared_prompt_row([5, 6, 7], [9, 10], [17, 18])
    assert tokens == [5, 6, 7, 9, 10, 7, 17, 18]  # the prompt's last token again, starting the rejected answer
    assert positions == [0, 1, 2, 3, 4, 2, 3, 4]
    assert segments == [0, 0, 0, 1, 1, 2, 2, 2]
    assert loss_mask == [0, 0, 0, 1, 1, 0, 1, 1]
    # no prompt: nothing predicts either answer's first token, as in rows of their own
    assert shared_prompt_row([], [9, 10], [17]) == ([9, 10, 17], [0, 1, 0], [1, 1, 2], [0, 1, 0])


def test_collate_shared_hand_worked():
    batch = collate_shared({"prompt_ids": [[5, 6], [8]], "chosen_ids": [[9], [11, 12]], "rejected_ids": [[17], [18]]},
                           pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 9, 6, 17], [8, 11, 12, 8, 18]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 2], [0, 1, 2, 0, 1]]
    assert batch["segments"].tolist() == [[0, 0, 1, 2, 2], [0, 1, 1, 2, 2]]
    # row 0: the copy (index 3) and the rejected token (4) see the prompt's first token and each other only
    assert (batch["prompt_lengths"].tolist(), batch["lengths"].tolist()) == ([2, 1], [5, 5])
    assert "pair_mask" not in batch  # no [B, T, T] mask leaves the collate: core/attention.py builds it on the device
    pair_mask = shared_dense_mask(batch["segments"], batch["prompt_lengths"], batch["lengths"])
    assert pair_mask[0].int().tolist() == [[1, 0, 0, 0, 0],
                                                    [1, 1, 0, 0, 0],
                                                    [1, 1, 1, 0, 0],
                                                    [1, 0, 0, 1, 0],
                                                    [1, 0, 0, 1, 1]]
    # what a padded layout holds (2 + 1 + 2 + 1) + (1 + 2 + 1 + 1), against the 2 x 5 computed
    assert (batch["real_tokens"], batch["computed_tokens"]) == (11, 10)


def test_collate_shared_pads_and_masks_the_padding():
    batch = collate_shared({"prompt_ids": [[5], [8, 9, 10]], "chosen_ids": [[9], [11]], "rejected_ids": [[17], [18]]},
                           pad_id=0)
    assert batch["input_ids"][0].tolist() == [5, 9, 5, 17, 0, 0]
    assert batch["segments"][0].tolist() == [0, 1, 2, 2, -1, -1]
    pair_mask = shared_dense_mask(batch["segments"], batch["prompt_lengths"], batch["lengths"])
    assert not pair_mask[0, :, 4:].any()  # no query sees a padding key


LAYOUTS = {"packed": collate_packed, "shared": lambda pairs: collate_shared(pairs, pad_id=0)}


@pytest.mark.parametrize("layout,attention", [("packed", "sdpa"), ("shared", "sdpa"), ("shared", "eager")])
def test_packed_and_shared_layouts_give_the_padded_logps_and_gradients(tiny_model_dir, layout, attention):
    from transformers import AutoModelForCausalLM

    pairs = {"prompt_ids": [[5, 6, 7], [8], []], "chosen_ids": [[9, 10], [11, 12, 13, 14], [15, 16]],
             "rejected_ids": [[17], [18, 19], [20, 21, 22]]}
    results = []
    for collate, implementation in ((lambda p: collate_pairs(p, pad_id=0), "eager"), (LAYOUTS[layout], attention)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                     attn_implementation=implementation)
        add_logps_head(model)
        logps, counts = sequence_logps_of(model, collate(pairs))
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad for n, p in model.named_parameters()}))
    (padded, padded_n, padded_grads), (other, other_n, other_grads) = results
    torch.testing.assert_close(other, padded, rtol=1e-5, atol=1e-5)
    # the empty prompt's first response token is predicted by nothing in any layout
    assert other_n.tolist() == padded_n.tolist() == [2, 4, 1, 1, 2, 2]
    for name, grad in padded_grads.items():
        torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # flex attention compiles its kernels on CPU (~20 s); CPU has no flex backward: GPU check
@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_flex_attention_block_masks_give_the_eager_padded_logps(tiny_model_dir, layout):
    from transformers import AutoModelForCausalLM

    pairs = {"prompt_ids": [[5, 6, 7], [8], []], "chosen_ids": [[9, 10], [11, 12, 13, 14], [15, 16]],
             "rejected_ids": [[17], [18, 19], [20, 21, 22]]}
    results = []
    for collate, implementation in ((lambda p: collate_pairs(p, pad_id=0), "eager"), (LAYOUTS[layout],
                                                                                      "flex_attention")):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                     attn_implementation=implementation)
        add_logps_head(model)
        with torch.no_grad():
            results.append(sequence_logps_of(model, collate(pairs)))
    (padded, padded_n), (flex, flex_n) = results
    torch.testing.assert_close(flex, padded, rtol=1e-5, atol=1e-5)
    assert flex_n.tolist() == padded_n.tolist()


def test_batch_layout_table():
    assert batch_layout(packing=True, share_prompt=True, attention="sdpa") == "packed"
    assert batch_layout(packing=False, share_prompt=True, attention="sdpa") == "shared"
    assert batch_layout(packing=False, share_prompt=True, attention="eager") == "shared"
    # FlashAttention takes no 4D mask
    assert batch_layout(packing=False, share_prompt=True, attention="flash_attention_2") == "padded"
    assert batch_layout(packing=False, share_prompt=False, attention="sdpa") == "padded"


def test_a_sliding_window_model_keeps_padded_rows():
    from transformers import LlamaConfig, MistralConfig

    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
    llama._attn_implementation = "sdpa"
    assert model_layout(llama, share_prompt=True) == "shared"
    assert model_layout(llama, packing=True, share_prompt=True) == "packed"
    mistral = MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                            sliding_window=16)
    mistral._attn_implementation = "sdpa"
    assert mask_attention(mistral) == "sliding_window"
    assert model_layout(mistral, share_prompt=True) == "padded"


def test_every_layout_says_its_unique_tokens_the_prompt_once():
    from core.batch import collate_for

    pairs = {"prompt_ids": [[5, 6, 7], [8]], "chosen_ids": [[9, 10], [11, 12, 13]], "rejected_ids": [[17], [18, 19]]}
    # (3 + 2 + 1) + (1 + 3 + 2) = 12; real tokens count each prompt twice: 12 + 3 + 1 = 16
    for layout in ("padded", "shared", "packed"):
        batch = collate_for(layout, pad_id=0)(pairs)
        assert batch["unique_tokens"] == 12 and batch["real_tokens"] == 16, layout
