"""A run whose data shards and outputs live in S3 (moto's server on 127.0.0.1), through the code path AWS uses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.tiny import build_tiny_model_dir
from tests.training.test_train_integration import ROOT
from core.data.synthetic import answer_format_pairs

pytestmark = pytest.mark.slow


def test_train_streams_shards_from_s3_and_writes_outputs_there(s3_server, ray_cluster, tmp_path):
    import s3fs

    bucket = s3_server.make_bucket("prefs")  # s3://prefs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    rows = answer_format_pairs(48, seed=5)
    for shard in range(3):  # three shards of 16 pairs
        body = "".join(json.dumps(r) + "\n" for r in rows[shard * 16:(shard + 1) * 16])
        fs.pipe(f"{bucket}/pairs/shard-{shard}.jsonl", body.encode())
    fs.pipe(f"{bucket}/pairs/shard-3.jsonl", b'{"prompt": "q", "chosen": "a"}\n')  # a bad row, skipped and listed
    model_dir = build_tiny_model_dir(tmp_path / "model")
    recipe = {
        "run": {"name": "s3run", "model_name_or_path": str(model_dir), "replicas": 2,
                "data_s3_path": f"{bucket}/pairs/", "output_s3_path": f"{bucket}/runs"},
        "training_config": {"max_length": 128, "global_batch_size": 8, "data": {"on_error": "skip"},
                            "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                                      "peft": {"peft_scheme": "lora"}}},
    }
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # the shared head: its workers have this session's S3 server in their environment (tests/conftest.py)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=ROOT,
                          env=ray_cluster.driver_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipping 1 bad row(s)" in proc.stdout

    run = f"{bucket}/runs/s3run"
    summary = json.loads(fs.cat(f"{run}/summary.json"))
    assert summary["train_pairs"] == 48 and summary["steps"] == 6
    skipped = [json.loads(line) for line in fs.cat(f"{run}/skipped_rows.jsonl").decode().splitlines()]
    assert skipped == [{"source": f"{bucket}/pairs/shard-3.jsonl:1", "reason": skipped[0]["reason"]}]
    assert "rejected" in skipped[0]["reason"]
    manifest = json.loads(fs.cat(f"{run}/manifest.json"))
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"model/adapter_model.safetensors", "metrics.jsonl", "report.html"} <= paths
    assert len(fs.cat(f"{run}/metrics.jsonl").decode().splitlines()) == 6
