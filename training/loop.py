"""The worker loop, top to bottom: setup, train, checkpoint, clean up.

Runs inside each Ray Train worker. It receives plain data only: the resolved recipe (a dict in the shape of
recipes/reference.yaml) and the driver's plan (batch split, step counts, paths). Batches come from the worker's Ray
Data shard; the model sits in a DeepSpeed ZeRO-3 engine that we drive directly.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from training import checkpoint as ckpt
from core import devices
from training import ds_config
from core.batch import collate_for, model_layout
from core.data.pipeline import grouped_micro_batches
from core.forward import add_logps_head, sequence_logps_of
from training.losses import dpo_loss, rpo_term
from core.models import dropout_overrides, load_config, load_tokenizer, lora_config, resolve_model_source

# Sums that are all-reduced across workers each step; metrics are ratios of these.
SUMS = ("loss", "chosen_rewards", "rejected_rewards", "correct", "pairs", "chosen_logps", "rejected_logps",
        "real_tokens", "computed_tokens", "micro_batches")


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train

    recipe, plan = config["recipe"], config["plan"]
    tc = recipe["training_config"]
    model_cfg, dpo = tc["model"], tc["model"]["dpo_cfg"]
    lora = model_cfg["peft"]["peft_scheme"] == "lora"

    # ---------------------------------------------------------------- setup
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", context.get_local_rank()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(devices.cpu_threads(len(os.sched_getaffinity(0)), context.get_local_world_size(),
                                                 plan.get("omp_num_threads")))
    seed_everything(tc["seed"] + rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)

    precision = devices.precision_for(tc["precision"], on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model_source = resolve_model_source(recipe["run"]["model_name_or_path"])
    tokenizer = load_tokenizer(model_source)
    model_config = load_config(model_source)
    engine_config = ds_config.deepspeed_config(micro_batch=plan["micro_batch"], accum=plan["accum"], workers=world,
                                               precision=precision, stage=plan["zero_stage"],
                                               hidden_size=hidden_size_of(model_config))
    engine_config["zero_allow_untested_optimizer"] = True  # torch AdamW / LoRA+ are client optimizers
    dropouts = dropout_overrides(model_config, {k: model_cfg[k] for k in
                                                ("hidden_dropout", "attention_dropout", "ffn_dropout")})

    resume_uri = ckpt.checkpoint_to_resume(plan, rank)

    policy, hf_ds_config = load_under_zero_init(model_source, dtype, engine_config, dropouts)
    layout = model_layout(policy.config, packing=plan["packing"], share_prompt=plan["share_prompt"])
    if plan["logps_head"]:
        add_logps_head(policy)  # before PEFT wraps it: the adapters' forward reaches the patched one
    if lora:
        policy = wrap_lora(policy, model_cfg["peft"]["lora_tuning"], dtype, tc["gradient_checkpointing"])
    elif tc["gradient_checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optim = model_cfg["optim"]
    optimizer = build_optimizer(policy, optim, model_cfg["peft"]["lora_tuning"] if lora else None)
    schedule = partial(ds_config.lr_at, lr=optim["lr"], min_lr=optim["sched"]["min_lr"],
                       warmup_steps=optim["sched"]["warmup_steps"],
                       constant_steps=optim["sched"]["constant_steps"], total=plan["total_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / optim["lr"])
    engine, optimizer, _, scheduler = deepspeed.initialize(model=policy, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=engine_config)
    reference = None
    if plan["reference"] == "engine":
        ref_model, _ref_hf_config = load_under_zero_init(model_source, dtype, engine_config, dropouts)
        if plan["logps_head"]:
            add_logps_head(ref_model)
        reference, *_ = deepspeed.initialize(model=ref_model, config=ds_config.reference_config(engine_config))
        reference.eval()

    collate = collate_for(layout, tokenizer.pad_token_id)

    def collate_with_sources(batch):  # the pairs' file:line travel along, for the data-position checks
        return collate(batch) | {"sources": [str(s) for s in batch.get("source", [])]}

    def batches(split: str, epoch: int):
        if plan["length_grouping"]:  # micro-batches of similar-width pairs (core/data/pipeline.py)
            return grouped_micro_batches(ray.train.get_dataset_shard(split), micro_batch=plan["micro_batch"],
                                         buffer_size=plan["group_buffer"], collate=collate_with_sources,
                                         seed=tc["seed"] + epoch if split == "train" and plan["shuffle_buffer"]
                                         else None)
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=plan["micro_batch"], collate_fn=collate_with_sources, drop_last=True,
            local_shuffle_buffer_size=plan["shuffle_buffer"] if split == "train" else None,
            local_shuffle_seed=tc["seed"] + epoch if split == "train" else None)

    # resuming: after a worker-group restart, a driver rerun or --resume-from (the step, epoch and data position)
    state = ckpt.restore(engine, resume_uri, rank) if resume_uri else {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    replay = state.pop("rows", [])
    if replay:  # a worker that died may have taken reports with it: the driver keeps the steps it never received
        ckpt.report({"reports": replay, "replayed": True})

    loss_settings = dict(loss_type=dpo["loss_type"], beta=dpo["beta"], label_smoothing=dpo["label_smoothing"])

    def pair_logps(batch, model, with_grad):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad() if not with_grad else nullcontext():
            logps, counts = sequence_logps_of(model, batch, chunk_size=plan["logprob_chunk"], head=plan["logps_head"])
        half = logps.shape[0] // 2
        return logps[:half], logps[half:], counts[:half], counts[half:]

    def reference_logps(batch):
        if plan["reference"] == "precompute":  # computed ahead of training by training/reference.py
            return batch["ref_chosen_logps"].to(device), batch["ref_rejected_logps"].to(device)
        if reference is not None:
            return pair_logps(batch, reference, with_grad=False)[:2]
        with engine.module.disable_adapter():  # LoRA: the base without adapters is the reference
            return pair_logps(batch, engine.module, with_grad=False)[:2]

    def loss_and_sums(batch, with_grad):
        chosen, rejected, chosen_n, rejected_n = pair_logps(batch, engine if with_grad else engine.module, with_grad)
        ref_chosen, ref_rejected = reference_logps(batch)
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                chosen_lengths=chosen_n, rejected_lengths=rejected_n,
                                                **loss_settings)
        loss = losses.mean()
        if dpo["rpo_alpha"] is not None:
            loss = loss + dpo["rpo_alpha"] * rpo_term(chosen, chosen_n)
        sums = {"loss": loss.item(), "chosen_rewards": chosen_r.sum().item(),
                "rejected_rewards": rejected_r.sum().item(), "correct": (chosen_r > rejected_r).sum().item(),
                "pairs": len(losses), "chosen_logps": chosen.detach().sum().item(),
                "rejected_logps": rejected.detach().sum().item(), "real_tokens": int(batch["real_tokens"]),
                "computed_tokens": int(batch["computed_tokens"]), "micro_batches": 1}
        return loss, sums

    def validate() -> dict:
        engine.eval()
        totals = dict.fromkeys(SUMS, 0.0)
        for batch in batches("validation", 0):
            totals = add_sums(totals, loss_and_sums(batch, with_grad=False)[1])
        engine.train()
        return step_metrics(all_reduce_sums(totals, world), elapsed=1.0) | {"split": "validation"}

    # ---------------------------------------------------------------- train
    engine.train()
    started = time.time()
    probe_logps = None
    unsaved_rows: list[dict] = []  # reported since the last checkpoint; the next checkpoint keeps them
    while state["step"] < plan["total_steps"]:
        step_sums, step_started, step_sources = dict.fromkeys(SUMS, 0.0), time.time(), []
        skip = state["micro_in_epoch"]  # resuming mid-epoch: batches this epoch already trained on
        for micro, batch in enumerate(batches("train", state["epoch"])):
            if micro < skip:
                continue
            if micro >= plan["micro_steps_per_epoch"] or state["step"] >= plan["total_steps"]:
                break
            loss, sums = loss_and_sums(batch, with_grad=True)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            unclipped_norm = grad_norm(engine) if boundary else None
            engine.step()
            step_sums = add_sums(step_sums, sums)
            step_sources += batch["sources"]
            state["micro_in_epoch"] = micro + 1
            if not boundary:
                continue
            state["step"] += 1
            metrics = step_metrics(all_reduce_sums(step_sums, world), elapsed=time.time() - step_started)
            metrics |= {"step": state["step"], "epoch": state["epoch"] + micro / plan["micro_steps_per_epoch"],
                        "split": "train", "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(engine.get_global_grad_norm() or unclipped_norm or 0.0),
                        "elapsed_s": time.time() - started, "total_steps": plan["total_steps"]}
            reports = [metrics]
            if plan["val_every"] and state["step"] % plan["val_every"] == 0 and state["step"] < plan["total_steps"]:
                reports.append(validate() | {"step": state["step"]})
            if plan["checkpoint_every"] and state["step"] % plan["checkpoint_every"] == 0 \
                    and state["step"] < plan["total_steps"]:
                ckpt.save_and_report(engine, state, reports, rank=rank, world=world, plan=plan, seed=tc["seed"],
                                     lora=lora, unsaved_rows=unsaved_rows)
                unsaved_rows = []
            else:
                ckpt.report({"reports": reports})
                unsaved_rows += reports
            ckpt.trace_step(state["step"], rank, step_sources)
            step_sums, step_started, step_sources = dict.fromkeys(SUMS, 0.0), time.time(), []
        state["epoch"] += 1
        state["micro_in_epoch"] = 0

    # ---------------------------------------------------------------- finish: validation, model, probe
    final = [validate() | {"step": state["step"]}] if plan["has_validation"] else []
    engine.eval()
    if plan["probe"]:
        probe = collate({k: plan["probe"][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
        chosen, rejected, _, _ = pair_logps(probe, engine.module, with_grad=False)
        probe_logps = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
        if plan["reference"] in ("engine", "adapter_disabled"):  # the reference as training ended: LoRA's base
            ref_chosen, ref_rejected = reference_logps(probe)
            probe_logps |= {"reference_chosen": ref_chosen.tolist(), "reference_rejected": ref_rejected.tolist()}
    save_final_model(engine, tokenizer, plan["model_uri"], rank, lora)
    ckpt.report({"reports": final, "final": True, "probe_logps": probe_logps, "step": state["step"]})

    # ---------------------------------------------------------------- clean up
    del engine, reference
    if on_gpu:
        torch.cuda.empty_cache()


def hidden_size_of(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def grad_norm(engine) -> float | None:
    """The gradient norm before clipping, where DeepSpeed does not record one (no ZeRO partitioning, fp32): there
    the gradients are whole and already averaged across workers when the accumulation boundary's backward ends."""
    if engine.zero_optimization_stage() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None  # ZeRO's and the 16-bit optimizers' own norm is read after the step
    grads = [p.grad.detach().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_under_zero_init(source: str, dtype, engine_config: dict, config_overrides: dict):
    """Under ZeRO-3, loads weights partitioned as they arrive (zero.Init through transformers), never whole per
    worker; without partitioning (one worker), a plain load."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(engine_config)  # must stay alive while from_pretrained runs
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **config_overrides)
    return model, hf_ds_config


def wrap_lora(model, lora: dict, dtype, gradient_checkpointing: bool):
    from peft import get_peft_model

    if gradient_checkpointing:
        # ZeRO-3 + LoRA: reentrant checkpointing needs inputs that require grad, or adapters get no gradient.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(lora))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)  # adapters in the base dtype: ZeRO-3 flattens one dtype
    return model


def build_optimizer(model, optim: dict, lora: dict | None):
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=optim["lr"], eps=optim["eps"], betas=tuple(optim["betas"]),
                  weight_decay=optim["weight_decay"] if optim["adam_w_mode"] else 0.0)
    choice = ds_config.optimizer_choice(optim["name"], torch.cuda.is_available())
    if choice == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        optimizer_cls = partial(FusedAdam, adam_w_mode=optim["adam_w_mode"])
    else:
        optimizer_cls = torch.optim.AdamW
    if lora and lora["loraplus_lr_ratio"]:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model=model, optimizer_cls=optimizer_cls,
                                         loraplus_lr_ratio=lora["loraplus_lr_ratio"], **kwargs)
    return optimizer_cls(params, **kwargs)


def add_sums(totals: dict, sums: dict) -> dict:
    return {k: totals[k] + sums[k] for k in SUMS}


def all_reduce_sums(sums: dict, world: int) -> dict:
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    values = torch.tensor([float(sums[k]) for k in SUMS], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(values)
    reduced = dict(zip(SUMS, values.tolist()))
    reduced["loss"] /= max(reduced["micro_batches"], 1)  # the mean of the workers' micro-batch losses
    return reduced


def step_metrics(sums: dict, elapsed: float) -> dict:
    pairs = max(sums["pairs"], 1)
    chosen, rejected = sums["chosen_rewards"] / pairs, sums["rejected_rewards"] / pairs
    return {"loss": sums["loss"], "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": sums["correct"] / pairs, "rewards/margins": chosen - rejected,
            "logps/chosen": sums["chosen_logps"] / pairs, "logps/rejected": sums["rejected_logps"] / pairs,
            "tokens_per_s": sums["real_tokens"] / max(elapsed, 1e-9), "real_tokens": sums["real_tokens"],
            "padding_waste": sums["computed_tokens"] / max(sums["real_tokens"], 1), "pairs": sums["pairs"]}


def save_final_model(engine, tokenizer, model_uri: str, rank: int, lora: bool) -> None:
    """Gathers the 16-bit weights (a collective: every rank calls it); rank 0 writes safetensors and uploads."""
    from core import storage

    partitioned = engine.zero_optimization_partition_weights()
    state_dict = engine._zero3_consolidated_16bit_state_dict() if partitioned else engine.module.state_dict()
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, model_uri)
