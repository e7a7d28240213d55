"""The worker loop's small helpers (the loop itself runs in the integration, resume and reference tests)."""
import threading
import time

import pytest

from training.loop import grad_norm, hidden_size_of, started_early


def test_started_early_fetches_the_first_item_before_anyone_iterates():
    fetched = threading.Event()

    def items():
        fetched.set()
        yield from (1, 2, 3)

    early = started_early(items())
    assert fetched.wait(timeout=10)  # the thread began while nothing iterated
    assert list(early) == [1, 2, 3]


def test_started_early_keeps_the_order_and_the_rest_in_the_callers_thread():
    threads = []

    def items():
        for i in range(3):
            threads.append(threading.current_thread().name)
            yield i

    early = started_early(items())
    time.sleep(0.2)
    assert list(early) == [0, 1, 2]
    assert threads[0] == "raydpo-first-batch" and threads[1:] == [threading.current_thread().name] * 2


def test_started_early_of_nothing_and_of_a_failing_source():
    assert list(started_early(iter([]))) == []

    def broken():
        raise OSError("shard unreadable")
        yield

    early = started_early(broken())
    with pytest.raises(OSError, match="shard unreadable"):
        next(early)


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
