"""The canonical preference record every input format becomes.

Plain dicts travel through Ray Data (Arrow needs a fixed schema), so the record is a dict with these keys:
    system:   str | None            system prompt from the data (the recipe's default applies later)
    prompt:   list[{"role", "content"}]   user/assistant turns up to the answer; roles user|assistant|tool
    chosen:   str                   the preferred final assistant answer
    rejected: str                   the non-preferred final assistant answer
    tools:    str | None            JSON text of a list of tool specs (JSON text keeps Arrow's schema fixed)
    images:   int                   number of image objects in the prompt (training on them needs a vision model)
    media:    str | None            JSON text, where the prompt holds images: per prompt turn, its content parts in
                                    order ([{"type": "text", "text"} | {"type": "image", "uri", "format"}]) or null
                                    for a text-only turn; `content` keeps the turn's text alone (text models)
    source:   str                   "file:line" (1-based line; for a JSON array, the element's index + 1)
"""
from __future__ import annotations

import json

RECORD_KEYS = ("system", "prompt", "chosen", "rejected", "tools", "images", "media", "source")


def make_record(prompt, chosen, rejected, *, system=None, tools=None, images=0, source="") -> dict:
    """prompt turns may carry "parts" (a parser's content parts with images): they become the media column."""
    parts = [m.get("parts") for m in prompt]
    return {
        "system": system,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": chosen,
        "rejected": rejected,
        "tools": tools,
        "images": int(images),
        "media": json.dumps(parts, ensure_ascii=False) if any(parts) else None,
        "source": source,
    }
