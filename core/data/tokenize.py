"""Canonical records -> token ids, through the model's chat template (TRL's data utilities do the templating).

Truncation is explicit and counted: the prompt first (keep its end or its start) down to max_prompt_length, then the
responses down to what max_length leaves.
"""
from __future__ import annotations

import json

# Used only for tokenizers without a chat template (base models): ChatML, which most chat models use.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prompt_messages(record: dict, default_system: str | None) -> list[dict]:
    system = record.get("system") or default_system
    messages = [{"role": m["role"], "content": m["content"]} for m in record["prompt"]]
    return ([{"role": "system", "content": system}] if system else []) + messages


def template_texts(record: dict, tokenizer, default_system: str | None = None) -> dict:
    """{"prompt", "chosen", "rejected"} as text: the prompt ends with the assistant header, responses its turns."""
    from trl.data_utils import maybe_apply_chat_template

    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_TEMPLATE
    example = {
        "prompt": prompt_messages(record, default_system),
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
    }
    tools = json.loads(record["tools"]) if record.get("tools") else None
    return maybe_apply_chat_template(example, tokenizer, tools=tools)


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int,
             max_prompt_length: int, keep: str) -> tuple[list[int], list[int], list[int], bool]:
    """Fit prompt + longest response into max_length. Returns the pieces and whether anything was cut."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if keep == "keep_end" else prompt[:max_prompt_length]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def tokenize_record(record: dict, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                    keep: str = "keep_end", default_system: str | None = None) -> dict:
    if record.get("images"):  # the prompt without its images would train silently on the wrong question
        from core.errors import DataError

        raise DataError(f"{record.get('source', '')}: the row holds {record['images']} image(s) and the model is a "
                        "text model", why="a text model sees the prompt without its images",
                        fix="train a vision-language model on image rows (one AutoModelForImageTextToText loads: "
                            "Qwen2-VL, SmolVLM, LLaVA; README 'Images'), or drop the image rows")
    texts = template_texts(record, tokenizer, default_system)
    ids = {k: tokenizer(texts[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen", "rejected")}
    prompt, chosen, rejected, truncated = truncate(
        ids["prompt"], ids["chosen"], ids["rejected"], max_length=max_length,
        max_prompt_length=max_prompt_length or max_length // 2, keep=keep)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated,
            "source": record.get("source", "")}


class TokenizeStage:
    """Ray Data map_batches stage: loads the tokenizer once per actor/process, tokenises a batch of records."""

    def __init__(self, model_source: str, max_length: int, max_prompt_length: int | None, keep: str,
                 default_system: str | None):
        from core.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_source)
        self.kwargs = dict(max_length=max_length, max_prompt_length=max_prompt_length, keep=keep,
                           default_system=default_system)

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [tokenize_record(_plain(row), self.tokenizer, **self.kwargs) for row in rows]
        return {key: [row[key] for row in out] for key in ("prompt_ids", "chosen_ids", "rejected_ids",
                                                           "truncated", "source")}


def _plain(row: dict) -> dict:
    """Ray hands numpy arrays and scalars, and an all-null string column as NaN floats; templating wants str/None."""
    prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]]
    optional = {k: row.get(k) if isinstance(row.get(k), str) else None for k in ("system", "tools")}
    return {**row, "prompt": prompt, **optional}
