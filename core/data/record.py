"""The canonical preference record every input format becomes.

Plain dicts travel through Ray Data (Arrow needs a fixed schema), so the record is a dict with these keys:
    system:   str | None            system prompt from the data (the recipe's default applies later)
    prompt:   list[{"role", "content"}]   user/assistant turns up to the answer; roles user|assistant|tool
    chosen:   str                   the preferred final assistant answer
    rejected: str                   the non-preferred final assistant answer
    tools:    str | None            JSON text of a list of tool specs (JSON text keeps Arrow's schema fixed)
    images:   int                   number of image objects in the prompt (training on them needs a vision model)
    source:   str                   "file:line" (1-based line; for a JSON array, the element's index + 1)
"""
from __future__ import annotations

RECORD_KEYS = ("system", "prompt", "chosen", "rejected", "tools", "images", "source")


def make_record(prompt, chosen, rejected, *, system=None, tools=None, images=0, source="") -> dict:
    return {
        "system": system,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": chosen,
        "rejected": rejected,
        "tools": tools,
        "images": int(images),
        "source": source,
    }
