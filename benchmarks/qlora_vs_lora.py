"""QLoRA against LoRA, side by side in one run: the same model, pairs, adapters and steps; only the base differs.

    python benchmarks/qlora_vs_lora.py              # SmolLM2-135M-Instruct (the offline `smollm2-135m-instruct`)
    python benchmarks/qlora_vs_lora.py --quick      # a tiny Llama built from a config (tests/tiny.py), seconds

Each side runs in a fresh process (so that its peak memory is its own) and trains the way a worker does with one
device: the base loaded by training.loop.load_under_zero_init with core.quantization's BitsAndBytesConfig (QLoRA:
NF4, double quantization, fp32 compute on CPU) and prepare_for_training, adapters by training.loop.wrap_lora,
the pairs tokenised and collated as the loop does (core.data.tokenize, core.batch: one row per pair), policy
log-probs through core.forward's head, the reference as the base with the adapters off, TRL's sigmoid loss
(training.losses) and AdamW (training.optim). DeepSpeed's engine is left out: at one worker it only wraps the step,
the same for both sides.

Reported per side: the base's weight bytes (parameters, buffers and bitsandbytes' scaling constants, adapters
excluded), peak resident memory of the process and its rise over the process before the model was loaded, and
tokens/s (real tokens of chosen and rejected rows, prompt counted with each, over the timed steps). Then QLoRA's
ratios to LoRA. The goal: base weights at <= 0.35x of LoRA's (fp32 on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_WEIGHT_RATIO = 0.35


def weight_bytes(model) -> int:
    """Bytes of a model's weights as held in memory: parameters and buffers, plus the quantization constants that
    bitsandbytes keeps beside each 4-bit weight (absmax, nested absmax, code) or 8-bit weight (row scales)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            total += sum(t.numel() * t.element_size() for t in tensors)
        scales = getattr(getattr(module, "weight", None), "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def child(side: str, setup: dict) -> dict:
    import torch

    from core import quantization
    from core.attention import attention_for_model
    from core.batch import collate_for, model_layout
    from core.config import LoraTuning, Quantization
    from core.data.formats import parse_line
    from core.data.tokenize import tokenize_record
    from core.forward import add_logps_head, sequence_logps_of
    from core.models import load_config, load_tokenizer, resolve_model_source
    from training.loop import load_under_zero_init, wrap_lora
    from training.losses import dpo_loss
    from training.optim import build_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(setup["threads"])
    before_load = peak_rss_bytes()
    quant = Quantization(bits=4) if side == "qlora" else Quantization()
    source = resolve_model_source(setup["model"])  # the offline SmolLM2: its GGUF converted once, cached
    config = load_config(source)
    kwargs = {"attn_implementation": attention_for_model(config, packing=False, share_prompt=True, on_gpu=False)}
    kwargs |= quantization.load_kwargs(quant, "fp32", zero_stage=0, device=torch.device("cpu"))
    model, _ = load_under_zero_init(source, torch.float32, {"zero_optimization": {"stage": 0}}, kwargs)
    base_bytes = weight_bytes(model)
    if quantization.quantized(quant):
        model = quantization.prepare_for_training(model, gradient_checkpointing=False, partitioned=False)
    add_logps_head(model)
    model = wrap_lora(model, LoraTuning(adapter_dim=16, alpha=32, adapter_dropout=0.0), torch.float32, False)
    model.train()
    optimizer = build_optimizer(model, name="adamw", lr=1e-4, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.0,
                                adam_w_mode=True, on_gpu=False, loraplus_lr_ratio=0)
    tokenizer = load_tokenizer(source)
    collate = collate_for(model_layout(model.config, share_prompt=True), tokenizer.pad_token_id)
    records = [parse_line(json.dumps(r), f"bench:{i + 1}")[0] for i, r in enumerate(setup["pairs"])]
    rows = [tokenize_record(r, tokenizer, max_length=setup["max_length"]) for r in records]
    batches = [collate({k: [r[k] for r in rows[i:i + setup["batch"]]] for k in ("prompt_ids", "chosen_ids",
                                                                              "rejected_ids")})
               for i in range(0, len(rows), setup["batch"])]
    # real tokens as the padded layout counts them: prompt + answer, for chosen and rejected
    real = [sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                for r in rows[i:i + setup["batch"]]) for i in range(0, len(rows), setup["batch"])]
    losses, tokens, seconds = [], 0, 0.0
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        logps, _ = sequence_logps_of(model, batch)
        with torch.no_grad(), model.disable_adapter():
            ref, _ = sequence_logps_of(model, batch)
        half = logps.shape[0] // 2
        loss = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], loss_type="sigmoid", beta=0.1)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= setup["warmup"]:  # the first steps pay one-time costs (bitsandbytes' CPU weight repacking)
            seconds += time.perf_counter() - started
            tokens += real[step]
        losses.append(loss.item())
    peak = peak_rss_bytes()
    return {"side": side, "base_weight_bytes": base_bytes, "peak_rss_bytes": peak,
            "rss_rise_bytes": peak - before_load, "tokens_per_s": tokens / seconds, "timed_steps":
            len(batches) - setup["warmup"], "losses": losses,
            "linear_class": type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__}


def run_side(side: str, setup_path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--setup", str(setup_path)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(lora: dict, qlora: dict) -> dict:
    """QLoRA over LoRA for each figure (< 1: QLoRA uses less / is slower for tokens/s)."""
    return {key: qlora[key] / lora[key] for key in ("base_weight_bytes", "peak_rss_bytes", "rss_rise_bytes",
                                                      "tokens_per_s")}


def table(results: dict) -> str:
    mib = 1024**2
    lines = ["| | LoRA (fp32 base) | QLoRA (NF4 base) | QLoRA / LoRA |", "|---|---|---|---|"]
    lora, qlora, ratio = results["lora"], results["qlora"], results["ratio"]
    for key, what, scale, unit in (("base_weight_bytes", "base weights", mib, "MiB"),
                                   ("peak_rss_bytes", "peak memory (process RSS)", mib, "MiB"),
                                   ("rss_rise_bytes", "memory rise from loading and training", mib, "MiB"),
                                   ("tokens_per_s", "tokens/s", 1, "")):
        lines.append(f"| {what} | {lora[key] / scale:,.1f} {unit} | {qlora[key] / scale:,.1f} {unit} | "
                     f"{ratio[key]:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model built from a config")
    parser.add_argument("--pairs", type=int, default=None, help="pairs trained on (default 24; --quick 8)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--json", metavar="PATH", help="write the results there too")
    parser.add_argument("--child", choices=("lora", "qlora"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(Path(args.setup).read_text()))))
        return 0

    from core.data.synthetic import answer_format_pairs
    from core.models import OFFLINE_SMOLLM2

    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        if args.quick:
            from tests.tiny import build_tiny_model_dir

            model = str(build_tiny_model_dir(Path(tmp) / "model", hidden=128, layers=2))
        else:
            model = OFFLINE_SMOLLM2
        pairs = args.pairs or (8 if args.quick else 24)
        setup = {"model": model, "pairs": answer_format_pairs(pairs, seed=11), "batch": args.batch, "warmup": 1,
                 "max_length": 256, "threads": len(os.sched_getaffinity(0))}
        setup_path = Path(tmp) / "setup.json"
        setup_path.write_text(json.dumps(setup))
        results = {side: run_side(side, setup_path) for side in ("lora", "qlora")}
    results["ratio"] = ratios(results["lora"], results["qlora"])
    results["goal"] = {"base_weight_ratio_at_most": GOAL_WEIGHT_RATIO,
                       "met": results["ratio"]["base_weight_bytes"] <= GOAL_WEIGHT_RATIO}
    results["setup"] = {"model": model if not args.quick else "tiny (tests/tiny.py, hidden 128)", "pairs": pairs,
                        "batch": args.batch, "threads": setup["threads"],
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    print(table(results))
    print(f"goal: QLoRA base weights <= {GOAL_WEIGHT_RATIO}x LoRA's: "
          f"{results['ratio']['base_weight_bytes']:.3f}x ({'met' if results['goal']['met'] else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0 if results["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
