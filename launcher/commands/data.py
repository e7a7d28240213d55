"""`raydpo data validate|convert|when2call`: check preference files row by row, rewrite them as Nova or TRL rows,
or turn NVIDIA When2Call rows into preference pairs and a gen_qa set.

    raydpo data validate PATH... [--format F] [--key-map JSON] [--model M] [--max-length N]
    raydpo data convert PATH... --to nova|trl --out FILE [--format F] [--key-map JSON]
    raydpo data when2call PATH... --out DIR [--heldout FILE... | --heldout-fraction F] [--seed N]

Both stream every row; every bad row is listed as file:line and its reason (the first 50, then a count). Exit code 2
when any row is bad (convert still writes the good rows), 0 otherwise. Imports no torch, ray or deepspeed unless
--model asks for a tokenizer.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

from core.data.formats import (PAIR_FORMATS, WRITERS, ScanReport, parsed_rows, scan, unwritable_reason,
                               write_records)
from core.data.raw_rows import data_files
from core.errors import ConfigError, DataError

SHOWN_BAD_ROWS = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    validate = actions.add_parser("validate", help="report formats, bad rows (file:line, reason) and token lengths")
    _add_common(validate)
    validate.add_argument("--model", metavar="M",
                          help="a local folder or hub id whose tokenizer measures prompt and response lengths")
    validate.add_argument("--max-length", type=_positive_int, metavar="N",
                          help="count the pairs whose prompt + longer response exceed N tokens (needs --model)")
    convert = actions.add_parser("convert", help="write the good rows as Nova or TRL conversational JSONL")
    _add_common(convert)
    convert.add_argument("--to", required=True, choices=sorted(WRITERS), help="the output format")
    convert.add_argument("--out", required=True, metavar="FILE", help="the output .jsonl (or .jsonl.gz) file")
    when2call = actions.add_parser(
        "when2call", help="When2Call rows -> preference pairs (tools in the system message) and a gen_qa set")
    when2call.add_argument("paths", nargs="+", metavar="PATH", help="When2Call test rows (raw format): files or folders")
    when2call.add_argument("--out", required=True, metavar="DIR",
                           help="writes DIR/train/pairs.jsonl, DIR/heldout/pairs.jsonl, DIR/heldout/gen_qa.jsonl")
    when2call.add_argument("--heldout", nargs="+", metavar="FILE",
                           help="raw rows to hold out instead of a split; every row of PATH then trains")
    when2call.add_argument("--heldout-fraction", type=float, default=0.3, metavar="F",
                           help="share of each behaviour's rows held out (stratified; default 0.3)")
    when2call.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a file, a folder of .jsonl/.json/.gz files, or s3://")
    parser.add_argument("--format", default="auto", choices=("auto", *PAIR_FORMATS),
                        help="the input format (default: detected per file from its first row)")
    parser.add_argument("--key-map", metavar="JSON",
                        help='rename your keys before parsing, e.g. \'{"question": "prompt", "good": "chosen"}\'')


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def parse_key_map(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        key_map = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError("--key-map is not valid JSON", why=err.msg, fix='give an object, e.g. \'{"q": "prompt"}\'')
    if not isinstance(key_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in key_map.items()):
        raise ConfigError("--key-map must be a JSON object of strings", fix='e.g. \'{"their_key": "our_key"}\'')
    return key_map


def bad_row_lines(bad_rows, limit: int = SHOWN_BAD_ROWS) -> list[str]:
    lines = [f"  {source}  {reason}" for source, reason in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more bad rows")
    return lines


def summary_lines(files: int, per_format: dict, good: int, bad_rows) -> list[str]:
    formats = ", ".join(f"{name} {count}" for name, count in sorted(per_format.items())) or "none"
    lines = [f"files: {files}", f"rows per format: {formats}", f"good pairs: {good}", f"bad rows: {len(bad_rows)}"]
    fix = ["fix: correct or remove the rows listed (file:line: why), or pass --format/--key-map if the rows are "
           "of a format raydpo did not detect; `raydpo train` leaves bad rows out with "
           "training_config.data.on_error=skip"] if bad_rows else []
    return lines + bad_row_lines(list(bad_rows)) + fix


def report_lines(report: ScanReport) -> list[str]:
    lines = summary_lines(len(report.files), report.rows_per_format, report.good, report.bad_rows)
    for name, stats in (("prompt tokens", report.prompt_tokens), ("response tokens", report.response_tokens)):
        if stats is not None:
            lines.append(f"{name}: p50 {stats.p50}, p95 {stats.p95}, max {stats.max}")
    if report.truncated is not None:
        lines.append(f"pairs over max_length {report.max_length} (truncated in training): "
                     f"{report.truncated} of {report.good}")
    return lines


def _tokenizer(model: str):
    from core.models import load_tokenizer

    try:
        return load_tokenizer(model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer of {model!r}", why=str(err).splitlines()[0],
                          fix="give a local model folder or a reachable hub id") from err


def validate(args: argparse.Namespace) -> int:
    if args.max_length is not None and args.model is None:
        raise ConfigError("--max-length needs --model", why="lengths are counted in the model's tokens",
                          fix="add --model with a local folder or hub id")
    key_map = parse_key_map(args.key_map)
    tokenizer = _tokenizer(args.model) if args.model else None
    report = scan(args.paths, fmt=args.format, key_map=key_map, tokenizer=tokenizer, max_length=args.max_length)
    print("\n".join(report_lines(report)))
    if not report.good and not report.bad:  # an empty file (or only blank lines) is no data, not good data
        raise DataError(f"no preference pairs in {', '.join(map(str, args.paths))}",
                        why="the files hold no rows (empty, or blank lines only)",
                        fix="point at the JSONL files with your pairs, one JSON object per line")
    return 2 if report.bad else 0


def convert(args: argparse.Namespace) -> int:
    key_map = parse_key_map(args.key_map)
    files = data_files(args.paths)
    per_format, bad = Counter(), []

    def writable():
        for record, reason, source, name in parsed_rows(files, args.format, key_map):
            per_format[name] += 1
            reason = reason or unwritable_reason(record, args.to)
            if reason:
                bad.append((source, reason))
            else:
                yield record

    written = write_records(writable(), args.out, args.to)
    print("\n".join(summary_lines(len(files), per_format, written, bad)))
    print(f"wrote {written} {args.to} rows to {args.out}")
    return 2 if bad else 0


def when2call(args: argparse.Namespace) -> int:
    from core.data.when2call import convert_files

    if not 0 <= args.heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction must be in [0, 1), not {args.heldout_fraction}",
                          fix="e.g. --heldout-fraction 0.3")
    result, files = convert_files(args.paths, args.out, heldout_paths=args.heldout,
                                  heldout_fraction=args.heldout_fraction, seed=args.seed)
    for split in ("train", "heldout"):
        counts = ", ".join(f"{b} {n}" for b, n in sorted(result.behaviours.get(split, {}).items())) or "none"
        pairs = len(result.train_pairs if split == "train" else result.heldout_pairs)
        print(f"{split}: {pairs} pairs from rows by correct behaviour: {counts}")
    print("\n".join([f"bad rows: {len(result.bad_rows)}"] + bad_row_lines(result.bad_rows)))
    for name, path in files.items():
        print(f"wrote {path}")
    return 2 if result.bad_rows else 0


def run(args: argparse.Namespace) -> int:
    return {"validate": validate, "convert": convert, "when2call": when2call}[args.data_command](args)
