"""The log-prob head (core/forward.py) against the model's own full logits: same values, same gradients."""
from __future__ import annotations

import types

import pytest
import torch

from core.batch import collate_pairs
from core.forward import (add_logps_head, fp32_logits, logit_transform, segment_sums, sequence_logps_of,
                          shifted_labels)
from core.logprobs import IGNORE_INDEX

PAIRS = {"prompt_ids": [[5, 6, 7], [8], [30, 31, 32, 33, 34]],
         "chosen_ids": [[9, 10], [11, 12, 13, 14], [15]],
         "rejected_ids": [[17], [18, 19], [20, 21, 22, 23, 24, 25]]}


def tiny_llama(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(config).float()


def plain_logps(model, batch):
    """The textbook computation: full logits, fp32 log_softmax, gather, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].bool()
    picked = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(-1), mask.sum(-1)


def test_shifted_labels_hand_worked():
    input_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    assert shifted_labels(input_ids, loss_mask).tolist() == [[IGNORE_INDEX, 3, 4, IGNORE_INDEX],
                                                             [6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_segment_sums_hand_worked():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    totals, counts = segment_sums(values, torch.tensor([0, 0, 1, 1, 2]), 3,
                                  torch.tensor([True, True, False, True, False]))
    assert totals.tolist() == [3.0, 8.0, 0.0] and counts.tolist() == [2, 1, 0]


def test_logit_transform_reads_scale_and_softcap():
    assert logit_transform(types.SimpleNamespace()) == (1.0, None)
    assert logit_transform(types.SimpleNamespace(logit_scale=0.5, final_logit_softcapping=30.0)) == (0.5, 30.0)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [1, 1024])
def test_head_matches_full_logits_values_and_gradients(tie, chunk):
    plain, fused = tiny_llama(tie), tiny_llama(tie)
    add_logps_head(fused)
    batch = collate_pairs(PAIRS, pad_id=0)
    want, want_n = plain_logps(plain, batch)
    got, got_n = sequence_logps_of(fused, batch, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_n.tolist() == want_n.tolist() == [2, 4, 1, 1, 2, 6]
    weights = torch.arange(1.0, 7.0)  # a loss that weighs every sequence differently
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_head_through_lora_and_with_the_adapter_disabled():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    plain = get_peft_model(tiny_llama(False), lora)
    base = tiny_llama(False)
    add_logps_head(base)  # before PEFT wraps it, as the loop does
    torch.manual_seed(1)
    fused = get_peft_model(base, lora)
    fused.load_state_dict(plain.state_dict())
    batch = collate_pairs(PAIRS, pad_id=0)
    want, _ = plain_logps(plain, batch)
    got, _ = sequence_logps_of(fused, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.sum().backward()
    got.sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6)
                         for n, p in fused.named_parameters() if p.requires_grad)
    with fused.disable_adapter(), plain.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(sequence_logps_of(fused, batch)[0], plain_logps(plain, batch)[0],
                                   rtol=1e-5, atol=1e-5)


def test_without_labels_the_model_forward_is_unchanged():
    plain, fused = tiny_llama(False), tiny_llama(False)
    add_logps_head(fused)
    add_logps_head(fused)  # idempotent
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_batch_without_response_tokens_gives_zeros_and_a_graph():
    fused = tiny_llama(False)
    add_logps_head(fused)
    batch = collate_pairs({"prompt_ids": [[5, 6]], "chosen_ids": [[]], "rejected_ids": [[]]}, pad_id=0)
    logps, counts = sequence_logps_of(fused, batch)
    assert logps.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    logps.sum().backward()  # no error: the loss of such a batch is a differentiable zero


def zero3_differences(model_dir: str) -> dict:
    """Under DeepSpeed ZeRO-3 (one process, gloo): the largest differences between the head and the full-logits
    path, in log-probs and in every trained parameter's full gradient, full-rank and LoRA. Runs in a subprocess."""
    import os
    import socket

    import deepspeed

    from training import ds_config
    from core.config import LoraTuning
    from training.loop import load_under_zero_init, wrap_lora

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = ds_config.deepspeed_config(micro_batch=3, accum=1, workers=1, precision="fp32")
    config["zero_allow_untested_optimizer"] = True
    lora = LoraTuning(adapter_dim=4, alpha=8, adapter_dropout=0.0)
    out = {}
    for use_lora in (False, True):
        runs = []
        for head in (False, True):
            torch.manual_seed(0)
            model, _keep = load_under_zero_init(model_dir, torch.float32, config, {})
            if head:
                add_logps_head(model)
            if use_lora:
                model = wrap_lora(model, lora, torch.float32, False)
                for name, param in model.named_parameters():  # B = 0 at init would give A no gradient
                    if "lora_B" in name:
                        torch.nn.init.normal_(param, std=0.1)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            logps, _ = sequence_logps_of(engine, collate_pairs(PAIRS, pad_id=0), head=head)
            engine.backward((logps * torch.arange(1.0, 7.0)).sum())
            grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
                     if p.requires_grad}
            runs.append((logps.detach(), grads))
        (plain, plain_grads), (fused, fused_grads) = runs
        out["lora" if use_lora else "full"] = {
            "logps": (plain - fused).abs().max().item(), "grads": len(plain_grads),
            "grad": max((plain_grads[n] - fused_grads[n]).abs().max().item() for n in plain_grads),
            "largest_grad": max(g.abs().max().item() for g in plain_grads.values())}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_head_gradients_equal_full_logits_under_zero3(tmp_path, tie):
    from tests.tiny import result_in_fresh_python

    model_dir = tmp_path / "model"
    tiny_llama(tie).save_pretrained(model_dir)  # tied: the head is the embedding, which ZeRO-3 must gather twice
    result = result_in_fresh_python("tests.core.test_forward", "zero3_differences", str(model_dir), 900)
    # every weight (the tied head is the embedding: one fewer); every LoRA A and B
    assert result["full"]["grads"] == (20 if tie else 21) and result["lora"]["grads"] == 28
    for kind in ("full", "lora"):
        assert result[kind]["largest_grad"] > 1e-3  # the comparison is not between zeros
        assert result[kind]["logps"] < 1e-5 and result[kind]["grad"] < 1e-5 * result[kind]["largest_grad"]


def test_a_bf16_head_gives_fp32_logits_of_its_weights_and_passes_gradients_back():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True).to(torch.bfloat16)
    hidden = (torch.randn(5, 8) * 4).to(torch.bfloat16).requires_grad_()
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(1))  # ZeRO-3 gathers in such a hook
    logits = fp32_logits(head, hidden)
    want = hidden.detach().float() @ head.weight.float().T + head.bias.float()
    assert logits.dtype == torch.float32 and calls == [1]
    torch.testing.assert_close(logits, want)  # exact fp32 sums of the bf16 values
    assert not torch.equal(head(hidden).float(), want)  # bf16's own forward rounds them
    assert "forward" not in head.__dict__  # the module's forward is its own again
    logits.sum().backward()
    torch.testing.assert_close(hidden.grad.float(), head.weight.float().sum(0).expand(5, 8).to(torch.bfloat16).float())
    assert head.weight.grad.dtype == torch.bfloat16
    fp32 = torch.nn.Linear(8, 50)
    assert torch.equal(fp32_logits(fp32, hidden.detach().float()), fp32(hidden.detach().float()))
