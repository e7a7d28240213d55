"""Annotations -> pairs: the shown order undone, majority vote, drop reasons, agreement (hand-worked)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from collection import votes as v
from core.errors import DataError

DATA = Path(__file__).parent / "data"


def test_vote_for_undoes_the_shown_order():
    assert v.vote_for("left", [0, 1], [0, 1]) == "A"
    assert v.vote_for("left", [1, 0], [0, 1]) == "B"  # candidate 1 was shown on the left
    assert v.vote_for("right", [1, 0], [0, 1]) == "A"
    assert v.vote_for("right", [3, 1], [1, 3]) == "A"  # candidate 1 on the right: the pair's first
    assert v.vote_for("left", [3, 1], [1, 3]) == "B"


def _ls(selected=None, verdict=None, cancelled=False):
    result = []
    if selected:
        result.append({"from_name": "preference", "to_name": "answer_a,answer_b", "type": "pairwise",
                       "value": {"selected": selected}})
    if verdict:
        result.append({"from_name": "verdict", "to_name": "answer_a", "type": "choices",
                       "value": {"choices": [verdict]}})
    return {"completed_by": 1, "was_cancelled": cancelled, "result": result}


def test_label_studio_outcomes():
    data = {"order": [1, 0], "pair": [0, 1]}
    assert v.ls_outcome(_ls("left"), data) == "B"
    assert v.ls_outcome(_ls("right"), data) == "A"
    assert v.ls_outcome(_ls(verdict="Tie"), data) == "tie"
    assert v.ls_outcome(_ls("left", verdict="Both bad"), data) == "both_bad"  # the verdict outweighs a side
    assert v.ls_outcome(_ls(cancelled=True), data) == "skipped"
    assert v.ls_outcome(_ls(), data) == "empty"
    assert v.ls_outcome({"result": [{"from_name": "preference", "value": {"selected": "up"}}]}, data) == "unreadable"


def test_majority_vote():
    assert v.majority(["A", "A", "B"]) == "A"
    assert v.majority(["A", "B"]) is None
    assert v.majority(["tie", "tie", "B"]) == "tie"
    assert v.majority([]) is None


def test_ground_truth_manifest_becomes_pairs_with_reasons_and_agreement():
    items = v.items_from_ground_truth((DATA / "groundtruth-output.manifest").read_text().splitlines(), "gt")
    records, summary = v.resolve(items)
    # line 1: order [1, 0]; "Answer A" twice = candidate 1 (shown left), "Answer B" once -> candidate 1 is chosen
    assert [(r["chosen"], r["rejected"]) for r in records] == [("The capital of France is Paris.",
                                                               "I think it is Lyon.")]
    assert records[0]["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert summary["dropped"] == {"annotators split evenly": 1, "both bad": 1}
    assert summary["annotations"] == {"B": 3, "A": 1, "tie": 1, "both_bad": 2, "unreadable": 1}
    agreement = summary["agreement"]
    # votes per item: (B, B, A), (B, tie), (both_bad, both_bad): percent (1/3 + 0 + 1) / 3 = 4/9;
    # Fleiss: P-bar 4/9, P_e = (3^2 + 1 + 1 + 2^2) / 7^2 = 15/49, kappa = 61/306
    assert agreement["items_with_two_or_more"] == 3
    assert agreement["percent"] == pytest.approx(4 / 9)
    assert agreement["fleiss_kappa"] == pytest.approx(61 / 306)
    first, second = sorted(summary["per_annotator"])[:2]
    cohen = agreement["cohen_kappa"]
    # worker 0 (B, B, both_bad) vs worker 1 (B, tie, both_bad): p_o 2/3, p_e 1/3 -> 0.5 (ids sort differently)
    pair = next(p for p in cohen.values() if p["items"] == 3)
    assert pair["kappa"] == pytest.approx(0.5)


def test_label_studio_export_with_several_annotators():
    data = {"raydpo_task": "p-1", "pair": [0, 1], "order": [1, 0], "answer_a": "second", "answer_b": "first",
            "messages": json.dumps([{"role": "user", "content": "q"}]), "system": "be kind", "tools": ""}
    export = [{"id": 7, "data": data, "annotations": [
        {**_ls("left"), "completed_by": 1}, {**_ls("left"), "completed_by": 2}, {**_ls("right"), "completed_by": 3},
        {**_ls(cancelled=True), "completed_by": 4}]},
        {"id": 8, "data": data, "annotations": [{**_ls(verdict="Tie"), "completed_by": 1}]},
        {"id": 9, "data": data, "annotations": [{**_ls(cancelled=True), "completed_by": 1}]},
        {"id": 10, "data": data, "annotations": []},
        {"id": 11, "data": data, "annotations": [{**_ls(), "completed_by": 2}]}]
    records, summary = v.resolve(v.items_from_label_studio(export, {1: "ann1@x", 2: "ann2@x"}))
    assert [(r["chosen"], r["rejected"], r["system"]) for r in records] == [("second", "first", "be kind")]
    assert summary["dropped"] == {"tie": 1, "skipped": 1, "not annotated": 1, "no usable annotation": 1}
    assert summary["per_annotator"]["ann1@x"] == {"B": 1, "tie": 1, "skipped": 1}
    assert summary["per_annotator"]["user 4"] == {"skipped": 1}


def test_a_row_that_is_no_comparison_is_a_data_error():
    with pytest.raises(DataError, match="lacks"):
        v.items_from_label_studio([{"id": 1, "data": {"text": "hello"}, "annotations": []}])
    with pytest.raises(DataError, match="JSON export"):
        v.items_from_label_studio({"tasks": []})


def test_collect_import_through_the_cli_writes_trl_pairs_and_a_summary(tmp_path, capsys):
    from launcher.cli import main

    out = tmp_path / "pairs.jsonl"
    code = main(["collect", "import", str(DATA / "groundtruth-output.manifest"), "--out", str(out), "--format", "trl"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1  # the other two items: split evenly, both bad
    chosen = rows[0]["chosen"] if isinstance(rows[0]["chosen"], str) else rows[0]["chosen"][-1]["content"]
    assert chosen == "The capital of France is Paris."
    assert "1 preference pair(s) written" in capsys.readouterr().out


def test_collect_import_of_a_missing_file_is_a_clean_error(tmp_path, capsys):
    from launcher.cli import main

    code = main(["collect", "import", str(tmp_path / "nope.json"), "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "nope.json" in err
    assert not (tmp_path / "p.jsonl").exists()
