"""Attention masks made on the device from segment ids (core/attention.py): the dense mask and flex attention's block
mask say the same thing, the mask is made once per batch, and the implementation table."""
from __future__ import annotations

import torch

from core import attention
from core.batch import collate_packed, collate_shared

PAIRS = {"prompt_ids": [[5, 6], [8]], "chosen_ids": [[9], [11, 12]], "rejected_ids": [[17], [18]]}


def test_attention_table():
    assert attention.attention_for("shared", on_gpu=True, supports_flex=True) == "flex_attention"
    assert attention.attention_for("packed", on_gpu=True, supports_flex=True) == "flex_attention"
    assert attention.attention_for("padded", on_gpu=True, supports_flex=True) == "sdpa"  # SDPA's flash kernel
    assert attention.attention_for("shared", on_gpu=True, supports_flex=False) == "sdpa"
    assert attention.attention_for("shared", on_gpu=False, supports_flex=True) == "sdpa"  # CPU: no compile per shape


def test_flex_support_is_read_from_the_architecture():
    from transformers import GPT2Config, LlamaConfig

    assert attention.supports_flex(LlamaConfig())
    assert not attention.supports_flex(GPT2Config())  # GPT-2's class takes no flex attention


def test_packed_mask_is_causal_within_each_sequence():
    batch = collate_packed({"prompt_ids": [[1], [2]], "chosen_ids": [[3], [6]], "rejected_ids": [[4], [5, 7]]})
    mask = attention.packed_dense_mask(batch["segment_ids"])[0].int().tolist()
    # sequences [1, 3], [2, 6], [1, 4], [2, 5, 7]: lower-triangular blocks of 2, 2, 2 and 3
    assert batch["segment_ids"][0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert mask[4] == [0, 0, 0, 0, 1, 0, 0, 0, 0] and mask[8] == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_the_block_mask_allows_exactly_what_the_dense_mask_does():
    from torch.nn.attention.flex_attention import create_mask

    shared = collate_shared(PAIRS | {"prompt_ids": [[5, 6, 7], [8]]}, pad_id=0)
    dense = attention.shared_dense_mask(shared["segments"], shared["prompt_lengths"], shared["lengths"])
    rows, width = shared["segments"].shape
    flex = create_mask(attention.shared_mask_mod(shared["segments"], shared["prompt_lengths"], shared["lengths"]),
                       rows, None, width, width, device="cpu")
    assert torch.equal(flex[:, 0], dense)
    packed = collate_packed(PAIRS)
    width = packed["segment_ids"].shape[1]
    flex = create_mask(attention.packed_mask_mod(packed["segment_ids"]), 1, None, width, width, device="cpu")
    assert torch.equal(flex[:, 0], attention.packed_dense_mask(packed["segment_ids"]))


def test_the_mask_is_made_once_per_batch_and_shared_by_the_policy_and_the_reference(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from core.forward import add_logps_head, sequence_logps_of

    made = []
    real = attention.shared_dense_mask
    monkeypatch.setattr(attention, "shared_dense_mask", lambda *a: made.append(1) or real(*a))
    policy, reference = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
                         for _ in range(2))
    for model in (policy, reference):
        add_logps_head(model)
    cpu_batch = collate_shared(PAIRS, pad_id=0)
    batch = attention.on_device(cpu_batch, torch.device("cpu"))
    assert attention.on_device(cpu_batch, torch.device("cpu")) is batch  # one device copy per batch
    with torch.no_grad():
        sequence_logps_of(policy, batch)
        sequence_logps_of(reference, batch)
    assert len(made) == 1


def test_the_implementation_is_chosen_before_loading_from_the_config():
    from transformers import LlamaConfig, MistralConfig

    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
    assert attention.attention_for_model(llama, packing=False, share_prompt=True, on_gpu=True) == "flex_attention"
    assert attention.attention_for_model(llama, packing=False, share_prompt=False, on_gpu=True) == "sdpa"
    assert attention.attention_for_model(llama, packing=True, share_prompt=False, on_gpu=True) == "flex_attention"
    assert attention.attention_for_model(llama, packing=False, share_prompt=True, on_gpu=False) == "sdpa"
    mistral = MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                            sliding_window=16)  # padded rows: a block mask would bypass its window
    assert attention.attention_for_model(mistral, packing=False, share_prompt=True, on_gpu=True) == "sdpa"
