"""Chunked per-token log-probs equal the plain log_softmax + gather, values and gradients, and save far less."""
from __future__ import annotations

import math

import pytest
import torch

from core.logprobs import IGNORE_INDEX, fused_linear_token_logps, sequence_logps, token_logps

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def plain_token_logps(logits, labels):
    """The reference: what TRL and everybody else do (one fp32 [B, T, V] log-softmax)."""
    safe = labels.clamp(min=0)
    logps = torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(logps), logps)


def random_labels(gen, batch, seq, vocab, ignore_prefix=3):
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :ignore_prefix] = IGNORE_INDEX  # the prompt
    labels[0, -2:] = IGNORE_INDEX  # padding of a shorter sequence
    return labels


def test_token_logps_hand_worked():
    # logits [0, ln 2, ln 3]: softmax = [1, 2, 3] / 6, so logp(label 2) = ln(3/6) = ln 0.5.
    # d logp / d logits = onehot - softmax = [-1/6, -2/6, 1 - 3/6]; an ignored position gives 0 and no gradient.
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)], [5.0, 1.0, 2.0]]], requires_grad=True)
    labels = torch.tensor([[2, IGNORE_INDEX]])
    out = token_logps(logits, labels, chunk_size=1)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), 0.0]]))
    out.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[-1 / 6, -2 / 6, 0.5], [0.0, 0.0, 0.0]]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_token_logps_matches_plain(dtype, chunk_size):
    gen = torch.Generator().manual_seed(0)
    batch, seq, vocab = 3, 19, 53  # 7 divides neither T nor B*T
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 3).to(dtype)
    labels = random_labels(gen, batch, seq, vocab)
    weights = torch.randn(batch, seq, generator=gen)  # a non-uniform upstream gradient

    mine_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    mine = token_logps(mine_in, labels, chunk_size=chunk_size)
    ref = plain_token_logps(ref_in, labels)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, **TOL[torch.float32])
    (mine * weights).sum().backward()
    (ref * weights).sum().backward()
    assert mine_in.grad.dtype == dtype
    torch.testing.assert_close(mine_in.grad, ref_in.grad, **TOL[dtype])
    ignored = labels == IGNORE_INDEX
    assert torch.all(mine[ignored] == 0) and torch.all(mine_in.grad[ignored] == 0)


def plain_fused(hidden, weight, labels):
    # fp32 logits from the (possibly bf16) inputs: what the fused function promises to compute.
    return plain_token_logps(hidden.float() @ weight.float().T, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 5, 256])
def test_fused_linear_token_logps_matches_plain(dtype, chunk_size):
    gen = torch.Generator().manual_seed(1)
    batch, seq, hid, vocab = 2, 13, 16, 41
    hidden = torch.randn(batch, seq, hid, generator=gen).to(dtype)
    weight = torch.randn(vocab, hid, generator=gen).to(dtype)
    labels = random_labels(gen, batch, seq, vocab)
    weights = torch.randn(batch, seq, generator=gen)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    mine = fused_linear_token_logps(h1, w1, labels, chunk_size=chunk_size)
    ref = plain_fused(h2, w2, labels)
    torch.testing.assert_close(mine, ref, **TOL[torch.float32])
    (mine * weights).sum().backward()
    (ref * weights).sum().backward()
    assert h1.grad.dtype == dtype and w1.grad.dtype == dtype
    torch.testing.assert_close(h1.grad, h2.grad, **TOL[dtype])
    torch.testing.assert_close(w1.grad, w2.grad, **TOL[dtype])


def test_fused_linear_weight_only_gradient():
    # A frozen trunk (hidden without grad) still gets the head's gradient, and no hidden gradient is built.
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=gen)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = random_labels(gen, 2, 6, 11, ignore_prefix=1)
    fused_linear_token_logps(hidden, weight, labels, chunk_size=4).sum().backward()
    ref_weight = weight.detach().clone().requires_grad_()
    plain_fused(hidden, ref_weight, labels).sum().backward()
    torch.testing.assert_close(weight.grad, ref_weight.grad)


def test_all_ignored_gives_zeros_and_zero_grad():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    out = token_logps(logits, labels)
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_shape_mismatch_and_bad_chunk_are_refused():
    with pytest.raises(ValueError, match="labels shape"):
        token_logps(torch.randn(2, 4, 9), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_token_logps(torch.randn(2, 4, 8), torch.randn(9, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), chunk_size=0)


def test_sequence_logps_hand_worked():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), -4.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])
    total, count = sequence_logps(logps, mask)
    # row 0: -2 + -3 = -5 over 2 tokens; row 1: -0.5 + -4 = -4.5 (the masked -inf must not leak in as NaN)
    torch.testing.assert_close(total, torch.tensor([-5.0, -4.5]))
    assert count.tolist() == [2, 2]
    total.sum().backward()
    torch.testing.assert_close(logps.grad, mask.float())


def fresh_saved_bytes(fn, *inputs):
    """Bytes saved for backward by fn(*inputs), not counting the inputs themselves (they are alive anyway)."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_saves_far_less_than_plain(dtype):
    batch, seq, hid, vocab = 1, 512, 32, 4096
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    logits = torch.randn(batch, seq, vocab, generator=gen).to(dtype).requires_grad_()
    plain = fresh_saved_bytes(plain_token_logps, logits, labels)
    chunked = fresh_saved_bytes(lambda x, y: token_logps(x, y, chunk_size=64), logits, labels)
    assert plain >= batch * seq * vocab * 4  # the fp32 log-softmax of every position
    assert chunked < plain / 4, (chunked, plain)

    hidden = torch.randn(batch, seq, hid, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hid, generator=gen).to(dtype).requires_grad_()
    plain = fresh_saved_bytes(lambda h, w, y: plain_token_logps(h @ w.T, y), hidden, weight, labels)
    fused = fresh_saved_bytes(lambda h, w, y: fused_linear_token_logps(h, w, y, chunk_size=64), hidden, weight, labels)
    assert plain >= batch * seq * vocab * 4
    assert fused < plain / 4, (fused, plain)


def tiny_llama(vocab=64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_matches_trl_fused_head_on_a_tiny_llama():
    # TRL's own per-token log-probs (what DPOTrainer sums): labels are input_ids with the prompt masked, and
    # position t of its output scores token t + 1. Ours get the same numbers from logits[:, :-1] vs labels[:, 1:].
    add_fused_lm_head = pytest.importorskip("trl.trainer.utils").add_fused_lm_head
    model = tiny_llama()
    gen = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 64, (3, 10), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[2, 8:] = IGNORE_INDEX

    hidden = model.model(input_ids=input_ids).last_hidden_state
    weight = model.lm_head.weight
    mine = token_logps(model.lm_head(hidden)[:, :-1], labels[:, 1:], chunk_size=5)
    mine_fused = fused_linear_token_logps(hidden[:, :-1], weight, labels[:, 1:], chunk_size=5)
    mine_fused.sum().backward()
    mine_weight_grad = weight.grad.clone()

    model.zero_grad()
    add_fused_lm_head(model)
    trl = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    trl.sum().backward()
    torch.testing.assert_close(mine, trl)
    torch.testing.assert_close(mine_fused, trl)
    torch.testing.assert_close(mine_weight_grad, weight.grad)
