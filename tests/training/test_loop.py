"""The worker loop's small helpers (the loop itself runs in the integration, resume and reference tests)."""
import pytest

from training.loop import grad_norm, hidden_size_of


def test_hidden_size_of_a_config_and_of_a_multimodal_one():
    from transformers import LlamaConfig

    assert hidden_size_of(LlamaConfig(hidden_size=64)) == 64

    class Wrapper:  # a composite config hands out its text part
        def get_text_config(self):
            return LlamaConfig(hidden_size=96)

    assert hidden_size_of(Wrapper()) == 96


def test_grad_norm_is_the_2_norm_of_every_gradient_without_partitioning():
    import torch

    class Engine:
        module = torch.nn.Linear(2, 1, bias=True)

        def zero_optimization_stage(self):
            return 0

        def bfloat16_enabled(self):
            return False

        def fp16_enabled(self):
            return False

    engine = Engine()
    engine.module.weight.grad = torch.tensor([[3.0, 0.0]])
    engine.module.bias.grad = torch.tensor([4.0])
    assert grad_norm(engine) == pytest.approx(5.0)  # sqrt(3² + 4²)
    engine.zero_optimization_stage = lambda: 3
    assert grad_norm(engine) is None  # ZeRO keeps its own
