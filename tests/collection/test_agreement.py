"""Agreement measures, each against a hand-worked example."""
from __future__ import annotations

import pytest

from collection.agreement import cohen_kappa, fleiss_kappa, percent_agreement


def test_percent_agreement_is_the_mean_share_of_agreeing_annotator_pairs():
    # item 1: 1 of 1 pair agrees; item 2: 0 of 1; item 3 (A, A, B): 1 of 3 pairs; the one-label item is left out
    assert percent_agreement([["A", "A"], ["A", "B"], ["A", "A", "B"], ["B"]]) == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert percent_agreement([["A"]]) is None


def test_cohen_kappa_worked_example():
    # 50 items: both yes 20, first yes second no 5, first no second yes 10, both no 15.
    # p_o = 35/50 = 0.7; first says yes 25/50, second 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    first = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["A", "B"], ["A", "B"]) == pytest.approx(1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None


def test_fleiss_kappa_small_worked_example():
    # P_i = 1, 0, 1 -> mean 2/3; A and B are 3 of 6 labels each -> P_e = 0.5; kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert fleiss_kappa([["A", "A"], ["A", "B"], ["B", "B"]]) == pytest.approx(1 / 3)
    assert fleiss_kappa([["A", "A"], ["A", "A"]]) is None
    assert fleiss_kappa([["A"]]) is None


def test_fleiss_kappa_fleiss_1971_table():
    # the classic 10 subjects x 14 raters x 5 categories table (Fleiss 1971; Wikipedia's worked example):
    # P-bar = 0.378, P_e = 0.213, kappa = 0.210
    table = [(0, 0, 0, 0, 14), (0, 2, 6, 4, 2), (0, 0, 3, 5, 6), (0, 3, 9, 2, 0), (2, 2, 8, 1, 1),
             (7, 7, 0, 0, 0), (3, 2, 6, 3, 0), (2, 5, 3, 2, 2), (6, 5, 2, 1, 0), (0, 2, 2, 3, 7)]
    items = [[category for category, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.20993, abs=1e-4)
