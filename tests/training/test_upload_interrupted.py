"""A checkpoint upload cut off by the uploading process dying (SIGKILL: a worker lost mid-upload) leaves a folder
that no resume trusts: the run goes on from the previous complete checkpoint, and naming the half one is refused.

The child process runs the workers' own upload (training/checkpoint.py upload_folder) against the local S3 server;
each file's upload waits 0.2 s there, so that the kill lands between two files, at the point the test picks: after
some data files, or after rank 0's completeness marker and before rank 1's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from core import storage
from core.errors import ConfigError
from tests.s3server import s3_server  # noqa: F401 - fixture
from tests.training.test_checkpoint import PLAN, FakeEngine, write_complete_checkpoint
from training import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # `make test-faults`; a child process per case
CHILD = """
import sys, time
from core import storage
from training import checkpoint as ckpt
slow = storage.with_retries
def with_retries(*args, **kwargs):
    time.sleep(0.2)
    return slow(*args, **kwargs)
ckpt.storage.with_retries = with_retries
ckpt.upload_folder(sys.argv[1], sys.argv[2])
"""


def objects_under(uri: str) -> list[str]:
    fs, root = storage.filesystem_for(uri)
    try:
        return [p[len(root.rstrip("/")) + 1:] for p in fs.find(root)]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("kill_after", ["a data file", "rank 0's marker"])
def test_a_process_killed_mid_upload_leaves_no_checkpoint_a_resume_trusts(s3_server, tmp_path, kill_after):
    bucket = s3_server.make_bucket(f"cut-{'data' if kill_after == 'a data file' else 'marker'}")
    ray_train = f"{bucket}/run/ray_train"
    write_complete_checkpoint(f"{ray_train}/checkpoint_a", 2, tmp_path)  # the last complete one
    local = tmp_path / "step4"
    local.mkdir()
    for rank in (0, 1):  # both ranks' files in one folder: one upload, the markers last
        ckpt.write_checkpoint(FakeEngine(rank, payload=b"y" * 50_000), str(local),
                              {"step": 4, "epoch": 0, "batches_in_epoch": 4}, rank=rank, world=2, plan=PLAN,
                              seed=42, lora=True)
    target = f"{ray_train}/checkpoint_b"
    fs, _ = storage.filesystem_for(target)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(local), target], cwd=os.getcwd(),
                             env=os.environ | {"PYTHONPATH": os.getcwd()})
    wanted = (lambda names: any(n.startswith("state/") for n in names)) if kill_after == "a data file" else (
        lambda names: ckpt.marker_name(0) in names)
    deadline = time.time() + 120
    while child.poll() is None and time.time() < deadline:
        fs.invalidate_cache()
        if wanted(objects_under(target)):
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the upload ended before the kill"
    fs.invalidate_cache()
    landed = objects_under(target)
    assert landed and ckpt.marker_name(1) not in landed  # cut off: some files there, not all markers

    problems = ckpt.missing_parts(target)
    assert problems and any("complete_rank" in p or "raydpo_state" in p for p in problems)
    latest, state = ckpt.latest_complete(ray_train)
    assert latest.endswith("/checkpoint_a") and state["step"] == 2
    assert ckpt.resume_point(ray_train, None)["uri"].endswith("/checkpoint_a")
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        ckpt.resume_point(ray_train, target)
    print(f"failure-record: uploading process SIGKILLed during a checkpoint upload (after {kill_after}) | "
          f"the half checkpoint ({len(landed)} files) is never resumed from: the run goes on from the previous "
          f"complete one | steps lost: those since it (2 here)")
