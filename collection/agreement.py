"""Agreement between annotators: percent agreement, Cohen's kappa (two annotators), Fleiss' kappa (any number).

Hand-written because they are a few lines each and the libraries that have them (scikit-learn, statsmodels) are not
raydpo dependencies. Labels are any hashable values; an item is the list of labels its annotators gave.
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations


def percent_agreement(items: list[list]) -> float | None:
    """Mean over items (with at least two labels) of the share of annotator pairs that agree; None if no such item."""
    shares = []
    for labels in items:
        if len(labels) < 2:
            continue
        pairs = list(combinations(labels, 2))
        shares.append(sum(a == b for a, b in pairs) / len(pairs))
    return sum(shares) / len(shares) if shares else None


def cohen_kappa(first: list, second: list) -> float | None:
    """Cohen's kappa of two annotators' labels on the same items: (p_o - p_e) / (1 - p_e).

    None when undefined: no items, or chance agreement is already 1 (both always gave the same one label).
    """
    assert len(first) == len(second), "the same items for both annotators"
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(items: list[list]) -> float | None:
    """Fleiss' kappa over items with at least two labels each (the number of annotators may differ per item:
    each item's agreement is over its own annotator pairs, category shares over all labels).

    None when undefined: no such item, or every label is the same category.
    """
    rated = [Counter(labels) for labels in items if len(labels) >= 2]
    if not rated:
        return None
    per_item = [sum(c * (c - 1) for c in counts.values()) / (sum(counts.values()) * (sum(counts.values()) - 1))
                for counts in rated]
    observed = sum(per_item) / len(per_item)
    totals = sum(rated, Counter())
    labels = sum(totals.values())
    expected = sum((c / labels) ** 2 for c in totals.values())
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)
