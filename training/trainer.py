"""Builds Ray Train's TorchTrainer from the frozen Recipe and RunPlan (training/plan.py), and the progress lines.

The driver owns the run's small outputs (metrics.jsonl, summary.json); workers own the model and checkpoints.
Progress reaches the driver through a Ray Train UserCallback (it runs in the controller) and a queue.
"""
from __future__ import annotations

import math

from ray.train import UserCallback

from core.config import Recipe
from training.plan import RAY_TRAIN_DIR, RunPlan


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


def build_trainer(recipe: Recipe, plan: RunPlan, datasets: dict, *, storage_path: str, storage_filesystem=None,
                  callbacks=()):
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import train_loop  # the worker side: deepspeed and transformers load there
    from training.node_wait import NodeWait

    # preserve_order: a resumed run must see the data in the same order to skip exactly what it trained on. The
    # training set is not split: every worker reads all of it and trains its slice of each global batch
    # (training/batch_split.py), so the data position does not depend on the worker count
    data_config = ray.train.DataConfig(datasets_to_split=["validation"],
                                       execution_options=ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"recipe": recipe, "plan": plan},  # the frozen objects themselves (they pickle)
        scaling_config=ray.train.ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=None if plan.use_gpu else {"CPU": 1},
                                               placement_strategy=plan.placement_strategy),
        run_config=ray.train.RunConfig(
            name=RAY_TRAIN_DIR, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.training_config.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=recipe.training_config.max_failures),
            # NodeWait: a group that cannot start again (a lost node) waits node_wait_timeout_s, then the run stops
            callbacks=[*callbacks, NodeWait(recipe.training_config.node_wait_timeout_s)]),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
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
        # the end of the text: the worker's own error line comes last, after the traceback (training/failures.py)
        self.queue.put({"exception": {rank: f"{type(e).__name__}: {e}"[-2000:]
                                      for rank, e in worker_exceptions.items()}})
