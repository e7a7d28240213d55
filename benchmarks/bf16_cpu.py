"""bf16 against fp32 on this CPU: the same short LoRA DPO run in both precisions, side by side in one invocation.

    python benchmarks/bf16_cpu.py [--steps N] [--json PATH] [--threads N] [--workdir DIR]

Each precision runs benchmarks/vs_trl.py's raydpo_optimized side (SmolLM2-135M-Instruct, the first steps x 4 HH
harmless pairs, max_length 512, LoRA, length-aware batching, log-prob head, reference precomputed into a fresh cache,
gradient checkpointing; one Ray Train worker) in its own process, with training_config.precision set to fp32 or bf16.
Printed: the per-step losses of both, the loss agreement (max and mean absolute difference of the per-step loss, the
final step's reward accuracy and margin of each), real tokens/s of each (reference stage counted, and training alone)
and their ratio, and the oneDNN ISA that bf16 matmuls run on here (AMX when the CPU has it).

The criterion, fixed before measuring (raydpo issue 21): `precision: auto` picks bf16 on a CPU with bf16 matmul
units (AMX, AVX-512 BF16) only if the mean absolute per-step loss difference is at most LOSS_TOLERANCE and bf16's
real tokens/s (reference stage counted) is at least MIN_SPEEDUP times fp32's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import vs_trl  # noqa: E402  (after the path above: run as a script from anywhere)

SIDE = "raydpo_optimized"
PRECISIONS = ("bf16", "fp32")  # bf16 first: a failure shows before fp32's longer run
LOSS_TOLERANCE = 0.01  # nats, mean absolute per-step loss difference
MIN_SPEEDUP = 1.2      # bf16 over fp32, real tokens/s with the reference stage counted


def agreement(fp32: dict, bf16: dict) -> dict:
    """How far bf16's run is from fp32's: per-step loss differences, the final step's reward accuracy and margin of
    each, and bf16's speed over fp32's (with the reference stage counted, and training alone)."""
    diffs = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"])]
    return {"steps": len(diffs), "loss_max_abs_diff": max(diffs), "loss_mean_abs_diff": sum(diffs) / len(diffs),
            "final_accuracy": {"fp32": fp32["accuracies"][-1], "bf16": bf16["accuracies"][-1]},
            "final_margin": {"fp32": fp32["margins"][-1], "bf16": bf16["margins"][-1]},
            "speedup": bf16["tokens_per_s"] / fp32["tokens_per_s"],
            "train_speedup": train_tokens_per_s(bf16) / train_tokens_per_s(fp32)}


def train_tokens_per_s(result: dict) -> float:
    return result["real_tokens"] / result["train_s"]


def bf16_by_default(agreed: dict) -> bool:
    """The criterion above: the losses agree and bf16 is fast enough to be worth it."""
    return agreed["loss_mean_abs_diff"] <= LOSS_TOLERANCE and agreed["speedup"] >= MIN_SPEEDUP


def onednn_isa() -> str:
    """The ISA oneDNN reports for a bf16 matmul in a fresh process (ONEDNN_VERBOSE's isa line and the kernel)."""
    code = ("import torch; a = torch.randn(64, 576, dtype=torch.bfloat16); "
            "torch.nn.functional.linear(a, torch.randn(576, 576, dtype=torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                         capture_output=True, text=True, timeout=120).stdout
    isa = next((line.split("isa:", 1)[1].strip() for line in out.splitlines() if "isa:" in line), "not reported")
    kernels = sorted({field for line in out.splitlines() if ",exec," in line for field in line.split(",")
                      if "matmul:" in field or "gemm:" in field})
    return f"{isa}; kernel {', '.join(kernels) or 'none reported'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of 4 pairs (default 10)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for both runs")
    parser.add_argument("--workdir", help="keep data and outputs here (default: a temporary folder)")
    args = parser.parse_args()
    from core.devices import this_cpu_bf16_fast

    work = Path(args.workdir or tempfile.mkdtemp(prefix="raydpo-bf16-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    setup = vs_trl.prepare(work, quick=False, steps=args.steps, batch=4)
    isa = onednn_isa()
    print(f"model {setup['model']}, {setup['steps']} steps x {setup['batch']} pairs, max_length "
          f"{setup['max_length']}, {args.threads} threads, bf16 matmul units {this_cpu_bf16_fast()}; oneDNN bf16: "
          f"{isa}; work in {work}", flush=True)
    results = {}
    for precision in PRECISIONS:
        folder = work / precision  # its own outputs and reference cache: each run computes its reference stage
        folder.mkdir(exist_ok=True)
        setup_path = folder / "setup.json"
        setup_path.write_text(json.dumps(setup | {"precision": precision, "work": str(folder)}, indent=2))
        print(f"running {precision} ...", flush=True)
        r = results[precision] = vs_trl.run_side(SIDE, setup_path, args.threads)
        print(f"  {r['tokens_per_s']:.1f} real tokens/s (reference stage {r['reference_s']:.0f}s counted), "
              f"{train_tokens_per_s(r):.1f} training alone, first step {r['first_step_s']:.0f}s, whole process "
              f"{r['wall_s']:.0f}s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    agreed = agreement(results["fp32"], results["bf16"])
    print("| step | fp32 loss | bf16 loss | abs diff |\n| ---: | ---: | ---: | ---: |")
    for step, (a, b) in enumerate(zip(results["fp32"]["losses"], results["bf16"]["losses"]), 1):
        print(f"| {step} | {a:.4f} | {b:.4f} | {abs(a - b):.4f} |")
    print(f"loss agreement over {agreed['steps']} steps: max abs diff {agreed['loss_max_abs_diff']:.4f}, mean "
          f"{agreed['loss_mean_abs_diff']:.4f} (criterion <= {LOSS_TOLERANCE}); final reward accuracy fp32 "
          f"{agreed['final_accuracy']['fp32']:.2f} bf16 {agreed['final_accuracy']['bf16']:.2f}; final margin fp32 "
          f"{agreed['final_margin']['fp32']:+.4f} bf16 {agreed['final_margin']['bf16']:+.4f}")
    print(f"real tokens/s: fp32 {results['fp32']['tokens_per_s']:.1f}, bf16 {results['bf16']['tokens_per_s']:.1f}: "
          f"{agreed['speedup']:.2f}x (criterion >= {MIN_SPEEDUP}); training alone {agreed['train_speedup']:.2f}x")
    decision = bf16_by_default(agreed)
    print(f"bf16 as this CPU's default: {'yes' if decision else 'no'}: criterion "
          f"{'met' if decision else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "agreement": agreed, "bf16_by_default": decision,
                                               "onednn": isa, "setup": setup, "load_average": os.getloadavg(),
                                               "command": " ".join(["python", "benchmarks/bf16_cpu.py",
                                                                    *sys.argv[1:]])}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
