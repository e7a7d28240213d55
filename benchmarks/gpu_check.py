"""The GPU check: raydpo's worker-loop pieces on one GPU, correct and fast, in one prepared run (raydpo issue 14).

    python benchmarks/gpu_check.py [--json PATH]   # one GPU: a ~1B Llama-shaped model built from a config, 2k tokens
    python benchmarks/gpu_check.py --dry-run       # every check on CPU with a tiny model (well under 2 minutes)
    python benchmarks/gpu_check.py --only speed,zero3_lora   # a rerun of some checks

Needs torch, transformers, peft and DeepSpeed only: no Ray (nothing here imports it), no model hub, no data files.
The model is built from a config with random weights and saved to a temporary folder with a word-level tokenizer;
the pairs are random tokens. It calls the project's own functions, not copies: core.forward (the log-prob head and
sequence_logps_of), core.batch and core.attention (layouts, masks on the device, the attention table),
training.losses, training.optim (LoRA+ and the fused-Adam class), training.ds_config (the DeepSpeed config),
training.loop (load_under_zero_init, wrap_lora), training.reference (the precompute stage's actor class) and
training.memory_plan (`raydpo plan`'s estimate).

It prints one JSON object (the last line of stdout; --json writes it to a file too), one key per check, each with
"ok" where there is something to agree with and "seconds":
- precision: bf16 against fp32 log-probs of the same weights (nats per response token);
- attention: every implementation (eager, sdpa, flex_attention where it runs) and layout (padded, shared, packed)
  against eager on padded rows: log-probs and gradients, and which one core.attention picks on this device;
- loraplus_fused_adam: one LoRA+ step with DeepSpeed's FusedAdam (on --dry-run a torch AdamW stand-in with its
  signature), built through peft's create_loraplus_optimizer as the loop builds it;
- optimizers: FusedAdam beside torch.optim.AdamW(fused=True) and foreach, ms per step on the full model's shapes;
- zero3_full, zero3_lora: steps under DeepSpeed ZeRO-3 at world size 1 (NCCL on GPU, gloo on CPU); LoRA twice,
  with the reference as the loop runs it (adapters disabled, live) and precomputed, counting ZeRO-3 trace
  invalidations (DeepSpeed issue #6870) and step time for each;
- reference: the precompute stage's log-probs (training/reference.ReferenceStage) against the live reference;
- reuse_distance: LoRA under ZeRO-3 with DeepSpeed's default stage3_max_reuse_distance beside raydpo's 0;
- memory: peak GPU memory of the full-rank ZeRO-3 step against training/memory_plan's estimate;
- speed: tokens/s and MFU of a one-GPU full-rank step (the loop's one-worker DeepSpeed config) with the reference
  forward counted (the README's Performance section defines MFU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.attention import FLEX, attention_for, attention_for_model, on_device, supports_flex  # noqa: E402
from core.batch import collate_for  # noqa: E402
from core.config import LoraTuning  # noqa: E402
from core.forward import add_logps_head, sequence_logps_of  # noqa: E402
from core.models import load_causal_lm  # noqa: E402
from training import ds_config, memory_plan  # noqa: E402
from training.losses import dpo_loss, total_loss  # noqa: E402
from training.optim import build_optimizer, group_lrs, scheduler_factory  # noqa: E402

# Model and data sizes. gpu: Llama-3.2-1B's body (hidden 2048, 16 layers, GQA 32/8 heads) with a 32k vocabulary,
# 1.1B parameters; the speed batch is 2 pairs of a 1,024-token prompt and two 1,024-token answers (2k-token
# sequences). The agreement checks use shorter rows of uneven length (padding, eager attention's T x T scores).
SIZES = {
    "gpu": {"model": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32768, max_position_embeddings=4096),
            "agree": dict(pairs=2, prompt=192, answer=160), "speed": dict(pairs=2, prompt=1024, answer=1024),
            "accum": 2, "steps": 3, "timed_steps": 3},
    "dry": {"model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
            "agree": dict(pairs=2, prompt=12, answer=10), "speed": dict(pairs=2, prompt=32, answer=32),
            "accum": 2, "steps": 3, "timed_steps": 2},
}
# Tolerances in nats per response token: fp32 paths must agree to rounding; bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # relative L2 error of the gradients
LORA = LoraTuning(alpha=16, adapter_dim=8, adapter_dropout=0.0, loraplus_lr_ratio=16.0)
ADAM = dict(lr=1e-4, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.0, adam_w_mode=True)
BETA = 0.1

# Dense bf16 tensor-core peak of each GPU, FLOP/s (vendor data sheets, without sparsity). Matched in order.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
             ("A10", 125e12))


# ---------------------------------------------------------------- arithmetic (hand-worked tests)

def matmul_params(config) -> int:
    """Parameters that take part in a matrix multiply per token: every decoder layer's linear weights and the output
    head (the input embedding is a lookup). Norm weights are left out (a few per layer)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    return layers * (attention + mlp) + hidden * config.vocab_size


def forward_flops_per_token(config, sequence_length: int) -> float:
    """A forward's FLOPs for one token of a causal sequence of sequence_length tokens: 2 per matmul parameter, and
    the attention scores and weighted sum (2 x 2 x heads x head_dim per earlier position, (n + 1) / 2 on average)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attended = (sequence_length + 1) / 2
    return 2 * matmul_params(config) + 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * attended


def dpo_flops_per_token(config, sequence_length: int) -> float:
    """Model FLOPs per real token of a DPO step: the policy's forward and backward (3 forwards) and the reference's
    forward (1), on both answers. Recomputation (gradient checkpointing) is not counted: MFU, not hardware FLOPs."""
    return 4 * forward_flops_per_token(config, sequence_length)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    return None if not peak_flops else tokens_per_s * flops_per_token / peak_flops


def peak_flops_of(device_name: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16 if name in device_name), None)


def per_token_gap(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> float:
    """The largest difference of two sequences' summed log-probs, per response token."""
    return float(((a.double() - b.double()).abs() / counts.clamp(min=1).double()).max())


def relative_l2(grads: dict, reference: dict) -> float:
    """||g - g_ref|| / ||g_ref|| over every parameter that has a gradient in both."""
    diff = sum(float((grads[n].double() - g.double()).pow(2).sum()) for n, g in reference.items() if n in grads)
    norm = sum(float(g.double().pow(2).sum()) for g in reference.values())
    return math.sqrt(diff / max(norm, 1e-30))


# ---------------------------------------------------------------- a model and pairs from nothing

def build_model_folder(folder: Path, shape: dict, dtype, device) -> Path:
    """A Llama-shaped model with seeded random weights and a word-level tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model initialises in seconds on the GPU, minutes on the CPU
        model = LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    vocab = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, shape["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    return folder


def random_pairs(pairs: int, prompt: int, answer: int, vocab: int, seed: int, uneven: bool) -> dict:
    """Tokenised pairs as the data pipeline hands them (prompt_ids, chosen_ids, rejected_ids). uneven: each pair's
    lengths differ (padding, answers of unequal length); else every sequence is prompt + answer long."""
    rng = random.Random(seed)
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in range(pairs):
        cut = (lambda n, k: max(1, n - k * (i + 1) * max(1, n // 8))) if uneven else (lambda n, k: n)
        for column, length in (("prompt_ids", cut(prompt, 1)), ("chosen_ids", cut(answer, 2)),
                               ("rejected_ids", cut(answer, 1))):
            rows[column].append([rng.randrange(2, vocab) for _ in range(length)])
    return rows


def with_reference(rows: dict, chosen, rejected) -> dict:
    return rows | {"ref_chosen_logps": [float(x) for x in chosen], "ref_rejected_logps": [float(x) for x in rejected]}


# ---------------------------------------------------------------- the checks

class Context:
    def __init__(self, dry_run: bool, folder: Path):
        self.dry_run = dry_run
        self.size = SIZES["dry" if dry_run else "gpu"]
        self.on_gpu = not dry_run
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.on_gpu else torch.float32  # as core.devices.precision_for decides
        self.precision = "bf16" if self.on_gpu else "fp32"
        self.folder = folder
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(folder)
        vocab = self.config.vocab_size
        agree, speed = self.size["agree"], self.size["speed"]
        self.agree_rows = random_pairs(agree["pairs"], agree["prompt"], agree["answer"], vocab, 1, uneven=True)
        self.step_rows = [random_pairs(agree["pairs"], agree["prompt"], agree["answer"], vocab, 10 + i, uneven=True)
                          for i in range(self.size["accum"])]
        self.speed_rows = random_pairs(speed["pairs"], speed["prompt"], speed["answer"], vocab, 2, uneven=False)
        self.reference_logps: dict[int, tuple] = {}  # micro-batch index -> the precompute stage's (chosen, rejected)
        # counted now: while a ZeRO-3 engine's HfDeepSpeedConfig lives, from_config would build under zero.Init
        self.shape = memory_plan.model_shape(self.config)
        self.fused_adam_error: str | None = None

    def model(self, dtype, attention: str):
        """The saved model loaded as core.models loads it, with the log-prob head, on this device."""
        overrides = {"attn_implementation": attention} | ({"device_map": {"": 0}} if self.on_gpu else {})
        model = load_causal_lm(str(self.folder), dtype=dtype, config_overrides=overrides)
        add_logps_head(model)
        return model.to(self.device)

    def optimizer_name(self) -> str:
        """Nova's distributed_fused_adam (DeepSpeed's FusedAdam on a GPU worker), unless FusedAdam cannot be built
        here (no prebuilt op and no nvcc to JIT-compile it): then torch's AdamW, and the reason in the report."""
        if self.on_gpu and self.fused_adam_error is None:
            try:
                from deepspeed.ops.adam import FusedAdam

                FusedAdam([torch.nn.Parameter(torch.zeros(1, device=self.device))])
            except Exception as err:  # noqa: BLE001 - reported in "fused_adam_error"
                self.fused_adam_error = f"{type(err).__name__}: {err}"[:300]
        return "adamw" if self.fused_adam_error else "distributed_fused_adam"

    def flex_runs_here(self) -> bool:
        """flex attention on the GPU; on the CPU it compiles per shape (~20 s) and has no backward, so --dry-run
        checks its masks through core.attention's tests instead and skips it here."""
        return self.on_gpu and supports_flex(self.config)


def logps_of(model, rows: dict, layout: str, device, grad: bool = False):
    batch = on_device(collate_for(layout, 0)(rows), device)
    with contextlib.nullcontext() if grad else torch.no_grad():
        return sequence_logps_of(model, batch)


def check_precision(ctx: Context) -> dict:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ctx.model(dtype, "sdpa")
        results[dtype] = logps_of(model, ctx.agree_rows, "shared", ctx.device)
        del model
    (fp32, counts), (bf16, _) = results[torch.float32], results[torch.bfloat16]
    gap = per_token_gap(bf16, fp32, counts)
    return {"max_gap_nats_per_token": gap, "mean_logp_per_token": float(fp32.sum() / counts.sum()),
            "tolerance": TOLERANCE[torch.bfloat16], "ok": gap <= TOLERANCE[torch.bfloat16]}


def check_attention(ctx: Context) -> dict:
    """fp32, so that any gap is the mask logic's, not rounding's."""
    dtype = torch.float32
    implementations = ["eager", "sdpa"] + ([FLEX] if ctx.flex_runs_here() else [])
    weights = torch.arange(1.0, 2 * ctx.size["agree"]["pairs"] + 1, device=ctx.device)

    def run(model, layout):
        model.zero_grad(set_to_none=True)
        logps, counts = logps_of(model, ctx.agree_rows, layout, ctx.device, grad=True)
        (logps * weights).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), counts, grads

    paths, models = {}, {}
    base, base_counts, base_grads = run(models.setdefault("eager", ctx.model(dtype, "eager")), "padded")
    for implementation in implementations:
        model = models.pop("eager", None) if implementation == "eager" else ctx.model(dtype, implementation)
        for layout in ("padded", "shared", "packed"):
            if (implementation, layout) == ("eager", "padded"):
                continue
            logps, counts, grads = run(model, layout)
            gap, grad_gap = per_token_gap(logps, base, base_counts), relative_l2(grads, base_grads)
            paths[f"{implementation}/{layout}"] = {
                "max_gap_nats_per_token": gap, "grad_relative_l2": grad_gap,
                "ok": gap <= TOLERANCE[dtype] and grad_gap <= GRAD_TOLERANCE[dtype] and counts.equal(base_counts)}
        del model
        empty_cache(ctx)
    chosen = {layout: attention_for(layout, ctx.on_gpu, supports_flex(ctx.config)) for layout in ("shared", "packed",
                                                                                                 "padded")}
    return {"paths": paths, "chosen_by_core_attention": chosen, "dtype": "fp32",
            "flex": "checked" if FLEX in implementations else "not run here (CPU: compiles per shape, no backward)",
            "ok": all(p["ok"] for p in paths.values())}


class FusedAdamStandIn(torch.optim.AdamW):
    """DeepSpeed FusedAdam's signature (adam_w_mode, bias_correction) over torch's AdamW: FusedAdam needs CUDA."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def fused_base(ctx: Context):
    """None (DeepSpeed's FusedAdam) on the GPU; the stand-in on --dry-run."""
    return None if ctx.on_gpu else FusedAdamStandIn


def dpo_step_loss(chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected):
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid", beta=BETA,
                            chosen_lengths=chosen_n, rejected_lengths=rejected_n)
    return total_loss(losses)


def split(logps, counts):
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], counts[:half], counts[half:]


def check_loraplus_fused_adam(ctx: Context) -> dict:
    from training.loop import wrap_lora

    model = wrap_lora(ctx.model(ctx.dtype, "sdpa"), LORA, ctx.dtype, gradient_checkpointing=False)
    # on_gpu=True: the optimizer a GPU worker builds (training/ds_config.optimizer_choice), with the stand-in on CPU
    optimizer = build_optimizer(model, name="distributed_fused_adam", **ADAM, loraplus_lr_ratio=LORA.loraplus_lr_ratio,
                                on_gpu=True, fused_base=fused_base(ctx))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    chosen, rejected, chosen_n, rejected_n = split(*logps_of(model, ctx.agree_rows, "shared", ctx.device, grad=True))
    with model.disable_adapter():
        ref_chosen, ref_rejected, _, _ = split(*logps_of(model, ctx.agree_rows, "shared", ctx.device))
    loss = dpo_step_loss(chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected)
    loss.backward()
    optimizer.step()
    moved = any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
    lrs = group_lrs(optimizer)
    return {"optimizer": type(optimizer).__name__, "base": type(optimizer).__mro__[1].__name__, "group_lrs": lrs,
            "loss": float(loss.detach()), "adapters_moved": moved,
            "ok": math.isfinite(float(loss.detach())) and moved and len(lrs) == 2 and lrs[1] == lrs[0] * LORA.loraplus_lr_ratio}


def check_optimizers(ctx: Context) -> dict:
    """ms per step of each Adam over fp32 parameters of the full model's shapes (issue 14, defect 9: FusedAdam or
    torch's fused AdamW, whichever is faster where both run)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = [p.shape for p in AutoModelForCausalLM.from_config(ctx.config).parameters()]
    kinds = {"torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
             "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)}
    if ctx.on_gpu:
        from deepspeed.ops.adam import FusedAdam

        kinds = {"deepspeed_fused_adam": lambda ps: FusedAdam(ps, lr=1e-4, adam_w_mode=True)} | kinds
    results = {}
    for name, make in kinds.items():
        try:
            params = [torch.nn.Parameter(torch.randn(s, device=ctx.device) * 0.02) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            optimizer = make(params)
            for _ in range(2):
                optimizer.step()
            synchronize(ctx)
            started, steps = time.perf_counter(), 5
            for _ in range(steps):
                optimizer.step()
            synchronize(ctx)
            results[name] = {"ms_per_step": 1000 * (time.perf_counter() - started) / steps}
        except Exception as err:  # noqa: BLE001 - FusedAdam may fail to build on a machine without nvcc: say so
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        finally:
            params = optimizer = None
            empty_cache(ctx)
    timed = {k: v["ms_per_step"] for k, v in results.items() if "ms_per_step" in v}
    return {"per_optimizer": results, "fastest": min(timed, key=timed.get) if timed else None,
            "parameters": sum(math.prod(s) for s in shapes)}


def synchronize(ctx: Context) -> None:
    if ctx.on_gpu:
        torch.cuda.synchronize()


def empty_cache(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.on_gpu:
        torch.cuda.empty_cache()


def check_reference_stage(ctx: Context) -> dict:
    """The precompute stage's actor (training/reference.py ReferenceStage) over the step batches: its numbers are what
    the ZeRO-3 checks below train against, and what `reference` compares with the live reference."""
    import numpy as np

    from training.reference import ReferenceStage

    stage = ReferenceStage(str(ctx.folder), precision=ctx.precision, share_prompt=True)
    for index, rows in enumerate(ctx.step_rows):
        out = stage({k: np.array(v, dtype=object) for k, v in rows.items()})
        ctx.reference_logps[index] = (out["ref_chosen_logps"], out["ref_rejected_logps"])
    del stage
    empty_cache(ctx)
    return {"micro_batches": len(ctx.reference_logps), "layout": "shared"}


@contextlib.contextmanager
def counting_trace_invalidations():
    """Counts ZeRO-3's prefetch-trace invalidations (each makes DeepSpeed record the module order again, without
    prefetching, for the next step)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    counts = {"n": 0}
    original = Coordinator._invalidate_trace

    def counted(self):
        counts["n"] += 1
        return original(self)

    Coordinator._invalidate_trace = counted
    try:
        yield counts
    finally:
        Coordinator._invalidate_trace = original


def init_distributed(ctx: Context) -> None:
    """World size 1 on this machine: NCCL on the GPU, gloo on the CPU, over 127.0.0.1."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    if ctx.on_gpu:
        torch.cuda.set_device(ctx.device)
    deepspeed.init_distributed(dist_backend="nccl" if ctx.on_gpu else "gloo", auto_mpi_discovery=False)


def make_engine(ctx: Context, *, lora: bool, stage: int, micro_batch: int, zero_changes: dict | None = None):
    """A DeepSpeed engine built as training/loop.py builds it: the DeepSpeed config of training/ds_config.py, the model
    loaded under zero.Init (ZeRO-3) with the attention core/attention.py picks, the log-prob head, LoRA adapters,
    the optimizer of training/optim.py (Nova's distributed_fused_adam; LoRA+ groups) and its scheduler."""
    import deepspeed

    from training.loop import load_under_zero_init, wrap_lora

    init_distributed(ctx)
    config = ds_config.deepspeed_config(micro_batch=micro_batch, accum=ctx.size["accum"], workers=1,
                                        precision=ctx.precision, stage=stage, hidden_size=ctx.config.hidden_size)
    config["zero_allow_untested_optimizer"] = True
    config["zero_optimization"] |= zero_changes or {}
    attention = attention_for_model(ctx.config, packing=False, share_prompt=True, on_gpu=ctx.on_gpu)
    model, hf_config = load_under_zero_init(str(ctx.folder), ctx.dtype, config, {"attn_implementation": attention})
    add_logps_head(model)
    if lora:
        model = wrap_lora(model, LORA, ctx.dtype, gradient_checkpointing=False)
    optimizer = build_optimizer(model, name=ctx.optimizer_name(), **ADAM,
                                loraplus_lr_ratio=LORA.loraplus_lr_ratio if lora else 0, on_gpu=True,
                                fused_base=fused_base(ctx))  # the GPU worker's optimizer; on CPU the stand-in
    schedule = scheduler_factory(lr=ADAM["lr"], min_lr=1e-6, warmup_steps=0, constant_steps=10, total=100)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    engine.train()
    return engine, {"attention": attention, "optimizer": type(optimizer).__name__}, hf_config


def train_steps(ctx: Context, engine, batches: list[dict], steps: int, reference: str) -> dict:
    """steps optimizer steps over the micro-batches, as the loop runs them: the policy's log-probs, the reference's
    (precomputed: from the batch; adapter_disabled: the same engine's module without adapters), the loss, backward,
    step. Returns losses, seconds per step and ZeRO-3 trace invalidations after the first step."""
    losses, seconds, invalidations = [], [], []
    for _ in range(steps):
        with counting_trace_invalidations() as invalidated:
            synchronize(ctx)
            started = time.perf_counter()
            for cpu_batch in batches:
                batch = on_device(cpu_batch, ctx.device)  # one copy per micro-batch, shared with the reference
                chosen, rejected, chosen_n, rejected_n = split(*sequence_logps_of(engine, batch))
                if reference == "precompute":
                    ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
                else:
                    with torch.no_grad(), engine.module.disable_adapter():
                        ref_chosen, ref_rejected, _, _ = split(*sequence_logps_of(engine.module, batch))
                loss = dpo_step_loss(chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected)
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
            synchronize(ctx)
        seconds.append(time.perf_counter() - started)
        invalidations.append(invalidated["n"])
    return {"loss": [float(x) for x in losses], "seconds_per_step": seconds, "trace_invalidations_per_step":
            invalidations}


def step_batches(ctx: Context, precomputed: bool) -> list[dict]:
    collate = collate_for("shared", 0)
    return [collate(with_reference(rows, *ctx.reference_logps[i]) if precomputed else rows)
            for i, rows in enumerate(ctx.step_rows)]


def check_zero3_full(ctx: Context, report: dict) -> dict:
    pairs = ctx.size["agree"]["pairs"]
    engine, built, _keep = make_engine(ctx, lora=False, stage=3, micro_batch=pairs)
    if ctx.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = train_steps(ctx, engine, step_batches(ctx, precomputed=True), ctx.size["steps"], "precompute")
    peak = torch.cuda.max_memory_allocated() if ctx.on_gpu else None
    report["memory"] = memory_check(ctx, peak, pairs)
    del engine, _keep
    empty_cache(ctx)
    return result | built | {"ok": all(math.isfinite(x) for x in result["loss"])}


def memory_check(ctx: Context, peak: int | None, pairs: int) -> dict:
    """Peak allocated GPU memory against `raydpo plan`'s estimate for the same run (its CUDA-context and
    communication-buffer line left out: torch's allocator does not see them)."""
    shape = ctx.shape
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(*(ctx.step_rows[0][k] for k in
                                                                   ("prompt_ids", "chosen_ids", "rejected_ids"))))
    run = memory_plan.RunShape(gpus_per_node=1, nodes=1, micro_batch_pairs=pairs, max_length=longest,
                               dtype_bytes=2 if ctx.dtype == torch.bfloat16 else 4, gradient_checkpointing=False,
                               reference="precompute")
    lines = dict(memory_plan.estimate(shape, run))
    estimate = lines["total"] - lines["runtime (CUDA context, communication buffers)"]
    return {"estimate_gb": estimate / memory_plan.GB, "peak_allocated_gb": None if peak is None else
            peak / memory_plan.GB, "measured_over_estimate": None if peak is None else peak / estimate,
            "what": "full-rank ZeRO-3 step, world size 1, precomputed reference",
            "note": None if peak is not None else "no GPU: the estimate alone (CPU memory is not what it plans)"}


def check_zero3_lora(ctx: Context) -> dict:
    """LoRA under ZeRO-3 with the loop's reference (adapters disabled, live) and then with the precomputed one,
    on one engine: trace invalidations per step and seconds per step of each (issue 14, defect 6)."""
    pairs = ctx.size["agree"]["pairs"]
    engine, built, _keep = make_engine(ctx, lora=True, stage=3, micro_batch=pairs)
    # the live reference against the precompute stage's numbers, on the same micro-batch, before any step
    batch = on_device(step_batches(ctx, precomputed=True)[0], ctx.device)
    with torch.no_grad(), engine.module.disable_adapter():
        live, counts = sequence_logps_of(engine.module, batch)
    stage = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(live.dtype)
    gap = per_token_gap(live.float().cpu(), stage.float().cpu(), counts.cpu())
    reference_check = {"max_gap_nats_per_token": gap, "tolerance": TOLERANCE[ctx.dtype],
                       "what": "training/reference.ReferenceStage (precompute) against the LoRA engine's base with "
                               "adapters disabled under ZeRO-3 (the live reference)", "ok": gap <= TOLERANCE[ctx.dtype]}
    steps = ctx.size["steps"]
    live_run = train_steps(ctx, engine, step_batches(ctx, precomputed=False), steps, "adapter_disabled")
    precomputed_run = train_steps(ctx, engine, step_batches(ctx, precomputed=True), steps, "precompute")
    del engine, _keep
    empty_cache(ctx)

    def steady(run):  # after the first step, which records the trace
        return {"trace_invalidations": sum(run["trace_invalidations_per_step"][1:]),
                "seconds_per_step": sum(run["seconds_per_step"][1:]) / max(1, steps - 1)}

    losses = live_run["loss"] + precomputed_run["loss"]
    return built | {"reference": reference_check,
            "adapter_disabled": live_run | {"steady": steady(live_run)},
            "precompute": precomputed_run | {"steady": steady(precomputed_run)},
            "ok": all(math.isfinite(x) for x in losses)}


def check_reuse_distance(ctx: Context, report: dict) -> dict:
    """LoRA under ZeRO-3 with DeepSpeed's default stage3_max_reuse_distance (1e9: a gathered parameter stays while
    it is reused soon) beside raydpo's 0 (training/ds_config.py: tuned on CPU, where the scan of upcoming modules
    on every release cost most of a step): steady seconds per step of each, the precomputed reference."""
    engine, built, _keep = make_engine(ctx, lora=True, stage=3, micro_batch=ctx.size["agree"]["pairs"],
                                       zero_changes={"stage3_max_reuse_distance": 1_000_000_000})
    run = train_steps(ctx, engine, step_batches(ctx, precomputed=True), ctx.size["steps"], "precompute")
    del engine, _keep
    empty_cache(ctx)
    default = sum(run["seconds_per_step"][1:]) / max(1, ctx.size["steps"] - 1)
    ours = report.get("zero3_lora", {}).get("precompute", {}).get("steady", {}).get("seconds_per_step")
    return {"seconds_per_step": {"reuse_distance_0": ours, "reuse_distance_1e9": default},
            "default_over_ours": default / ours if ours else None, "loss": run["loss"]}


def check_speed(ctx: Context) -> dict:
    """Tokens/s and MFU of a full-rank step on one GPU as the loop runs one worker (ds_config.zero_stage(1): no
    partitioning), the reference forward (a plain model, as the precompute stage runs it) timed in the step."""
    speed = ctx.size["speed"]
    stage = ds_config.zero_stage(1)
    engine, built, _keep = make_engine(ctx, lora=False, stage=stage, micro_batch=speed["pairs"])
    reference = ctx.model(ctx.dtype, "sdpa").eval()
    cpu_batches = [collate_for("shared", 0)(ctx.speed_rows) for _ in range(ctx.size["accum"])]
    real_tokens = sum(b["real_tokens"] for b in cpu_batches)

    def step():
        for cpu_batch in cpu_batches:
            batch = on_device(cpu_batch, ctx.device)
            with torch.no_grad():
                ref_chosen, ref_rejected, _, _ = split(*sequence_logps_of(reference, batch))
            chosen, rejected, chosen_n, rejected_n = split(*sequence_logps_of(engine, batch))
            engine.backward(dpo_step_loss(chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected))
            engine.step()

    synchronize(ctx)
    started = time.perf_counter()
    step()  # the first step: flex attention compiles its kernels here
    synchronize(ctx)
    first = time.perf_counter() - started
    if ctx.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(ctx.size["timed_steps"]):
        step()
    synchronize(ctx)
    elapsed = time.perf_counter() - started
    tokens_per_s = real_tokens * ctx.size["timed_steps"] / elapsed
    sequence = speed["prompt"] + speed["answer"]
    flops = dpo_flops_per_token(ctx.config, sequence)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.on_gpu else "cpu"
    peak = peak_flops_of(device_name) if ctx.on_gpu else None
    del engine, reference, _keep
    empty_cache(ctx)
    return {"device": device_name, "parameters": ctx.shape.params,
            "zero_stage": ds_config.engine_stage(stage, ctx.precision), **built,
            "precision": ctx.precision, "pairs_per_micro_batch": speed["pairs"], "accum": ctx.size["accum"],
            "sequence_tokens": sequence, "real_tokens_per_step": real_tokens,
            "computed_tokens_per_step": sum(b["computed_tokens"] for b in cpu_batches),
            "first_step_s": first, "seconds_per_step": elapsed / ctx.size["timed_steps"],
            "tokens_per_s": tokens_per_s, "flops_per_real_token": flops, "achieved_flops": tokens_per_s * flops,
            "peak_flops": peak, "mfu": mfu(tokens_per_s, flops, peak),
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / memory_plan.GB if ctx.on_gpu else None}


CHECKS = ("precision", "attention", "loraplus_fused_adam", "optimizers", "reference_stage", "zero3_full",
          "zero3_lora", "reuse_distance", "speed")


def run_check(name: str, fn, report: dict, *args, only: set | None = None) -> None:
    """One check's result, or its error: one failing check does not hide the others' figures. only: the checks
    asked for (None: all); the ZeRO-3 checks need the reference stage's numbers, which run whenever they do."""
    if only is not None and name not in only:
        return
    started = time.perf_counter()
    try:
        report[name] = fn(*args)
    except Exception as err:  # noqa: BLE001 - reported, with the traceback on stderr
        traceback.print_exc()
        report[name] = {"error": f"{type(err).__name__}: {err}"[:500], "ok": False}
    report[name]["seconds"] = round(time.perf_counter() - started, 2)
    print(f"gpu_check: {name} done in {report[name]['seconds']:.1f}s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every check on CPU with a tiny model")
    parser.add_argument("--json", help="also write the JSON result here")
    parser.add_argument("--only", help=f"comma-separated checks to run (of {', '.join(CHECKS)}): a rerun of those "
                                       "that failed or ran out of time")
    args = parser.parse_args(argv)
    only = None if not args.only else set(args.only.split(","))
    if only and only - set(CHECKS):
        parser.error(f"unknown checks {sorted(only - set(CHECKS))}: choose from {', '.join(CHECKS)}")
    if only and only & {"zero3_full", "zero3_lora", "reuse_distance"}:
        only.add("reference_stage")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run to check on CPU")
    started = time.perf_counter()
    report: dict = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "dry_run": args.dry_run,
                    "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="raydpo-gpu-check-") as tmp, contextlib.redirect_stdout(sys.stderr):
        dtype = torch.float32 if args.dry_run else torch.bfloat16  # bf16 weights are exact in fp32 too
        device = "cpu" if args.dry_run else "cuda"
        folder = build_model_folder(Path(tmp) / "model", SIZES["dry" if args.dry_run else "gpu"]["model"], dtype,
                                    device)
        ctx = Context(args.dry_run, folder)
        import deepspeed
        import transformers

        report |= {"transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                   "model_parameters": ctx.shape.params}
        for name in CHECKS:
            fn = globals()[f"check_{name}"]
            run_check(name, fn, report, ctx, *((report,) if name in ("zero3_full", "reuse_distance") else ()),
                      only=only)
        if "zero3_lora" in report:
            report["reference"] = report["zero3_lora"].get("reference", {"error": "zero3_lora failed", "ok": False})
    report["fused_adam_error"] = ctx.fused_adam_error
    if "zero3_full" in report:
        report.setdefault("memory", {"error": "zero3_full failed", "ok": False})
    report["ray_imported"] = "ray" in sys.modules
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text, flush=True)
    return report


if __name__ == "__main__":
    main()
