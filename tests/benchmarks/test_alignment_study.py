"""The alignment study's arithmetic and table, on hand-made evaluation results (no training here)."""
from __future__ import annotations

import pytest

from benchmarks import alignment_study as study


def results(metrics_by_label: dict) -> dict:
    return {"models": {label: {"metrics": m, "n": 3} for label, m in metrics_by_label.items()}}


PREFERENCE = results({"base": {"ranking_accuracy": 0.6, "ranking_accuracy_per_token": 0.5},
                      "tuned": {"ranking_accuracy": 0.8, "ranking_accuracy_per_token": 0.75}})
GEN_QA = results({"base": {"f1": 0.10, "quasi_f1": 0.2, "rouge1": 0.2, "rouge2": 0.05, "rougeL": 0.2, "bleu": 2.0},
                  "tuned": {"f1": 0.14, "quasi_f1": 0.3, "rouge1": 0.25, "rouge2": 0.0, "rougeL": 0.3, "bleu": 3.0}})
ROWS = [{"base": {"prediction": "Sure, the weather is nice."}, "tuned": {"prediction": '<TOOLCALL>[{"name": "w"}]'}},
        {"base": {"prediction": "Which city?"}, "tuned": {"prediction": "Which city?"}},
        {"base": {"prediction": "<TOOLCALL>[]</TOOLCALL>"}, "tuned": {"prediction": "I cannot help."}},
        {"base": {"prediction": "x"}, "tuned": {"prediction": "<TOOLCALL>[{}]</TOOLCALL>"}}]


def test_relative_change():
    assert study.relative_change(0.10, 0.14) == pytest.approx(0.4)
    assert study.relative_change(-2.0, -1.0) == pytest.approx(0.5)  # |base|: less negative reads as better
    assert study.relative_change(0.0, 0.3) is None
    assert study.relative_change(None, 0.3) is None


def test_tool_call_rates_overall_and_by_behaviour():
    assert study.tool_call_rate([r["tuned"]["prediction"] for r in ROWS]) == 0.5
    assert study.tool_call_rate([]) == 0.0
    behaviours = ["tool_call", "request_for_info", "cannot_answer", "tool_call"]
    assert study.rates_by_behaviour(ROWS, behaviours, "tuned") == \
        {"cannot_answer": 0.0, "request_for_info": 0.0, "tool_call": 1.0}
    assert study.rates_by_behaviour(ROWS, behaviours, "base") == \
        {"cannot_answer": 1.0, "request_for_info": 0.0, "tool_call": 0.0}


def test_study_metrics_and_targets():
    metrics = study.study_metrics(PREFERENCE, GEN_QA, ROWS)
    assert metrics["base"] == {"ranking_accuracy": 0.6, "ranking_accuracy_per_token": 0.5, "f1": 0.10,
                               "quasi_f1": 0.2, "rouge1": 0.2, "rouge2": 0.05, "rougeL": 0.2, "bleu": 2.0,
                               "tool_call_rate": 0.25}
    out = study.comparison(metrics)
    # ranking gain 0.8 - 0.6 = 0.2 >= 0.15; F1 (0.14 - 0.10) / 0.10 = +40% >= +30%
    assert out["targets"]["ranking_accuracy_gain"] == pytest.approx(0.2)
    assert out["targets"]["ranking_accuracy_met"] and out["targets"]["f1_met"]
    assert out["targets"]["f1_relative_change"] == pytest.approx(0.4)
    assert out["relative_change"]["rouge2"] == pytest.approx(-1.0)
    assert out["absolute_change"]["tool_call_rate"] == pytest.approx(0.25)
    missed = study.targets({"ranking_accuracy": 0.6, "f1": 0.10}, {"ranking_accuracy": 0.7, "f1": 0.12})
    assert not missed["ranking_accuracy_met"] and not missed["f1_met"]  # +0.10 and +20%


def test_the_targets_hold_exactly_at_the_threshold():
    exact = study.targets({"ranking_accuracy": 0.6, "f1": 0.10}, {"ranking_accuracy": 0.75, "f1": 0.13})
    assert exact["ranking_accuracy_met"] and exact["f1_met"]


def test_table_shows_percentages_and_changes():
    metrics = study.study_metrics(PREFERENCE, GEN_QA, ROWS)
    rows = study.table_rows({**metrics, **study.comparison(metrics)})
    assert rows[0] == ["metric", "base", "tuned", "change"]
    by_name = {r[0]: r[1:] for r in rows[1:]}
    assert by_name["ranking_accuracy"] == ["0.600", "0.800", "+0.200 (+33.3%)"]
    assert by_name["f1 (x100)"] == ["10.0", "14.0", "+40.0%"]
    assert by_name["bleu"] == ["2.000", "3.000", "+50.0%"]
    assert by_name["tool_call_rate"] == ["0.250", "0.500", "+0.250 (+100.0%)"]
    assert study.markdown_table(rows).splitlines()[1] == "|---|---|---|---|"


def test_hh_rows_have_no_tool_call_rate_and_every_tenth_line_is_held_out():
    metrics = study.study_metrics(PREFERENCE, GEN_QA, ROWS, tool_calls=False)
    assert metrics["tuned"]["tool_call_rate"] is None
    rows = study.table_rows({**metrics, **study.comparison(metrics)})
    assert rows[-1] == ["tool_call_rate", "-", "-", "-"]
    assert [line for line in range(1, 31) if study.is_hh_heldout(line)] == [10, 20, 30]


def test_prepare_hh_splits_by_line(tmp_path):
    import gzip
    import json

    source = tmp_path / "hh.jsonl.gz"
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"}
            for i in range(1, 23)]
    with gzip.open(source, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    summary = study.prepare_hh(source, tmp_path / "data")
    assert summary["rows"] == {"train": 20, "heldout": 2}
    held = [json.loads(line) for line in (tmp_path / "data" / "heldout" / "pairs.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in held] == [rows[9]["chosen"], rows[19]["chosen"]]


def test_ranking_by_pair_kind_counts_base_tuned_and_implicit_reward():
    pairs = [{"chosen_category": "tool_call", "rejected_category": "direct"},
             {"chosen_category": "cannot_answer", "rejected_category": "tool_call"},
             {"chosen_category": "tool_call", "rejected_category": "direct"}]

    def row(line, base, tuned, ref):  # (chosen, rejected) log-probs of each model
        return {"source": f"held/pairs.jsonl:{line}",
                "base": {"logp_chosen": base[0], "logp_rejected": base[1]},
                "tuned": {"logp_chosen": tuned[0], "logp_rejected": tuned[1], "ref_logp_chosen": ref[0],
                          "ref_logp_rejected": ref[1]}}

    rows = [row(3, (-5, -9), (-6, -4), (-5, -9)),    # base right; tuned wrong; reward -1 vs +5: wrong
            row(1, (-9, -5), (-7, -6), (-9, -5)),    # base wrong; tuned wrong; reward +2 vs -1: right
            row(2, (-20, -10), (-15, -14), (-20, -10))]  # tool call rejected: base wrong, tuned wrong, reward right
    got = study.ranking_by_pair_kind(pairs, rows)
    assert got == {"cannot_answer>tool_call": {"pairs": 1, "base": 0.0, "tuned": 0.0, "tuned_reward": 1.0},
                   "tool_call>direct": {"pairs": 2, "base": 0.5, "tuned": 0.0, "tuned_reward": 0.5}}


def test_pair_groups_weigh_each_kind_by_its_pairs():
    by_kind = {"cannot_answer>direct": {"pairs": 2, "base": 0.5, "tuned": 1.0, "tuned_reward": 1.0},
               "tool_call>direct": {"pairs": 6, "base": 1.0, "tuned": 0.5, "tuned_reward": 0.5},
               "tool_call>request_for_info": {"pairs": 4, "base": 0.25, "tuned": 0.75, "tuned_reward": 0.0}}
    got = study.ranking_by_pair_group(by_kind)
    # against direct: base (2*0.5 + 6*1.0)/8 = 0.875, tuned (2*1.0 + 6*0.5)/8 = 0.625
    assert got == {"against_direct": {"pairs": 8, "base": 0.875, "tuned": 0.625, "tuned_reward": 0.625},
                   "between_behaviours": {"pairs": 4, "base": 0.25, "tuned": 0.75, "tuned_reward": 0.0}}


def test_train_fit_reads_the_preference_task_on_the_training_pairs(tmp_path):
    import json

    pairs = [{"chosen_category": "tool_call", "rejected_category": "direct"},
             {"chosen_category": "request_for_info", "rejected_category": "cannot_answer"}]
    rows = [{"source": "train/pairs.jsonl:2", "base": {"logp_chosen": -3, "logp_rejected": -2},
             "tuned": {"logp_chosen": -1, "logp_rejected": -2, "ref_logp_chosen": -3, "ref_logp_rejected": -2}},
            {"source": "train/pairs.jsonl:1", "base": {"logp_chosen": -1, "logp_rejected": -2},
             "tuned": {"logp_chosen": -1, "logp_rejected": -2, "ref_logp_chosen": -1, "ref_logp_rejected": -3}}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "results.json").write_text(json.dumps(results({"base": {"ranking_accuracy": 0.5},
                                                                "tuned": {"ranking_accuracy": 1.0}})))
    fit = study.train_fit(pairs, tmp_path)
    assert fit["pairs"] == 3 and fit["base"] == {"ranking_accuracy": 0.5} and fit["tuned"]["ranking_accuracy"] == 1.0
    # line 2 (request_for_info>cannot_answer): base wrong, tuned right, reward +2 vs 0 right
    # line 1 (tool_call>direct): base right, tuned right, reward 0 vs +1 wrong
    assert fit["ranking_by_pair_group"] == {
        "against_direct": {"pairs": 1, "base": 1.0, "tuned": 1.0, "tuned_reward": 0.0},
        "between_behaviours": {"pairs": 1, "base": 0.0, "tuned": 1.0, "tuned_reward": 1.0}}


def test_train_fit_is_when2call_only():
    with pytest.raises(SystemExit):
        study.parse_args(["--dataset", "hh", "--train-fit"])
    assert study.parse_args(["--train-fit", "--skip-train"]).train_fit


def test_plot_fit_draws_training_and_held_out_groups(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    group = {"against_direct": {"pairs": 2, "base": 0.5, "tuned": 1.0, "tuned_reward": 1.0},
             "between_behaviours": {"pairs": 4, "base": 0.5, "tuned": 0.75, "tuned_reward": 0.5}}
    path = study.plot_fit({"train_fit": {"ranking_by_pair_group": group}, "ranking_by_pair_group": group},
                          tmp_path / "fit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
