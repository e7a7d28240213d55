"""benchmarks/padding.py's computed / unique real tokens, against hand-counted layouts."""
from __future__ import annotations

from benchmarks.padding import measure


def pair(prompt: int, chosen: int, rejected: int) -> dict:
    return {"prompt_ids": list(range(1, prompt + 1)), "chosen_ids": [7] * chosen, "rejected_ids": [8] * rejected}


def test_computed_per_unique_token_by_hand():
    # widths 3 and 5; unique tokens 4 + 6 = 10
    rows = [pair(2, 1, 1), pair(2, 1, 3)]
    got = measure(rows, micro_batch=2, buffer=10, seed=1, layout="padded", pad_id=0)
    assert got["raydpo"] == 2 * 2 * 5 / 10            # one batch: 2 rows per pair x 2 pairs x the widest, 5
    assert got["one_pair_per_forward"] == (2 * 3 + 2 * 5) / 10
    assert got["padded_rows_in_data_order"] == 2.0
    # the prompt shared: one row per pair, prompt + chosen + rejected (+ the copied last prompt token) wide
    shared = measure(rows, micro_batch=1, buffer=10, seed=1, layout="shared", pad_id=0)
    assert shared["raydpo"] == shared["one_pair_per_forward"] == (5 + 7) / 10


def test_length_grouping_pairs_similar_widths():
    rows = [pair(2, 1, 1), pair(9, 1, 1), pair(2, 1, 1), pair(9, 1, 1)]  # widths 3, 10, 3, 10 in data order
    got = measure(rows, micro_batch=2, buffer=10, seed=3, layout="padded", pad_id=0)
    unique = 2 * 4 + 2 * 11
    assert got["raydpo"] == (2 * 2 * 3 + 2 * 2 * 10) / unique  # the two narrow pairs together, the wide ones too
    assert got["padded_rows_in_data_order"] == 2 * (2 * 2 * 10) / unique
