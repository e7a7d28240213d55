"""DPO losses on summed sequence log-probs, matching TRL 1.x's DPOTrainer (trl/trainer/dpo_trainer.py, _compute_loss).

TRL computes these inside DPOTrainer._compute_loss, tied to its model call, Accelerate and its metric store, so the
arithmetic is restated here as pure functions; tests/training/test_losses.py runs TRL's own method on the same
batch and checks values and gradients.

Conventions (TRL's): logps are sums over the response tokens; lengths are the response token counts;
delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected); rewards = beta * (policy - ref), detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from training.loss_rules import LENGTH_NORMALISED, LOSS_TYPES, label_smoothing_problem


def _sigmoid(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # eps > 0 is conservative DPO (cDPO, Mitchell 2023): labels flipped with probability eps. TRL 1.x dropped it from
    # "sigmoid" (its sigmoid ignores label_smoothing); this is TRL 0.x's formula, exact for eps = 0 (tested vs TRL).
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def _hinge(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1 - beta * delta)


def _ipo(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # delta is per-token here (see LENGTH_NORMALISED); beta plays IPO's tau.
    return (delta - 1 / (2 * beta)) ** 2


def _robust(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Unbiased under label flips with probability eps (Chowdhury et al. 2024), TRL's form.
    clean = -(1 - eps) * F.logsigmoid(beta * delta)
    flipped = -eps * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * eps)


def _sigmoid_norm(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # TRL's "sigmoid_norm": DPO on per-token-average log-ratios (delta is per-token, see LENGTH_NORMALISED).
    return -F.logsigmoid(beta * delta)


LOSSES = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
    "sigmoid_norm": _sigmoid_norm,
}
assert tuple(LOSSES) == LOSS_TYPES, "one loss per name in training/loss_rules.py"


def loss_config_problems(loss_type: str, beta: float, label_smoothing: float = 0.0, rpo_alpha=None) -> list[str]:
    """Every problem with a loss configuration, for one ConfigError that lists them all."""
    problems = []
    if loss_type not in LOSSES:
        problems.append(f"loss_type {loss_type!r} is not one of {sorted(LOSSES)}")
    if not beta > 0:
        problems.append(f"beta must be > 0, got {beta}")
    smoothing = label_smoothing_problem(loss_type, label_smoothing)
    if smoothing:
        problems.append(f"label_smoothing {smoothing}")
    if rpo_alpha is not None and not rpo_alpha >= 0:
        problems.append(f"rpo_alpha must be >= 0 or null, got {rpo_alpha}")
    return problems


def check_loss_config(loss_type: str, beta: float, label_smoothing: float = 0.0, rpo_alpha=None) -> None:
    problems = loss_config_problems(loss_type, beta, label_smoothing, rpo_alpha)
    if problems:
        raise ConfigError(
            "invalid DPO loss settings (training_config.model.dpo_cfg)",
            why="the loss cannot be computed as configured",
            fix=f"set loss_type to one of {sorted(LOSSES)}, beta > 0, label_smoothing in [0, 0.5) and only with "
            "sigmoid (cDPO) or robust, rpo_alpha >= 0 or null",
            problems=problems,
        )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the chosen / rejected rewards [B] (detached, for logging)."""
    check_loss_config(loss_type, beta, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type in LENGTH_NORMALISED:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    else:
        delta = chosen_logratios - rejected_logratios
    losses = LOSSES[loss_type](delta, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def rpo_term(chosen_token_logps_sum: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The NLL of the chosen responses, averaged over all their tokens in the batch (not per sequence).

    TRL 1.x's "sft" loss (-per_token_logps[chosen_mask].mean()), which with loss_weights [1, rpo_alpha] is what
    TRL 0.x's rpo_alpha added (a token-mean cross-entropy on chosen). max(tokens, 1): an empty batch gives 0, not NaN.
    """
    return -chosen_token_logps_sum.sum() / chosen_lengths.sum().clamp(min=1)


def total_loss(
    losses: torch.Tensor,
    *,
    rpo_alpha: float | None = None,
    chosen_token_logps_sum: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean(losses) + rpo_alpha * rpo_term(...) when rpo_alpha is set: TRL's loss_type [type, "sft"], weights [1, a]."""
    loss = losses.mean()
    if rpo_alpha is None:
        return loss
    if chosen_token_logps_sum is None or chosen_lengths is None:
        raise ValueError("rpo_alpha needs chosen_token_logps_sum and chosen_lengths")
    return loss + rpo_alpha * rpo_term(chosen_token_logps_sum, chosen_lengths)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """The rewards/* numbers TRL logs, as means over the pairs given (gather across workers before, as TRL does)."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }
