"""Recipe dropouts map onto the model's own config attributes; a knob the model lacks is an error."""
import pytest
from transformers import GPT2Config, LlamaConfig

from core.errors import ConfigError
from core.models import dropout_overrides


def test_llama_has_attention_dropout_only():
    config = LlamaConfig()
    assert dropout_overrides(config, {"attention_dropout": 0.1, "hidden_dropout": 0.0, "ffn_dropout": 0.0}) == \
        {"attention_dropout": 0.1}
    with pytest.raises(ConfigError) as err:
        dropout_overrides(config, {"attention_dropout": 0.0, "hidden_dropout": 0.2, "ffn_dropout": 0.3})
    text = str(err.value)
    assert "training_config.model.hidden_dropout=0.2" in text and "ffn_dropout=0.3" in text
    assert "knobs it honours: attention_dropout" in text


def test_gpt2_maps_hidden_and_attention():
    got = dropout_overrides(GPT2Config(), {"attention_dropout": 0.1, "hidden_dropout": 0.2, "ffn_dropout": 0.0})
    assert got == {"attn_pdrop": 0.1, "resid_pdrop": 0.2, "embd_pdrop": 0.2}
