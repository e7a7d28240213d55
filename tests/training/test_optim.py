"""The optimizer and schedule (training/optim.py): LoRA+ groups at lr and lr x ratio, a named fused-Adam class for
peft, and a scheduler DeepSpeed builds on the parameter groups it keeps (ZeRO-3 drops LoRA+'s empty groups)."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from core.config import LoraTuning
from training import optim
from tests.training.test_checkpoint import single_process_group  # noqa: F401 - fixture

ADAM = dict(name="adamw", lr=1e-2, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.01, adam_w_mode=True)
SCHEDULE = dict(lr=1e-2, min_lr=1e-4, warmup_steps=2, constant_steps=0, total=10)
LORA = LoraTuning(alpha=16, adapter_dim=4, adapter_dropout=0.0)  # training_config.model.peft.lora_tuning


class FusedAdamStandIn(torch.optim.Adam):
    """DeepSpeed's FusedAdam signature (adam_w_mode, bias_correction), on CPU."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self.adam_w_mode = adam_w_mode


def lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from core.models import lora_config

    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), lora_config(LORA))


def named(model, optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]


def test_loraplus_puts_a_at_lr_and_b_at_lr_times_the_ratio_with_no_empty_group(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    optimizer = optim.build_optimizer(model, **ADAM, loraplus_lr_ratio=16.0, on_gpu=False)
    groups = named(model, optimizer)
    assert len(groups) == 2  # peft makes four; the embedding and no-decay ones are empty here
    assert all("lora_A" in n for n in groups[0]) and all("lora_B" in n for n in groups[1])
    assert optim.group_lrs(optimizer) == pytest.approx([1e-2, 16e-2])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.01]  # the recipe's, not peft's 0


def test_plain_lora_is_one_group_and_l2_mode_has_no_decoupled_decay(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    optimizer = optim.build_optimizer(model, **ADAM | {"adam_w_mode": False}, on_gpu=False)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_fused_adam_is_a_named_class_peft_can_use(tiny_model_dir):
    from peft.optimizers import create_loraplus_optimizer

    model = lora_model(tiny_model_dir)
    with pytest.raises(AttributeError, match="__name__"):  # what the loop did before: a partial has no name
        create_loraplus_optimizer(model=model, optimizer_cls=partial(FusedAdamStandIn, adam_w_mode=True),
                                  lr=1e-2, loraplus_lr_ratio=16.0)
    optimizer = optim.build_optimizer(model, **ADAM | {"name": "distributed_fused_adam"}, loraplus_lr_ratio=16.0,
                                      on_gpu=True, fused_base=FusedAdamStandIn)
    assert type(optimizer).__name__ == "FusedAdamW" and isinstance(optimizer, FusedAdamStandIn)
    assert optimizer.adam_w_mode is True
    assert optim.group_lrs(optimizer) == pytest.approx([1e-2, 16e-2])
    l2 = optim.build_optimizer(model, **ADAM | {"name": "distributed_fused_adam", "adam_w_mode": False},
                               on_gpu=True, fused_base=FusedAdamStandIn)
    assert type(l2).__name__ == "FusedAdamL2" and l2.adam_w_mode is False
    # on CPU Nova's distributed_fused_adam is torch AdamW (ds_config.optimizer_choice)
    assert type(optim.build_optimizer(model, **ADAM | {"name": "distributed_fused_adam"}, on_gpu=False)) \
        is torch.optim.AdamW


def test_lr_factor_scales_every_group_alike():
    # warmup 2 steps: (step + 1) / 3 of lr (ds_config.lr_at), lr at step 2, then cosine to min_lr at step 10
    factors = [optim.lr_factor(s, **SCHEDULE) for s in range(11)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[10] == pytest.approx(1e-4 / 1e-2)
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 16e-2}])
    scheduler = optim.scheduler_factory(**SCHEDULE)(opt)
    for step in range(1, 6):
        opt.step()
        scheduler.step()
        a, b = optim.group_lrs(opt)
        assert a == pytest.approx(1e-2 * factors[step]) and b == pytest.approx(16 * a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])
def test_deepspeed_steps_loraplus_with_the_ratio_kept(single_process_group, tiny_model_dir, stage):  # noqa: F811
    """ZeRO-3 (and stage 0) drop LoRA+'s empty groups: a LambdaLR built on the optimizer before
    deepspeed.initialize fails at its first step; the callable builds it on the groups DeepSpeed kept."""
    from training import ds_config
    from training.loop import load_under_zero_init, wrap_lora

    deepspeed = single_process_group
    config = ds_config.deepspeed_config(micro_batch=2, accum=1, workers=1, precision="fp32", stage=stage)
    config["zero_allow_untested_optimizer"] = True

    def engine_with(scheduler_for):
        model, _hf = load_under_zero_init(str(tiny_model_dir), torch.float32, config, {})
        model = wrap_lora(model, LORA, torch.float32, gradient_checkpointing=False)
        optimizer = torch.optim.AdamW  # peft's four groups, as the loop built them before
        from peft.optimizers import create_loraplus_optimizer
        optimizer = create_loraplus_optimizer(model=model, optimizer_cls=optimizer, lr=1e-2, loraplus_lr_ratio=16.0)
        return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler_for(optimizer),
                                    config=config)

    def step(engine, seed):
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    before, *_ = engine_with(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, partial(optim.lr_factor,
                                                                                       **SCHEDULE)))
    with pytest.raises(ValueError, match="zip"):
        step(before, 0)

    engine, optimizer, _, scheduler = engine_with(lambda opt: optim.scheduler_factory(**SCHEDULE))
    for seed in range(3):
        step(engine, seed)
        a, b = optim.group_lrs(optimizer)
        assert a == pytest.approx(1e-2 * optim.lr_factor(seed + 1, **SCHEDULE))
        assert b == pytest.approx(16 * a)
    assert scheduler.get_last_lr() == pytest.approx(optim.group_lrs(optimizer))
