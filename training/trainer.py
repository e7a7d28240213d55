"""Builds Ray Train's TorchTrainer from plain data (the resolved recipe and the run plan) and runs it.

The driver owns the run's small outputs (metrics.jsonl, summary.json); workers own the model and checkpoints.
Progress reaches the driver through a Ray Train UserCallback (it runs in the controller) and a queue.
"""
from __future__ import annotations

import math

from ray.train import UserCallback

from training import ds_config

RAY_TRAIN_DIR = "ray_train"  # under the run's output: Ray Train's run state and checkpoints
REFERENCE_DEFAULTS = {True: "adapter_disabled", False: "precompute"}  # LoRA? -> reference strategy


def run_uri(recipe: dict) -> str:
    return recipe["run"]["output_s3_path"].rstrip("/") + "/" + recipe["run"]["name"]


def plan_run(recipe: dict, *, train_pairs: int, validation_pairs: int, on_gpu: bool, gpus_per_node: int = 1,
             probe: dict | None = None) -> dict:
    """Everything the workers need to know that is not in the recipe: a pure function of counts and recipe."""
    tc = recipe["training_config"]
    lora = tc["model"]["peft"]["peft_scheme"] == "lora"
    replicas = recipe["run"]["replicas"]
    workers = replicas * (gpus_per_node if on_gpu else 1)
    micro, accum = ds_config.batch_plan(tc["global_batch_size"], workers, tc["micro_batch_size"])
    total = ds_config.total_steps(train_pairs, tc["global_batch_size"], tc["trainer"]["max_epochs"],
                                  tc["trainer"]["max_steps"])
    reference = tc["model"]["dpo_cfg"]["reference"]
    if reference == "auto":
        reference = REFERENCE_DEFAULTS[lora]
    return {
        "workers": workers,
        "use_gpu": on_gpu,
        "zero_stage": ds_config.zero_stage(workers, tc["zero_stage"]),
        "micro_batch": micro,
        "accum": accum,
        "total_steps": total,
        "steps_per_epoch": ds_config.steps_per_epoch(train_pairs, tc["global_batch_size"]),
        "micro_steps_per_epoch": ds_config.steps_per_epoch(train_pairs, tc["global_batch_size"]) * accum,
        "train_pairs": train_pairs,
        "validation_pairs": validation_pairs,
        "has_validation": validation_pairs >= workers * micro,
        "val_every": tc["trainer"]["val_check_interval"] if validation_pairs >= workers * micro else None,
        "checkpoint_every": tc["checkpoint"]["every_n_steps"],
        "reference": reference,
        "shuffle_buffer": tc["data"]["shuffle_buffer"] if tc["data"]["shuffle"] else None,
        # length-aware batching: micro-batches of pairs of similar width, grouped within this many pairs
        "length_grouping": True,
        "group_buffer": tc["data"]["shuffle_buffer"],
        # padding-free rows; pays off only with variable-length attention kernels (FlashAttention), so off here
        "packing": False,
        # one row per pair, the prompt computed once for both answers (core/batch.py collate_shared)
        "share_prompt": True,
        "logps_head": True,  # per-token log-probs of response positions only, never the [B, T, V] logits
        "logprob_chunk": 1024,
        "probe": probe,
        "model_uri": run_uri(recipe) + "/model",
        "run_uri": run_uri(recipe),
    }


def eta_seconds(step: int, total: int, elapsed: float) -> float:
    return math.inf if step <= 0 else elapsed / step * (total - step)


def format_progress(m: dict) -> str:
    eta = eta_seconds(m["step"], m["total_steps"], m["elapsed_s"])
    eta_text = "?" if math.isinf(eta) else f"{int(eta // 60)}m{int(eta % 60):02d}s"
    return (f"step {m['step']}/{m['total_steps']} | loss {m['loss']:.4f} | reward acc {m['rewards/accuracies']:.2f}"
            f" | margin {m['rewards/margins']:+.3f} | {m['tokens_per_s']:.0f} tok/s | ETA {eta_text}")


def format_validation(m: dict) -> str:
    return (f"validation @ step {m['step']} | loss {m['loss']:.4f} | reward acc {m['rewards/accuracies']:.2f}"
            f" | margin {m['rewards/margins']:+.3f}")


def build_trainer(recipe: dict, plan: dict, datasets: dict, *, storage_path: str, storage_filesystem=None,
                  callbacks=(), placement_strategy: str = "PACK"):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import train_loop

    tc = recipe["training_config"]
    from ray.data import ExecutionOptions

    # preserve_order: a resumed run must see the data in the same order to skip exactly what it trained on
    data_config = ray.train.DataConfig(datasets_to_split="all",
                                       execution_options=ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"recipe": recipe, "plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=plan["workers"], use_gpu=plan["use_gpu"],
                                               resources_per_worker=None if plan["use_gpu"] else {"CPU": 1},
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=RAY_TRAIN_DIR, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc["checkpoint"]["keep_last"]),
            failure_config=ray.train.FailureConfig(max_failures=tc["max_failures"]),
            callbacks=list(callbacks)),
        torch_config=TorchConfig(backend="nccl" if plan["use_gpu"] else "gloo"),
        datasets=datasets,
        dataset_config=data_config,
    )


class ProgressCallback(UserCallback):
    """Forwards rank 0's reports from the Ray Train controller to a queue that the driver reads."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "checkpoint": checkpoint.path if checkpoint else None})

    def after_exception(self, run_context, worker_exceptions):
        self.queue.put({"exception": {rank: repr(e)[:2000] for rank, e in worker_exceptions.items()}})
