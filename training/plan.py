"""The run plan: everything the workers need that is not in the recipe, decided once by the driver, frozen.

`build_run_plan` is a pure function of the recipe, where the workers run (cluster/placement.py, decided by the
launcher), the data's pair counts and the checkpoint the run continues from. The driver calls it once; the
workers receive the same object (frozen dataclasses pickle) beside the Recipe, and nothing edits either afterwards.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.config import Recipe, run_uri
from core.quantization import require_stage
from training import ds_config

RAY_TRAIN_DIR = "ray_train"  # under the run's output: Ray Train's run state and checkpoints
REFERENCE_DEFAULTS = {True: "adapter_disabled", False: "precompute"}  # LoRA? -> reference strategy


@dataclass(frozen=True, kw_only=True)
class ResumeAt:
    """What the driver found under the run's checkpoints before it started (training/checkpoint.py)."""
    checkpoint: str | None = None               # the checkpoint to continue from (latest complete, or --resume-from)
    ray_checkpoint_at_start: str | None = None  # the latest one Ray knows of: it hands it to workers on its own
    checkpoints_at_start: tuple[str, ...] = ()  # names there before this run: a restart looks for newer ones
    zero_stage: int | None = None               # the checkpoint's ZeRO stage: a resumed run keeps it
    universal: str | None = None                # the checkpoint converted for another worker count (reshard.py)


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    # where the workers run: launcher -> cluster/placement.py (a replica is a node: one worker per GPU, or one)
    workers: int
    use_gpu: bool
    placement_strategy: str
    # the batch split: rank r trains rank_pairs[r] pairs a step (their sum: training_config.global_batch_size), in
    # accum micro-batches of up to micro_batch; micro_batch x accum is the busiest rank's share (ds_config.batch_plan)
    rank_pairs: tuple[int, ...]
    micro_batch: int
    accum: int
    zero_stage: int
    # step counts, from the pairs the preflight counted
    train_pairs: int
    validation_pairs: int
    total_steps: int
    steps_per_epoch: int
    micro_steps_per_epoch: int
    has_validation: bool
    val_every: int | None
    checkpoint_every: int | None
    log_every: int                   # trainer.log_every_n_steps: progress lines and metrics rows every n steps
    reference: str                   # precompute | engine | adapter_disabled (dpo_cfg.reference, auto resolved)
    # LoRA with `precompute` and no cache yet: the adapter-disabled reference in the loop, its log-probs sent back
    # for the driver to write as the cache (training/reference.py), instead of a stage that holds up step 1
    fill_reference_cache: bool = False
    # data order: the shuffle buffer (None: no shuffling) and length-aware micro-batches within group_buffer pairs
    shuffle_buffer: int | None
    length_grouping: bool = True
    group_buffer: int
    # the forward pass (core/batch.py, core/forward.py)
    packing: bool = False            # padding-free rows; pays off only with variable-length attention kernels
    share_prompt: bool = True        # one row per pair, the prompt computed once for both answers
    logps_head: bool = True          # per-token log-probs of response positions only, never the [B, T, V] logits
    logprob_chunk: int = 1024
    probe: dict | None = None        # a few tokenised training pairs whose final log-probs the workers report
    # outputs and resuming
    run_uri: str
    model_uri: str
    ray_train_uri: str
    resume: ResumeAt = ResumeAt()
    omp_num_threads: str | None = None  # the driver's OMP_NUM_THREADS, for the workers' torch threads

    def summary(self) -> dict:
        """The plan as summary.json keeps it (without the probe's token ids)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "probe"}


def build_run_plan(recipe: Recipe, *, workers: int, use_gpu: bool, placement_strategy: str = "PACK",
                   train_pairs: int, validation_pairs: int, probe: dict | None = None,
                   resume: ResumeAt = ResumeAt(), omp_num_threads: str | None = None,
                   overrides: dict | None = None) -> RunPlan:
    """overrides: plan fields to replace before the plan is frozen (benchmarks/vs_trl.py turns the optimisations
    off with it). A batch split that cannot work is a ConfigError (training/ds_config.py batch_plan)."""
    tc = recipe.training_config
    lora = tc.model.peft.peft_scheme == "lora"
    micro, accum = ds_config.batch_plan(tc.global_batch_size, workers, tc.micro_batch_size,
                                        replicas=recipe.run.replicas)
    per_epoch = ds_config.steps_per_epoch(train_pairs, tc.global_batch_size)
    has_validation = validation_pairs >= workers * micro
    reference = tc.model.dpo_cfg.reference
    uri = run_uri(recipe)
    stage = ds_config.zero_stage(workers, tc.zero_stage, resume.zero_stage)
    require_stage(tc.model.peft.quantization.bits, stage)  # 8-bit cannot be partitioned: refused before any worker
    fields = dict(
        workers=workers, use_gpu=use_gpu, placement_strategy=placement_strategy,
        rank_pairs=ds_config.batch_split(tc.global_batch_size, workers),
        micro_batch=micro, accum=accum, zero_stage=stage,
        train_pairs=train_pairs, validation_pairs=validation_pairs,
        total_steps=ds_config.total_steps(train_pairs, tc.global_batch_size, tc.trainer.max_epochs,
                                          tc.trainer.max_steps),
        steps_per_epoch=per_epoch, micro_steps_per_epoch=per_epoch * accum,
        has_validation=has_validation,
        val_every=tc.trainer.val_check_interval if has_validation else None,
        checkpoint_every=tc.checkpoint.every_n_steps, log_every=tc.trainer.log_every_n_steps,
        reference=REFERENCE_DEFAULTS[lora] if reference == "auto" else reference,
        shuffle_buffer=tc.data.shuffle_buffer if tc.data.shuffle else None, group_buffer=tc.data.shuffle_buffer,
        probe=probe, run_uri=uri, model_uri=uri + "/model", ray_train_uri=f"{uri}/{RAY_TRAIN_DIR}",
        resume=resume, omp_num_threads=omp_num_threads,
    )
    unknown = set(overrides or {}) - set(fields) - {f.name for f in dataclasses.fields(RunPlan)}
    assert not unknown, f"not plan fields: {sorted(unknown)}"
    return RunPlan(**(fields | (overrides or {})))


def logs_at(step: int, total_steps: int, log_every: int) -> bool:
    """Whether a train step's metrics row and progress line are reported: every log_every steps, and the last."""
    return step % log_every == 0 or step == total_steps
