"""`raydpo report OUTPUT`: report.md, report.html and plots/ for a run, written beside the run.

OUTPUT is a run's output folder or s3:// URI, <output_s3_path>/<run.name>. For s3://, the small files the report
reads are fetched to a temporary folder (never the model or checkpoints) and the report is uploaded back beside
the run. Training writes the same report at its end; this command refreshes it, e.g. after `raydpo eval`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from training.errors import ConfigError

# what training/eval/report.py reads from a run; eval/ is fetched whole
REPORT_INPUTS = ("recipe.yaml", "data_summary.json", "summary.json", "metrics.jsonl", "skipped_rows.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT",
                        help="a run's output: local folder or s3:// URI, <output_s3_path>/<run.name>")


def fetch_report_inputs(uri: str, local: Path) -> int:
    """Copies the report's inputs of a remote run into local; returns how many files came."""
    from training import storage

    base = uri.rstrip("/")
    local.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for name in REPORT_INPUTS:
        if storage.exists(f"{base}/{name}"):
            (local / name).write_bytes(storage.read_bytes(f"{base}/{name}"))
            fetched += 1
    if storage.exists(f"{base}/eval"):
        fetched += len(storage.download_dir(f"{base}/eval", str(local / "eval")))
    return fetched


def upload_report(local: Path, uri: str) -> list[str]:
    from training import storage

    base = uri.rstrip("/")
    written = []
    for name in ("report.md", "report.html"):
        storage.write_bytes(f"{base}/{name}", (local / name).read_bytes())
        written.append(f"{base}/{name}")
    if (local / "plots").is_dir():
        written += storage.upload_dir(str(local / "plots"), f"{base}/plots")
    return written


def run(args) -> int:
    from training import storage
    from training.eval.report import write_report

    if not storage.is_remote(args.output):
        md_path, html_path = write_report(args.output)
        print(f"wrote {md_path}\nwrote {html_path}")
        return 0
    uri = args.output.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="raydpo-report-") as tmp:
        # the local folder carries the run's name: the report's title is the folder's name
        local = Path(tmp) / uri.rsplit("/", 1)[-1]
        if not fetch_report_inputs(uri, local):
            runs = [d for d in storage.list_dirs(uri) if storage.exists(f"{d}/recipe.yaml")]
            raise ConfigError(f"{uri} holds no run outputs",
                              why="none of recipe.yaml, metrics.jsonl, summary.json, data_summary.json, eval/ is there",
                              fix=(f"pass one of the runs inside it: {', '.join(runs)}" if runs
                                   else "pass <output_s3_path>/<run.name> of a run that has started"))
        write_report(local, source=uri)
        for written in upload_report(local, uri):
            if written.endswith((".md", ".html")):
                print(f"wrote {written}")
    return 0
