"""gen_qa metrics against the values of the reference implementations (../shared/eval/metric_test_vectors.json)."""
from __future__ import annotations

import json
import math

import pytest

from evaluation import gen_qa


@pytest.fixture(scope="module")
def cases(shared):
    return json.loads((shared / "eval" / "metric_test_vectors.json").read_text(encoding="utf-8"))["cases"]


def test_squad_matches_the_official_script(cases):
    for case in cases:
        gold, pred, want = case["gold"], case["pred"], case["squad_v1_1"]
        assert gen_qa.normalize_answer(gold) == want["normalized_gold"], case
        assert gen_qa.normalize_answer(pred) == want["normalized_pred"], case
        assert gen_qa.squad_exact_match(pred, gold) == float(want["exact_match"]), case
        assert gen_qa.squad_f1(pred, gold) == want["f1_counter"], case


def test_quasi_metrics_match_helm(cases):
    for case in cases:
        gold, pred, want = case["gold"], case["pred"], case["helm_style"]
        assert gen_qa.quasi_exact_match(pred, gold) == want["quasi_exact_match"], case
        assert gen_qa.quasi_f1(pred, gold) == want["f1_set"], case


@pytest.mark.parametrize("stem", [True, False])
def test_rouge_matches_rouge_score_with_its_own_tokeniser(cases, stem):
    key = "rouge_stem" if stem else "rouge_nostem"
    for case in cases:
        got = gen_qa.rouge_f(case["pred"], case["gold"], use_stemmer=stem, cjk_chars=False)
        assert got == {name: case[key][name]["f"] for name in gen_qa.ROUGE_TYPES}, case


@pytest.mark.parametrize("stem", [True, False])
def test_cjk_aware_rouge_changes_nothing_for_text_without_cjk(cases, stem):
    key = "rouge_stem" if stem else "rouge_nostem"
    for case in cases:
        if gen_qa.has_cjk(case["gold"] + case["pred"]):
            continue
        got = gen_qa.rouge_f(case["pred"], case["gold"], use_stemmer=stem, cjk_chars=True)
        assert got == {name: case[key][name]["f"] for name in gen_qa.ROUGE_TYPES}, case


def test_chinese_rouge_counts_characters():
    # 8 characters each, all shared; bigrams: 北京 中国 国的 的首 首都 shared of 7; LCS 中国的首都 = 5 of 8.
    got = gen_qa.rouge_f("中国的首都是北京", "北京是中国的首都")
    assert got["rouge1"] == pytest.approx(1.0)
    assert got["rouge2"] == pytest.approx(5 / 7)
    assert got["rougeL"] == pytest.approx(5 / 8)
    # gold 食管克罗恩病 (6 chars), pred 克罗恩病 (4): R1 P=1 R=4/6 -> 0.8; R2 P=3/3 R=3/5 -> 0.75; LCS 4 -> 0.8.
    got = gen_qa.rouge_f("克罗恩病", "食管克罗恩病")
    assert got == pytest.approx({"rouge1": 0.8, "rouge2": 0.75, "rougeL": 0.8})
    # Mixed text: CJK characters are tokens, the English word stays a word; punctuation (，) is dropped.
    assert gen_qa.CjkAwareTokenizer(False).tokenize("答案是 Paris，对") == ["答", "案", "是", "paris", "对"]
    assert gen_qa.rouge_f("答案是 Paris", "Paris")["rouge1"] == pytest.approx(2 * 0.25 * 1 / 1.25)


def test_sentence_bleu_by_hand():
    # 7 hypothesis tokens against 6: n-gram precisions 6/7, 5/6, 4/5, 3/4 and no brevity penalty.
    got = gen_qa.sentence_bleu("the cat sat on the mat today", ["the cat sat on the mat"])
    assert got == pytest.approx(100 * (3 / 7) ** 0.25)


def test_bleu_tokenises_chinese_by_character():
    assert gen_qa.bleu_tokenizer(["北京"]) == "zh" and gen_qa.bleu_tokenizer(["Paris"]) == "13a"
    # characters: precisions 8/8, 5/7, 3/6, 2/5 (same length, no brevity penalty) -> (1/7) ** (1/4)
    got = gen_qa.sentence_bleu("中国的首都是北京", ["北京是中国的首都"])
    assert got == pytest.approx(100 * (1 / 7) ** 0.25)


def test_corpus_bleu_pools_counts_over_rows():
    preds = ["the cat sat on the mat today", "a b c d"]
    refs = [["the cat sat on the mat"], ["a b c d"]]
    # pooled precisions (6+4)/(7+4), (5+3)/(6+3), (4+2)/(5+2), (3+1)/(4+1); hypothesis longer -> no penalty
    want = 100 * (10 / 11 * 8 / 9 * 6 / 7 * 4 / 5) ** 0.25
    assert gen_qa.corpus_bleu(preds, refs) == pytest.approx(want)
    # not the mean of sentence BLEU (80.9 and 100)
    assert not math.isclose(want, (100 * (3 / 7) ** 0.25 + 100) / 2, rel_tol=1e-3)


def test_corpus_bleu_takes_rows_with_different_numbers_of_references():
    # second row has one reference, first has two: the missing one is None for sacrebleu, not an error
    got = gen_qa.corpus_bleu(["a b c d", "e f g h"], [["x y z w", "a b c d"], ["e f g h"]])
    assert got == pytest.approx(100.0)


def test_best_reference_counts():
    row = gen_qa.score_row("Paris", ["London", "paris."])
    assert row["exact_match"] == 1.0 and row["quasi_exact_match"] == 1.0 and row["f1"] == 1.0
    assert row["rouge1"] == 1.0


def test_score_predictions_means_over_rows():
    rows, agg = gen_qa.score_predictions(["Paris", "New York", ""], ["Paris", "New York City", "Rome"])
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["f1"] for r in rows] == pytest.approx([1.0, 0.8, 0.0])
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["f1"] == pytest.approx(1.8 / 3)
    assert agg["quasi_exact_match"] == pytest.approx(1 / 3)
    assert set(agg) == set(gen_qa.METRICS)
