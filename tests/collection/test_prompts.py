"""Prompts for candidate generation: plain, chat and preference rows; bad rows kept with their reason."""
from __future__ import annotations

import json

from collection.prompts import read_prompts


def test_plain_chat_and_preference_rows_give_prompts_and_bad_rows_their_reason(tmp_path):
    rows = [{"prompt": "Name a colour."},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"prompt": "   "}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    prompts, bad = read_prompts([str(path)])
    assert [(p["system"], p["prompt"]) for p in prompts] == [
        (None, [{"role": "user", "content": "Name a colour."}]),
        ("Be brief.", [{"role": "user", "content": "Hi"}]),  # a leading system turn becomes the system prompt
        (None, [{"role": "user", "content": "Q"}])]  # a preference row's prompt, its answers ignored
    assert [p["source"] for p in prompts] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    reasons = dict(bad)
    assert "ends with an assistant turn" in reasons[f"{path}:4"]
    assert "empty" in reasons[f"{path}:5"]
    assert f"{path}:6" in reasons
