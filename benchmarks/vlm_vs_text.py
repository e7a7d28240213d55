"""What images cost: the same DPO run on a tiny vision-language model with image rows and on the same-size text model
with the same rows' text, side by side, through `raydpo train` (README "Images (vision-language models)").

    python benchmarks/vlm_vs_text.py [--pairs 32] [--steps 30] [--json PATH]

Both models are the test suite's (tests/tiny_vlm.py: LLaVA class, a 1-layer CLIP vision tower of width 32, 2x2
patches per 28-pixel image, a 2-layer Llama of width 32; tests/tiny.py: the same Llama alone). The image rows are
Nova rows (one or two images each, in a local S3 server: moto on 127.0.0.1), the text rows the same prompts and
answers as TRL rows. One replica, full-rank, a live reference engine for both (the VLM's default; text would
precompute it by default, which would leave the reference's forward out of its steps only), global batch 4. Prints
and writes per run: wall time of `raydpo train`, the median s/step and tokens/s of steps 2.. (step 1 warms up; a
tiny model's step takes tens of milliseconds, so single steps are noisy and the median is kept), the real tokens per
step, and the ratios VLM / text. Each run has its default layout: the shared-prompt row for text, two padded rows
per pair for the VLM (README "Images").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(recipe: dict, work: Path, env: dict) -> dict:
    import yaml

    path = work / f"{recipe['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    run_dir = work / "out" / recipe["run"]["name"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][1:]  # step 1 warms up
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip([rows[0]] + train, train)]
    return {"wall_s": round(wall, 1), "s_per_step": round(statistics.median(times), 4),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train), 1),
            "real_tokens_per_step": round(statistics.mean(r["real_tokens"] for r in train), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import s3fs

    from tests.s3server import S3Server, aws_env_for
    from tests.tiny import build_tiny_model_dir
    from tests.tiny_vlm import build_tiny_vlm_dir, image_bytes, nova_image_row

    server = S3Server()
    server.start()
    env = {**os.environ, **aws_env_for(server.endpoint_url)}
    os.environ.update(aws_env_for(server.endpoint_url))
    work = Path(tempfile.mkdtemp(prefix="raydpo-vlm-bench-"))
    bucket = server.make_bucket("vlm-bench")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint_url})
    colours = ("red", "green", "blue", "white")
    nova, trl = [], []
    for i in range(args.pairs):
        uris = [f"{bucket}/images/{i}-{k}.png" for k in range(1 + i % 2)]
        for k, uri in enumerate(uris):
            fs.pipe(uri, image_bytes(10 * i + k))
        question, chosen, rejected = ("Which colour is most of the picture?", f"Mostly {colours[i % 4]}.",
                                      f"Mostly {colours[(i + 1) % 4]}.")
        nova.append(nova_image_row(uris, question, chosen, rejected))
        trl.append({"system": "You describe pictures.", "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    fs.pipe(f"{bucket}/nova/train.jsonl", "".join(json.dumps(r) + "\n" for r in nova).encode())
    (work / "text").mkdir()
    (work / "text" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    models = {"vlm": build_tiny_vlm_dir(work / "vlm"), "text": build_tiny_model_dir(work / "text-model")}
    data = {"vlm": f"{bucket}/nova/", "text": str(work / "text")}
    results = {}
    for kind in ("text", "vlm"):
        recipe = {"run": {"name": f"bench-{kind}", "model_name_or_path": str(models[kind]), "replicas": 1,
                          "data_s3_path": data[kind], "output_s3_path": str(work / "out")},
                  "training_config": {"max_length": 128, "global_batch_size": 4,
                                      "trainer": {"max_steps": args.steps, "max_epochs": 5},  # steps win
                                      "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1,
                                                                                   "min_lr": 1e-5}},
                                                "dpo_cfg": {"reference": "engine"}}}}
        results[kind] = run(recipe, work, env)
        print(kind, results[kind], flush=True)
    results["ratio_vlm_over_text"] = {k: round(results["vlm"][k] / results["text"][k], 2)
                                      for k in ("wall_s", "s_per_step", "tokens_per_s", "real_tokens_per_step")}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    server.stop()


if __name__ == "__main__":
    main()
