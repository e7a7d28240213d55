"""`raydpo generate MODEL PROMPTS.jsonl --out FILE [--max-new-tokens N] [--temperature T] [--workers W]`: answers
for a data set, no server: Ray Data actors running the evaluation's generator (core/generate.py).

MODEL: a run folder, a model folder, a hub id, s3://, or smollm2-135m-instruct. Each PROMPTS line is
{"messages": [{"role", "content"}, ...]} (optionally "system", "tools") or {"prompt": "text"}; each FILE line is
the input line plus "prediction", "new_tokens" and "hit_max_new_tokens", in input order.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a run folder, model folder, hub id, s3:// or "
                        "smollm2-135m-instruct")
    parser.add_argument("prompts", type=Path, metavar="PROMPTS.jsonl")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the answers (JSONL)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--workers", type=int, default=1, help="model actors (one CPU, or one GPU with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")


def read_prompts(path: Path) -> list[dict]:
    """The prompts as core.generate takes them; a DataError naming every bad line."""
    if not path.is_file():
        raise DataError(f"{path} does not exist", fix="pass a JSONL file of prompts")
    rows, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not JSON ({err.msg})")
            continue
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            row = {**row, "messages": [{"role": "user", "content": row["prompt"]}]}
        messages = row.get("messages") if isinstance(row, dict) else None
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m and
                                                                "content" in m for m in messages)):
            problems.append(f"line {number}: needs \"prompt\" (text) or \"messages\" (a list of {{role, content}})")
            continue
        rows.append(row)
    if problems:
        raise DataError(f"{path} has {len(problems)} bad line(s)", problems=problems[:20],
                        fix='write one {"messages": [{"role": "user", "content": "..."}]} or {"prompt": "..."} '
                            "per line")
    if not rows:
        raise DataError(f"{path} holds no prompts", fix="write one prompt per line")
    return rows


def run(args: argparse.Namespace) -> int:
    from cluster.session import ray_session
    from core.generate import GenerationSettings, generate_answers
    from core.models import cache_root

    prompts = read_prompts(args.prompts)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  batch_size=args.batch_size, seed=args.seed)
    model = str(args.model)
    model_dir = Path(model) / "model"
    if model_dir.is_dir():  # a run folder: its model/ (a full model, or an adapter that load_trained puts on its base)
        model = str(model_dir)
    log_file = cache_root() / "logs" / "generate.log"
    with ray_session(num_cpus=max(2, args.workers + 1), num_gpus=None, log_file=log_file):
        answers = generate_answers(prompts, model, settings, workers=args.workers, use_gpu=args.gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for row, answer in zip(prompts, answers):
            out.write(json.dumps({**row, **answer}, ensure_ascii=False) + "\n")
    cut = sum(a["hit_max_new_tokens"] for a in answers)
    print(f"wrote {len(answers)} answers to {args.out} ({cut} cut at --max-new-tokens {args.max_new_tokens})")
    return 0
