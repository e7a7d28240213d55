"""DPO losses against TRL 1.x's own DPOTrainer._compute_loss (values, gradients, logged rewards) and by hand."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from core.logprobs import sequence_logps
from training.losses import (
    LOSSES,
    check_loss_config,
    dpo_loss,
    reward_metrics,
    rpo_term,
    total_loss,
)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is the reference implementation")

PAIRS, SEQ = 4, 12


class _StubModel:
    """Stands in for the policy: TRL's fused LM head returns per-token log-probs; we hand it ours."""

    training = True

    def __init__(self, per_token_logps):
        zeros = torch.zeros_like(per_token_logps)
        self.outputs = SimpleNamespace(
            log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )

    def __call__(self, **kwargs):
        return self.outputs


def trl_compute_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, *, loss_types, loss_weights, beta,
                     label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss, unchanged, bound to the fields it reads; the batch is [chosen; rejected]."""
    model = _StubModel(per_token_logps)
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=per_token_logps.device, gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        precompute_ref_logps=True,  # so the reference log-probs come from the batch, no second model
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def random_batch(seed):
    """Per-token log-probs [2B, SEQ-1] (aligned with the shifted completion mask, 0 elsewhere, as TRL's head gives)."""
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * PAIRS, SEQ, dtype=torch.long)
    for row in range(2 * PAIRS):
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        response = int(torch.randint(1, SEQ - prompt + 1, (1,), generator=gen))  # varied lengths: IPO notices
        completion_mask[row, prompt : prompt + response] = 1
    shift_mask = completion_mask[:, 1:]
    per_token = -torch.rand(2 * PAIRS, SEQ - 1, generator=gen) * 3 * shift_mask
    ref = per_token.sum(1) + torch.randn(2 * PAIRS, generator=gen) * 2  # a reference that disagrees, both ways
    return per_token, completion_mask, ref[:PAIRS], ref[PAIRS:]


def ours(per_token, completion_mask, ref_chosen, ref_rejected, *, loss_type, beta, label_smoothing=0.0,
         rpo_alpha=None):
    logps, lengths = sequence_logps(per_token, completion_mask[:, 1:])
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
        chosen_lengths=chosen_len, rejected_lengths=rejected_len,
    )
    loss = total_loss(losses, rpo_alpha=rpo_alpha, chosen_token_logps_sum=chosen, chosen_lengths=chosen_len)
    return loss, losses, reward_metrics(chosen_rewards, rejected_rewards)


def assert_same_response_grads(ours_grad, trl_grad, completion_mask):
    """On response tokens, d loss / d token log-prob = d loss / d its sequence's summed log-prob, in both.

    Elsewhere TRL sums the zeros its head returns (a gradient that goes nowhere in TRL); sequence_logps masks them.
    """
    response = completion_mask[:, 1:].bool()
    assert ours_grad[response].abs().sum() > 0
    torch.testing.assert_close(ours_grad[response], trl_grad[response])
    assert torch.all(ours_grad[~response] == 0)


CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 0.5, 0.0),
    ("hinge", 0.1, 0.0),
    ("hinge", 2.0, 0.0),  # large beta: some pairs past the hinge, zero gradient there
    ("robust", 0.1, 0.0),
    ("robust", 0.1, 0.2),
    ("sigmoid_norm", 0.1, 0.0),
    ("sigmoid_norm", 2.0, 0.0),
]


def test_every_loss_type_is_checked_against_trl():
    assert {case[0] for case in CASES} == set(LOSSES)


@pytest.mark.parametrize("loss_type,beta,label_smoothing", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_value_gradient_and_rewards(loss_type, beta, label_smoothing, seed):
    per_token, completion_mask, ref_chosen, ref_rejected = random_batch(seed)
    trl_in = per_token.clone().requires_grad_()
    our_in = per_token.clone().requires_grad_()
    trl_loss, trl_metrics = trl_compute_loss(
        trl_in, completion_mask, ref_chosen, ref_rejected, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing,
    )
    loss, losses, metrics = ours(
        our_in, completion_mask, ref_chosen, ref_rejected, loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing,
    )
    torch.testing.assert_close(loss, trl_loss)
    trl_loss.backward()
    loss.backward()
    assert_same_response_grads(our_in.grad, trl_in.grad, completion_mask)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-7), key

    # Per pair too: TRL on a batch of one pair gives losses[i].
    for i in range(PAIRS):
        rows = [i, PAIRS + i]
        one, _ = trl_compute_loss(
            per_token[rows], completion_mask[rows], ref_chosen[i : i + 1], ref_rejected[i : i + 1],
            loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        )
        torch.testing.assert_close(losses[i].detach(), one)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5, 1.0])
def test_rpo_alpha_matches_trl_sft_term(loss_type, rpo_alpha):
    # TRL 1.x has no rpo_alpha field; the same objective is loss_type [type, "sft"] with loss_weights [1, rpo_alpha].
    per_token, completion_mask, ref_chosen, ref_rejected = random_batch(7)
    trl_in = per_token.clone().requires_grad_()
    our_in = per_token.clone().requires_grad_()
    trl_loss, _ = trl_compute_loss(
        trl_in, completion_mask, ref_chosen, ref_rejected, loss_types=[loss_type, "sft"],
        loss_weights=[1.0, rpo_alpha], beta=0.1,
    )
    loss, _, _ = ours(our_in, completion_mask, ref_chosen, ref_rejected, loss_type=loss_type, beta=0.1,
                      rpo_alpha=rpo_alpha)
    torch.testing.assert_close(loss, trl_loss)
    trl_loss.backward()
    loss.backward()
    assert_same_response_grads(our_in.grad, trl_in.grad, completion_mask)


def test_sigmoid_by_hand_two_pairs():
    # beta = 0.5.
    # pair 0: policy chosen -4, rejected -6; reference chosen -5, rejected -5.
    #   chosen log-ratio = -4 - -5 = 1, rejected = -6 - -5 = -1, delta = 2, beta*delta = 1
    #   loss = -log sigmoid(1) = log(1 + e^-1) = log(1.367879) = 0.313262
    #   rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5
    #   d loss / d policy_chosen = -beta * sigmoid(-1) = -0.5 * 0.268941 = -0.134471; rejected: +0.134471
    # pair 1: policy chosen -3, rejected -2; reference chosen -2, rejected -3.
    #   chosen log-ratio = -1, rejected = 1, delta = -2, beta*delta = -1
    #   loss = log(1 + e^1) = log(3.718282) = 1.313262
    #   rewards: chosen -0.5, rejected 0.5
    #   d loss / d policy_chosen = -0.5 * sigmoid(1) = -0.5 * 0.731059 = -0.365529; rejected: +0.365529
    # mean loss = (0.313262 + 1.313262) / 2 = 0.813262; gradients of the mean are halved.
    # metrics: rewards/chosen (0.5 - 0.5)/2 = 0, rejected 0, accuracies (1 + 0)/2 = 0.5, margins (1 + -1)/2 = 0.
    chosen = torch.tensor([-4.0, -3.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -2.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, torch.tensor([-5.0, -2.0]), torch.tensor([-5.0, -3.0]), loss_type="sigmoid", beta=0.5
    )
    torch.testing.assert_close(losses, torch.tensor([0.313262, 1.313262]), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.5]))
    total_loss(losses).backward()
    torch.testing.assert_close(total_loss(losses.detach()), torch.tensor(0.813262), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.134471, -0.365529]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected.grad, torch.tensor([0.134471, 0.365529]) / 2, rtol=0, atol=1e-6)
    assert reward_metrics(chosen_rewards, rejected_rewards) == pytest.approx(
        {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.5, "rewards/margins": 0.0}
    )


def test_tied_rewards_are_not_accurate():
    # TRL counts chosen > rejected strictly: a tie is a miss.
    tied = torch.tensor([0.3, -0.2])
    assert reward_metrics(tied, tied)["rewards/accuracies"] == 0.0
    assert reward_metrics(tied, torch.tensor([0.3, -0.4]))["rewards/accuracies"] == 0.5


def test_cdpo_label_smoothing_by_hand():
    # TRL 1.x's sigmoid ignores label_smoothing, so cDPO is checked by hand (TRL 0.x's formula):
    # beta*delta = 1, eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    losses, _, _ = dpo_loss(
        torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0]),
        loss_type="sigmoid", beta=0.5, label_smoothing=0.1,
    )
    torch.testing.assert_close(losses, torch.tensor([0.413262]), rtol=0, atol=1e-6)


def test_ipo_and_sigmoid_norm_by_hand():
    # chosen log-ratio 2 over 4 tokens = 0.5 per token; rejected log-ratio -3 over 2 tokens = -1.5; delta = 2.
    # ipo, beta 0.25: (2 - 1 / 0.5)^2 = 0. sigmoid_norm, beta 0.5: log(1 + e^-1) = 0.313262.
    args = (torch.tensor([-8.0]), torch.tensor([-7.0]), torch.tensor([-10.0]), torch.tensor([-4.0]))
    lengths = dict(chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    ipo, _, _ = dpo_loss(*args, loss_type="ipo", beta=0.25, **lengths)
    norm, _, _ = dpo_loss(*args, loss_type="sigmoid_norm", beta=0.5, **lengths)
    torch.testing.assert_close(ipo, torch.tensor([0.0]))
    torch.testing.assert_close(norm, torch.tensor([0.313262]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*args, loss_type="ipo", beta=0.25)


def test_rpo_term_by_hand():
    # chosen sums -6 over 3 tokens and -2 over 1 token: token mean NLL = 8 / 4 = 2 (a per-sequence mean would be 2.0
    # too here, so a second case: -6 over 3 and -1 over 1 gives 7 / 4 = 1.75, per-sequence would be 1.5).
    assert rpo_term(torch.tensor([-6.0, -1.0]), torch.tensor([3, 1])).item() == pytest.approx(1.75)
    losses = torch.tensor([1.0, 3.0])
    assert total_loss(losses, rpo_alpha=0.5, chosen_token_logps_sum=torch.tensor([-6.0, -1.0]),
                      chosen_lengths=torch.tensor([3, 1])).item() == pytest.approx(2.0 + 0.5 * 1.75)
    assert total_loss(losses).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="rpo_alpha needs"):
        total_loss(losses, rpo_alpha=1.0)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(loss_type="dpo", beta=0.1), "is not one of"),
        (dict(loss_type="sigmoid", beta=0.0), "beta must be > 0"),
        (dict(loss_type="robust", beta=0.1, label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(loss_type="ipo", beta=0.1, label_smoothing=0.1), "loss_type 'ipo' has no label smoothing"),
        (dict(loss_type="hinge", beta=0.1, rpo_alpha=-1.0), "rpo_alpha must be"),
    ],
)
def test_bad_settings_raise_config_error(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_loss_config(**settings)
    assert info.value.fix


def test_dpo_loss_refuses_unknown_loss_type():
    one = torch.tensor([-1.0])
    with pytest.raises(ConfigError) as info:
        dpo_loss(one, one, one, one, loss_type="kto", beta=0.1, label_smoothing=0.7)
    assert len(info.value.problems) == 1 and "kto" in info.value.problems[0]


def test_hand_numbers_are_what_the_comments_say():
    # The constants above, recomputed: log(1 + e^-1), log(1 + e^1), sigmoid(-1), sigmoid(1).
    assert math.log1p(math.exp(-1)) == pytest.approx(0.313262, abs=1e-6)
    assert math.log1p(math.exp(1)) == pytest.approx(1.313262, abs=1e-6)
    assert 1 / (1 + math.e) == pytest.approx(0.268941, abs=1e-6)
    assert 1 / (1 + math.exp(-1)) == pytest.approx(0.731059, abs=1e-6)
