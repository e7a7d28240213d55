"""Every input format -> one canonical record (record.py). The prompt is extracted here and nowhere else.

Formats are a table of parser functions (format_parsers.py). A file's format is detected from its first readable row
(unless one is given); rows of that file that do not fit are bad rows, each with a reason and its file:line, never an
exception. Raw rows come from raw_rows.py (the one reader of file bytes). Also here: scanning files for a report,
and writing records back out as Nova or TRL rows.
"""
from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from core import storage
from core.data import format_parsers as fp
from core.data.raw_rows import UNREADABLE_KEY, data_files, iter_raw_rows
from core.data.record import RECORD_KEYS, make_record
from core.errors import DataError

FORMATS = {
    "nova": fp.parse_nova,
    "trl": fp.parse_trl,
    "hh": fp.parse_hh,
    "sharegpt": fp.parse_sharegpt,
    "openai": fp.parse_openai,
    "nemo": fp.parse_nemo,
    "when2call": fp.parse_when2call,
    "kto": fp.parse_unpaired,  # detected only to say clearly why such a file cannot train DPO
}
PAIR_FORMATS = tuple(name for name in FORMATS if name != "kto")

# (format, test on a row's keys), first match wins: the specific shapes before the generic chosen/rejected one.
DETECTORS = (
    ("kto", fp.is_unpaired),
    ("nova", lambda o: isinstance(o.get("messages"), list) and bool(o["messages"])
        and isinstance(o["messages"][-1], dict) and "candidates" in o["messages"][-1]),
    ("openai", lambda o: "input" in o and "preferred_output" in o),
    ("nemo", lambda o: "context" in o and "completions" in o),
    ("when2call", lambda o: "chosen_response" in o and "rejected_response" in o),
    ("sharegpt", lambda o: "conversations" in o),
    ("hh", lambda o: "prompt" not in o and isinstance(o.get("chosen"), str) and "\n\nAssistant:" in o["chosen"]),
    ("trl", lambda o: "chosen" in o and "rejected" in o),
)
# The top-level keys each format needs: a row that has some of them is told which ones it lacks.
FORMAT_KEYS = {"nova": ("messages",), "openai": ("input", "preferred_output", "non_preferred_output"),
               "nemo": ("context", "completions"), "when2call": ("messages", "chosen_response", "rejected_response"),
               "sharegpt": ("conversations", "chosen", "rejected"), "trl": ("prompt", "chosen", "rejected")}


def closest_format_hint(obj: dict) -> str:
    """"; closest: trl, which also needs 'rejected'" for the format sharing most keys with the row, "" for none."""
    shared = {name: len(set(keys) & set(obj)) for name, keys in FORMAT_KEYS.items()}
    name = max(shared, key=lambda n: (shared[n], -len(FORMAT_KEYS[n])))
    if shared[name] == 0:
        return ""
    lacking = [k for k in FORMAT_KEYS[name] if k not in obj]
    return f"; closest: {name}, which also needs {', '.join(repr(k) for k in lacking)}" if lacking else ""


def detect_format(obj: dict) -> str:
    """The format a row's keys say it is in; DataError (its `what` is a one-line reason) when none fits."""
    for name, fits in DETECTORS:
        if fits(obj):
            return name
    raise DataError(
        f"no known preference format has the keys {sorted(obj)}{closest_format_hint(obj)}",
        why="rows are recognised by their keys: nova (messages ending in candidates), trl (prompt/chosen/rejected), "
            "hh (chosen/rejected dialogues), sharegpt (conversations), openai (input/preferred_output), "
            "nemo (context/completions), when2call (messages/chosen_response/rejected_response)",
        fix="name the format with --format, or rename your keys with a key_map {\"their_key\": \"our_key\"}")


def finish(pair: fp.Pair, source: str) -> dict:
    """The checks every format shares, then the canonical record. The one place a prompt takes its final shape."""
    turns = list(pair.turns)
    leading = []
    while turns and turns[0]["role"] == "system":
        leading.append(turns.pop(0)["content"])
    if any(turn["role"] == "system" for turn in turns):
        raise fp.RowError("a system message after the conversation started; only leading system messages are read")
    if leading and pair.system:
        raise fp.RowError("two system prompts: a 'system' key and a leading system message")
    system = "\n".join(leading) or pair.system or None
    if not turns:
        raise fp.RowError("the prompt has no user turn")
    if turns[-1]["role"] not in ("user", "tool"):
        raise fp.RowError(f"the prompt ends with an {turns[-1]['role']} turn; it must end with a user (or tool) turn")
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not answer.strip():
            raise fp.RowError(f"empty {name} response")
    if pair.chosen.strip() == pair.rejected.strip():
        raise fp.RowError("chosen and rejected responses are identical")
    return make_record(turns, pair.chosen, pair.rejected, system=system, tools=pair.tools, images=pair.images,
                       source=source)


def _file_of(source: str) -> str:
    return source.rpartition(":")[0] or source


def _row_format(obj: dict, source: str, file_format: dict) -> str:
    path = _file_of(source)
    if path not in file_format:
        file_format[path] = detect_format(obj)
    return file_format[path]


def parse_line(text: str, source: str, fmt: str = "auto", key_map: dict | None = None,
               file_format: dict | None = None) -> tuple[dict | None, str | None]:
    """One raw JSON row -> (record, None) or (None, reason). Never raises for bad input.

    file_format caches {file path: detected format} across calls, so a file's first readable row decides its format.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON: {err.msg} at column {err.colno}"
    if not isinstance(obj, dict):
        return None, f"a row must be a JSON object, not a JSON {type(obj).__name__}"
    if UNREADABLE_KEY in obj:
        return None, str(obj[UNREADABLE_KEY])
    if key_map:
        obj = {key_map.get(key, key): value for key, value in obj.items()}
    try:
        name = fmt if fmt != "auto" else _row_format(obj, source, {} if file_format is None else file_format)
    except DataError as err:
        return None, err.what
    if name not in FORMATS:
        return None, f"unknown format {name!r}; known: {', '.join(PAIR_FORMATS)}"
    try:
        if fp.is_unpaired(obj):
            raise fp.RowError(fp.UNPAIRED_REASON)
        return finish(FORMATS[name](obj), source), None
    except fp.RowError as err:
        return None, str(err) + _misfit_note(obj, name, fmt)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as err:
        # Shapes no parser foresaw (a number where a list belongs...): still a bad row with a reason, not a crash.
        return None, f"unexpected row structure for {name}: {type(err).__name__}: {err}"


def _misfit_note(obj: dict, name: str, fmt: str) -> str:
    if fmt != "auto":
        return ""
    try:
        own = detect_format(obj)
    except DataError:
        return ""
    return "" if own == name else f" (the file was detected as {name} from its first row; this row looks like {own})"


def empty_record(source: str) -> dict:
    return {"system": None, "prompt": [], "chosen": "", "rejected": "", "tools": None, "images": 0, "media": None,
            "source": source}


def parse_batch(batch: dict[str, list], fmt: str = "auto", key_map: dict | None = None) -> dict[str, list]:
    """Ray Data map_batches stage: columns text, source -> RECORD_KEYS + error (None for good rows)."""
    out = {key: [] for key in (*RECORD_KEYS, "error")}
    file_format: dict = {}
    for text, source in zip(batch["text"], batch["source"]):
        record, reason = parse_line(str(text), str(source), fmt, key_map, file_format)
        record = record or empty_record(str(source))
        for key in RECORD_KEYS:
            out[key].append(record[key])
        out["error"].append(reason)
    return out


def parsed_rows(files: list[str], fmt: str = "auto", key_map: dict | None = None):
    """(record | None, reason | None, source, format name) for every row of every file, streamed."""
    file_format: dict = {}
    for path in files:
        # s3fs opens "s3://bucket/key" as given, so sources keep the URI the user knows
        for text, source in iter_raw_rows(path, storage.filesystem_for(path)[0]):
            record, reason = parse_line(text, source, fmt, key_map, file_format)
            yield record, reason, source, fmt if fmt != "auto" else file_format.get(path, "undetected")


# --- scanning -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthStats:
    p50: int
    p95: int
    max: int


@dataclass(frozen=True)
class ScanReport:
    files: tuple[str, ...]
    rows_per_format: dict[str, int]
    good: int
    bad: int
    bad_rows: tuple[tuple[str, str], ...]  # (source, reason)
    prompt_tokens: LengthStats | None = None
    response_tokens: LengthStats | None = None  # chosen and rejected answers together
    max_length: int | None = None
    truncated: int | None = None  # pairs whose prompt + longer answer exceed max_length


def nearest_rank(sorted_values: list[int], percent: float) -> int:
    """The nearest-rank percentile: the smallest value with at least `percent`% of the values at or below it."""
    assert sorted_values, "percentile of nothing"
    rank = max(1, -(-len(sorted_values) * percent // 100))  # ceil without floats drifting
    return sorted_values[int(rank) - 1]


def length_stats(values: list[int]) -> LengthStats | None:
    if not values:
        return None
    ordered = sorted(values)
    return LengthStats(p50=nearest_rank(ordered, 50), p95=nearest_rank(ordered, 95), max=ordered[-1])


def token_lengths(record: dict, tokenizer) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts through the same templating the training pipeline uses."""
    from core.data.tokenize import template_texts

    texts = template_texts(record, tokenizer)
    return tuple(len(tokenizer(texts[k], add_special_tokens=False)["input_ids"])
                 for k in ("prompt", "chosen", "rejected"))


def scan(paths: list[str], fmt: str = "auto", key_map: dict | None = None, tokenizer=None,
         max_length: int | None = None) -> ScanReport:
    """Stream every row of every file: counts per format, bad rows with reasons, and token lengths if asked."""
    files = data_files(paths)
    per_format, bad, prompts, answers = Counter(), [], [], []
    truncated = 0
    for record, reason, source, name in parsed_rows(files, fmt, key_map):
        per_format[name] += 1
        if reason:
            bad.append((source, reason))
            continue
        if tokenizer is not None:
            prompt, chosen, rejected = token_lengths(record, tokenizer)
            prompts.append(prompt)
            answers += [chosen, rejected]
            if max_length is not None:
                from core.data.tokenize import truncate

                truncated += truncate([0] * prompt, [0] * chosen, [0] * rejected, max_length=max_length,
                                      max_prompt_length=max_length, keep="keep_end")[3]
    good = sum(per_format.values()) - len(bad)
    return ScanReport(files=tuple(files), rows_per_format=dict(per_format), good=good, bad=len(bad),
                      bad_rows=tuple(bad), prompt_tokens=length_stats(prompts), response_tokens=length_stats(answers),
                      max_length=max_length, truncated=truncated if tokenizer is not None and max_length else None)


# --- writing records back out -------------------------------------------------------------------------------------

def nova_row(record: dict) -> dict:
    messages = [{"role": t["role"], "content": [{"text": t["content"]}]} for t in record["prompt"]]
    messages.append({"role": "assistant", "candidates": [
        {"content": [{"text": record["chosen"]}], "preferenceLabel": "preferred"},
        {"content": [{"text": record["rejected"]}], "preferenceLabel": "non-preferred"}]})
    system = {"system": [{"text": record["system"]}]} if record["system"] else {}
    return {"schemaVersion": "bedrock-conversation-2024", **system, "messages": messages}


def trl_row(record: dict) -> dict:
    """TRL conversational preference row; the system prompt leads the prompt, tools ride along as a list."""
    system = [{"role": "system", "content": record["system"]}] if record["system"] else []
    row = {"prompt": system + [dict(t) for t in record["prompt"]],
           "chosen": [{"role": "assistant", "content": record["chosen"]}],
           "rejected": [{"role": "assistant", "content": record["rejected"]}]}
    if record["tools"]:
        row["tools"] = json.loads(record["tools"])
    return row


WRITERS = {"nova": nova_row, "trl": trl_row}


def unwritable_reason(record: dict, to: str) -> str | None:
    """Why a record cannot be written as `to` without losing something, or None."""
    if record["images"]:
        return f"holds {record['images']} image(s); raydpo keeps only their count, so it cannot write them back"
    if to == "nova" and (record["tools"] or any(t["role"] == "tool" for t in record["prompt"])):
        return "has tools or tool turns, which Nova DPO rows cannot hold"
    if to == "nova" and record["prompt"][0]["role"] != "user":
        return "starts with an assistant turn; a Nova row starts with a user turn"
    return None


def write_records(records: Iterable[dict], out_path: str, to: str) -> int:
    """Write canonical records as JSONL rows in Nova's or TRL's conversational format; returns the row count.

    Written to a temporary file and moved into place, so a failure never leaves half a file under out_path.
    """
    if to not in WRITERS:
        raise DataError(f"cannot write format {to!r}", fix=f"choose one of {', '.join(WRITERS)}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    count = 0
    try:
        with (gzip.open(partial, "wt", encoding="utf-8") if out.name.endswith(".gz")
              else open(partial, "w", encoding="utf-8")) as handle:
            for record in records:
                problem = unwritable_reason(record, to)
                if problem:
                    raise DataError(f"cannot write {record['source']} as {to}", why=problem,
                                    fix="leave such rows out (raydpo data convert does and reports them)")
                handle.write(json.dumps(WRITERS[to](record), ensure_ascii=False) + "\n")
                count += 1
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return count
