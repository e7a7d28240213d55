"""The worker loop, top to bottom: setup, train, finish, clean up.

Runs inside each Ray Train worker. It receives the frozen Recipe (core/config.py) and the driver's frozen RunPlan
(training/plan.py: batch split, step counts, reference strategy, layout, paths) and reads their attributes:
`recipe.training_config.model.dpo_cfg.beta` reaches the loss below as it was written in the YAML. Batches come from
the worker's Ray Data shard; the model sits in a DeepSpeed engine (ZeRO-3 across several workers) that we drive.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from itertools import islice

import numpy as np
import torch

from core import devices, quantization
from core.startup_trace import mark
from core import vision
from core.attention import attention_for_model, on_device
from core.batch import REFERENCE_COLUMNS, collate_for, model_layout
from core.config import LoraTuning, Recipe
from core.data.images import load_processor
from core.data.pipeline import TOKEN_COLUMNS, as_columns, grouped_micro_batches, shard_rows
from core.forward import add_logps_head, sequence_logps_of
from core.models import dropout_overrides, load_config, load_tokenizer, lora_config, resolve_model_source
from training import checkpoint as ckpt
from training import batch_split, ds_config, save
from training.losses import dpo_loss, total_loss
from training.optim import build_optimizer, group_lrs, scheduler_factory
from training.plan import RunPlan, logs_at
from training.step_metrics import gather, metrics_of, micro_part, step_record


def train_loop(config: dict) -> None:
    mark("worker: in the training loop")
    import deepspeed
    import ray.train

    mark("worker: deepspeed imported")
    recipe: Recipe = config["recipe"]
    plan: RunPlan = config["plan"]
    tc = recipe.training_config
    model_cfg, dpo = tc.model, tc.model.dpo_cfg
    lora = model_cfg.peft.peft_scheme == "lora"

    # ---------------------------------------------------------------- setup
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    on_gpu = torch.cuda.is_available()
    quant = model_cfg.peft.quantization  # QLoRA: the frozen base in 4/8 bit (core/quantization.py)
    devices.require_quantization(quant.bits)  # this worker's packages decide (bitsandbytes runs on CPU and GPU)
    device = torch.device("cuda", context.get_local_rank()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(devices.cpu_threads(devices.usable_cores(), context.get_local_world_size(),
                                              plan.omp_num_threads))
    seed_everything(tc.seed + rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    mark("worker: process group")

    precision = devices.precision_for(tc.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported(),
                                      cpu_bf16=devices.this_cpu_bf16_fast())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model_source = resolve_model_source(recipe.run.model_name_or_path)
    tokenizer = load_tokenizer(model_source)
    model_config = load_config(model_source)
    engine_config = ds_config.deepspeed_config(micro_batch=plan.micro_batch, accum=plan.accum, workers=world,
                                               precision=precision, stage=plan.zero_stage,
                                               hidden_size=hidden_size_of(model_config))
    engine_config["zero_allow_untested_optimizer"] = True  # torch AdamW / LoRA+ are client optimizers
    dropouts = dropout_overrides(model_config, {"hidden_dropout": model_cfg.hidden_dropout,
                                                "attention_dropout": model_cfg.attention_dropout,
                                                "ffn_dropout": model_cfg.ffn_dropout})
    dropouts["attn_implementation"] = attention_for_model(model_config, packing=plan.packing,  # core/attention.py
                                                          share_prompt=plan.share_prompt, on_gpu=on_gpu)

    assert len(plan.rank_pairs) == world, (plan.rank_pairs, world)  # Ray started the workers the plan asked for
    resume_uri = ckpt.checkpoint_to_resume(plan, rank)
    # the driver's checkpoint from another worker count: its universal form (training/reshard.py); a checkpoint this
    # run wrote since (a worker-group restart) has this run's layout
    universal = plan.resume.universal if resume_uri and resume_uri == plan.resume.checkpoint else None
    engine_config["checkpoint"] = {"load_universal": universal is not None}

    base_kwargs = dropouts | quantization.load_kwargs(quant, precision, zero_stage=plan.zero_stage, device=device)
    policy, hf_ds_config = load_under_zero_init(model_source, dtype, engine_config, base_kwargs)
    mark("worker: model loaded")
    if quantization.quantized(quant):  # the reference is this quantized base with the adapters off
        policy = quantization.prepare_for_training(policy, gradient_checkpointing=tc.gradient_checkpointing,
                                                   partitioned=plan.zero_stage == 3)
    vlm = vision.is_vision_config(model_config)  # a vision-language model (core/vision.py)
    if vlm and model_cfg.freeze_vision_tower:
        vision.freeze_vision_tower(policy)  # the projector and the language model train
    layout = model_layout(policy.config, packing=plan.packing, share_prompt=plan.share_prompt)
    if plan.logps_head:
        add_logps_head(policy)  # before PEFT wraps it: the adapters' forward reaches the patched one
    if lora:
        policy = wrap_lora(policy, model_cfg.peft.lora_tuning, dtype, tc.gradient_checkpointing,
                           exclude=vision.lora_exclusions(policy, model_cfg.freeze_vision_tower) if vlm else None)
    elif tc.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optim = model_cfg.optim
    optimizer = build_optimizer(policy, name=optim.name, lr=optim.lr, eps=optim.eps, betas=optim.betas,
                                weight_decay=optim.weight_decay, adam_w_mode=optim.adam_w_mode, on_gpu=on_gpu,
                                loraplus_lr_ratio=model_cfg.peft.lora_tuning.loraplus_lr_ratio if lora else 0)
    # a callable: DeepSpeed builds the scheduler on the parameter groups it kept (training/optim.py)
    schedule = scheduler_factory(lr=optim.lr, min_lr=optim.sched.min_lr, warmup_steps=optim.sched.warmup_steps,
                                 constant_steps=optim.sched.constant_steps, total=plan.total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=policy, optimizer=optimizer,
                                                           lr_scheduler=schedule, config=engine_config)
    mark("worker: deepspeed engine")
    reference = None
    if plan.reference == "engine":
        ref_model, _ref_hf_config = load_under_zero_init(model_source, dtype, engine_config, dropouts)
        if plan.logps_head:
            add_logps_head(ref_model)
        reference, *_ = deepspeed.initialize(model=ref_model, config=ds_config.reference_config(engine_config))
        reference.eval()

    collate = collate_for(layout, tokenizer.pad_token_id)
    # a VLM's micro-batch without images runs a blank one through the vision encoder (core/vision.py: ZeRO-3 gathers
    # its weights on every rank); the processor only, once
    blank = vision.blank_image_inputs(load_processor(model_source)) if vlm else None

    def collate_with_sources(batch):  # the pairs' file:line travel along, for the data-position checks
        return vision.with_blank_image(collate(batch), blank) | {"sources": [str(s) for s in batch.get("source", [])]}

    def batches(split: str, epoch: int):  # validation: each worker its own part of the split (Ray Data's)
        shuffled = split == "train" and plan.shuffle_buffer is not None
        if plan.length_grouping:  # micro-batches of similar-width pairs (core/data/pipeline.py)
            return grouped_micro_batches(ray.train.get_dataset_shard(split), micro_batch=plan.micro_batch,
                                         buffer_size=plan.group_buffer, collate=collate_with_sources,
                                         seed=tc.seed + epoch if shuffled else None)
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=plan.micro_batch, collate_fn=collate_with_sources, drop_last=True,
            local_shuffle_buffer_size=plan.shuffle_buffer if split == "train" else None,
            local_shuffle_seed=tc.seed + epoch if split == "train" else None)

    # resuming: after a worker-group restart, a driver rerun or --resume-from (the step, epoch and data position)
    state = (ckpt.restore(engine, resume_uri, rank, universal) if resume_uri else
             {"step": 0, "epoch": 0, "batches_in_epoch": 0})
    replay = state.pop("rows", [])
    if replay:  # a worker that died may have taken reports with it: the driver keeps the steps it never received
        ckpt.send_metrics({"reports": replay, "replayed": True})

    def train_batches():
        """(micro-batch, real pairs in it) still to train, epoch after epoch, from the data position in `state`: the
        global batches done in this epoch, the same count whatever the worker count (training/batch_split.py). It
        moves as each global batch is handed out; a checkpoint saves it; a resumed run skips what was trained."""
        while True:
            epoch = state["epoch"]
            rng = random.Random(tc.seed + epoch) if plan.shuffle_buffer is not None else None
            rows = shard_rows(ray.train.get_dataset_shard("train"), (*TOKEN_COLUMNS, "source", *REFERENCE_COLUMNS))
            epoch_batches = enumerate(batch_split.global_batches(
                rows, global_batch_size=tc.global_batch_size, buffer_size=plan.group_buffer, rng=rng,
                group_by_length=plan.length_grouping))
            for index, global_batch in islice(epoch_batches, state["batches_in_epoch"], plan.steps_per_epoch):
                state["batches_in_epoch"] = index + 1
                for rows_, pairs in batch_split.rank_micro_batches(
                        global_batch, shares=plan.rank_pairs, rank=rank, micro_batch=plan.micro_batch, accum=plan.accum,
                        by_width=plan.length_grouping):
                    yield collate_with_sources(as_columns(rows_)), pairs
            state["epoch"] += 1
            state["batches_in_epoch"] = 0

    def pair_logps(batch, model, with_grad):
        batch = on_device(batch, device)  # once per micro-batch: policy and reference share it and its mask
        with torch.no_grad() if not with_grad else nullcontext():
            logps, counts = sequence_logps_of(model, batch, chunk_size=plan.logprob_chunk, head=plan.logps_head)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:], counts[:half], counts[half:]

    # a LoRA run whose reference cache is missing fills it as it trains (training/reference.py): split -> [(sources,
    # [pairs, 2] log-probs)], gathered to rank 0 at the end as split -> {source: [chosen, rejected]}
    reference_seen: dict[str, list] = {"train": [], "validation": []}

    def reference_logps(batch, split="train"):
        if plan.reference == "precompute":  # computed ahead of training by training/reference.py
            return batch["ref_chosen_logps"].to(device), batch["ref_rejected_logps"].to(device)
        if reference is not None:
            return pair_logps(batch, reference, with_grad=False)[:2]
        if not plan.fill_reference_cache:
            with engine.module.disable_adapter():  # LoRA: the base without adapters is the reference
                return pair_logps(batch, engine.module, with_grad=False)[:2]
        was_training = engine.module.training
        engine.module.eval()  # as the precompute stage computes them: no dropout in what the cache keeps
        with engine.module.disable_adapter():
            ref_chosen, ref_rejected = pair_logps(batch, engine.module, with_grad=False)[:2]
        engine.module.train(was_training)
        if batch.get("sources"):  # the end-of-run probe pairs carry none and are no part of the cache
            # kept on the device: read to the host once, at the end (no host sync per micro-batch)
            reference_seen[split].append((batch["sources"], torch.stack([ref_chosen, ref_rejected], dim=1)))
        return ref_chosen, ref_rejected

    def loss_of(batch, with_grad, split="train"):
        """The micro-batch's loss (TRL's, training/losses.py) and what it adds to the step's metrics."""
        chosen, rejected, chosen_n, rejected_n = pair_logps(batch, engine if with_grad else engine.module, with_grad)
        ref_chosen, ref_rejected = reference_logps(batch, split)
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                loss_type=dpo.loss_type, beta=dpo.beta,
                                                label_smoothing=dpo.label_smoothing,
                                                chosen_lengths=chosen_n, rejected_lengths=rejected_n)
        loss = total_loss(losses, rpo_alpha=dpo.rpo_alpha, chosen_token_logps_sum=chosen, chosen_lengths=chosen_n)
        return loss, micro_part(loss, chosen_r, rejected_r, chosen, rejected, real_tokens=batch["real_tokens"],
                                computed_tokens=batch["computed_tokens"], unique_tokens=batch["unique_tokens"])

    def validate(step: int) -> dict:
        engine.eval()
        parts = [loss_of(batch, with_grad=False, split="validation")[1] for batch in batches("validation", 0)]
        engine.train()
        return metrics_of(gather(step_record(parts), world), elapsed=1.0) | {"split": "validation", "step": step}

    unsaved_rows: list[dict] = []  # reported since the last checkpoint; the next checkpoint keeps them

    def send(reports: list[dict]) -> None:
        """This step's rows to the driver, with a checkpoint every checkpoint_every steps (not at the last step:
        the final model is saved whole below)."""
        nonlocal unsaved_rows
        step = state["step"]
        if plan.checkpoint_every and step % plan.checkpoint_every == 0 and step < plan.total_steps:
            ckpt.save_and_report(engine, state, reports, rank=rank, world=world, plan=plan, seed=tc.seed,
                                 lora=lora, unsaved_rows=unsaved_rows)
            unsaved_rows = []
        elif reports:
            ckpt.send_metrics({"reports": reports})
            unsaved_rows += reports

    # ---------------------------------------------------------------- train
    engine.train()
    started = time.time()
    parts, step_started = [], time.time()
    # the failure tests' tracer (RAYDPO_TRACE_DIR) wraps the micro-batches; without it they come as they are
    micro_batches = ckpt.traced(train_batches(), state, rank,
                                sources_of=lambda item: item[0]["sources"] if item[1] else [])
    for batch, pairs in micro_batches if state["step"] < plan.total_steps else ():  # resumed at the end: none
        if not state["step"] and not parts:
            mark("worker: first micro-batch")
        loss, part = loss_of(batch, with_grad=True)
        # an uneven split: this rank's share weighted so the step's gradient is the global batch's mean (ds_config)
        engine.backward(loss * ds_config.loss_weight(pairs, workers=world, accum=plan.accum,
                                                     global_batch_size=tc.global_batch_size))
        boundary = engine.is_gradient_accumulation_boundary()
        logged = boundary and logs_at(state["step"] + 1, plan.total_steps, plan.log_every)
        unclipped_norm = grad_norm(engine) if logged else None
        engine.step()
        if pairs:  # a padding pair (weight 0) is no part of the step's metrics
            parts.append(part)
        if not boundary:
            continue
        state["step"] += 1
        if state["step"] == 1:
            mark("worker: step 1 done")
        reports = []
        if logged:  # one host copy and one gather per logged step, none per micro-batch
            metrics = metrics_of(gather(step_record(parts), world), elapsed=time.time() - step_started)
            reports.append(metrics | {
                "step": state["step"], "epoch": state["epoch"] + (state["batches_in_epoch"] - 1) /
                plan.steps_per_epoch, "split": "train", "lr": scheduler.get_last_lr()[0],
                "lr_groups": group_lrs(optimizer),
                "grad_norm": float(engine.get_global_grad_norm() or unclipped_norm or 0.0),
                "elapsed_s": time.time() - started, "total_steps": plan.total_steps})
        if plan.val_every and state["step"] % plan.val_every == 0 and state["step"] < plan.total_steps:
            reports.append(validate(state["step"]))
        send(reports)
        parts, step_started = [], time.time()
        if state["step"] >= plan.total_steps:
            break

    # ---------------------------------------------------------------- finish: validation, model, probe
    final = [validate(state["step"])] if plan.has_validation else []
    engine.eval()
    probe_logps = None
    if plan.probe:
        probe = collate({k: plan.probe[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
        chosen, rejected, _, _ = pair_logps(probe, engine.module, with_grad=False)
        probe_logps = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
        if plan.reference in ("engine", "adapter_disabled"):  # the reference as training ended: LoRA's base
            ref_chosen, ref_rejected = reference_logps(probe)
            probe_logps |= {"reference_chosen": ref_chosen.tolist(), "reference_rejected": ref_rejected.tolist()}
    reference_cache = gather_reference(reference_seen, world) if plan.fill_reference_cache else None
    saved_with = load_processor(model_source) if vlm else tokenizer  # a VLM's folder keeps its processor
    save.save_final_model(engine, saved_with, plan.model_uri, rank, lora)  # training/save.py: LoRA: the adapter
    ckpt.send_metrics({"reports": final, "final": True, "probe_logps": probe_logps, "step": state["step"],
                       "reference_logps": reference_cache})

    # ---------------------------------------------------------------- clean up
    del engine, reference
    if on_gpu:
        torch.cuda.empty_cache()


def gather_reference(seen_batches: dict[str, list], world: int) -> dict[str, dict] | None:
    """Every rank's reference log-probs by split and pair source, merged on rank 0 (None on the other ranks)."""
    import torch.distributed as dist

    seen = {split: {source: values for sources, logps in batches
                    for source, values in zip(sources, logps.float().cpu().tolist())}
            for split, batches in seen_batches.items()}
    if world == 1:
        return seen
    parts = [None] * world
    dist.all_gather_object(parts, seen)
    if dist.get_rank() != 0:
        return None
    return {split: {k: v for part in parts for k, v in part[split].items()} for split in seen}


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
    auto_class = vision.model_class(load_config(source)) if source else AutoModelForCausalLM  # a VLM: its own
    model = auto_class.from_pretrained(source, dtype=dtype, **config_overrides)
    return model, hf_ds_config


def wrap_lora(model, lora: LoraTuning, dtype, gradient_checkpointing: bool, exclude: list[str] | None = None):
    from peft import get_peft_model

    if gradient_checkpointing:
        # ZeRO-3 + LoRA: reentrant checkpointing needs inputs that require grad, or adapters get no gradient.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(lora, exclude_modules=exclude))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)  # adapters in the base dtype: ZeRO-3 flattens one dtype
    return model
