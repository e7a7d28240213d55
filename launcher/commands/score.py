"""`raydpo score --task gen_qa --predictions FILE [--predictions FILE2] [--output DIR]`: gen_qa metrics on answers
made elsewhere.

Each FILE is JSONL of {"prediction", "reference"} rows (reference: a string or a list of strings; "prompt" is kept
for the examples when present). With two or more files the first is the base, the others are tuned models, and the
rows must line up. Prints the metrics side by side; with --output, writes results.json and rows.jsonl there in the
shape `raydpo eval` writes (launcher/commands/eval.py). No torch or Ray: the metrics are plain Python.
"""
from __future__ import annotations

import argparse
import json

from core.errors import DataError

SHOWN_BAD_ROWS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=("gen_qa",), help="the metrics to compute")
    parser.add_argument("--predictions", action="append", required=True, metavar="FILE",
                        help="JSONL of {prediction, reference} rows; repeat to compare models (the first is the base)")
    parser.add_argument("--output", metavar="DIR", help="write results.json and rows.jsonl into this folder")
    parser.add_argument("--no-stemmer", action="store_true", help="ROUGE without the Porter stemmer")


def prediction_field(obj, key: str) -> tuple[object, str | None]:
    """(value, None) or (None, reason) for a row's prediction or reference."""
    if not isinstance(obj, dict):
        return None, f"a row must be a JSON object, not {type(obj).__name__}"
    if key not in obj or obj[key] is None:
        return None, f"no {key!r}"
    value = obj[key]
    if key == "prediction":
        return (value, None) if isinstance(value, str) else (None, "prediction must be a string")
    ok = (isinstance(value, str) and value.strip()) or (
        isinstance(value, list) and value and all(isinstance(r, str) and r.strip() for r in value))
    return (value, None) if ok else (None, "reference must be a non-empty string or list of strings")


def read_predictions(path: str) -> list[dict]:
    """[{"prediction", "reference", "prompt", "source"}]; every bad row is listed (file:line) in one DataError."""
    from core import storage
    from core.data.raw_rows import iter_raw_rows

    rows, bad = [], []
    fs = storage.filesystem_for(path)[0] if storage.is_remote(path) else None
    for text, source in iter_raw_rows(path, fs):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            bad.append(f"{source}: malformed JSON: {err.msg}")
            continue
        reasons = []
        values = {}
        for key in ("prediction", "reference"):
            values[key], reason = prediction_field(obj, key)
            if reason:
                reasons.append(reason)
        if reasons:
            bad.append(f"{source}: {'; '.join(reasons)}")
            continue
        rows.append({**values, "prompt": obj.get("prompt"), "source": source})
    if bad or not rows:
        raise DataError(f"{path}: {len(bad)} bad row(s), {len(rows)} usable",
                        problems=bad[:SHOWN_BAD_ROWS] + ([f"... and {len(bad) - SHOWN_BAD_ROWS} more"]
                                                         if len(bad) > SHOWN_BAD_ROWS else []),
                        why="every row needs a string 'prediction' and a non-empty 'reference' (string or list)",
                        fix='write one {"prediction": ..., "reference": ...} object per line')
    return rows


def run(args: argparse.Namespace) -> int:
    from launcher.commands.eval import build_results, model_labels, print_summary, write_results
    from evaluation import gen_qa

    files = [read_predictions(path) for path in args.predictions]
    if any(len(f) != len(files[0]) or [r["reference"] for r in f] != [r["reference"] for r in files[0]]
           for f in files[1:]):
        raise DataError("the prediction files do not line up", why="comparing models needs the same rows, with the "
                        "same references, in the same order", fix="score each file on its own, or align them")
    labels = model_labels(len(files))
    per_row = [{"source": r["source"], "prompt": r["prompt"], "reference": r["reference"]} for r in files[0]]
    models = {}
    for label, path, rows in zip(labels, args.predictions, files):
        scores, metrics = gen_qa.score_predictions([r["prediction"] for r in rows], [r["reference"] for r in rows],
                                                   use_stemmer=not args.no_stemmer)
        models[label] = {"path": path, "metrics": metrics, "n": len(rows)}
        for record, row, score in zip(per_row, rows, scores):
            record[label] = {"prediction": row["prediction"], "scores": score}
    examples = [{"prompt": r["prompt"], "reference": r["reference"], **{l: r[l]["prediction"] for l in labels}}
                for r in per_row[:gen_qa.EXAMPLES]]
    results = build_results("gen_qa", "score", None, labels, models, examples,
                            {"path": args.predictions[0], "rows": len(per_row), "skipped": 0, "skipped_rows": []})
    if args.output:
        write_results(args.output, results, per_row, per_task_copy=False)
    print_summary(results, f"{args.output.rstrip('/')}/results.json" if args.output else "(not written: no --output)")
    return 0
