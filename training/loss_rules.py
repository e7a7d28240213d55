"""The DPO loss names and their label-smoothing rules: one table, read by the recipe checks and by the losses.

Kept apart from training/losses.py because it imports no torch: `raydpo validate` checks recipes with it.
"""
from __future__ import annotations

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
# TRL divides each log-ratio by its own response length (clamped to >= 1) for these, before the difference.
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm"})
# label_smoothing's meaning per loss type, as a half-open range [0, limit): sigmoid's is cDPO's flip probability,
# robust divides by 1 - 2 x label_smoothing. TRL ignores it silently for the others; here it is an error.
LABEL_SMOOTHING_LIMIT = {"sigmoid": 0.5, "robust": 0.5}
LABEL_SMOOTHING_MAX = max(LABEL_SMOOTHING_LIMIT.values())


def label_smoothing_problem(loss_type: str, label_smoothing: float) -> str | None:
    """What is wrong with label_smoothing for this loss type, or None."""
    limit = LABEL_SMOOTHING_LIMIT.get(loss_type)
    if limit is None:
        if label_smoothing == 0 or loss_type not in LOSS_TYPES:
            return None
        return (f"{label_smoothing:g} would be ignored: loss_type {loss_type!r} has no label smoothing; allowed: 0 "
                f"(label smoothing applies to {' and '.join(LABEL_SMOOTHING_LIMIT)})")
    if not 0 <= label_smoothing < limit:
        return f"{label_smoothing:g} is not allowed with loss_type {loss_type!r}; allowed: [0, {limit:g})"
    return None
