"""Options given after RECIPE: a value of 0 is a value (it was dropped: `0 in (None, False)` is true)."""
from __future__ import annotations

from pathlib import Path

import yaml

from launcher.cli import build_parser, main
from launcher.recipe_args import parse_rest

ROOT = Path(__file__).resolve().parents[2]
S3 = ["run.data_s3_path=s3://bucket/dpo/train.jsonl", "run.output_s3_path=s3://bucket/dpo/runs"]


def merged(*argv):
    return parse_rest(build_parser().parse_args(list(argv)))


def test_zero_after_the_recipe_is_kept_and_flags_still_merge():
    assert merged("train", "r.yaml", "--replicas", "0").replicas == 0
    assert merged("train", "--replicas", "2", "r.yaml", "--replicas", "0").replicas == 0  # after RECIPE wins
    assert merged("train", "--replicas", "2", "r.yaml").replicas == 2  # not given after: the earlier one stays
    args = merged("k8s", "render", "r.yaml", "--gpus-per-worker", "0", "--ttl-seconds", "0", "beta=0.05")
    assert (args.gpus_per_worker, args.ttl_seconds, args.overrides) == (0, 0, ["beta=0.05"])
    assert merged("validate", "r.yaml", "--explain").explain is True


def test_train_with_replicas_zero_after_the_recipe_is_refused(capsys, tmp_path):
    out = tmp_path / "runs"
    assert main(["train", str(ROOT / "recipes/reference.yaml"), f"run.output_s3_path={out}",
                 "--replicas", "0"]) == 2
    err = capsys.readouterr().err
    assert "run.replicas (from --replicas): 0 is not allowed; allowed: >= 1" in err
    assert not out.exists()


def test_k8s_render_takes_zero_gpus_and_a_zero_ttl(tmp_path):
    target = tmp_path / "out.yaml"
    assert main(["k8s", "render", str(ROOT / "recipes/reference.yaml"), *S3, "--image", "raydpo:0.1.0-gpu",
                 "--gpus-per-worker", "0", "--ttl-seconds", "0", "-o", str(target)]) == 0
    job = next(d for d in yaml.safe_load_all(target.read_text()) if d and d["kind"] == "RayJob")
    assert job["spec"]["ttlSecondsAfterFinished"] == 0
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in workers["resources"].get("limits", {})  # a GPU image, asked for 0 GPUs
