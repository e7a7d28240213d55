"""Batch arithmetic, the learning-rate schedule and the DeepSpeed config, each against numbers worked by hand."""
import math

import pytest

from core import devices
from core.errors import ConfigError
from training import ds_config


@pytest.mark.parametrize("global_batch, workers, micro, expected", [
    (8, 2, None, (4, 1)),    # 4 pairs per worker: one micro batch of 4
    (64, 2, None, (4, 8)),   # 32 per worker: the largest micro batch up to 4 is 4, accumulated 8 times
    (12, 4, None, (3, 1)),   # 3 per worker: 3 divides 3
    (10, 2, None, (1, 5)),   # 5 per worker: only 1 (of 1..4) divides 5
    (64, 2, 2, (2, 16)),     # a requested micro batch is kept
])
def test_batch_plan_keeps_the_global_batch(global_batch, workers, micro, expected):
    got = ds_config.batch_plan(global_batch, workers, micro)
    assert got == expected
    assert got[0] * got[1] * workers == global_batch


def test_a_batch_smaller_than_the_worker_count_is_a_config_error():
    # run.replicas=2 on 8-GPU nodes: 16 workers cannot share 8 pairs a step
    with pytest.raises(ConfigError) as info:
        ds_config.batch_plan(8, 16, None, replicas=2)
    assert "16 workers (run.replicas=2 × 8 GPUs per node)" in info.value.what
    assert "16 or more (a multiple of 16 splits evenly: 16, 32, 64" in info.value.fix
    assert "at most 8 workers" in info.value.fix
    # 12 pairs over 2 workers is 6 each: a micro batch of 4 does not divide it
    with pytest.raises(ConfigError, match="micro_batch_size=4 does not divide the 6 pairs") as info:
        ds_config.batch_plan(12, 2, 4)
    assert "1, 2, 3, 6" in info.value.fix


def test_an_uneven_split_nova_pro_32_pairs_over_6_and_12_workers():
    # by hand: 32 = 6 * 5 + 2, so the first 2 ranks take 6 and the other 4 take 5
    assert ds_config.batch_split(32, 6) == (6, 6, 5, 5, 5, 5)
    assert ds_config.batch_split(32, 12) == (3,) * 8 + (2,) * 4   # 32 = 12 * 2 + 8
    assert ds_config.batch_split(8, 2) == (4, 4)
    assert [ds_config.rank_offset(32, 6, r) for r in range(6)] == [0, 6, 12, 17, 22, 27]
    # the busiest share 6: the largest micro batch up to 4 that divides it is 3, accumulated twice
    assert ds_config.batch_plan(32, 6) == (3, 2)
    assert ds_config.batch_plan(32, 12) == (3, 1)
    assert ds_config.batch_plan(32, 3) == (1, 11)   # 11, 11, 10: only 1 divides 11
    assert ds_config.batch_plan(32, 6, 2) == (2, 3)
    with pytest.raises(ConfigError, match="micro_batch_size=4 does not divide the 6 pairs .*busiest"):
        ds_config.batch_plan(32, 6, 4)


def test_micro_sizes_fill_full_micro_batches_first_and_mark_an_empty_one():
    assert ds_config.micro_sizes(6, 3, 2) == (3, 3)
    assert ds_config.micro_sizes(5, 3, 2) == (3, 2)
    assert ds_config.micro_sizes(10, 1, 11) == (1,) * 10 + (0,)   # a padding micro-step on the light rank
    assert ds_config.micro_sizes(2, 3, 1) == (2,)


def test_loss_weights_make_every_pair_count_one_over_the_global_batch():
    # even: 8 pairs on 2 workers, one micro-batch of 4 each: weight 1 (the plain mean is already right)
    assert ds_config.loss_weight(4, workers=2, accum=1, global_batch_size=8) == 1.0
    # 32 over 6, micro 3 x accum 2: a full micro-batch of 3 weighs 6*2*3/32, the light ranks' 2-pair one 6*2*2/32
    assert ds_config.loss_weight(3, workers=6, accum=2, global_batch_size=32) == pytest.approx(36 / 32)
    assert ds_config.loss_weight(2, workers=6, accum=2, global_batch_size=32) == pytest.approx(24 / 32)
    assert ds_config.loss_weight(0, workers=6, accum=2, global_batch_size=32) == 0.0
    # every pair: weight / (workers * accum * pairs in its micro-batch) = 1/32, summed over 32 pairs = 1
    total = sum(ds_config.loss_weight(n, workers=6, accum=2, global_batch_size=32) / (6 * 2)
                for share in ds_config.batch_split(32, 6) for n in ds_config.micro_sizes(share, 3, 2))
    assert total == pytest.approx(1.0)


def test_step_counts_drop_the_last_partial_batch():
    assert ds_config.steps_per_epoch(50, 8) == 6
    assert ds_config.total_steps(50, 8, max_epochs=3, max_steps=None) == 18
    assert ds_config.total_steps(50, 8, max_epochs=3, max_steps=10) == 10


def test_schedule_warmup_constant_then_cosine():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=4, constant_steps=2, total=16)
    # warmup: lr × (step + 1) / (warmup + 1) -> 0.2, 0.4, 0.6, 0.8 of lr
    assert [round(ds_config.lr_at(s, **kw), 10) for s in range(4)] == [2e-4, 4e-4, 6e-4, 8e-4]
    assert ds_config.lr_at(4, **kw) == ds_config.lr_at(5, **kw) == 1e-3  # the constant steps
    # cosine over the 10 decay steps 6..16: half way (step 11) is the mean of lr and min_lr
    assert ds_config.lr_at(11, **kw) == pytest.approx((1e-3 + 1e-4) / 2)
    assert ds_config.lr_at(6, **kw) == pytest.approx(1e-3)
    assert ds_config.lr_at(16, **kw) == pytest.approx(1e-4)
    assert ds_config.lr_at(100, **kw) == pytest.approx(1e-4)  # never below min_lr past the end
    # one step into the decay: min + (lr - min) × (1 + cos(pi/10)) / 2
    assert ds_config.lr_at(7, **kw) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 10)) / 2)


def test_precision_follows_the_device():
    assert devices.precision_for("auto", on_gpu=False) == "fp32"
    assert devices.precision_for("auto", on_gpu=True) == "bf16"
    assert devices.precision_for("auto", on_gpu=True, bf16_supported=False) == "fp32"
    assert devices.precision_for("bf16", on_gpu=False) == "bf16"
    # a CPU with AMX: auto is bf16 there (benchmarks/bf16_cpu.py); fp32 pins it; the GPU's own support still rules
    assert devices.precision_for("auto", on_gpu=False, cpu_bf16=True) == "bf16"
    assert devices.precision_for("fp32", on_gpu=False, cpu_bf16=True) == "fp32"
    assert devices.precision_for("auto", on_gpu=True, bf16_supported=False, cpu_bf16=True) == "fp32"


def test_deepspeed_config_for_zero3():
    config = ds_config.deepspeed_config(micro_batch=4, accum=8, workers=2, precision="bf16")
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 8
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["bf16"] == {"enabled": True}
    assert ds_config.deepspeed_config(micro_batch=1, accum=1, workers=1, precision="fp32")["bf16"] == \
        {"enabled": False}
    offload = ds_config.deepspeed_config(micro_batch=1, accum=1, workers=1, precision="fp32", offload_optimizer=True)
    reference = ds_config.reference_config(offload)
    assert "offload_optimizer" not in reference["zero_optimization"] and "gradient_clipping" not in reference
    assert reference["zero_optimization"]["stage"] == 3
    one_worker = ds_config.deepspeed_config(micro_batch=1, accum=1, workers=1, precision="fp32", stage=1)
    assert one_worker["zero_optimization"]["stage"] == 1
    assert ds_config.reference_config(one_worker)["zero_optimization"]["stage"] == 0  # stage 1 needs an optimizer


def test_zero3_keeps_small_parameters_whole_and_releases_gathered_ones_at_once():
    config = ds_config.deepspeed_config(micro_batch=1, accum=4, workers=2, precision="fp32", hidden_size=576)
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 5760  # 10 x hidden, as HF's auto
    assert config["zero_optimization"]["stage3_max_reuse_distance"] == 0
    tiny = ds_config.deepspeed_config(micro_batch=1, accum=4, workers=2, precision="fp32")
    assert tiny["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_one_worker_runs_without_partitioning_unless_the_recipe_asks():
    assert ds_config.zero_stage(workers=1) == 1  # no hooks, and a checkpoint the universal converter reads
    assert ds_config.zero_stage(workers=1, checkpoint_stage=3) == 3  # resumed from 2 workers: the checkpoint's stage
    assert ds_config.zero_stage(workers=2, requested=1, checkpoint_stage=3) == 1  # the recipe's word wins
    assert ds_config.zero_stage(workers=2) == 3
    assert ds_config.zero_stage(workers=1, requested=3) == 3
    assert ds_config.zero_stage(workers=4, requested=0) == 0
    plain = ds_config.deepspeed_config(micro_batch=1, accum=4, workers=1, precision="fp32", stage=0)
    assert plain["zero_optimization"] == {"stage": 0}  # no ZeRO-3 keys where DeepSpeed would reject or ignore them
    assert plain["train_batch_size"] == 4


def test_gradients_accumulate_in_fp32_and_bf16_without_zero_gets_master_weights():
    for workers, stage, precision, engine in [(2, 3, "bf16", 3), (1, 0, "bf16", 1), (1, 0, "fp32", 0)]:
        config = ds_config.deepspeed_config(micro_batch=1, accum=8, workers=workers, precision=precision,
                                            stage=stage)
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}
        # stage 0 + bf16 + fp32 accumulation is DeepSpeed's NotImplementedError; stage 1 is its bf16 optimizer
        assert config["zero_optimization"]["stage"] == engine


def test_optimizer_choice():
    assert ds_config.optimizer_choice("distributed_fused_adam", on_gpu=True) == "fused_adam"
    assert ds_config.optimizer_choice("distributed_fused_adam", on_gpu=False) == "torch_adamw"
    assert ds_config.optimizer_choice("adamw", on_gpu=True) == "torch_adamw"


def test_cpu_threads_share_the_nodes_cores_unless_the_user_set_them():
    assert devices.cpu_threads(2, 1) == 2  # one worker on a 2-core node: both cores, not Ray's 1
    assert devices.cpu_threads(2, 2) == 1
    assert devices.cpu_threads(16, 3) == 5  # 16 // 3
    assert devices.cpu_threads(2, 4) == 1  # more workers than cores: at least one thread each
    assert devices.cpu_threads(2, 1, "6") == 6  # OMP_NUM_THREADS given when the run started
    assert devices.cpu_threads(2, 1, "") == 2 and devices.cpu_threads(2, 1, "0") == 2
