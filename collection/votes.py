"""Annotations -> preference pairs: read Label Studio's JSON export or SageMaker Ground Truth's output manifest,
undo the shown order, take the majority vote, and count everything dropped with its reason.

An item is one compared pair: {"key", "data" (the comparison item pushed, collection/tasks.py), "annotations"
[(annotator, outcome)]}. An outcome is a vote, "A" (the pair's first candidate is better), "B" (the second),
"tie" or "both_bad", or a reason the annotation is no vote: "skipped" (Label Studio's skip / cancel), "empty",
"unreadable".
"""
from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

from collection.agreement import cohen_kappa, fleiss_kappa, percent_agreement
from core.data.record import make_record
from core.errors import DataError

VOTES = ("A", "B", "tie", "both_bad")
PREFERENCE, VERDICT = "preference", "verdict"  # the Pairwise and the Choices tag names of the labeling config
VERDICTS = {"tie": "tie", "both bad": "both_bad"}
ITEM_KEYS = ("raydpo_task", "pair", "order", "answer_a", "answer_b", "messages")
# Ground Truth: the crowd-classifier categories of the pairwise template (docs/collection/groundtruth-template.html)
GT_LABELS = {"answer a": "left", "a": "left", "answer b": "right", "b": "right", "tie": "tie", "both bad": "both_bad"}


def vote_for(shown_pick: str, order: list[int], pair: list[int]) -> str:
    """The vote in the pair's own order for a pick of the shown "left" / "right" answer (the shuffle undone)."""
    winner = order[0] if shown_pick == "left" else order[1]
    return "A" if winner == pair[0] else "B"


def ls_outcome(annotation: dict, data: dict) -> str:
    """A Label Studio annotation (one entry of a task's "annotations") -> its outcome."""
    if annotation.get("was_cancelled"):
        return "skipped"
    results = annotation.get("result") or []
    if not results:
        return "empty"
    verdict = next((r for r in results if r.get("from_name") == VERDICT), None)
    if verdict is not None:  # a tie / both-bad choice outweighs a side picked as well
        choices = (verdict.get("value") or {}).get("choices") or []
        return VERDICTS.get(str(choices[0]).lower(), "unreadable") if choices else "empty"
    pick = next((r for r in results if r.get("from_name") == PREFERENCE), None)
    selected = ((pick or {}).get("value") or {}).get("selected")
    if selected not in ("left", "right"):
        return "unreadable"
    return vote_for(selected, data["order"], data["pair"])


def gt_outcome(content: str | None, data: dict) -> str:
    """A Ground Truth worker's annotationData.content (JSON text, {"preference": {"label": ...}}) -> its outcome."""
    if not content:
        return "empty"
    try:
        label = json.loads(content)[PREFERENCE]["label"]
    except (ValueError, KeyError, TypeError):
        return "unreadable"
    side = GT_LABELS.get(str(label).strip().lower())
    if side is None:
        return "unreadable"
    return side if side in ("tie", "both_bad") else vote_for(side, data["order"], data["pair"])


def _check_item(data, where: str) -> dict:
    missing = [k for k in ITEM_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{where} is not a raydpo comparison", why=f"it lacks {', '.join(missing)}",
                        fix="read annotations of tasks pushed by `raydpo collect push`")
    return data


def _annotator(completed_by, names: dict) -> str:
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id"))
    return names.get(completed_by, f"user {completed_by}")


def items_from_label_studio(export: list, names: dict | None = None) -> list[dict]:
    """Label Studio's JSON export (a list of tasks) -> items. names: {user id: email} for the summary."""
    if not isinstance(export, list):
        raise DataError("not a Label Studio JSON export", why="the file holds no list of tasks",
                        fix="export the project as JSON (Export -> JSON), not JSON-MIN or CSV")
    items = []
    for task in export:
        data = _check_item(task.get("data") if isinstance(task, dict) else None, f"task {task.get('id', '?')}")
        items.append({"key": f"label-studio task {task.get('id')}", "data": data,
                      "annotations": [(_annotator(a.get("completed_by"), names or {}), ls_outcome(a, data))
                                      for a in task.get("annotations") or []]})
    return items


def items_from_ground_truth(lines: list[str], where: str = "manifest") -> list[dict]:
    """SageMaker Ground Truth's output manifest (JSON lines) of a custom pairwise job -> items.

    Each line is the input line (a comparison item's keys) plus "<job>": {"annotationsFromAllWorkers": [...]} and
    "<job>-metadata" (the shape the post-annotation Lambda writes for custom templates).
    """
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{number} is not JSON", why=err.msg) from err
        data = _check_item(row, f"{where}:{number}")
        job = next((k for k, v in row.items() if isinstance(v, dict) and "annotationsFromAllWorkers" in v), None)
        workers = row[job]["annotationsFromAllWorkers"] if job else []
        items.append({"key": f"{where}:{number}", "data": data,
                      "annotations": [(str(w.get("workerId")), gt_outcome((w.get("annotationData") or {})
                                                                            .get("content"), data))
                                      for w in workers]})
    return items


def majority(votes: list[str]) -> str | None:
    """The vote most annotators gave, or None when the top count is shared (or there is no vote)."""
    ranked = Counter(votes).most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def pair_record(data: dict, winner: str, source: str) -> dict:
    texts = {data["order"][0]: data["answer_a"], data["order"][1]: data["answer_b"]}
    first, second = data["pair"]
    chosen, rejected = (texts[first], texts[second]) if winner == "A" else (texts[second], texts[first])
    return make_record(json.loads(data["messages"]), chosen, rejected, system=data.get("system") or None,
                       tools=data.get("tools") or None, source=source)


def resolve(items: list[dict]) -> tuple[list[dict], dict]:
    """(preference records, summary) from items: majority vote per item; ties, both-bad and split votes dropped."""
    records, dropped, outcomes = [], Counter(), Counter()
    per_annotator: dict[str, Counter] = {}
    labelled: dict[str, dict[str, str]] = {}  # item key -> annotator -> vote
    for item in items:
        votes = []
        for annotator, outcome in item["annotations"]:
            outcomes[outcome] += 1
            per_annotator.setdefault(annotator, Counter())[outcome] += 1
            if outcome in VOTES:
                votes.append(outcome)
                labelled.setdefault(item["key"], {})[annotator] = outcome
        winner = majority(votes)
        if not votes:
            given = {outcome for _, outcome in item["annotations"]}
            dropped["not annotated" if not given else "skipped" if given == {"skipped"} else
                    "no usable annotation"] += 1
        elif winner is None:
            dropped["annotators split evenly"] += 1
        elif winner in ("tie", "both_bad"):
            dropped["tie" if winner == "tie" else "both bad"] += 1
        else:
            records.append(pair_record(item["data"], winner, item["key"]))
    summary = {"items": len(items), "pairs": len(records), "dropped": dict(dropped), "annotations": dict(outcomes),
               "per_annotator": {a: dict(c) for a, c in sorted(per_annotator.items())},
               "agreement": agreement_summary(labelled)}
    return records, summary


def agreement_summary(labelled: dict[str, dict[str, str]]) -> dict:
    multi = [list(by.values()) for by in labelled.values() if len(by) >= 2]
    annotators = sorted({a for by in labelled.values() for a in by})
    cohen = {}
    for first, second in combinations(annotators, 2):
        shared = [by for by in labelled.values() if first in by and second in by]
        if shared:
            cohen[f"{first} vs {second}"] = {"items": len(shared), "kappa": cohen_kappa(
                [by[first] for by in shared], [by[second] for by in shared])}
    return {"items_with_two_or_more": len(multi), "percent": percent_agreement(multi),
            "fleiss_kappa": fleiss_kappa(multi), "cohen_kappa": cohen}
