"""`raydpo report OUTPUT`: report.md, report.html and plots/ for a run, written beside the run.

OUTPUT is a run's output folder or s3:// URI, <output_s3_path>/<run.name>. For s3://, the small files the report
reads are fetched to a temporary folder (never the model or checkpoints) and the report is uploaded back beside
the run. Training writes the same report at its end; this command refreshes it, e.g. after `raydpo eval`.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT",
                        help="a run's output: local folder or s3:// URI, <output_s3_path>/<run.name>")


def run(args) -> int:
    from evaluation.report import write_report

    md, html = write_report(args.output)
    print(f"wrote {md}\nwrote {html}")
    return 0
