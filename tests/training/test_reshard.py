"""Resuming on another worker count (training/reshard.py): a run's checkpoint goes on on another worker count, and
that run's checkpoint on the first count again (2 -> 1 -> 2 with LoRA, 1 -> 2 -> 1 full-rank), through DeepSpeed's
universal checkpoint. The global batch stays, the schedule continues and the data position is exact: each step
trains the pairs the uninterrupted run's step trained (whatever rank had them), and the losses match it.

Dropout is off in these recipes: with it, ranks that did not exist in the checkpoint's run draw other masks, and the
losses would only be close. Everything else (weights, Adam moments, the step, the schedule) is carried exactly.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from core import storage
from tests.training.test_resume import (PAIRS, RAYDPO, STEPS, fresh_name, metrics, sources_by_step, trace_lines,
                                        train_losses, write_recipe)
from training import checkpoint as ckpt
from training import reshard

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # `make test-faults`
RUN_S = 900


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.tiny import build_tiny_workspace

    return build_tiny_workspace(tmp_path_factory.mktemp("reshard"), PAIRS)


def recipe_for(workspace: Path, name: str, *, lora: bool, replicas: int) -> Path:
    path = write_recipe(workspace, name, str(workspace / "out"))
    recipe = yaml.safe_load(path.read_text())
    recipe["run"]["replicas"] = replicas
    model = recipe["training_config"]["model"]
    if lora:
        model["peft"]["lora_tuning"]["adapter_dropout"] = 0.0
    else:
        model["peft"] = {"peft_scheme": None}
        model["optim"]["lr"] = 1.0e-3
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(recipe: Path, trace: Path, *args: str) -> str:
    trace.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {ckpt.TRACE_DIR_ENV: str(trace)}
    done = subprocess.run([RAYDPO, "train", str(recipe), *args], capture_output=True, text=True, cwd=recipe.parent,
                          timeout=RUN_S, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


def checkpoint_at(run_uri: str, step: int) -> str:
    found = [u for u in storage.list_dirs(f"{run_uri}/ray_train") if "/checkpoint_" in u
             and not ckpt.missing_parts(u) and ckpt.read_state(u)["step"] == step]
    assert found, f"no complete step-{step} checkpoint under {run_uri}"
    return found[0]


def pairs_by_step(trace: Path) -> dict[int, list[str]]:
    """step -> the pairs every rank trained in it, together (ranks split a global batch by the worker count)."""
    by_step: dict[int, list[str]] = {}
    for (step, _rank), sources in sources_by_step(trace_lines(trace)).items():
        by_step.setdefault(step, []).extend(sources)
    return {step: sorted(sources) for step, sources in by_step.items()}


# LoRA starts on 2 workers (ZeRO-3 partitions, resharded for 1); full-rank on 1 (ZeRO stage 1, a one-worker run's:
# resharded for 2 at stage 1, as a resumed run keeps its checkpoint's stage)
@pytest.mark.parametrize("lora, start", [(True, 2), (False, 1)], ids=["lora-2-1-2", "full-rank-1-2-1"])
def test_a_run_moves_to_another_worker_count_and_back(workspace, lora, start):
    kind, other = "lora" if lora else "full", 3 - start
    out_dir = workspace / "out"
    # the uninterrupted run
    name = fresh_name(workspace, f"whole-{kind}")
    train(recipe_for(workspace, name, lora=lora, replicas=start), workspace / f"trace-{name}")
    whole = train_losses(metrics(str(out_dir / name)))
    whole_pairs = pairs_by_step(workspace / f"trace-{name}")
    assert sorted(whole) == list(range(1, STEPS + 1))

    # its step-4 checkpoint goes on on the other worker count
    moved = fresh_name(workspace, f"moved-{kind}")
    out = train(recipe_for(workspace, moved, lora=lora, replicas=other), workspace / f"trace-{moved}",
                "--resume-from", checkpoint_at(str(out_dir / name), 4))
    assert f"the checkpoint was written by {start} worker(s), this run has {other}" in out
    assert "resharding: converting" in out and ": step 4/8, 32 pairs consumed" in out
    moved_pairs = pairs_by_step(workspace / f"trace-{moved}")
    assert sorted(moved_pairs) == [5, 6, 7, 8]
    assert all(moved_pairs[s] == whole_pairs[s] for s in moved_pairs)  # the same pairs: none twice, none skipped
    moved_losses = train_losses(metrics(str(out_dir / moved)))

    # and that run's step-6 checkpoint goes on on the first worker count again
    back = fresh_name(workspace, f"back-{kind}")
    out = train(recipe_for(workspace, back, lora=lora, replicas=start), workspace / f"trace-{back}",
                "--resume-from", checkpoint_at(str(out_dir / moved), 6))
    assert f"the checkpoint was written by {other} worker(s), this run has {start}" in out
    back_pairs = pairs_by_step(workspace / f"trace-{back}")
    assert sorted(back_pairs) == [7, 8] and all(back_pairs[s] == whole_pairs[s] for s in back_pairs)
    back_losses = train_losses(metrics(str(out_dir / back)))

    resumed = {s: moved_losses[s] for s in (5, 6)} | {s: back_losses[s] for s in (7, 8)}
    worst = max(abs(resumed[s] - whole[s]) / abs(whole[s]) for s in resumed)
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole[step], rel=1e-3), f"step {step}"
    assert reshard.universal_complete(checkpoint_at(str(out_dir / name), 4))
    schedule = [r["lr"] for r in metrics(str(out_dir / name)) if r["split"] == "train"]
    again = [r["lr"] for r in metrics(str(out_dir / back)) if r["split"] == "train"]
    assert again[-2:] == pytest.approx(schedule[-2:], rel=1e-9)  # the schedule went on, not restarted
    print(f"failure-record: {kind} run moved from {start} worker(s) to {other} (step-4 checkpoint) and back "
          f"(step-6) | survived: {STEPS}/{STEPS} steps | steps lost: 0 | worst relative loss difference against "
          f"the uninterrupted run over steps 5-8: {worst:.1e}")


def test_three_workers_split_the_batch_unevenly_and_train_as_two_do(workspace):
    """8 pairs on 3 workers: 3, 3, 2 a step (training/ds_config.py batch_split), the light rank's loss weighted
    (loss_weight): the same pairs in each step and the same losses as 2 workers sharing it evenly."""
    runs = {}
    for workers in (2, 3):
        name = fresh_name(workspace, f"split-{workers}")
        out = train(recipe_for(workspace, name, lora=True, replicas=workers), workspace / f"trace-{name}")
        runs[workers] = (train_losses(metrics(str(workspace / "out" / name))),
                         pairs_by_step(workspace / f"trace-{name}"), trace_lines(workspace / f"trace-{name}"))
    assert "3 workers taking 3+3+2 pairs" in out
    (even, even_pairs, _), (uneven, uneven_pairs, lines) = runs[2], runs[3]
    assert uneven_pairs == even_pairs  # every step the same 8 pairs, however they are shared
    assert {len(x["sources"]) for x in lines if x["rank"] == 2} == {2}  # the light rank: 2 pairs a step
    worst = max(abs(uneven[s] - even[s]) / abs(even[s]) for s in even)
    for step, loss in even.items():
        assert uneven[step] == pytest.approx(loss, rel=1e-3), f"step {step}"
    print(f"failure-record: 8 pairs a step on 3 workers (3+3+2, weighted) against 2 workers (4+4) | "
          f"{STEPS}/{STEPS} steps | worst relative loss difference: {worst:.1e}")
