"""Prompts for candidate generation: plain {"prompt": text} or chat rows ({"messages"/"prompt": [turns]}, an
optional "system"), or rows of any preference format raydpo reads (their prompt is taken, their answers ignored).

A row that ends with an assistant turn is a whole conversation, not a prompt; it is a bad row with that reason.
"""
from __future__ import annotations

import json

from core.data import format_parsers as fp
from core.data.formats import data_files, iter_raw_rows, parse_line

PROMPT_KEYS = ("prompt", "messages")
PAIR_KEYS = ("chosen", "rejected", "preferred_output", "completions", "chosen_response", "conversations")


def plain_prompt(obj: dict) -> dict | None:
    """{"prompt", "system", "tools"} of a plain prompt row, None when the row is a preference row instead."""
    if any(k in obj for k in PAIR_KEYS):
        return None
    key = next((k for k in PROMPT_KEYS if k in obj), None)
    if key is None or (key == "messages" and obj["messages"] and isinstance(obj["messages"][-1], dict)
                       and "candidates" in obj["messages"][-1]):
        return None  # a Nova row: the formats read it
    value = obj[key]
    turns = [{"role": "user", "content": value}] if isinstance(value, str) else fp.chat_turns(value, key)[0]
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise fp.RowError("'system' must be a string")
    leading = []
    while turns and turns[0]["role"] == "system":
        leading.append(turns.pop(0)["content"])
    if not turns or not any(t["content"].strip() for t in turns):
        raise fp.RowError("the prompt is empty")
    if turns[-1]["role"] not in ("user", "tool"):
        raise fp.RowError(f"the prompt ends with an {turns[-1]['role']} turn; it must end with a user turn")
    return {"prompt": turns, "system": "\n".join(leading) or system or None, "tools": fp.tools_text(obj.get("tools"))}


def read_prompts(paths: list[str], fmt: str = "auto") -> tuple[list[dict], list[tuple[str, str]]]:
    """(prompts [{"prompt", "system", "tools", "source"}], bad rows [(file:line, reason)])."""
    prompts, bad, file_format = [], [], {}
    for path in data_files(paths):
        for text, source in iter_raw_rows(path):
            try:
                obj = json.loads(text)
                fields = plain_prompt(obj) if isinstance(obj, dict) and fmt == "auto" else None
            except (ValueError, fp.RowError, TypeError, AttributeError) as err:
                bad.append((source, str(err)))
                continue
            if fields is None:
                record, reason = parse_line(text, source, fmt, None, file_format)
                if record is None:
                    bad.append((source, f"neither a prompt row nor a preference row: {reason}"))
                    continue
                fields = {"prompt": record["prompt"], "system": record["system"], "tools": record["tools"]}
            prompts.append({**fields, "source": source})
    return prompts, bad
