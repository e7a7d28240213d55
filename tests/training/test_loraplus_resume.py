"""LoRA+ on two workers under ZeRO-3 (Nova's LoRA recipes set loraplus_lr_ratio): trains, survives a killed
worker and resumes from a named checkpoint, with the A and B learning rates the ratio asks for at every step,
before and after each restore. Before training/optim.py the first optimizer step failed on every worker
(`zip() argument 2 is longer than argument 1`: a scheduler with four groups, DeepSpeed had kept two)."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
import yaml

from tests.training.test_resume import (EVERY, RAYDPO, STEPS, Run, checkpoint_step, fresh_name, held, metrics,
                                        trace_lines, workspace, write_recipe)  # noqa: F401 - workspace: fixture
from training import checkpoint as ckpt
from training import ds_config

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # a worker kill: `make test-faults`
RATIO, LR, MIN_LR, WARMUP = 16.0, 5.0e-3, 1.0e-5, 1


def loraplus_recipe(workspace, name: str, output: str):
    path = write_recipe(workspace, name, output, max_failures=1)
    recipe = yaml.safe_load(path.read_text())
    recipe["training_config"]["model"]["peft"]["lora_tuning"]["loraplus_lr_ratio"] = RATIO
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def assert_ratio_at_every_step(rows: list[dict]) -> None:
    train = [r for r in rows if r["split"] == "train"]
    assert train
    for row in train:
        expected = ds_config.lr_at(row["step"], lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, constant_steps=0,
                                   total=STEPS)
        a, b = row["lr_groups"]  # A matrices' group, then B's
        assert a == pytest.approx(expected, rel=1e-6), f"step {row['step']}"
        assert b == pytest.approx(RATIO * expected, rel=1e-6), f"step {row['step']}"


def test_loraplus_on_two_workers_keeps_its_ratio_through_a_worker_kill_and_a_resume(workspace):
    output, name = str(workspace / "out"), fresh_name(workspace, "loraplus")
    recipe = loraplus_recipe(workspace, name, output)
    log, trace = workspace / f"{name}.log", workspace / f"trace-{name}"
    run = Run(recipe, trace, log, hold_at=3)
    ray_train = f"{output}/{name}/ray_train"
    run.wait_for(lambda: held(trace) and checkpoint_step(ray_train) == EVERY,
                 "a hold after step 3 with the step-2 checkpoint written")
    victim = next(x["pid"] for x in reversed(trace_lines(trace)) if x["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    out = run.finish()
    assert run.proc.returncode == 0, out[-3000:]
    run_uri = f"{output}/{name}"
    rows = metrics(run_uri)
    restarted = [x for x in trace_lines(trace) if x["rank"] == 1 and x["pid"] != victim]
    assert restarted and min(x["step"] for x in restarted) == EVERY + 1  # went on from the step-2 checkpoint
    assert [r["step"] for r in rows if r["split"] == "train"][-STEPS + EVERY:] == list(range(EVERY + 1, STEPS + 1))
    assert_ratio_at_every_step(rows)

    # a second restore: the finished run retrained from its latest checkpoint, named on the command line
    latest, saved = ckpt.latest_complete(ray_train)
    resumed = subprocess.run([RAYDPO, "train", str(recipe), "--resume-from", latest], capture_output=True,
                             text=True, cwd=recipe.parent, timeout=900,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert saved["step"] > EVERY and f": step {saved['step']}/{STEPS}" in resumed.stdout
    again = metrics(run_uri)
    assert [r["step"] for r in again if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert_ratio_at_every_step(again)
