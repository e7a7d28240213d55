"""Templating through the model's chat template, and explicit truncation."""
import pytest

from core.data.record import make_record
from core.data.tokenize import template_texts, tokenize_record, truncate


def test_truncate_fits_without_cutting():
    assert truncate([1, 2], [3], [4, 5], max_length=4, max_prompt_length=2, keep="keep_end") == \
        ([1, 2], [3], [4, 5], False)


@pytest.mark.parametrize("keep, prompt", [("keep_end", [4, 5, 6]), ("keep_start", [1, 2, 3])])
def test_truncate_cuts_the_prompt_first_then_the_responses(keep, prompt):
    got = truncate([1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11], max_length=6, max_prompt_length=3, keep=keep)
    assert got == (prompt, [7, 8, 9], [11], True)  # 3 prompt tokens leave room for 3 response tokens


def test_chat_template_and_system_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = make_record([{"role": "user", "content": "hi"}], "yes", "no")
    texts = template_texts(record, tokenizer, default_system="be brief")
    assert texts["prompt"] == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                              "<|im_start|>assistant\n"
    assert texts["chosen"] == "yes<|im_end|>\n" and texts["rejected"] == "no<|im_end|>\n"
    # the data's own system prompt wins over the recipe's
    own = make_record([{"role": "user", "content": "hi"}], "yes", "no", system="data system")
    assert "data system" in template_texts(own, tokenizer, default_system="be brief")["prompt"]


def test_tokenize_record_counts_truncation(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = make_record([{"role": "user", "content": "hello " * 40}], "yes", "no", source="f.jsonl:3")
    out = tokenize_record(record, tokenizer, max_length=32, max_prompt_length=16)
    assert out["truncated"] and len(out["prompt_ids"]) == 16 and out["source"] == "f.jsonl:3"
    assert len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"])) <= 32
    full = tokenize_record(record, tokenizer, max_length=4096)
    assert not full["truncated"]
    assert out["prompt_ids"] == full["prompt_ids"][-16:]  # keep_end keeps the question's end
    assert tokenizer.decode(full["chosen_ids"]) == "yes<|im_end|>\n"
