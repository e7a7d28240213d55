"""Preference evaluation: the metrics by hand, and the actor's log-probabilities against plain transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.data.record import make_record
from evaluation import preference as p

RECORDS = [
    make_record([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital.", "London"),
    make_record([{"role": "user", "content": "hi"}], "hi there, how can I help you today?", "no",
                system="be brief"),
    make_record([{"role": "user", "content": "Answer: yes or no."}, {"role": "assistant", "content": "yes"},
                 {"role": "user", "content": "again?"}], "yes", "The quick brown fox jumps over the lazy dog."),
]


def test_ranking_accuracy_needs_strictly_higher():
    assert p.ranking_accuracy([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0]) == pytest.approx(1 / 3)  # tie is no win
    assert p.ranking_accuracy([], []) == 0.0


def test_summed_and_per_token_rankings_can_disagree():
    # chosen: -10 over 10 tokens (-1 a token); rejected: -6 over 3 tokens (-2 a token)
    rows = [{"logp_chosen": -10.0, "logp_rejected": -6.0, "tokens_chosen": 10, "tokens_rejected": 3}]
    m = p.preference_metrics(rows, beta=0.1)
    assert m["ranking_accuracy"] == 0.0 and m["ranking_accuracy_per_token"] == 1.0
    assert m["logps_chosen_per_token"] == -1.0 and m["logps_rejected_per_token"] == -2.0
    assert "reward_accuracy" not in m  # no reference log-probs: no rewards


def test_implicit_rewards_by_hand():
    # beta 0.1: chosen rewards 0.1*(-10+11)=0.1 and 0.1*(-20+20)=0; rejected 0.1*(-12+11)=-0.1 and 0.1*(-18+19)=0.1
    got = p.implicit_rewards([-10.0, -20.0], [-12.0, -18.0], [-11.0, -20.0], [-11.0, -19.0], beta=0.1)
    assert got == pytest.approx({"reward_accuracy": 0.5, "reward_margin": 0.05, "rewards_chosen": 0.05,
                                 "rewards_rejected": 0.0})


def test_per_token_guards_empty_answers():
    assert p.per_token([-4.0, -3.0], [2, 0]) == [-2.0, 0.0]


def _batch(records):
    return {"index": np.arange(len(records)), "record": np.array([json.dumps(r) for r in records])}


def _reference_logps(model_dir, record, max_length=1024):
    """Sum of log-probs of the answer tokens after the prompt: a plain forward pass per sequence."""
    import torch

    from core.data.tokenize import tokenize_record
    from core.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir)).eval()
    ids = tokenize_record(record, tok, max_length=max_length)
    out = []
    for answer in (ids["chosen_ids"], ids["rejected_ids"]):
        full = torch.tensor([ids["prompt_ids"] + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0].double(), -1)
        start = len(ids["prompt_ids"])
        out.append(sum(logprobs[t - 1, full[0, t]].item() for t in range(start, full.shape[1])))
        out.append(len(answer))
    return out  # [logp_chosen, n_chosen, logp_rejected, n_rejected]


def test_actor_log_probs_match_a_plain_forward_pass(tiny_model_dir):
    actor = p.LogpsActor(str(tiny_model_dir), None, {"max_length": 1024})
    got = actor(_batch(RECORDS))
    assert "ref_logp_chosen" not in got
    for i, record in enumerate(RECORDS):
        chosen, n_chosen, rejected, n_rejected = _reference_logps(tiny_model_dir, record)
        assert got["logp_chosen"][i] == pytest.approx(chosen, rel=1e-4)
        assert got["logp_rejected"][i] == pytest.approx(rejected, rel=1e-4)
        assert (got["tokens_chosen"][i], got["tokens_rejected"][i]) == (n_chosen, n_rejected)
    assert got["truncated"] == [False, False, False]


def test_actor_counts_truncated_pairs(tiny_model_dir):
    got = p.LogpsActor(str(tiny_model_dir), None, {"max_length": 16})(_batch(RECORDS[:1]))
    assert got["truncated"] == [True]
    assert got["tokens_chosen"][0] < _reference_logps(tiny_model_dir, RECORDS[0])[1]


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm, load_tokenizer

    torch.manual_seed(1)
    model = get_peft_model(load_causal_lm(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora")
    model.save_pretrained(path)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    return path


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, lora_dir):
    base = p.LogpsActor(str(tiny_model_dir), None, {})(_batch(RECORDS))
    tuned = p.LogpsActor(str(lora_dir), p.ADAPTER_DISABLED, {})(_batch(RECORDS))
    assert tuned["ref_logp_chosen"] == pytest.approx(base["logp_chosen"], rel=1e-5)
    assert tuned["ref_logp_rejected"] == pytest.approx(base["logp_rejected"], rel=1e-5)
    assert tuned["logp_chosen"] != pytest.approx(base["logp_chosen"], rel=1e-3)  # the adapter changes the model


def test_full_model_reference_is_a_second_model(tiny_model_dir, tmp_path):
    from tests.tiny import build_tiny_model_dir

    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    base = p.LogpsActor(str(tiny_model_dir), None, {})(_batch(RECORDS))
    tuned = p.LogpsActor(str(other), str(tiny_model_dir), {})(_batch(RECORDS))
    assert tuned["ref_logp_chosen"] == pytest.approx(base["logp_chosen"], rel=1e-5)
    assert tuned["logp_chosen"] != pytest.approx(base["logp_chosen"], rel=1e-3)
    rows = [{k: v[i] for k, v in tuned.items() if k != "index"} for i in range(len(RECORDS))]
    m = p.preference_metrics(rows, beta=0.5)
    rc = [0.5 * (a - b) for a, b in zip(tuned["logp_chosen"], tuned["ref_logp_chosen"])]
    rr = [0.5 * (a - b) for a, b in zip(tuned["logp_rejected"], tuned["ref_logp_rejected"])]
    assert m["reward_margin"] == pytest.approx(sum(c - r for c, r in zip(rc, rr)) / 3)


def test_a_reference_scored_earlier_is_reused_not_run_again(tiny_model_dir, lora_dir, monkeypatch):
    calls = []

    def score_in_process(records, model_source, reference, settings, **_):  # the actor, without Ray
        calls.append((model_source, reference))
        got = p.LogpsActor(model_source, reference, {})(_batch(records))
        return [{k: v[i] for k, v in got.items() if k != "index"} for i in range(len(records))]

    monkeypatch.setattr(p, "score_pairs", score_in_process)
    base = {"label": "base", "path": str(tiny_model_dir), "reference": None}
    tuned = {"label": "tuned", "path": str(lora_dir), "reference": p.ADAPTER_DISABLED, "beta": 0.1}
    live, _, _ = p.evaluate(RECORDS, [base, tuned], p.PreferenceSettings())
    assert calls[-1] == (str(lora_dir), p.ADAPTER_DISABLED)
    reused, _, _ = p.evaluate(RECORDS, [base, tuned | {"reference_scored_as": "base"}], p.PreferenceSettings())
    assert calls[-1] == (str(lora_dir), None)  # the tuned model's forward only
    assert reused["tuned"]["metrics"] == pytest.approx(live["tuned"]["metrics"], rel=1e-5)
    assert "reward_margin" in reused["tuned"]["metrics"]


def test_read_pairs_counts_bad_rows(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n"
                 + json.dumps({"prompt": "q2", "chosen": "c", "rejected": "d"}) + "\n")
    records, bad = p.read_pairs(str(f))
    assert [r["chosen"] for r in records] == ["a", "c"]
    assert len(bad) == 1 and bad[0][0] == f"{f}:2" and "identical" in bad[0][1]
    records, _ = p.read_pairs(str(f), max_rows=1)
    assert len(records) == 1
