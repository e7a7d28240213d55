"""`raydpo train` on a tiny vision-language model (tests/tiny_vlm.py) with Nova image rows whose images live in the
local S3 server: a 2-replica LoRA run and a 1-replica full-rank run of a few steps, whose parameters change (the
vision tower's stay frozen); the LoRA run with the reference precomputed from the image rows; Nova's max_length for
image data refused after the data check."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tiny_vlm import build_tiny_vlm_dir, image_bytes, nova_image_row

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COLOURS = ("red", "green", "blue", "white")


@pytest.fixture(scope="module")
def vlm_workspace(s3_server, ray_cluster, tmp_path_factory):  # noqa: F811
    import s3fs

    tmp = tmp_path_factory.mktemp("vlm-train")
    bucket = s3_server.make_bucket("vlm-prefs")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    rows = []
    for i in range(16):  # one or two images per row, each named where it stands in the user turn; every fourth row
        # none: micro-batches of those alone run a blank image through the vision tower (ZeRO-3, core/vision.py)
        uris = [f"{bucket}/images/{i}-{k}.png" for k in range(0 if i % 4 == 3 else 1 + i % 2)]
        for k, uri in enumerate(uris):
            fs.pipe(uri, image_bytes(10 * i + k))
        right, wrong = COLOURS[i % 4], COLOURS[(i + 1) % 4]
        rows.append(nova_image_row(uris, "Which colour is most of the picture?", f"Mostly {right}.",
                                   f"Mostly {wrong}."))
    fs.pipe(f"{bucket}/pairs/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return tmp, bucket, build_tiny_vlm_dir(tmp / "vlm"), ray_cluster


def raydpo_train(tmp: Path, bucket: str, model_dir: Path, head, *, name: str, lora: bool, replicas: int,
                 max_length: int = 128, reference: str = "auto", micro_batch: int | None = None
                 ) -> subprocess.CompletedProcess:
    recipe = {
        "run": {"name": name, "model_name_or_path": str(model_dir), "replicas": replicas,
                "data_s3_path": f"{bucket}/pairs/", "output_s3_path": str(tmp / "out")},
        "training_config": {
            # fp32: the trained model's log-probs are checked against the base's and a plain forward's
            "max_length": max_length, "global_batch_size": 4, "precision": "fp32", "trainer": {"max_steps": 3},
            **({"micro_batch_size": micro_batch} if micro_batch else {}),
            # global batches of 4 rows in file order (image, image, image, text): rank 0 takes the text-only row
            # and an image row, rank 1 two image rows (training/batch_split.py sorts each batch by width)
            **({"data": {"shuffle_buffer": 4}} if micro_batch else {}),
            "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                      "dpo_cfg": {"reference": reference},
                      "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "alpha": 16}} if lora
                      else {"peft_scheme": None}},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # on the shared head, which started with the S3 server's environment (tests/conftest.py ray_cluster)
    return subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=ROOT,
                          env=head.driver_env(), capture_output=True, text=True, timeout=1200)


def train(tmp: Path, bucket: str, model_dir: Path, head, *, name: str, lora: bool, replicas: int, **more):
    proc = raydpo_train(tmp, bucket, model_dir, head, name=name, lora=lora, replicas=replicas, **more)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp / "out" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert json.loads((run_dir / "data_summary.json").read_text())["images"] == 16  # 8 rows x 1 + 4 rows x 2
    assert "16 training pairs, 0 validation pairs, 16 images" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    return run_dir, summary


def test_lora_two_replicas_trains_adapters_on_projector_and_language_model(vlm_workspace):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from core.data.formats import parse_line

    tmp, bucket, model_dir, head = vlm_workspace
    # the reference precomputed (training/reference.py) from the image rows, images and all: at step 1 the policy is
    # the base (lora_B is zero), so its log-probs equal the stored ones and the loss is ln 2, rewards 0
    # one pair per micro-batch on each of the 2 ZeRO-3 workers, at every step a text-only row on rank 0 beside an
    # image row on rank 1: that fails unless rank 0 runs the blank image through the vision tower (core/vision.py)
    run_dir, summary = train(tmp, bucket, model_dir, head, name="vlm-lora", lora=True, replicas=2,
                             reference="precompute", micro_batch=1)
    assert summary["plan"]["reference"] == "precompute" and summary["plan"]["workers"] == 2
    assert summary["plan"]["zero_stage"] == 3 and summary["plan"]["micro_batch"] == 1
    assert summary["plan"]["reference_precompute"]["reused"] == []
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    adapter = load_file(run_dir / "model" / "adapter_model.safetensors")
    lora_b = {n: t for n, t in adapter.items() if "lora_B" in n}  # lora_B starts at zero: non-zero means trained
    assert any(t.abs().sum() > 0 for t in lora_b.values())
    assert any("multi_modal_projector" in n for n in lora_b) and any("language_model" in n for n in lora_b)
    assert not any("vision_tower" in n for n in adapter), "the frozen vision tower gets no adapter"
    assert (run_dir / "model" / "processor_config.json").exists()  # the processor travels with the output

    # preference evaluation of the adapter against its base (adapters disabled), on a pair with its S3 image
    from evaluation.preference import ADAPTER_DISABLED, LogpsActor, PreferenceSettings

    row = nova_image_row([f"{bucket}/images/0-0.png"], "Which colour is most of the picture?", "Mostly red.",
                         "Mostly green.")
    record, _ = parse_line(json.dumps(row), "eval.jsonl:1")
    actor = LogpsActor(str(run_dir / "model"), reference=ADAPTER_DISABLED, settings=vars(PreferenceSettings()))
    out = actor({"index": [0], "record": [json.dumps(record)]})
    assert out["logp_chosen"][0] != pytest.approx(out["ref_logp_chosen"][0], abs=1e-6)  # trained != base
    # export --merge: a standalone VLM folder with its processor
    from training.export import export_model

    export_model(str(run_dir), str(tmp / "vlm-merged"), merge=True, overwrite=True, say=lambda line: None)
    AutoModelForImageTextToText.from_pretrained(tmp / "vlm-merged")
    AutoProcessor.from_pretrained(tmp / "vlm-merged")


def test_full_rank_one_replica_moves_projector_and_language_model_not_the_vision_tower(vlm_workspace):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tmp, bucket, model_dir, head = vlm_workspace
    run_dir, summary = train(tmp, bucket, model_dir, head, name="vlm-full", lora=False, replicas=1)
    assert summary["plan"]["reference"] == "engine"  # the reference stage is text only: a live reference
    tuned = AutoModelForImageTextToText.from_pretrained(run_dir / "model").state_dict()
    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    changed = {n for n, p in tuned.items() if not torch.allclose(p, base[n])}
    assert any("multi_modal_projector" in n for n in changed) and any("language_model" in n for n in changed)
    assert not any("vision_tower" in n for n in changed), "the vision tower is frozen by default"
    AutoProcessor.from_pretrained(run_dir / "model")  # the trained folder loads as a VLM again


def test_image_data_above_novas_max_length_is_refused_after_the_data_check(vlm_workspace):
    """Nova limits image data to max_length 16384 (raydpo allows 32768 for text): refused once the pre-flight has
    seen the images, before any training work (no plan, no checkpoint)."""
    tmp, bucket, model_dir, head = vlm_workspace
    proc = raydpo_train(tmp, bucket, model_dir, head, name="vlm-too-long", lora=True, replicas=1, max_length=16400)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "config error: training_config.max_length=16400 is above 16384 and the training data holds 16 image(s)" \
        in out
    assert "plan:" not in out and not (tmp / "out" / "vlm-too-long" / "summary.json").exists()
