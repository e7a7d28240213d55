"""Generation: sampling arguments, cut answers, batching with left padding, and the Ray Data actor pool."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core import generate as g

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Answer: yes or no. Please answer in one word."}],
]


def test_generation_kwargs_greedy_and_sampling():
    greedy = g.generation_kwargs(g.GenerationSettings(max_new_tokens=5, temperature=0.0, top_p=0.5, top_k=3))
    assert greedy == {"max_new_tokens": 5, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    sample = g.generation_kwargs(g.GenerationSettings(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=-1))
    assert sample == {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert g.generation_kwargs(g.GenerationSettings(temperature=1.0, top_k=40))["top_k"] == 40


def test_answer_length_stops_at_the_first_end_token():
    assert g.answer_length([5, 7, 2, 0, 0], {2}) == (2, True)
    assert g.answer_length([2, 5], {2, 9}) == (0, True)
    assert g.answer_length([5, 7, 8], {2}) == (3, False)  # never ended: cut by max_new_tokens


def test_prompt_text_puts_the_system_prompt_first(tiny_model_dir):
    from core.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    text = g.prompt_text(tok, MESSAGES[1], "be brief")
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert g.prompt_text(tok, MESSAGES[1], None).startswith("<|im_start|>user\nhi")


def _batch(messages, systems=None):
    systems = systems or [""] * len(messages)
    return {"index": np.arange(len(messages)), "messages": np.array([json.dumps(m) for m in messages]),
            "system": np.array(systems)}


def _greedy_alone(tok, model, messages, max_new_tokens, eos_ids):
    """The reference: one prompt at a time, no padding, plain transformers generate."""
    import torch

    ids = tok(g.prompt_text(tok, messages, None), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids),
                             pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_actor_batches_with_left_padding_like_one_at_a_time(tiny_model_dir):
    actor = g.GeneratorActor(str(tiny_model_dir), {"max_new_tokens": 8, "batch_size": 3})
    out = actor(_batch(MESSAGES))
    assert list(out["index"]) == [0, 1, 2]
    for i, messages in enumerate(MESSAGES):
        alone = _greedy_alone(actor.tokenizer, actor.model, messages, 8, actor.eos_ids)
        n, ended = g.answer_length(alone, actor.eos_ids)
        assert out["prediction"][i] == actor.tokenizer.decode(alone[:n], skip_special_tokens=True)
        assert out["new_tokens"][i] == n and out["hit_max_new_tokens"][i] == (not ended)


def test_actor_counts_answers_cut_by_max_new_tokens(tiny_model_dir):
    actor = g.GeneratorActor(str(tiny_model_dir), {"max_new_tokens": 8})
    alone = _greedy_alone(actor.tokenizer, actor.model, MESSAGES[0], 8, actor.eos_ids)
    n, ended = g.answer_length(alone, actor.eos_ids)
    first = actor(_batch(MESSAGES[:1]))
    assert first["hit_max_new_tokens"] == [not ended] and first["new_tokens"] == [n]
    assert not ended and n == 8, "a random tiny model does not end within 8 tokens"
    # Make the third generated token an end token: the same prompt now ends where it first appears.
    stop = alone[2]
    cut_at = alone.index(stop)
    actor.eos_ids = {stop}
    again = actor(_batch(MESSAGES[:1]))
    assert again["hit_max_new_tokens"] == [False] and again["new_tokens"] == [cut_at]
    assert again["prediction"][0] == actor.tokenizer.decode(alone[:cut_at], skip_special_tokens=True)


@pytest.mark.slow
def test_ray_data_actor_pool_keeps_order(tiny_model_dir):
    import ray

    prompts = [{"messages": m, "system": s} for m in MESSAGES for s in (None, "be brief")]
    settings = g.GenerationSettings(max_new_tokens=8, batch_size=2)
    direct = g.GeneratorActor(str(tiny_model_dir), {"max_new_tokens": 8})
    want = direct(_batch([p["messages"] for p in prompts], [p["system"] or "" for p in prompts]))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        got = g.generate_answers(prompts, str(tiny_model_dir), settings, workers=2)
    finally:
        ray.shutdown()
    assert [r["prediction"] for r in got] == list(want["prediction"])
    assert [r["new_tokens"] for r in got] == list(want["new_tokens"])
    assert [r["hit_max_new_tokens"] for r in got] == list(want["hit_max_new_tokens"])


def test_generate_candidates_repeats_each_prompt_and_groups_the_answers(monkeypatch):
    seen = {}

    def fake_answers(prompts, model_source, settings, *, workers, use_gpu):
        seen["prompts"] = prompts
        return [{"prediction": f"answer {i}"} for i in range(len(prompts))]

    monkeypatch.setattr(g, "generate_answers", fake_answers)
    prompts = [{"messages": MESSAGES[0]}, {"messages": MESSAGES[1]}]
    got = g.generate_candidates(prompts, "m", g.GenerationSettings(temperature=1.0), 3)
    assert seen["prompts"] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert [[a["prediction"] for a in group] for group in got] == [["answer 0", "answer 1", "answer 2"],
                                                                   ["answer 3", "answer 4", "answer 5"]]


# ---------------------------------------------------------------- a vision-language model (tests/tiny_vlm.py)

@pytest.fixture(scope="module")
def vlm_rows(tmp_path_factory):
    """The tiny VLM and two Nova image rows read as gen_qa reads them (reference: the chosen answer), their images
    local files (the s3:// URIs Nova requires rewritten to them, as the vision tests do)."""
    from evaluation.gen_qa import read_qa_rows
    from tests.tiny_vlm import build_tiny_vlm_dir, image_bytes, nova_image_row

    tmp = tmp_path_factory.mktemp("gen-vlm")
    rows = [nova_image_row([f"s3://bkt/{i}-{k}.png" for k in range(1 + i)], "Which colour is it?", "Red.", "Blue.")
            for i in range(2)]
    (tmp / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, k in ((0, 0), (1, 0), (1, 1)):
        (tmp / f"{i}-{k}.png").write_bytes(image_bytes(10 * i + k, size=(28 + 9 * i, 28)))
    qa, bad = read_qa_rows(str(tmp / "qa.jsonl"))
    assert not bad and [r["reference"] for r in qa] == ["Red.", "Red."]
    for row in qa:  # parsed with the s3:// URIs Nova requires, then pointed at the local files
        row["media"] = row["media"].replace("s3://bkt/", str(tmp) + "/")
    return build_tiny_vlm_dir(tmp / "vlm"), qa


def _vlm_batch(rows):
    return {"index": np.arange(len(rows)), "messages": np.array([json.dumps(r["messages"]) for r in rows]),
            "system": np.array([r["system"] or "" for r in rows]), "media": np.array([r["media"] for r in rows])}


def test_a_vlm_answers_image_prompts_with_their_images_like_one_at_a_time(vlm_rows):
    """GeneratorActor on Nova image rows (gen_qa's path): batched with left padding, each answer equals plain
    transformers generate() of that prompt alone with its own images, and the images reach the model."""
    import torch

    from core.data.images import conversation, load_image, image_uris

    model_dir, rows = vlm_rows
    actor = g.GeneratorActor(str(model_dir), {"max_new_tokens": 6, "batch_size": 2})
    assert actor.processor is not None
    out = actor(_vlm_batch(rows))
    processor = actor.processor
    for i, row in enumerate(rows):
        chat, uris = conversation({"prompt": row["messages"], "system": row["system"], "media": row["media"]}, None)
        assert uris == image_uris(row["media"]) and len(uris) == 1 + i
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert text.count("<image>") == 1 + i
        alone = processor(text=[text], images=[load_image(u) for u in uris], return_tensors="pt")
        with torch.no_grad():
            ids = actor.model.generate(**alone, max_new_tokens=6, do_sample=False, eos_token_id=sorted(actor.eos_ids),
                                       pad_token_id=actor.tokenizer.pad_token_id)[0, alone["input_ids"].shape[1]:]
            # the same prompt without its pixels (the image features zeroed) scores differently: the images count
            logits = actor.model(**alone).logits[0, -1]
            blank = actor.model(**(alone | {"pixel_values": torch.zeros_like(alone["pixel_values"])})).logits[0, -1]
        assert not torch.allclose(logits, blank)
        n, ended = g.answer_length(ids.tolist(), actor.eos_ids)
        assert out["prediction"][i] == actor.tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert out["new_tokens"][i] == n and out["hit_max_new_tokens"][i] == (not ended)


def test_a_text_model_refuses_prompts_with_images(vlm_rows, tiny_model_dir):
    from core.errors import DataError

    actor = g.GeneratorActor(str(tiny_model_dir), {"max_new_tokens": 2})
    with pytest.raises(DataError, match="2 prompt\\(s\\) hold images and the model is a text model"):
        actor(_vlm_batch(vlm_rows[1]))
