"""Export: a LoRA adapter merged into its base gives the adapter model's log-probabilities, and loads with plain
transformers; full-rank models are copied as they are; S3 in and out through moto on 127.0.0.1."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.s3server import s3_server  # noqa: F401 - the session fixture
from tests.tiny import CHAT_TEMPLATE, build_tiny_model_dir
from core import config, storage
from training import export
from core.errors import ConfigError

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def lora_run(root, base_dir):
    """A run folder whose model/ is a LoRA adapter on base_dir, with random non-zero B so the merge matters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / "lora-run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.save_pretrained(str(run / "model"))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(run / "model"))
    recipe = config.Recipe(run=config.Run(name="lora-run", model_name_or_path=str(base_dir), data_s3_path="data",
                                          output_s3_path=str(run.parent)),
                           training_config=config.TrainingConfig(model=config.ModelCfg(
                               peft=config.Peft(peft_scheme="lora"))))
    (run / "recipe.yaml").write_text(yaml.safe_dump(config.as_dict(recipe), sort_keys=False))  # as the driver writes
    return run


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_dir):
    return lora_run(tmp_path_factory.mktemp("runs"), base_dir)


def token_logps(model, tokenizer):
    """Per-token log-probabilities of a chat prompt and answer, as DPO scores them."""
    import torch

    text = tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_merged_model_matches_the_adapter_and_loads_with_plain_transformers(tmp_path, base_dir, run_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "merged"
    result = export.export_model(str(run_dir), str(target), merge=True, say=lambda line: None)
    assert (result.kind, result.base) == ("merged", str(base_dir))
    names = {p.name for p in target.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    merged = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                        str(run_dir / "model")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()

    merged_logps, adapter_logps = token_logps(merged, tokenizer), token_logps(adapter, tokenizer)
    torch.testing.assert_close(merged_logps, adapter_logps, rtol=1e-5, atol=1e-5)
    # the adapter changes the model, so equality above is the merge's doing, not a no-op
    assert (adapter_logps - token_logps(base, tokenizer)).abs().max() > 0.1

    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = merged.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    same = adapter.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.tolist() == same.tolist()


def test_adapter_without_merge_and_full_rank_are_copied_as_they_are(tmp_path, base_dir, run_dir):
    said = []
    result = export.export_model(str(run_dir), str(tmp_path / "adapter"), merge=False, say=said.append)
    assert result.kind == "adapter" and "pass --merge" in said[0]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "adapter" / name).read_bytes() == (run_dir / "model" / name).read_bytes()

    said.clear()
    result = export.export_model(str(base_dir), str(tmp_path / "full"), merge=True, say=said.append)
    assert result.kind == "full" and "copied as is" in said[0]
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted(p.name for p in base_dir.iterdir())
    assert (tmp_path / "full" / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes()


def test_base_model_source_prefers_the_recipe_then_the_adapter_config(tmp_path, run_dir, base_dir):
    assert export.base_model_source(run_dir / "model") == str(base_dir)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert export.base_model_source(lone) == "org/base"
    (lone / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match="names no base model"):
        export.base_model_source(lone)


def test_missing_run_model_or_busy_target_are_clear_errors(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        export.export_model(str(tmp_path / "nope"), str(tmp_path / "out"), merge=True)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError) as err:
        export.export_model(str(tmp_path / "unfinished"), str(tmp_path / "out"), merge=True)
    assert "no model to export" in err.value.what and "no model/ folder" in err.value.why
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="already holds files"):
        export.export_model(str(run_dir), str(tmp_path / "busy"), merge=False)
    with pytest.raises(ConfigError, match="write over the run"):
        export.export_model(str(run_dir), str(run_dir.parent), merge=False, overwrite=True)
    assert (run_dir / "model" / "adapter_config.json").exists()


def test_s3_run_in_and_s3_folder_out(tmp_path, s3_server, run_dir, base_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    bucket = s3_server.make_bucket("raydpo-export-test")
    try:
        storage.upload_dir(str(run_dir), f"{bucket}/out/lora-run")
        export.export_model(f"{bucket}/out/lora-run", f"{bucket}/exported", merge=True, say=lambda line: None)
        with pytest.raises(ConfigError, match="already holds files"):
            export.export_model(f"{bucket}/out/lora-run", f"{bucket}/exported", merge=True)
        storage.download_dir(f"{bucket}/exported", str(tmp_path / "back"))
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
        local = AutoModelForCausalLM.from_pretrained(
            str(export.export_model(str(run_dir), str(tmp_path / "local"), merge=True, say=lambda line: None).target))
        for (name, a), (_, b) in zip(merged.state_dict().items(), local.state_dict().items()):
            assert a.equal(b), name
    finally:
        s3_server.remove_bucket("raydpo-export-test")
