"""Checkpoints through Ray Train: every rank's ZeRO-3 shard, optimizer, scheduler, RNG, step and data position.

Ray Train persists a reported checkpoint only after every worker has uploaded its part, and records it in its run
state last: that record is what makes a checkpoint complete, so a half-written one is never resumed from.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

TAG = "state"


def save_and_report(engine, state: dict, reports: list[dict], rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=TAG)  # collective: each rank writes its own shard files
        torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(tmp) / "raydpo_state.json").write_text(json.dumps(state))
        ray.train.report({"reports": reports, "checkpoint_step": state["step"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, checkpoint, rank: int) -> dict:
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(folder, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        state = json.loads((Path(folder) / "raydpo_state.json").read_text())
        rng_file = Path(folder) / f"rng_rank{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(saved: dict) -> None:
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
