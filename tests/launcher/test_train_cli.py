"""`raydpo train` on a cluster whose nodes have 8 GPUs: a global batch the GPUs cannot share is a ConfigError (exit
2) before any data is read. Ray itself is replaced by a cluster description (no Ray processes start here)."""
from __future__ import annotations

import contextlib

import yaml

from launcher.cli import main


def test_train_refuses_a_batch_that_8_gpu_nodes_cannot_share(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import ray

    import cluster.session

    gpu_node = {"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [gpu_node, gpu_node])

    @contextlib.contextmanager
    def two_gpu_nodes(**_):
        yield {"started_here": False, "address": "10.0.0.1:6379", "resources": {"CPU": 192.0, "GPU": 16.0}}

    monkeypatch.setattr(cluster.session, "ray_session", two_gpu_nodes)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "eight-gpus", "model_name_or_path": str(tiny_model_dir), "replicas": 2,
                "data_s3_path": str(tmp_path / "missing-data"), "output_s3_path": str(tmp_path / "out")},
        "training_config": {"global_batch_size": 8}}))
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2
    assert "global_batch_size=8 does not split over 16 workers (run.replicas=2 × 8 GPUs per node)" in err
    assert "multiple of 16" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "eight-gpus" / "skipped_rows.jsonl").exists()  # stopped before the data check
