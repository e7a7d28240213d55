"""Nothing raydpo reads back from a model, output, checkpoint or cache path is unpickled: a crafted pickle (it runs a
shell command when loaded) is planted where each job reads weights, and each refuses it with a ConfigError that
names the file, before loading anything; the command never runs. The checkpoint's RNG and DeepSpeed files:
tests/training/test_checkpoint.py::test_restore_never_unpickles_a_planted_file. The reference cache is Parquet,
which Ray Data refuses to read when it holds pickled-object columns (raise_on_pickle_object_columns)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from core import models
from core.errors import ConfigError


class Planted:
    def __init__(self, proof: str):
        self.proof = proof

    def __reduce__(self):
        return os.system, (f"touch {self.proof}",)


def plant(folder, name: str, proof) -> None:
    import torch

    torch.save(Planted(str(proof)), folder / name)


@pytest.fixture
def adapter_run(tmp_path, tiny_model_dir):
    """A LoRA run's folder whose adapter weights are a planted pickle instead of adapter_model.safetensors."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": str(tiny_model_dir), "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
        "lora_alpha": 8, "target_modules": ["q_proj"]}))
    plant(run / "model", "adapter_model.bin", tmp_path / "ran")
    return run


def test_a_model_folder_with_planted_weights_is_refused_for_training(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    plant(folder, "pytorch_model.bin", tmp_path / "ran")
    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        models.resolve_model_source(str(folder))  # what `raydpo train` and the workers load through
    assert not (tmp_path / "ran").exists()


def test_a_planted_adapter_is_refused_for_evaluation(adapter_run, tmp_path):
    with pytest.raises(ConfigError, match="adapter_model.bin"):
        models.load_trained(str(adapter_run / "model"))  # `raydpo eval --model RUN` and the generator
    assert not (tmp_path / "ran").exists()


def test_a_planted_adapter_is_refused_for_export(adapter_run, tmp_path):
    from training.export import export_model

    with pytest.raises(ConfigError, match="adapter_model.bin"):
        export_model(str(adapter_run), str(tmp_path / "exported"), merge=True, say=lambda line: None)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "exported").exists()


def test_a_planted_adapter_is_refused_for_serving(adapter_run, tmp_path):
    from serving.sources import plan_groups

    with pytest.raises(ConfigError, match="adapter_model.bin"):
        plan_groups([str(adapter_run)])  # `raydpo serve RUN`, before any replica loads it
    assert not (tmp_path / "ran").exists()


def test_trust_remote_code_is_never_turned_on():
    """No call in the wings passes trust_remote_code (transformers' default is off); a model that needs its own
    code is refused by load_config with the reason."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [p for wing in ("core", "training", "evaluation", "serving", "collection", "launcher", "cluster")
               for p in (root / wing).rglob("*.py")]
    passing = [f"{p.relative_to(root)}:{i}" for p in sources
               for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if "trust_remote_code=" in line.replace(" ", "")]
    assert passing == []
