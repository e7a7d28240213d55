"""Where a small run's start-up goes: `raydpo train` from process start to its first step, on a cluster it starts
itself (cold) and on a warm one (`raydpo up`), each console line stamped with the seconds since the process began.

    python benchmarks/startup.py [--model tiny|smollm2] [--runs cold,warm,warm] [--json PATH]

One replica, LoRA, 2 steps of 4 pairs (HH harmless from ../shared with SmolLM2, synthetic pairs with the tiny model).
A "warm" run is on the cluster `raydpo up` started before the first warm run (its start-up is printed apart) and
`raydpo down` stops after the last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from core import startup_trace  # noqa: E402 - after the path: this file runs as a script
RAYDPO = str(Path(sys.executable).parent / "raydpo")
FIRST_STEP = re.compile(r"\bstep 1/\d+")


def prepare(work: Path, model: str) -> Path:
    (work / "data").mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from core.data.synthetic import answer_format_pairs
        from tests.tiny import build_tiny_model_dir

        source = str(build_tiny_model_dir(work / "model"))
        rows = [json.dumps(r) for r in answer_format_pairs(8, seed=1)]
        fmt, max_length = "auto", 128
    else:
        from benchmarks.vs_trl import hh_pairs
        from core.models import resolve_model_source

        source = resolve_model_source("smollm2-135m-instruct")
        rows = [text for text, _ in hh_pairs(8)]
        fmt, max_length = "hh", 512
    (work / "data" / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    import yaml

    recipe = {"run": {"name": "startup", "model_name_or_path": source, "replicas": 1,
                      "data_s3_path": str(work / "data"), "output_s3_path": str(work / "out")},
              "training_config": {"max_length": max_length, "global_batch_size": 4, "micro_batch_size": 1,
                                  "precision": "fp32", "trainer": {"max_steps": 2},
                                  "data": {"format": fmt, "validation_fraction": 0.0},
                                  "model": {"optim": {"lr": 1e-4}, "peft": {"peft_scheme": "lora"}}}}
    path = work / "startup.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def timed(command: list[str], env: dict) -> tuple[list[tuple[float, str]], float | None, int, float]:
    """(each output line with its seconds since start, seconds to the first step, exit code, start time)."""
    started = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, first = [], None
    for line in proc.stdout:
        at = time.time() - started
        lines.append((at, line.rstrip()))
        if first is None and FIRST_STEP.search(line):
            first = at
    return lines, first, proc.wait(), started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--runs", default="cold,warm", help="comma-separated cold/warm runs, in order")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raydpo-startup-"))
    recipe = prepare(work, args.model)
    from cluster.warm import EXPORTED

    base = {k: v for k, v in os.environ.items() if k not in EXPORTED}
    base |= {"PYTHONUNBUFFERED": "1", "RAYDPO_WARM_STATE": str(work / "warm.json")}
    results, warm_env = [], None
    try:
        for i, kind in enumerate(args.runs.split(",")):
            env = base
            if kind == "warm":
                if warm_env is None:
                    started = time.time()
                    up = subprocess.run([RAYDPO, "up"], env=base, capture_output=True, text=True, check=True)
                    print(f"raydpo up: {time.time() - started:.1f}s")
                    warm_env = dict(base)
                    for line in up.stdout.splitlines():
                        key, _, value = line.removeprefix("export ").partition("=")
                        warm_env[key] = value
                env = warm_env
            trace = work / f"trace-{i}.txt"  # core/startup_trace.py: the launcher's, driver's and worker's marks
            lines, first, code, started = timed([RAYDPO, "train", str(recipe), f"run.name=startup-{i}"],
                                                env | {startup_trace.ENV: str(trace)})
            print(f"\n== {kind} run {i}: exit {code}, first step at {first if first is None else round(first, 1)}s")
            for at, line in lines:
                print(f"{at:6.1f}s  {line}")
            marks = startup_trace.read_trace(str(trace), started) if trace.exists() else []
            print("where the start-up went (seconds to reach each mark from the one before):")
            for label, took in startup_trace.phases(marks):
                print(f"  {took:6.1f}s  {label}")
            results.append({"kind": kind, "first_step_s": first, "exit": code,
                            "phases": startup_trace.phases(marks),
                            "lines": [[round(at, 2), line] for at, line in lines]})
    finally:
        if warm_env is not None:
            subprocess.run([RAYDPO, "down"], env=base, capture_output=True)
    print("\n" + " | ".join(f"{r['kind']}: first step {r['first_step_s'] and round(r['first_step_s'], 1)}s"
                            for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "runs": results}, indent=2))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
