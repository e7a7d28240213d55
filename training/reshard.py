"""Resuming on another worker count: the checkpoint converted to DeepSpeed's universal checkpoint, once.

A ZeRO checkpoint holds one partition of the weights and optimizer moments per worker (state/zero_pp_rank_<r>_*),
which only a run with the same worker count and ZeRO stage can load. DeepSpeed's converter
(deepspeed.checkpoint.ds_to_universal) rewrites it as one folder per parameter (fp32 weights, exp_avg, exp_avg_sq,
step), which an engine of any worker count loads with `checkpoint: {load_universal: true}`. The driver converts it
(it holds every rank's files; memory: the trainable parameters' fp32 weights and two moments, for LoRA the adapters
only) and writes it beside the checkpoint, under universal/, its marker last: a conversion cut off is done again.
The step, data position (global batches, the same on any worker count: training/batch_split.py) and metrics rows
stay in the checkpoint's own raydpo_state.json; each rank's RNG file is used where that rank existed before.

A one-worker run trains at ZeRO stage 1 rather than none (ds_config.zero_stage): a stage-0 checkpoint is the plain
torch state, which the converter does not read.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from core import storage
from core.errors import StorageError

UNIVERSAL_DIR = "universal"
UNIVERSAL_MARKER = "universal_complete.json"
TAG = "state"  # training/checkpoint.py's DeepSpeed tag


def needs_universal(saved_plan: dict, workers: int, zero_stage: int) -> bool:
    """Whether a checkpoint written under saved_plan must be converted to load on this run's workers."""
    return (saved_plan.get("workers"), saved_plan.get("zero_stage")) != (workers, zero_stage)


def universal_uri(checkpoint_uri: str) -> str:
    return f"{checkpoint_uri.rstrip('/')}/{UNIVERSAL_DIR}"


def universal_complete(checkpoint_uri: str) -> bool:
    """The converted checkpoint is there whole: its marker, and every file it lists at the listed size."""
    target = universal_uri(checkpoint_uri)
    marker = f"{target}/{UNIVERSAL_MARKER}"
    if not storage.exists(marker):
        return False
    listing = json.loads(storage.read_bytes(marker))["files"]
    fs, root = storage.filesystem_for(target)
    found = {path[len(root.rstrip("/")) + 1:]: info["size"]
             for path, info in storage.with_retries("list", target, lambda: fs.find(root, detail=True)).items()}
    return all(found.get(name) == size for name, size in listing.items())


def convert_to_universal(checkpoint_uri: str, say) -> str:
    """The universal form of the checkpoint at checkpoint_uri (converted now unless already there); its URI."""
    target = universal_uri(checkpoint_uri)
    if universal_complete(checkpoint_uri):
        say(f"resharding: reusing the universal checkpoint {target}")
        return target
    say(f"resharding: converting {checkpoint_uri} to a universal checkpoint (deepspeed.checkpoint.ds_to_universal)")
    with tempfile.TemporaryDirectory(prefix="raydpo-universal-") as tmp:
        source, out = Path(tmp) / "in", Path(tmp) / "out"
        download(f"{checkpoint_uri.rstrip('/')}/{TAG}", source / TAG)
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                               "--input_folder", str(source / TAG), "--output_folder", str(out / TAG),
                               "--num_extract_workers", "1", "--num_merge_workers", "1",
                               # stage 1/2: the per-parameter layout a Megatron client records, which we do not
                               "--inject_missing_state"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise StorageError(f"could not convert {checkpoint_uri} to a universal checkpoint",
                               why=f"deepspeed.checkpoint.ds_to_universal failed: {tail[0][:300]}",
                               fix="resume with the worker count the checkpoint was written with "
                                   "(--replicas), or start a new run (a new run.name)")
        files = sorted(p for p in out.rglob("*") if p.is_file())
        listing = {p.relative_to(out).as_posix(): p.stat().st_size for p in files}
        storage.upload_dir(str(out), target)
        storage.write_bytes(f"{target}/{UNIVERSAL_MARKER}", json.dumps({"files": listing}).encode())  # last
    return target


def download(uri: str, local: Path) -> None:
    """Every file under uri into the local folder, each retried on its own."""
    fs, root = storage.filesystem_for(uri)
    root = root.rstrip("/")
    for path in storage.with_retries("list", uri, lambda: fs.find(root)):
        target = local / path[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.with_retries(f"download {path} to", str(target), partial(fs.get_file, path, str(target)))
