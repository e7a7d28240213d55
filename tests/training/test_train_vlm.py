"""`raydpo train` on a tiny vision-language model (tests/tiny_vlm.py) with Nova image rows whose images live in the
local S3 server: a 2-replica LoRA run and a 1-replica full-rank run of a few steps, whose parameters change (the
vision tower's stay frozen)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.s3server import s3_server  # noqa: F401 - the fixture
from tests.tiny_vlm import build_tiny_vlm_dir, image_bytes, nova_image_row

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COLOURS = ("red", "green", "blue", "white")


@pytest.fixture(scope="module")
def vlm_workspace(s3_server, tmp_path_factory):  # noqa: F811
    import s3fs

    tmp = tmp_path_factory.mktemp("vlm-train")
    bucket = s3_server.make_bucket("vlm-prefs")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    rows = []
    for i in range(16):  # one or two images per row, each named where it stands in the user turn
        uris = [f"{bucket}/images/{i}-{k}.png" for k in range(1 + i % 2)]
        for k, uri in enumerate(uris):
            fs.pipe(uri, image_bytes(10 * i + k))
        right, wrong = COLOURS[i % 4], COLOURS[(i + 1) % 4]
        rows.append(nova_image_row(uris, "Which colour is most of the picture?", f"Mostly {right}.",
                                   f"Mostly {wrong}."))
    fs.pipe(f"{bucket}/pairs/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return tmp, bucket, build_tiny_vlm_dir(tmp / "vlm")


def train(tmp: Path, bucket: str, model_dir: Path, *, name: str, lora: bool, replicas: int):
    recipe = {
        "run": {"name": name, "model_name_or_path": str(model_dir), "replicas": replicas,
                "data_s3_path": f"{bucket}/pairs/", "output_s3_path": str(tmp / "out")},
        "training_config": {
            "max_length": 128, "global_batch_size": 4, "trainer": {"max_steps": 3},
            "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                      "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "alpha": 16}} if lora
                      else {"peft_scheme": None}},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # the S3 fixture's environment reaches the local Ray cluster that `raydpo train` starts
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp / "out" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert json.loads((run_dir / "data_summary.json").read_text())["images"] == 24  # 8 rows x 1 + 8 rows x 2
    assert "16 training pairs, 0 validation pairs, 24 images" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    return run_dir, summary


def test_lora_two_replicas_trains_adapters_on_projector_and_language_model(vlm_workspace):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from core.data.formats import parse_line

    tmp, bucket, model_dir = vlm_workspace
    run_dir, summary = train(tmp, bucket, model_dir, name="vlm-lora", lora=True, replicas=2)
    assert summary["plan"]["reference"] == "adapter_disabled" and summary["plan"]["workers"] == 2
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

    tmp, bucket, model_dir = vlm_workspace
    run_dir, summary = train(tmp, bucket, model_dir, name="vlm-full", lora=False, replicas=1)
    assert summary["plan"]["reference"] == "engine"  # the reference stage is text only: a live reference
    tuned = AutoModelForImageTextToText.from_pretrained(run_dir / "model").state_dict()
    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    changed = {n for n, p in tuned.items() if not torch.allclose(p, base[n])}
    assert any("multi_modal_projector" in n for n in changed) and any("language_model" in n for n in changed)
    assert not any("vision_tower" in n for n in changed), "the vision tower is frozen by default"
    AutoProcessor.from_pretrained(run_dir / "model")  # the trained folder loads as a VLM again
