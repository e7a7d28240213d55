"""The replica's engine on the tiny model: a batch of rows answers as each row would alone (left padding, per-row
lengths, mixed adapters), stop strings cut, streamed pieces add up to the answer, a seed repeats its samples."""
from __future__ import annotations

import pytest

from serving.engine import Row, TransformersEngine, group_rows, left_pad
from serving.sources import plan_groups
from tests.serving.runs import build_lora_run


def test_left_pad_puts_padding_before_each_row():
    assert left_pad([[5, 6, 7], [8]], 0) == ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])


def test_rows_group_by_sampling_and_seeded_requests_run_alone():
    rows = [Row([1], 4), Row([2], 4, temperature=0.7), Row([3], 4, adapter="a"), Row([4], 4, temperature=0.7),
            Row([5], 4, temperature=0.7, seed=1, request="r1"), Row([6], 4, temperature=0.7, seed=1, request="r2"),
            Row([7], 4, temperature=0.7, seed=1, request="r1")]
    # greedy rows share a call whatever their adapter; a seed keeps a request's rows to themselves
    assert group_rows(rows) == [[0, 2], [1, 3], [4, 6], [5]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    a = build_lora_run(runs / "run-a", tiny_model_dir, seed=1)
    b = build_lora_run(runs / "run-b", tiny_model_dir, seed=2)
    (group,) = plan_groups([str(a), str(b)])
    return TransformersEngine(group)


def prompt(engine, text):
    return engine.tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False)["input_ids"]


def test_a_mixed_batch_answers_as_each_row_alone(engine):
    rows = [Row(prompt(engine, "hello"), 6, adapter="run-a"),
            Row(prompt(engine, "What is the capital of France?"), 9, adapter="__base__", index=1),
            Row(prompt(engine, "hi"), 4, adapter="run-b", index=2)]
    together = engine.generate(rows)
    alone = [engine.generate([r])[0] for r in rows]
    assert [(c.text, c.tokens, c.finish_reason) for c in together] == [(c.text, c.tokens, c.finish_reason)
                                                                        for c in alone]
    assert [c.index for c in together] == [0, 1, 2]
    assert all(c.tokens <= r.max_new_tokens for c, r in zip(together, rows))
    same = engine.generate([Row(prompt(engine, "hello"), 8, adapter=name) for name in ("run-a", "__base__", "run-b")])
    assert len({c.text for c in same}) == 3  # one prompt, three adapters in one call: three answers


def test_stop_string_cuts_and_streamed_pieces_add_up(engine):
    ids = prompt(engine, "hello")
    full = engine.generate([Row(ids, 12, adapter="run-a")])[0]
    assert full.finish_reason == "length" and full.tokens == 12 and len(full.text) > 4
    stop = full.text[2:4]
    pieces = []
    cut = engine.generate([Row(ids, 12, adapter="run-a", stops=[stop], sink=pieces.append)])[0]
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text
    pieces = []
    again = engine.generate([Row(ids, 12, adapter="run-a", sink=pieces.append)])[0]
    assert len(pieces) > 1 and "".join(pieces) == again.text == full.text


def test_a_seed_repeats_its_samples_whatever_else_is_in_the_batch(engine):
    ids = prompt(engine, "hello")
    mine = [Row(ids, 8, temperature=1.0, seed=7, request="r1", index=i) for i in range(2)]
    alone = [c.text for c in engine.generate(mine)]
    other = Row(prompt(engine, "hi"), 8, temperature=1.0, seed=7, request="r2")
    mixed = [c.text for c in engine.generate([other, *mine])][1:]
    assert mixed == alone and alone[0] != alone[1]


def test_a_failing_call_answers_its_own_rows_with_the_error_and_spares_the_rest(engine):
    good = Row(prompt(engine, "hello"), 4)
    broken = Row([10**6], 4, temperature=1.0, index=1)  # a token id past the vocabulary: the embedding refuses it
    answers = engine.generate([good, broken])
    assert isinstance(answers[1], Exception)
    assert answers[0].text == engine.generate([good])[0].text
