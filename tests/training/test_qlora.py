"""QLoRA end to end on CPU (bitsandbytes' CPU backend): `raydpo train` on one replica with a 4-bit NF4 base, the
adapters trained and saved alone, a checkpoint resumed, `raydpo export --merge` into the dequantized base, and
`raydpo eval` preference on the run. The tiny model has hidden size 64: bitsandbytes' CPU kernels quantize in
blocks of 64 weights along a row."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.config import Quantization
from core.data.synthetic import answer_format_pairs
from tests.tiny import build_tiny_model_dir
from tests.training.test_train_integration import probe_logps
from training import checkpoint as ckpt

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 3, 2


def raydpo(head, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=head.driver_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    build_tiny_model_dir(root / "model", hidden=64)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answer_format_pairs(24, seed=3)))
    return root


def write_recipe(root: Path) -> Path:
    recipe = {
        "run": {"name": "qlora", "model_name_or_path": str(root / "model"), "replicas": 1,
                "data_s3_path": str(root / "data"), "output_s3_path": str(root / "out")},
        "training_config": {
            # fp32: the probe's log-probs are checked against a plain forward of the dequantized base at 2e-3
            "max_length": 128, "global_batch_size": 4, "seed": 5, "precision": "fp32", "trainer": {"max_steps": STEPS},
            "checkpoint": {"every_n_steps": EVERY},
            "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                      "peft": {"peft_scheme": "lora", "quantization": "4bit",
                               "lora_tuning": {"adapter_dim": 8, "alpha": 16, "adapter_dropout": 0.0}}}},
    }
    path = root / "qlora.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    shutil.rmtree(root / "out", ignore_errors=True)  # a rerun (pytest --reruns) trains again, from scratch
    return path


def test_qlora_trains_resumes_exports_and_evaluates(workspace, ray_cluster, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import quantization
    from core.models import load_causal_lm, load_trained

    recipe = write_recipe(workspace)
    raydpo(ray_cluster, "train", str(recipe))
    run = workspace / "out" / "qlora"
    model_dir = run / "model"

    # the output is the adapter alone, and training moved it (peft starts every lora_B at zero)
    adapter = load_file(model_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    assert not list(model_dir.glob("model*.safetensors"))

    # the reference was the 4-bit base with the adapters off; the tuned model reloads on that base
    probe = json.loads((run / "probe_logps.json").read_text())
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    base = load_causal_lm(str(workspace / "model"), dtype=torch.float32,
                          config_overrides=quantization.inference_kwargs(Quantization(bits=4), "fp32")).train()
    ref_chosen, _ = probe_logps(base, probe["pairs"], pad)
    torch.testing.assert_close(torch.tensor(probe["logps"]["reference_chosen"]), ref_chosen, atol=2e-3, rtol=1e-4)
    tuned = load_trained(str(model_dir), dtype=torch.float32).train()
    assert type(tuned.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    chosen, _ = probe_logps(tuned, probe["pairs"], pad)
    torch.testing.assert_close(torch.tensor(probe["logps"]["chosen"]), chosen, atol=2e-3, rtol=1e-4)

    # the step-2 checkpoint holds the adapters (and their optimizer state), not the base, and resumes
    latest, saved = ckpt.latest_complete(str(run / "ray_train"))
    assert saved["step"] == EVERY
    states = torch.load(next(Path(latest).rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert states and all("lora_" in name for name in states)
    resumed = raydpo(ray_cluster, "train", str(recipe), "--resume-from", latest)
    assert f": step {EVERY}/{STEPS}" in resumed.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))

    # export --merge: a plain transformers model, merged into the dequantized base, and saying so
    merged_dir = tmp_path / "merged"
    out = raydpo(ray_cluster, "export", str(run), "--to", str(merged_dir), "--merge")
    assert "nf4-quantized base" in out.stdout
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["merged_from_quantized"] == "nf4" and "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear and merged.dtype == torch.float32
    merged_chosen, _ = probe_logps(merged, probe["pairs"], pad)
    torch.testing.assert_close(merged_chosen, chosen, atol=2e-2, rtol=1e-3)  # dequantized: the same weights

    # raydpo eval preference on the run: the tuned model against its own reference (the 4-bit base, adapters off)
    eval_recipe = tmp_path / "eval.yaml"
    eval_recipe.write_text(yaml.safe_dump({
        "run": {"name": "qlora-eval", "model_name_or_path": str(workspace / "model"),
                "data_s3_path": str(workspace / "data" / "train.jsonl"), "output_s3_path": str(run)},
        "evaluation": {"task": "preference", "max_rows": 8}, "inference": {"batch_size": 4}}))
    raydpo(ray_cluster, "eval", str(eval_recipe), "--model", str(run))
    results = json.loads((run / "eval" / "results.json").read_text())
    tuned_label = results["tuned"][0]
    assert results["models"][tuned_label]["reference"] == "adapter_disabled"
    assert results["models"][tuned_label]["n"] == 8 and "reward_accuracy" in results["models"][tuned_label]["metrics"]


def zero3_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    """One of two ZeRO-3 workers (gloo) as training/loop.py sets one up for QLoRA: the loop's own load, prepare and
    wrap functions, two steps, then the reference (adapters off) before and after an eval-mode forward."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import deepspeed

    from core import quantization
    from core.config import LoraTuning
    from training import ds_config
    from training.loop import load_under_zero_init, wrap_lora
    from training.optim import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.set_num_threads(1)
    config = ds_config.deepspeed_config(micro_batch=2, accum=1, workers=2, precision="fp32", stage=3, hidden_size=64)
    config["zero_allow_untested_optimizer"] = True
    kwargs = quantization.load_kwargs(Quantization(bits=4), "fp32", zero_stage=3, device=torch.device("cpu"))
    model, _keep = load_under_zero_init(model_dir, torch.float32, config, kwargs)
    model = quantization.prepare_for_training(model, gradient_checkpointing=False, partitioned=True)
    torch.manual_seed(0)
    model = wrap_lora(model, LoraTuning(adapter_dim=8, alpha=16, adapter_dropout=0.0), torch.float32, False)
    optimizer = build_optimizer(model, name="adamw", lr=1e-2, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.0,
                                adam_w_mode=True, on_gpu=False, loraplus_lr_ratio=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    weight = engine.module.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))

    def reference() -> float:
        with torch.no_grad(), engine.module.disable_adapter():
            return engine.module(input_ids=ids, labels=ids).loss.item()

    engine.train()
    before = reference()
    for _ in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.eval()  # validation and the final probe run in eval mode
    evaluated = reference()
    engine.train()
    result = {"storage": str(weight.dtype), "class": type(weight).__name__, "whole": int(weight.ds_numel),
              "held": int(weight.ds_tensor.numel()), "before": before, "eval": evaluated, "after": reference(),
              "trained": loss.item()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_qlora_under_zero3_partitions_the_4bit_base_and_keeps_it(workspace, tmp_path):
    """Two workers: 4-bit weights stored in the training dtype are partitioned by ZeRO-3 (each rank holds half),
    training moves the adapters, and the base (the reference) is the same after an eval-mode forward, which
    bitsandbytes' CPU inference path would otherwise repack in place."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(zero3_worker, args=(port, str(workspace / "model"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["class"] == "Params4bit" and rank["storage"] == "torch.float32"
        assert rank["held"] * 2 == rank["whole"]  # partitioned over the two workers
        assert rank["after"] == pytest.approx(rank["before"], abs=1e-6)
        assert rank["eval"] == pytest.approx(rank["before"], abs=1e-6)
        assert rank["trained"] < rank["before"]  # the adapters learned (the same batch, twice)
    assert ranks[0]["trained"] == pytest.approx(ranks[1]["trained"])
