"""Per-token log-probabilities of label tokens without the full fp32 log-softmax (raydpo issue 7).

The plain `torch.log_softmax(logits.float(), -1).gather(...)` keeps an fp32 [B, T, V] tensor alive for backward (and
makes another for the upcast of bf16 logits): with a 49k vocabulary, 4 pairs (8 sequences) x 512 tokens that is
~800 MB per copy. Here the forward adds only a [N] fp32 logsumexp of the positions that have a label to what it
keeps (token_logps: the logits the caller already holds; fused_linear_token_logps: hidden states and the head weight,
never the logits), and the backward recomputes the softmax chunk by chunk:
d logp(label) / d logits = onehot(label) - softmax(logits).

Hand-written: Liger's fused linear cross-entropy returns a reduced loss and needs Triton; TRL 1.x's
trl.kernels.ChunkedLogProbFunction (behind trl.trainer.utils.add_fused_lm_head, which patches a model's forward) does
its matmul in the input dtype; here the logits are fp32 per chunk, on any device, as plain functions on tensors.
The tests check both functions against plain log_softmax and against TRL's fused head on a tiny Llama.

Inputs are already aligned: position t of `labels` is the token that position t of `logits` predicts (the caller
shifts by one). Labels equal to IGNORE_INDEX give a log-prob of 0 and no gradient.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def _check_aligned(name: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 2:
        raise ValueError(f"{name}: labels must be [B, T], got shape {tuple(labels.shape)}")
    if scores.shape[:-1] != labels.shape:
        raise ValueError(f"{name}: leading shape {tuple(scores.shape[:-1])} != labels shape {tuple(labels.shape)}")


def _chunks(n: int, chunk_size: int):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Prompt and padding positions carry IGNORE_INDEX; skipping them saves their softmax entirely. (batch, time)
    # indices rather than a flat view: a sliced logits[:, :-1] is not viewable as [B*T, V] without a full copy.
    return (labels != IGNORE_INDEX).nonzero(as_tuple=True)


def _grad_wrt_scores(scores32: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g * (onehot(target) - softmax(scores)) for one chunk of rows, in fp32, in place over exp(scores - lse)."""
    grad = torch.exp(scores32 - lse.unsqueeze(1))
    grad.mul_(-g.unsqueeze(1))
    grad.scatter_add_(1, targets.unsqueeze(1), g.unsqueeze(1))
    return grad


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
        b, t = _labelled_positions(labels)
        targets = labels[b, t]
        lse = torch.empty(targets.numel(), dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for start, end in _chunks(targets.numel(), chunk_size):
            scores32 = logits[b[start:end], t[start:end]].float()
            lse[start:end] = torch.logsumexp(scores32, dim=-1)
            picked[start:end] = scores32.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
        out[b, t] = picked - lse
        # The logits themselves, not a copy: the caller holds them until the loss anyway. The rest is [N]-sized.
        ctx.save_for_backward(logits, b, t, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, b, t, targets, lse = ctx.saved_tensors
        g = grad_out[b, t].float()
        grad_logits = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        for start, end in _chunks(targets.numel(), ctx.chunk_size):
            rows = b[start:end], t[start:end]
            grad = _grad_wrt_scores(logits[rows].float(), lse[start:end], targets[start:end], g[start:end])
            grad_logits[rows] = grad.to(logits.dtype)
        return grad_logits, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[label] per position, fp32 [B, T]; 0 where label == IGNORE_INDEX.

    logits [B, T, V] of any float dtype; labels [B, T] int64. chunk_size bounds the fp32 scratch to chunk x V.
    """
    _check_aligned("token_logps", logits, labels)
    return _TokenLogps.apply(logits, labels, chunk_size)


class _FusedLinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        # One fp32 copy of the head (V x H; none when already fp32) buys fp32 logits; it does not grow with B x T.
        weight32 = weight.float()
        b, t = _labelled_positions(labels)
        targets = labels[b, t]
        lse = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
        picked = torch.empty_like(lse)
        for start, end in _chunks(targets.numel(), chunk_size):
            scores32 = hidden[b[start:end], t[start:end]].float() @ weight32.T
            lse[start:end] = torch.logsumexp(scores32, dim=-1)
            picked[start:end] = scores32.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        out[b, t] = picked - lse
        ctx.save_for_backward(hidden, weight, b, t, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, b, t, targets, lse = ctx.saved_tensors
        weight32 = weight.float()
        g = grad_out[b, t].float()
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
        grad_weight32 = torch.zeros_like(weight32) if want_weight else None  # fp32: bf16 sums over chunks drift
        for start, end in _chunks(targets.numel(), ctx.chunk_size):
            rows = b[start:end], t[start:end]
            hidden32 = hidden[rows].float()
            grad_scores = _grad_wrt_scores(hidden32 @ weight32.T, lse[start:end], targets[start:end], g[start:end])
            if want_hidden:
                grad_hidden[rows] = (grad_scores @ weight32).to(hidden.dtype)
            if want_weight:
                grad_weight32.addmm_(grad_scores.T, hidden32)
        grad_weight = grad_weight32.to(weight.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None


def fused_linear_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] per position, fp32 [B, T], never holding the [B, T, V] logits.

    hidden [B, T, H] (the last hidden state, after the final norm), weight [V, H] (the lm_head / tied embedding).
    Logits are computed in fp32 chunk by chunk; the backward recomputes them and accumulates grad_hidden and
    grad_weight. Not ZeRO-3 aware: forward and backward both read `weight`, which ZeRO-3 partitions outside the
    lm_head module's own forward; there use token_logps on the logits, or TRL's add_fused_lm_head (gathers in both).
    """
    _check_aligned("fused_linear_token_logps", hidden, labels)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    return _FusedLinearTokenLogps.apply(hidden, weight, labels, chunk_size)


def sequence_logps(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token log-probs where loss_mask, number of such tokens) per sequence: ([B], [B] int64)."""
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    mask = loss_mask.bool()
    # where, not multiply: a masked position holding -inf would turn 0 * -inf into NaN.
    total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)
    return total, mask.sum(-1)
