"""The precomputed reference (training/reference.py): same numbers and same losses as a live reference, a cache
keyed by what they depend on, reused by a second run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.batch import collate_pairs
from core.forward import sequence_logps_of
from training.losses import dpo_loss
from launcher.recipe import load_recipe
from training import reference
from training.reference import ReferenceStage, cache_key, file_fingerprints, forward_groups, model_fingerprint

ROOT = Path(__file__).resolve().parents[2]
PAIRS = {"prompt_ids": [[5, 6, 7], [8], [30, 31, 32, 33, 34], [40, 41]],
         "chosen_ids": [[9, 10], [11, 12, 13, 14], [15], [42, 43, 44, 45, 46, 47]],
         "rejected_ids": [[17], [18, 19], [20, 21, 22, 23, 24, 25], [48]]}


def recipe(model: str, out: str = "/tmp/out") -> dict:
    r = yaml.safe_load((ROOT / "recipes" / "reference.yaml").read_text())
    r["run"] |= {"model_name_or_path": model, "output_s3_path": out}
    r["training_config"]["precision"] = "fp32"  # the stage's log-probs are checked against fp32 forwards at 1e-5
    return r


def token_settings(raw: dict, precision: str) -> dict:
    """training/reference.py token_settings of the typed recipe a raw (mutated) one loads to."""
    return reference.token_settings(load_recipe(raw), precision)


def as_ray_batch(pairs: dict) -> dict:
    """Ray Data hands list columns as object arrays of int arrays."""
    return {k: np.array([np.array(v, dtype=np.int64) for v in values] + [None], dtype=object)[:-1]
            for k, values in pairs.items()}


def live_reference(model_dir, pairs: dict, pad_id: int, micro_batch: int):
    """What the loop computes with a live reference: the model's own full logits, on training micro-batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs["prompt_ids"]), micro_batch):
        part = {k: v[start:start + micro_batch] for k, v in pairs.items()}
        with torch.no_grad():
            logps, _ = sequence_logps_of(model, collate_pairs(part, pad_id=pad_id), head=False)
        chosen.append(logps[:len(part["prompt_ids"])])
        rejected.append(logps[len(part["prompt_ids"]):])
    return torch.cat(chosen), torch.cat(rejected)


def test_cache_key_is_stable_and_moves_with_each_input():
    settings = token_settings(recipe("m"), "fp32")
    key = cache_key(["model.safetensors", 10, 1], [["data.jsonl", 5, "t"]], settings)
    assert key == cache_key(["model.safetensors", 10, 1], [["data.jsonl", 5, "t"]], dict(settings))
    assert cache_key(["model.safetensors", 11, 1], [["data.jsonl", 5, "t"]], settings) != key
    assert cache_key(["model.safetensors", 10, 1], [["data.jsonl", 6, "t"]], settings) != key
    longer = recipe("m")
    longer["training_config"]["max_length"] = 2048
    assert cache_key(["model.safetensors", 10, 1], [["data.jsonl", 5, "t"]], token_settings(longer, "fp32")) != key
    assert cache_key(["model.safetensors", 10, 1], [["data.jsonl", 5, "t"]], token_settings(recipe("m"), "bf16")) != key


def test_a_beta_or_loss_sweep_keeps_the_key():
    sweep = recipe("m")
    sweep["training_config"]["model"]["dpo_cfg"] |= {"beta": 0.3, "loss_type": "ipo"}
    sweep["run"]["name"] = "another-run"
    assert token_settings(sweep, "fp32") == token_settings(recipe("m"), "fp32")


def test_fingerprints_follow_the_files(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    before = file_fingerprints([str(data)])
    assert before[0][:2] == [str(data), data.stat().st_size]
    data.write_text('{"prompt": "a", "chosen": "bb", "rejected": "c"}\n')
    assert file_fingerprints([str(data)]) != before
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert model_fingerprint(str(tmp_path / "model"))[0][:2] == ["config.json", 2]


def test_forward_groups_hand_worked():
    # widths 10, 3, 7, 3 with 28 tokens a forward: (3, 3) = 2 x 2 x 3 = 12 fits; adding 7 would be 2 x 3 x 7 = 42
    assert forward_groups([10, 3, 7, 3], 28) == [[1, 3], [2], [0]]
    assert forward_groups([50], 28) == [[0]]  # too wide for the budget: alone, never dropped


@pytest.mark.parametrize("share_prompt", [True, False])
def test_stage_equals_the_live_reference_and_so_do_the_losses(tiny_model_dir, share_prompt):
    from core.models import load_tokenizer

    pad_id = load_tokenizer(str(tiny_model_dir)).pad_token_id
    # a budget that splits the stage's forwards differently from the training micro-batches; the live reference
    # runs on padded rows, the stage on shared-prompt rows or on padded ones
    stage = ReferenceStage(str(tiny_model_dir), precision="fp32", tokens_per_forward=40, share_prompt=share_prompt)
    assert stage.layout == ("shared" if share_prompt else "padded")
    out = stage(as_ray_batch(PAIRS))
    assert set(out) >= {"prompt_ids", "ref_chosen_logps", "ref_rejected_logps"}
    live_chosen, live_rejected = live_reference(tiny_model_dir, PAIRS, pad_id, micro_batch=2)
    stored_chosen = torch.as_tensor(out["ref_chosen_logps"])
    stored_rejected = torch.as_tensor(out["ref_rejected_logps"])
    torch.testing.assert_close(stored_chosen, live_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored_rejected, live_rejected, rtol=1e-5, atol=1e-5)

    # a policy that moved away from the reference: the DPO losses with either reference are the same
    torch.manual_seed(0)
    policy_chosen = live_chosen + torch.randn(4)
    policy_rejected = live_rejected + torch.randn(4)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        kwargs = dict(chosen_lengths=torch.tensor([2, 4, 1, 6]), rejected_lengths=torch.tensor([1, 2, 6, 1]),
                      loss_type=loss_type, beta=0.1, label_smoothing=0.0)
        live = dpo_loss(policy_chosen, policy_rejected, live_chosen, live_rejected, **kwargs)
        stored = dpo_loss(policy_chosen, policy_rejected, stored_chosen, stored_rejected, **kwargs)
        for want, got in zip(live, stored):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stage_on_image_pairs_equals_the_live_reference_of_each_pair_alone(tmp_path):
    """A vision-language model (tests/tiny_vlm.py): Nova image rows (1, 2 and 1 images, different widths) through
    the data stage, then the reference stage with a budget that puts two pairs of different widths in one padded
    forward; each pair's stored log-probs equal the model's full logits on that pair alone with its own images."""
    from transformers import AutoModelForImageTextToText

    from core.data.formats import parse_line
    from core.data.images import load_processor, vision_tokenize_record
    from tests.tiny_vlm import build_tiny_vlm_dir, image_bytes, nova_image_row

    model_dir = str(build_tiny_vlm_dir(tmp_path / "vlm"))
    processor = load_processor(model_dir)
    rows = []
    for i, (count, chosen) in enumerate(((1, "Red."), (2, "Mostly green, a little blue."), (1, "Blue"))):
        uris = [f"s3://bkt/{i}-{k}.png" for k in range(count)]
        record, error = parse_line(json.dumps(nova_image_row(uris, "Which colour?", chosen, "White.")), f"f:{i + 1}")
        assert error is None
        for k, uri in enumerate(uris):  # the images as local files
            (tmp_path / f"{i}-{k}.png").write_bytes(image_bytes(10 * i + k))
            record["media"] = record["media"].replace(uri, str(tmp_path / f"{i}-{k}.png"))
        rows.append(vision_tokenize_record(record, processor, max_length=128))
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    batch = as_ray_batch({c: [r[c] for r in rows] for c in columns})
    batch["vision"] = np.array([r["vision"] for r in rows] + [None], dtype=object)[:-1]
    widths = sorted(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    stage = ReferenceStage(model_dir, precision="fp32", tokens_per_forward=4 * widths[1])  # two pairs a forward
    assert stage.layout == "padded" and len(forward_groups(widths, stage.tokens_per_forward)) == 2
    out = stage(batch)
    assert out["vision"] is batch["vision"]  # the images stay with the rows the workers read

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad_id = processor.tokenizer.pad_token_id
    for i, row in enumerate(rows):
        with torch.no_grad():
            live, _ = sequence_logps_of(model, collate_pairs({k: [row[k]] for k in (*columns, "vision")}, pad_id),
                                        head=False)
        stored = torch.tensor([out["ref_chosen_logps"][i], out["ref_rejected_logps"][i]])
        torch.testing.assert_close(stored, live, rtol=1e-5, atol=1e-5)
    # the images count: the first pair with the second one's image scores differently
    swapped = {k: [rows[0][k]] for k in columns} | {"vision": [rows[2]["vision"]]}
    with torch.no_grad():
        other, _ = sequence_logps_of(model, collate_pairs(swapped, pad_id), head=False)
    assert abs(float(other[0]) - out["ref_chosen_logps"][0]) > 1e-5


@pytest.mark.slow
def test_precompute_writes_a_cache_that_a_second_run_reuses(tiny_model_dir, tmp_path):
    import ray

    from core.data.pipeline import tokenized_dataset
    from core.data.synthetic import answer_format_pairs
    from training.reference import precompute_reference

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in answer_format_pairs(12, seed=3)))
    r = recipe(str(tiny_model_dir), out=str(tmp_path / "out"))
    r["training_config"]["max_length"] = 128
    said: list[str] = []
    ray.init(num_cpus=3, include_dashboard=False)  # a tokenizer actor, a model actor, the read tasks
    try:
        def run(r):
            datasets = {"train": tokenized_dataset([str(data)], load_recipe(r), "train", 0.0)}
            out, info = precompute_reference(datasets, load_recipe(r), key_parts={"train": file_fingerprints([str(data)])},
                                             on_gpu=False, actors=1, chunk_size=1024, say=said.append)
            rows = sorted(out["train"].take_all(), key=lambda row: row["source"])
            return rows, info

        first, first_info = run(r)
        sweep = copy.deepcopy(r)
        sweep["training_config"]["model"]["dpo_cfg"]["beta"] = 0.3
        second, second_info = run(sweep)
    finally:
        ray.shutdown()
    assert first_info["reused"] == [] and second_info["reused"] == ["train"] and second_info["seconds"] == 0.0
    assert first_info["cache_uri"] == second_info["cache_uri"]
    assert first_info["cache_uri"].startswith(str(tmp_path / "out" / "_reference_cache"))
    assert len(first) == 12
    assert [row["ref_chosen_logps"] for row in second] == [row["ref_chosen_logps"] for row in first]

    from core.models import load_tokenizer

    pad_id = load_tokenizer(str(tiny_model_dir)).pad_token_id
    pairs = {k: [list(row[k]) for row in first] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    live_chosen, live_rejected = live_reference(tiny_model_dir, pairs, pad_id, micro_batch=4)
    torch.testing.assert_close(torch.tensor([row["ref_chosen_logps"] for row in first]), live_chosen,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([row["ref_rejected_logps"] for row in first]), live_rejected,
                               rtol=1e-5, atol=1e-5)
    assert any("computing" in line for line in said) and any("reusing" in line for line in said)


@pytest.mark.slow
def test_training_with_precomputed_or_live_reference_gives_the_same_losses(tiny_model_dir, tmp_path, ray_cluster):
    """Two full-rank runs, same seed and so the same batches: a live reference engine, then precompute."""
    import subprocess
    import sys

    from core.data.synthetic import answer_format_pairs

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in answer_format_pairs(16, seed=5)))
    losses, norms = {}, {}
    for reference in ("engine", "precompute"):  # one replica: no ZeRO partitioning (ds_config.zero_stage)
        r = {"run": {"name": f"ref-{reference}", "model_name_or_path": str(tiny_model_dir), "replicas": 1,
                     "data_s3_path": str(tmp_path / "data"), "output_s3_path": str(tmp_path / "out")},
             "training_config": {"max_length": 128, "global_batch_size": 4, "precision": "fp32",
                                 "model": {"optim": {"lr": 5e-3, "name": "adamw",
                                                     "sched": {"warmup_steps": 1, "min_lr": 1e-5}},
                                           "dpo_cfg": {"reference": reference}}}}
        path = tmp_path / f"{reference}.yaml"
        path.write_text(yaml.safe_dump(r))
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=ROOT,
                              env=ray_cluster.driver_env(), capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "out" / f"ref-{reference}" / "metrics.jsonl").open()]
        losses[reference] = [(row["step"], row["loss"], row["rewards/margins"]) for row in rows
                             if row["split"] == "train"]
        norms[reference] = [row["grad_norm"] for row in rows if row["split"] == "train"]
    assert len(losses["engine"]) == 4
    assert [s for s, _, _ in losses["precompute"]] == [s for s, _, _ in losses["engine"]]
    for (_, live, live_margin), (_, stored, stored_margin) in zip(losses["engine"], losses["precompute"]):
        assert stored == pytest.approx(live, abs=1e-4) and stored_margin == pytest.approx(live_margin, abs=1e-4)
    assert losses["engine"][-1][1] < losses["engine"][0][1]  # it trained: the comparison is not of constants
    # the unclipped norm, measured by the loop where DeepSpeed records none (fp32 without partitioning)
    assert all(n > 0 for n in norms["engine"]) and norms["precompute"] == pytest.approx(norms["engine"], rel=1e-3)


def test_the_seed_matters_only_when_it_picks_a_held_out_split():
    other_seed = recipe("m")
    other_seed["training_config"]["seed"] = 7
    assert token_settings(other_seed, "fp32") == token_settings(recipe("m"), "fp32")
    for r in (other_seed, base := recipe("m")):
        r["training_config"]["data"]["validation_fraction"] = 0.1
    assert token_settings(other_seed, "fp32") != token_settings(base, "fp32")
