"""What raydpo's batching computes per token of the data, without training: computed tokens / unique real tokens.

    python benchmarks/padding.py [--data hh|when2call] [--pairs N] [--micro-batch 4] [--buffer 1000] [--json PATH]

The pairs are tokenised as `raydpo train` tokenises them (SmolLM2-135M-Instruct's chat template, max_length 512),
grouped by width into micro-batches within the shuffle buffer (core/data/pipeline.py length_grouped, with the
recipe's default seed) and collated in the layout the training forward takes for this model (core/batch.py
collate_for: the prompt shared by both answers). Unique real tokens count each pair's prompt once (prompt + chosen
+ rejected): the measure of padding a user pays for, the `padding_unique` of metrics.jsonl. Printed beside it: one
pair per forward (no padding at all with the prompt shared), and two padded rows per pair in the order the data
comes, without length grouping (the layout of TRL's collator, though not its exact token counts).

HH: the first N good pairs of HH harmless (the pairs benchmarks/vs_trl.py trains on). When2Call: `raydpo data
when2call` of ../shared's test rows (tools in the system message), its training pairs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEN2CALL = Path("data") / "when2call" / "when2call_test_llm_judge.part1.jsonl"
MAX_LENGTH = 512


def records(data: str, pairs: int) -> list[dict]:
    """Canonical records (core/data/formats.py) of the dataset's first `pairs` good pairs."""
    if data == "hh":
        from benchmarks.vs_trl import hh_pairs

        return [record for _, record in hh_pairs(pairs)]
    from benchmarks.vs_trl import shared_dir
    from core.config import Data
    from core.data.pipeline import is_bad, rows_here
    from launcher.cli import main as raydpo

    out = Path(tempfile.mkdtemp(prefix="raydpo-padding-"))
    if raydpo(["data", "when2call", str(shared_dir() / WHEN2CALL), "--out", str(out)]) != 0:
        sys.exit("raydpo data when2call failed")
    # read as `raydpo train` reads local data (no shuffling, no validation split: every training pair once)
    found = [record for record, reason, _, _ in rows_here([str(out / "train")], Data(shuffle=False), 0, 0.0)
             if not is_bad(reason)]
    return found[:pairs]


def ratio(batches: list[dict]) -> float:
    return sum(b["computed_tokens"] for b in batches) / sum(b["unique_tokens"] for b in batches)


def measure(rows: list[dict], micro_batch: int, buffer: int, seed: int, layout: str, pad_id: int) -> dict:
    from core.batch import collate_for, collate_pairs, unique_tokens
    from core.data.pipeline import as_columns, length_grouped

    collate = collate_for(layout, pad_id)
    grouped = [collate(as_columns(g)) for g in length_grouped(rows, micro_batch, buffer, random.Random(seed))]
    single = [collate(as_columns([r])) for r in rows]
    in_order = [as_columns(rows[i:i + micro_batch]) for i in range(0, len(rows) - micro_batch + 1, micro_batch)]
    trl = [collate_pairs(c, pad_id) | {"unique_tokens": unique_tokens(c)} for c in in_order]
    return {"pairs": len(rows), "layout": layout, "micro_batch": micro_batch, "raydpo": ratio(grouped),
            "one_pair_per_forward": ratio(single), "padded_rows_in_data_order": ratio(trl)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("hh", "when2call"), default="hh")
    parser.add_argument("--pairs", type=int, default=64, help="pairs to lay out (default 64: the vs_trl job)")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward (raydpo's default 4)")
    parser.add_argument("--buffer", type=int, default=1000, help="the shuffle buffer (the recipe default 1000)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    from core.attention import attention_for_model
    from core.batch import model_layout
    from core.config import TrainingConfig
    from core.data.tokenize import tokenize_record
    from core.models import load_config, load_tokenizer, resolve_model_source

    model = resolve_model_source("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model)
    rows = [tokenize_record(r, tokenizer, max_length=MAX_LENGTH) for r in records(args.data, args.pairs)]
    config = load_config(model)
    # the attention the worker loads the model with (core/attention.py), which decides the layout
    config._attn_implementation = attention_for_model(config, packing=False, share_prompt=True, on_gpu=False)
    layout = model_layout(config, share_prompt=True)
    # the first epoch's grouping, as the worker loop seeds it (training_config.seed + epoch)
    result = measure(rows, args.micro_batch, args.buffer, TrainingConfig().seed, layout, tokenizer.pad_token_id)
    result["data"] = args.data
    print(f"{args.data}: {result['pairs']} pairs, layout {layout}, {args.micro_batch} pairs per forward: computed / "
          f"unique real tokens {result['raydpo']:.3f} (one pair per forward {result['one_pair_per_forward']:.3f}, "
          f"two padded rows per pair in data order {result['padded_rows_in_data_order']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
