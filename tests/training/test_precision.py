"""precision: bf16 on CPU (raydpo issue 21): the DeepSpeed engine the worker loop builds (training/loop.py,
training/ds_config.py) runs bf16 weights with fp32 master weights and fp32 log-probs, and trains as fp32 does."""
from __future__ import annotations

import pytest
import torch

from tests.core.test_forward import PAIRS, tiny_llama
from tests.tiny import result_in_fresh_python


def train_both(model_dir: str) -> dict:
    """Four LoRA steps (2 micro-batches each) in fp32 and in bf16 from the same weights, as the worker loop builds
    them; what each run's weights, master weights and log-probs are, and its losses. Runs in a subprocess."""
    import os
    import socket

    import deepspeed

    from core.batch import collate_pairs
    from core.config import LoraTuning
    from core.forward import add_logps_head, sequence_logps_of
    from training import ds_config
    from training.loop import load_under_zero_init, wrap_lora

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    batch = collate_pairs(PAIRS, pad_id=0)
    out = {}
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # one worker: stage 1 (ds_config.zero_stage), as a one-replica CPU run gets
        config = ds_config.deepspeed_config(micro_batch=3, accum=2, workers=1, precision=precision, stage=1)
        config["zero_allow_untested_optimizer"] = True
        torch.manual_seed(0)
        model, _keep = load_under_zero_init(model_dir, dtype, config, {})
        add_logps_head(model)
        model = wrap_lora(model, LoraTuning(adapter_dim=4, alpha=8, adapter_dropout=0.0), dtype, False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        losses, logps_dtypes = [], set()
        for _ in range(8):
            logps, _ = sequence_logps_of(engine, batch)
            logps_dtypes.add(str(logps.dtype))
            loss = -logps.mean() / 10
            engine.backward(loss)
            engine.step()
            if engine.is_gradient_accumulation_boundary():
                losses.append(loss.item())
        out[precision] = {
            "weights": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "master": sorted({str(p.dtype) for g in engine.optimizer.optimizer.param_groups for p in g["params"]}),
            "logps": sorted(logps_dtypes), "losses": losses}
    return out


@pytest.mark.slow
def test_bf16_on_cpu_trains_bf16_weights_with_fp32_master_weights_as_fp32_does(tmp_path):
    tiny_llama(tie=False).save_pretrained(tmp_path / "model")
    runs = result_in_fresh_python("tests.training.test_precision", "train_both", str(tmp_path / "model"), 600)
    assert runs["bf16"]["weights"] == ["torch.bfloat16"] and runs["fp32"]["weights"] == ["torch.float32"]
    assert runs["bf16"]["master"] == ["torch.float32"]  # the optimizer steps fp32 copies, not the bf16 weights
    assert runs["bf16"]["logps"] == runs["fp32"]["logps"] == ["torch.float32"]
    fp32, bf16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    # both train (the objective falls ~0.056 over the four steps): the fp32 master weights' updates reach bf16's
    assert fp32[-1] < fp32[0] - 0.03 and bf16[-1] < bf16[0] - 0.03, (fp32, bf16)
    # bf16 keeps 8 bits of mantissa: a loss of ~1.2 lands within half a percent of fp32's at every step
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.005, (fp32, bf16)
