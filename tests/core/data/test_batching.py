"""Length-aware batching (core/data/pipeline.py): grouping by width within a buffer, on each worker's shard."""
from __future__ import annotations

import random

import numpy as np
import pytest

from core.data.pipeline import (as_columns, grouped_micro_batches, length_grouped, length_groups, padding_waste,
                                    pair_width)


def row(prompt: int, chosen: int, rejected: int, tag: int = 0) -> dict:
    return {"prompt_ids": [1] * prompt, "chosen_ids": [2] * chosen, "rejected_ids": [3] * rejected,
            "source": f"f:{tag}"}


def test_pair_width_is_the_longer_sequence():
    assert pair_width(row(3, 5, 2)) == 8
    assert pair_width(row(0, 1, 4)) == 4


def test_length_groups_without_shuffling_hand_worked():
    # widths by index: 0:5 1:1 2:3 3:2 4:4 5:6 6:9 -> one spare (the last arrival), the rest sorted and cut in twos
    groups, rest = length_groups([5, 1, 3, 2, 4, 6, 9], 2, rng=None)
    assert groups == [[1, 3], [2, 4], [0, 5]]
    assert rest == [6]


def test_length_groups_with_shuffling_covers_every_row_once_and_is_seeded():
    widths = [random.Random(0).randint(1, 500) for _ in range(103)]
    groups, rest = length_groups(widths, 4, random.Random(7))
    assert len(rest) == 103 % 4 and all(len(g) == 4 for g in groups)
    assert sorted([i for g in groups for i in g] + rest) == list(range(103))
    # each group spans a narrow band: sorted groups do not overlap in width
    bands = sorted((min(widths[i] for i in g), max(widths[i] for i in g)) for g in groups)
    assert all(low_next >= high for (_, high), (low_next, _) in zip(bands, bands[1:]))
    assert length_groups(widths, 4, random.Random(7)) == (groups, rest)  # a resumed run sees the same batches
    assert length_groups(widths, 4, random.Random(8))[0] != groups  # another epoch, another order


def test_length_grouped_carries_the_remainder_and_drops_only_the_last():
    rows = [row(1, w, 1, tag=i) for i, w in enumerate([7, 1, 6, 2, 5, 3, 4])]
    # buffer 4: [7,1,6,2] -> groups (1,2),(6,7); the end [5,3,4] -> (3,5); 4, the last arrival, is dropped
    groups = list(length_grouped(rows, 2, 4, rng=None))
    assert [[len(r["chosen_ids"]) for r in g] for g in groups] == [[1, 2], [6, 7], [3, 5]]


def test_equal_shards_give_equal_micro_batch_counts():
    rng = random.Random(3)
    shards = [[row(rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 50)) for _ in range(37)] for _ in range(3)]
    counts = [len(list(length_grouped(s, 4, 10, random.Random(1)))) for s in shards]
    assert counts == [37 // 4] * 3


def test_padding_waste_hand_worked():
    # one batch of two pairs: widths 8 and 4 -> 4 rows x 8 computed; real: (3+5)+(3+2)+(1+3)+(1+2) = 20
    assert padding_waste([[row(3, 5, 2), row(1, 3, 2)]]) == pytest.approx(32 / 20)


class FakeShard:
    """What a Ray Train worker's get_dataset_shard returns, as far as grouped_micro_batches uses it."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        assert batch_format == "numpy"
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start:start + batch_size]
            yield {k: np.array([np.array(r[k]) if k != "source" else r[k] for r in chunk], dtype=object)
                   for k in chunk[0]}


def test_grouped_micro_batches_collate_columns_in_a_fixed_order():
    rng = random.Random(5)
    rows = [row(rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30), tag=i) for i in range(600)]
    first = [b["source"] for b in grouped_micro_batches(FakeShard(rows), micro_batch=4, buffer_size=100, seed=11,
                                                         collate=lambda cols: cols)]
    again = [b["source"] for b in grouped_micro_batches(FakeShard(rows), micro_batch=4, buffer_size=100, seed=11,
                                                         collate=lambda cols: cols)]
    assert first == again and len(first) == 150
    assert sorted(s for b in first for s in b) == sorted(r["source"] for r in rows)


def test_grouping_cuts_padding_on_hh_harmless(shared, tiny_model_dir):
    """Real prompt and response lengths: random micro-batches of 4 pairs waste far more than grouped ones."""
    from core.data.formats import parse_line
    from core.data.raw_rows import iter_raw_rows
    from core.data.tokenize import tokenize_record
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows, detected = [], {}
    for text, source in iter_raw_rows(str(shared / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz")):
        record, error = parse_line(text, source, "auto", None, detected)
        if not error:
            rows.append(tokenize_record(record, tokenizer, max_length=512))
        if len(rows) == 1200:
            break
    random.Random(0).shuffle(rows)
    plain = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    grouped = list(length_grouped(rows, 4, 1000, random.Random(0)))
    assert padding_waste(plain) > 1.5
    assert padding_waste(grouped) < 1.15
    assert sorted(id(r) for g in grouped for r in g) == sorted(id(r) for r in rows)  # 1200 = 300 x 4: none dropped


def test_as_columns():
    assert as_columns([{"a": 1, "b": 2}, {"a": 3, "b": 4}]) == {"a": [1, 3], "b": [2, 4]}
