"""`raydpo train` end to end on a tiny model: 2 ZeRO-3 workers on the tests' shared Ray cluster, full-rank and LoRA.
(Starting a local cluster per run is tested by tests/cluster/test_session.py and the other training tests.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tiny import build_tiny_model_dir
from core.batch import collate_pairs
from core.data.synthetic import answer_format_pairs
from core.logprobs import sequence_logps, token_logps

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def write_recipe(tmp: Path, model_dir: Path, data_dir: Path, *, name: str, lora: bool) -> Path:
    recipe = {
        "run": {"name": name, "model_name_or_path": str(model_dir), "replicas": 2, "data_s3_path": str(data_dir),
                "output_s3_path": str(tmp / "out")},
        "training_config": {
            # fp32: the probe's log-probs are checked against a plain fp32 forward of the saved model at 1e-3
            "max_length": 128, "global_batch_size": 8, "precision": "fp32", "trainer": {"max_epochs": 1},
            "data": {"validation_fraction": 0.2},
            "model": {"optim": {"lr": 5e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                      "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "alpha": 16}} if lora
                      else {"peft_scheme": None}},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    shutil.rmtree(tmp / "out" / name, ignore_errors=True)  # a rerun (pytest --reruns) trains again, from scratch
    return path


def run_train(head, recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    # on the tests' shared head (conftest.py ray_cluster), from a user's shell: none of what an in-process DeepSpeed
    # test may have left in os.environ (headnode.user_env)
    return subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(recipe), *extra], cwd=ROOT,
                          env=head.driver_env(), capture_output=True, text=True, timeout=1200)


def probe_logps(model, probe: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_pairs(probe, pad_id=pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:].masked_fill(batch["loss_mask"][:, 1:] == 0, -100)
    logps, _ = sequence_logps(token_logps(logits[:, :-1], labels), batch["loss_mask"][:, 1:])
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model_dir = build_tiny_model_dir(tmp / "model")
    data_dir = tmp / "data"
    data_dir.mkdir()
    with open(data_dir / "pairs.jsonl", "w") as f:
        for row in answer_format_pairs(64, seed=3):
            f.write(json.dumps(row) + "\n")
    return tmp, model_dir, data_dir


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_common_outputs(run_dir: Path, proc: subprocess.CompletedProcess, log_every: int = 1) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    planned = summary["planned_steps"]
    assert summary["steps"] == planned > 0
    # trainer.log_every_n_steps: a progress line and a metrics row every n steps, and at the last step
    logged = [s for s in range(1, planned + 1) if s % log_every == 0 or s == planned]
    assert f"step {logged[0]}/{planned} |" in proc.stdout and "reward acc" in proc.stdout  # reached the console
    assert all((f"step {s}/{planned} |" in proc.stdout) == (s in logged) for s in range(1, planned + 1))
    rows = metrics_of(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == logged
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "lr",
                "grad_norm", "tokens_per_s"):
        assert key in train[0]
    # an easy preference set: the reward accuracy rises and the loss falls
    assert train[-1]["rewards/accuracies"] >= 0.9
    assert train[0]["rewards/accuracies"] < 0.9 or log_every > 1  # the first logged step may already be past it
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(r["split"] == "validation" for r in rows)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    listed = {a["path"] for a in manifest["artifacts"]}
    assert {"metrics.jsonl", "recipe.yaml", "summary.json", "model/tokenizer.json"} <= listed
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["run"]["replicas"] == 2
    return train


def test_full_rank_zero3_run_changes_weights_and_reloads(workspace, ray_cluster):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, model_dir, data_dir = workspace
    recipe = write_recipe(tmp, model_dir, data_dir, name="full", lora=False)
    proc = run_train(ray_cluster, recipe, "--replicas", "2")
    run_dir = tmp / "out" / "full"
    check_common_outputs(run_dir, proc)

    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [n for n, p in tuned.state_dict().items() if not torch.allclose(p, base.state_dict()[n])]
    assert len(changed) > len(base.state_dict()) // 2, "full-rank training should move most weights"

    probe = json.loads((run_dir / "probe_logps.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    chosen, rejected = probe_logps(tuned, probe["pairs"], tokenizer.pad_token_id)
    torch.testing.assert_close(chosen, torch.tensor(probe["logps"]["chosen"]), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(rejected, torch.tensor(probe["logps"]["rejected"]), atol=1e-3, rtol=1e-4)


def test_lora_run_keeps_base_and_reloads_with_peft(workspace, ray_cluster):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, model_dir, data_dir = workspace
    recipe = write_recipe(tmp, model_dir, data_dir, name="lora", lora=True)
    proc = run_train(ray_cluster, recipe, "--replicas", "2", "trainer.log_every_n_steps=2")
    run_dir = tmp / "out" / "lora"
    check_common_outputs(run_dir, proc, log_every=2)
    assert (run_dir / "model" / "adapter_config.json").exists()
    assert not (run_dir / "model" / "model.safetensors").exists(), "a LoRA run saves the adapter, not the base"

    probe = json.loads((run_dir / "probe_logps.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_chosen, base_rejected = probe_logps(base, probe["pairs"], tokenizer.pad_token_id)
    # the adapters-disabled model at the end of training is the untouched base
    torch.testing.assert_close(torch.tensor(probe["logps"]["reference_chosen"]), base_chosen, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(probe["logps"]["reference_rejected"]), base_rejected, atol=1e-3,
                               rtol=1e-4)

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run_dir / "model")
    chosen, rejected = probe_logps(tuned, probe["pairs"], tokenizer.pad_token_id)
    torch.testing.assert_close(chosen, torch.tensor(probe["logps"]["chosen"]), atol=1e-3, rtol=1e-4)
    assert (chosen - rejected).mean() > (base_chosen - base_rejected).mean()  # the adapter learned the preference
