"""NVIDIA When2Call test rows -> DPO preference pairs and a gen_qa set (`raydpo data when2call`).

A raw row holds a question, its tools (JSON texts), an answer for each of four behaviours (direct, tool_call,
request_for_info, cannot_answer) and the correct behaviour. Each row becomes:
  - three preference pairs in When2Call's own preference format (its README's `chosen_response`/`rejected_response`
    rows): the correct behaviour's answer preferred over each of the other three;
  - one gen_qa row {"system", "prompt", "reference"}: the correct answer is the reference.

Tool calls are written as the When2Call README documents them: <TOOLCALL>[{"name": ..., "arguments": {...}}]</TOOLCALL>.

The tool-rendering rule: the tools go into the system message, not into the chat template's `tools` argument.
SmolLM2's chat template (like many small models') ignores `tools`, so a model trained that way never sees them. The
system message lists one compact line per tool, `- name(required: type, optional?: type): first sentence of its
description`, then one line saying how to call a tool, when to ask for a missing argument and when to decline.
Parameter descriptions are left out: they make a prompt up to ~5,000 tokens, and the names carry what a 135M model
can use. The rows then carry no `tools` key, so a template that does render tools does not show them twice.

Held-out splits are stratified by the correct behaviour: the upstream file is ordered by behaviour (100 rows each),
so a plain head/tail split would never train on one behaviour preferred.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import DataError

BEHAVIOURS = ("direct", "tool_call", "request_for_info", "cannot_answer")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<TOOLCALL>", "</TOOLCALL>"
INSTRUCTION = (f"To call a tool, reply with only {TOOL_CALL_OPEN}[{{\"name\": \"tool_name\", \"arguments\": "
               f"{{...}}}}]{TOOL_CALL_CLOSE}. If the question lacks a required argument, ask the user for it. If no "
               "tool can answer the question, say that you cannot help with it.")
NO_TOOLS = "You have no tools."
MAX_DESCRIPTION_CHARS = 80  # one sentence is enough to tell tools apart; longer ones are cut at a word
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


class RowProblem(ValueError):
    """A raw row that cannot become pairs; the message is the reason shown beside its file:line."""


@dataclass(frozen=True)
class Converted:
    """What one raw file became: pairs and gen_qa rows per split, and every bad row with its reason."""
    train_pairs: list = field(default_factory=list)
    heldout_pairs: list = field(default_factory=list)
    train_qa: list = field(default_factory=list)
    heldout_qa: list = field(default_factory=list)
    bad_rows: list = field(default_factory=list)  # [(file:line, reason)]
    behaviours: dict = field(default_factory=dict)  # {split: {behaviour: rows}}


# ---- rendering: pure functions of one row -------------------------------------------------------------------------

def tool_call_text(answer) -> str:
    """When2Call's documented tool-call form from a raw `tool_call` answer (a JSON object, or a list of them)."""
    calls = json.loads(answer) if isinstance(answer, str) else answer
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise RowProblem("the tool_call answer is not a JSON object (or list of objects) with a 'name'")
    return f"{TOOL_CALL_OPEN}{json.dumps(calls, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def answer_text(behaviour: str, answer) -> str:
    if behaviour == "tool_call":
        try:
            return tool_call_text(answer)
        except json.JSONDecodeError as err:
            raise RowProblem(f"the tool_call answer is not valid JSON: {err.msg} at column {err.colno}") from err
    if not isinstance(answer, str) or not answer.strip():
        raise RowProblem(f"the {behaviour} answer is empty or not a string")
    return answer.strip()


def short_description(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    """The first sentence, cut at a word boundary to at most `limit` characters (with '...' when cut)."""
    sentence = _SENTENCE_END.split(" ".join(str(text or "").split()), maxsplit=1)[0]
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit - 3].rsplit(" ", 1)[0] + "..."


def parameter_list(parameters: dict | None) -> str:
    """'a: string, b?: integer': required parameters first in their listed order, optional ones marked '?'."""
    properties = (parameters or {}).get("properties") or {}
    required = [name for name in (parameters or {}).get("required") or [] if name in properties]
    optional = [name for name in properties if name not in required]

    def one(name: str, mark: str) -> str:
        kind = properties[name].get("type") if isinstance(properties[name], dict) else None
        return f"{name}{mark}: {kind}" if kind else f"{name}{mark}"

    return ", ".join([one(n, "") for n in required] + [one(n, "?") for n in optional])


def tool_line(tool: dict) -> str:
    line = f"- {tool['name']}({parameter_list(tool.get('parameters'))})"
    description = short_description(tool.get("description", ""))
    return f"{line}: {description}" if description else line


def parse_tools(tools) -> list[dict]:
    """A raw row's tools (a list of JSON texts or objects) as objects, each with a name."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RowProblem(f"'tools' must be a list, not {type(tools).__name__}")
    parsed = []
    for index, tool in enumerate(tools):
        try:
            tool = json.loads(tool) if isinstance(tool, str) else tool
        except json.JSONDecodeError as err:
            raise RowProblem(f"tool {index} is not valid JSON: {err.msg}") from err
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise RowProblem(f"tool {index} has no 'name'")
        parsed.append(tool)
    return parsed


def system_prompt(tools: list[dict]) -> str:
    """The system message that carries the tools: one compact line per tool, then the one-line instruction."""
    listing = "You can call these tools:\n" + "\n".join(tool_line(t) for t in tools) if tools else NO_TOOLS
    return f"{listing}\n{INSTRUCTION}"


def row_parts(row: dict) -> tuple[str, str, dict[str, str], str]:
    """(system prompt, question, {behaviour: answer text}, correct behaviour) of one raw row, or RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem(f"a row must be a JSON object, not {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RowProblem("missing or empty 'question'")
    correct = row.get("correct_answer")
    if correct not in BEHAVIOURS:
        raise RowProblem(f"correct_answer {correct!r} is none of {', '.join(BEHAVIOURS)}")
    answers = row.get("answers")
    if not isinstance(answers, dict):
        raise RowProblem("missing 'answers' (an object with one answer per behaviour)")
    missing = [b for b in BEHAVIOURS if b not in answers]
    if missing:
        raise RowProblem(f"'answers' lacks {', '.join(missing)}")
    texts = {b: answer_text(b, answers[b]) for b in BEHAVIOURS}
    return system_prompt(parse_tools(row.get("tools"))), question.strip(), texts, correct


def preference_pairs(row: dict, source: str = "") -> list[dict]:
    """Three When2Call preference rows: the correct behaviour's answer over each other behaviour's answer.

    An other answer identical to the correct one would make no pair: RowProblem.
    """
    system, question, texts, correct = row_parts(row)
    pairs = []
    for other in BEHAVIOURS:
        if other == correct:
            continue
        if texts[other] == texts[correct]:
            raise RowProblem(f"the {other} answer is identical to the correct ({correct}) answer")
        pairs.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                      "chosen_response": {"role": "assistant", "content": texts[correct]},
                      "rejected_response": {"role": "assistant", "content": texts[other]},
                      "chosen_category": correct, "rejected_category": other, "uuid": row.get("uuid"),
                      "raw_source": source})
    return pairs


def gen_qa_row(row: dict, source: str = "") -> dict:
    system, question, texts, correct = row_parts(row)
    return {"system": system, "prompt": question, "reference": texts[correct], "behaviour": correct,
            "uuid": row.get("uuid"), "raw_source": source}


def is_tool_call(answer: str) -> bool:
    """Whether a generated answer calls a tool the way the prompt says (the <TOOLCALL> tag)."""
    return TOOL_CALL_OPEN in answer


# ---- splitting ------------------------------------------------------------------------------------------------------

def stratified_split(behaviours: list[str], heldout_fraction: float, seed: int) -> list[bool]:
    """Per row, whether it is held out: round(fraction * n) rows of each behaviour, chosen by a seeded shuffle.

    Stratified because the upstream file is ordered by behaviour; every behaviour with 2+ rows keeps one for training
    and, when the fraction is above 0, gives at least one to the held-out set.
    """
    held = [False] * len(behaviours)
    if heldout_fraction <= 0:
        return held
    rng = random.Random(seed)
    for behaviour in sorted(set(behaviours)):
        indexes = [i for i, b in enumerate(behaviours) if b == behaviour]
        n = len(indexes)
        take = min(max(round(heldout_fraction * n), 1), n - 1) if n > 1 else 0
        for i in rng.sample(indexes, take):
            held[i] = True
    return held


# ---- files ----------------------------------------------------------------------------------------------------------

def read_raw(paths: list[str]) -> tuple[list[tuple[dict, str]], list[tuple[str, str]]]:
    """([(raw row, file:line)], [(file:line, reason)]) of When2Call raw files (.jsonl, .json, .gz, local or s3://)."""
    from core import storage
    from core.data.raw_rows import UNREADABLE_KEY, data_files, iter_raw_rows

    rows, bad = [], []
    for file in data_files(paths):
        fs = storage.filesystem_for(file)[0] if storage.is_remote(file) else None
        for text, source in iter_raw_rows(file, fs):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                bad.append((source, f"malformed JSON: {err.msg} at column {err.colno}"))
                continue
            if isinstance(obj, dict) and UNREADABLE_KEY in obj:
                bad.append((source, str(obj[UNREADABLE_KEY])))
                continue
            rows.append((obj, source))
    return rows, bad


def _converted(rows: list[tuple[dict, str]], bad: list) -> list[tuple[list, dict]]:
    """(pairs, gen_qa row) per good row; each bad row's (file:line, reason) is appended to `bad`."""
    out = []
    for row, source in rows:
        try:
            out.append((preference_pairs(row, source), gen_qa_row(row, source)))
        except RowProblem as err:
            bad.append((source, str(err)))
    return out


def convert_rows(rows: list[tuple[dict, str]], *, heldout: list[tuple[dict, str]] | None = None,
                 heldout_fraction: float = 0.0, seed: int = 0,
                 bad_rows: list[tuple[str, str]] | None = None) -> Converted:
    """Raw rows -> pairs and gen_qa rows for training and held-out evaluation.

    heldout: rows to hold out instead of a split (then every row of `rows` trains); else a stratified split.
    """
    bad = list(bad_rows or [])
    good = _converted(rows, bad)
    if heldout is not None:
        train, held = good, _converted(heldout, bad)
    else:
        flags = stratified_split([qa["behaviour"] for _, qa in good], heldout_fraction, seed)
        train = [g for g, f in zip(good, flags) if not f]
        held = [g for g, f in zip(good, flags) if f]
    return Converted(train_pairs=[p for pairs, _ in train for p in pairs],
                     heldout_pairs=[p for pairs, _ in held for p in pairs],
                     train_qa=[qa for _, qa in train], heldout_qa=[qa for _, qa in held], bad_rows=bad,
                     behaviours={"train": dict(Counter(qa["behaviour"] for _, qa in train)),
                                 "heldout": dict(Counter(qa["behaviour"] for _, qa in held))})


OUTPUT_FILES = {"train_pairs": "train/pairs.jsonl", "heldout_pairs": "heldout/pairs.jsonl",
                "train_qa": "train_gen_qa.jsonl", "heldout_qa": "heldout/gen_qa.jsonl"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def convert_files(paths: list[str], out_dir: str, *, heldout_paths: list[str] | None = None,
                  heldout_fraction: float = 0.0, seed: int = 0) -> tuple[Converted, dict[str, str]]:
    """Read raw When2Call files and write the pairs and gen_qa sets under out_dir; (result, {name: path}).

    Layout: train/pairs.jsonl (training data: a folder of its own, so a recipe's data path can name it),
    heldout/pairs.jsonl, heldout/gen_qa.jsonl, train_gen_qa.jsonl, summary.json.
    """
    rows, bad = read_raw(paths)
    heldout = None
    if heldout_paths:
        heldout, held_bad = read_raw(heldout_paths)
        bad += held_bad
        overlap = {r.get("uuid") for r, _ in rows if isinstance(r, dict)} & \
            {r.get("uuid") for r, _ in heldout if isinstance(r, dict)} - {None}
        if overlap:
            raise DataError(f"{len(overlap)} held-out row(s) are also in the training files",
                            problems=sorted(map(str, overlap))[:20],
                            why="held-out rows must never be seen in training",
                            fix="give a held-out file whose rows (by uuid) are not in the training files")
    if not rows:
        raise DataError(f"no When2Call rows in {', '.join(paths)}", fix="give When2Call test rows (raw format)")
    result = convert_rows(rows, heldout=heldout, heldout_fraction=heldout_fraction, seed=seed, bad_rows=bad)
    out = Path(out_dir)
    written = {}
    for name, relative in OUTPUT_FILES.items():
        items = getattr(result, name)
        if items or name.startswith("train"):
            write_jsonl(out / relative, items)
            written[name] = str(out / relative)
    summary = {"inputs": list(paths), "heldout_inputs": list(heldout_paths or []), "heldout_fraction":
               0.0 if heldout_paths else heldout_fraction, "seed": seed, "behaviours": result.behaviours,
               "pairs": {"train": len(result.train_pairs), "heldout": len(result.heldout_pairs)},
               "bad_rows": [{"source": s, "reason": r} for s, r in result.bad_rows], "files": written}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    written["summary"] = str(out / "summary.json")
    return result, written
