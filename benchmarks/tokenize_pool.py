"""Rows per second of the tokenize stage (core/data/pipeline.py tokenized_dataset) with 1 and with 2 actors.

    python benchmarks/tokenize_pool.py [--rows 4000] [--model smollm2|tiny] [--actors 1,2] [--json PATH]

Writes `rows` synthetic pairs (core/data/synthetic.py) to a temporary JSONL file, starts a local Ray cluster with
one CPU more than the most actors asked for (the read and parse tasks), and times the Ray Data path (read, parse,
split, tokenise) to the last row, with the pool fixed at each size. The driver's path for small data is switched off
so that the pool runs whatever the size.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    import ray

    from cluster.session import loopback_only
    from core.data import pipeline
    from core.data.synthetic import answer_format_pairs
    from launcher.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="raydpo-tokenize-"))
    if args.model == "tiny":
        from tests.tiny import build_tiny_model_dir

        model = str(build_tiny_model_dir(work / "model"))
    else:
        from core.models import resolve_model_source

        model = resolve_model_source("smollm2-135m-instruct")
    (work / "data").mkdir()
    (work / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                       for r in answer_format_pairs(args.rows, seed=0)))
    recipe = load_recipe({"run": {"name": "tok", "model_name_or_path": model, "data_s3_path": str(work / "data"),
                                  "output_s3_path": str(work / "out")},
                          "training_config": {"max_length": 512, "global_batch_size": 4}})
    pipeline.IN_PROCESS_BYTES = -1  # the Ray Data path, whatever the size
    sizes = [int(a) for a in args.actors.split(",")]
    results = {}
    with loopback_only():
        ray.init(address="local", num_cpus=max(sizes) + 1, include_dashboard=False, log_to_driver=False)
        try:
            for actors in sizes:
                started = time.time()
                ds = pipeline.tokenized_dataset([str(work / "data")], recipe, "train", 0.0, tokenizer_actors=actors)
                count = sum(len(batch["source"]) for batch in ds.iter_batches(batch_size=256))
                seconds = time.time() - started
                results[actors] = {"rows": count, "seconds": seconds, "rows_per_s": count / seconds}
                print(f"{actors} actor(s): {count} rows in {seconds:.1f}s, {count / seconds:.0f} rows/s", flush=True)
        finally:
            ray.shutdown()
    if len(sizes) > 1:
        print(f"{sizes[-1]} over {sizes[0]} actor(s): "
              f"{results[sizes[-1]]['rows_per_s'] / results[sizes[0]]['rows_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": args.rows, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
