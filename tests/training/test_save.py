"""The final save (training/save.py) under ZeRO-3 in one process (gloo): LoRA gathers and writes the adapter only, and
never calls the whole-model gather; full-rank writes shard by shard; both load back equal to the trained weights."""
from __future__ import annotations

import pytest

from tests.training.test_checkpoint import LORA, OPTIM, forget_deepspeed_groups, single_process_group  # noqa: F401
from training import save


def test_shard_groups_stay_within_the_limit_and_keep_order():
    sizes = [("a", 4), ("b", 4), ("c", 3), ("d", 10), ("e", 1)]
    # a+b = 8 <= 8; c alone (8 + 3 > 8); d is larger than the limit, so alone; e after it
    assert save.shard_groups(sizes, 8) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert save.shard_groups(sizes, 100) == [["a", "b", "c", "d", "e"]]
    assert save.shard_name(0, 3) == "model-00001-of-00003.safetensors"


def zero3_engine(deepspeed, model_dir, lora: bool):
    import torch

    from training import ds_config
    from training.loop import load_under_zero_init, wrap_lora
    from training.optim import build_optimizer

    config = ds_config.deepspeed_config(micro_batch=2, accum=1, workers=1, precision="fp32", stage=3)
    config["zero_allow_untested_optimizer"] = True
    torch.manual_seed(0)
    model, _hf = load_under_zero_init(str(model_dir), torch.float32, config, {})
    if lora:
        model = wrap_lora(model, LORA, torch.float32, gradient_checkpointing=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, **OPTIM, on_gpu=False),
                                      config=config)
    for seed in range(2):  # trained: the adapters' B is no longer its zero init
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    trained = {n: deepspeed.utils.safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()
               if p.requires_grad}
    return engine, trained


class Tokenizer:
    def save_pretrained(self, folder):
        pass


@pytest.mark.slow
def test_lora_saves_the_adapter_alone_without_gathering_the_model(single_process_group, tiny_model_dir,  # noqa: F811
                                                                 tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine, trained = zero3_engine(single_process_group, tiny_model_dir, lora=True)

    def whole_model_gather():
        raise AssertionError("a LoRA save gathered the whole model")

    engine._zero3_consolidated_16bit_state_dict = whole_model_gather
    save.save_final_model(engine, Tokenizer(), str(tmp_path / "model"), rank=0, lora=True)
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or \
        files == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "model"))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(got) == set(trained) and len(trained) > 0
    assert any(("lora_B" in n) and trained[n].abs().max() > 0 for n in trained)  # not the zero init
    for name, value in trained.items():
        torch.testing.assert_close(got[name], value)


@pytest.mark.slow
def test_full_rank_saves_shard_by_shard_and_loads_back(single_process_group, tiny_model_dir, tmp_path,  # noqa: F811
                                                       monkeypatch):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    engine, trained = zero3_engine(single_process_group, tiny_model_dir, lora=False)
    engine._zero3_consolidated_16bit_state_dict = lambda: (_ for _ in ()).throw(AssertionError("whole gather"))
    monkeypatch.setattr(save, "SHARD_BYTES", 16 * 1024)  # several shards of the tiny model
    folder = tmp_path / "model"
    save.save_final_model(engine, Tokenizer(), str(folder), rank=0, lora=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((folder / s).is_file() for s in shards)
    loaded = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name], value)
