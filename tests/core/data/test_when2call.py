"""The When2Call converter: tool rendering, pairs, gen_qa rows, the stratified split, bad rows, the CLI."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from core.data import when2call as w2c
from core.errors import DataError

TOOL = {"name": "get_weather", "description": "Get the weather. Uses a paid API.",
        "parameters": {"type": "dict", "required": ["city"],
                       "properties": {"unit": {"type": "string"}, "city": {"type": "string"}}}}
ANSWERS = {"direct": "It is sunny.",
           "tool_call": '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
           "request_for_info": "Which city?",
           "cannot_answer": "I cannot help with that."}


def raw_row(correct="tool_call", uuid="u1", **changes):
    row = {"uuid": uuid, "question": "Weather in Oslo?", "correct_answer": correct, "answers": dict(ANSWERS),
           "tools": [json.dumps(TOOL)]}
    row.update(changes)
    return row


# ---- rendering -------------------------------------------------------------------------------------------------------

def test_tool_call_is_written_in_the_readme_form():
    assert w2c.tool_call_text(ANSWERS["tool_call"]) == \
        '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</TOOLCALL>'
    two = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]'
    assert w2c.tool_call_text(two) == \
        '<TOOLCALL>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]</TOOLCALL>'


@pytest.mark.parametrize("answer, reason", [
    ('{"arguments": {}}', "with a 'name'"),
    ("[]", "with a 'name'"),
    ("{not json", "not valid JSON"),
])
def test_a_broken_tool_call_answer_is_a_row_problem(answer, reason):
    with pytest.raises(w2c.RowProblem, match=reason):
        w2c.answer_text("tool_call", answer)


def test_short_description_keeps_the_first_sentence_and_cuts_at_a_word():
    assert w2c.short_description("Get the weather. Uses a paid API.") == "Get the weather."
    assert w2c.short_description("  spaced \n out  text ") == "spaced out text"
    # limit 12: "one two three four" -> first 9 chars "one two t" -> cut back to the last word "one two" + "..."
    assert w2c.short_description("one two three four", limit=12) == "one two..."
    assert w2c.short_description(None) == ""


def test_parameter_list_puts_required_first_and_marks_optional():
    assert w2c.parameter_list(TOOL["parameters"]) == "city: string, unit?: string"
    assert w2c.parameter_list({"properties": {"x": {}}, "required": ["missing"]}) == "x?"
    assert w2c.parameter_list(None) == ""


def test_system_prompt_lists_each_tool_on_one_line_then_the_instruction():
    assert w2c.system_prompt([TOOL]) == (
        "You can call these tools:\n"
        "- get_weather(city: string, unit?: string): Get the weather.\n" + w2c.INSTRUCTION)
    assert w2c.system_prompt([]) == "You have no tools.\n" + w2c.INSTRUCTION
    assert "<TOOLCALL>[" in w2c.INSTRUCTION and "ask" in w2c.INSTRUCTION and "cannot help" in w2c.INSTRUCTION


# ---- pairs and gen_qa rows -------------------------------------------------------------------------------------------

def test_the_correct_behaviour_is_preferred_over_each_other_behaviour():
    pairs = w2c.preference_pairs(raw_row("request_for_info"), "f.jsonl:3")
    assert [(p["chosen_category"], p["rejected_category"]) for p in pairs] == \
        [("request_for_info", "direct"), ("request_for_info", "tool_call"), ("request_for_info", "cannot_answer")]
    assert {p["chosen_response"]["content"] for p in pairs} == {"Which city?"}
    assert [p["rejected_response"]["content"] for p in pairs] == [
        "It is sunny.", '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</TOOLCALL>',
        "I cannot help with that."]
    assert pairs[0]["messages"] == [{"role": "system", "content": w2c.system_prompt([TOOL])},
                                    {"role": "user", "content": "Weather in Oslo?"}]
    assert "tools" not in pairs[0]  # the tools reach the model through the system message only


def test_pairs_parse_as_when2call_rows_with_the_tools_in_the_system_prompt():
    from core.data.formats import detect_format, parse_line

    pair = w2c.preference_pairs(raw_row("tool_call"), "f.jsonl:1")[0]
    assert detect_format(pair) == "when2call"
    record, reason = parse_line(json.dumps(pair), "pairs.jsonl:1")
    assert reason is None
    assert record["system"] == w2c.system_prompt([TOOL])
    assert record["tools"] is None
    assert record["chosen"].startswith("<TOOLCALL>[")
    assert record["prompt"] == [{"role": "user", "content": "Weather in Oslo?"}]


def test_the_templated_prompt_shows_the_tools(tiny_model_dir):
    from core.data.formats import parse_line
    from core.data.tokenize import template_texts
    from core.models import load_tokenizer

    record, _ = parse_line(json.dumps(w2c.preference_pairs(raw_row(), "f:1")[0]), "p:1")
    prompt = template_texts(record, load_tokenizer(str(tiny_model_dir)))["prompt"]
    assert "- get_weather(city: string, unit?: string): Get the weather." in prompt
    assert prompt.index("get_weather") < prompt.index("Weather in Oslo?")


def test_gen_qa_row_has_the_correct_answer_as_reference_and_reads_as_gen_qa(tmp_path):
    from evaluation.gen_qa import read_qa_rows

    row = w2c.gen_qa_row(raw_row("tool_call"), "f:1")
    assert row["reference"] == '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</TOOLCALL>'
    assert row["behaviour"] == "tool_call"
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(row) + "\n")
    rows, bad = read_qa_rows(str(path))
    assert bad == []
    assert rows[0]["system"] == w2c.system_prompt([TOOL])
    assert rows[0]["messages"] == [{"role": "user", "content": "Weather in Oslo?"}]
    assert rows[0]["reference"] == row["reference"]


@pytest.mark.parametrize("correct, changes, reason", [
    ("tool_call", {"question": " "}, "empty 'question'"),
    ("maybe", {}, "correct_answer 'maybe' is none of"),
    ("tool_call", {"answers": {"direct": "x"}}, "lacks tool_call, request_for_info, cannot_answer"),
    ("tool_call", {"tools": ["{broken"]}, "tool 0 is not valid JSON"),
    ("tool_call", {"tools": [json.dumps({"description": "no name"})]}, "tool 0 has no 'name'"),
    ("request_for_info", {"answers": {**ANSWERS, "direct": "Which city?"}},
     "direct answer is identical to the correct"),
])
def test_bad_rows_say_why(correct, changes, reason):
    with pytest.raises(w2c.RowProblem, match=reason):
        w2c.preference_pairs(raw_row(correct, **changes))


def test_is_tool_call():
    assert w2c.is_tool_call('<TOOLCALL>[{"name": "x"}]</TOOLCALL>')
    assert not w2c.is_tool_call('{"name": "x", "arguments": {}}')


# ---- split -----------------------------------------------------------------------------------------------------------

def test_stratified_split_holds_out_the_same_share_of_each_behaviour():
    behaviours = ["a"] * 10 + ["b"] * 10 + ["c"] * 7
    held = w2c.stratified_split(behaviours, 0.3, seed=1)
    counts = Counter(b for b, h in zip(behaviours, held) if h)
    assert counts == {"a": 3, "b": 3, "c": 2}  # round(0.3 * 7) = round(2.1) = 2
    assert held == w2c.stratified_split(behaviours, 0.3, seed=1)
    assert held != w2c.stratified_split(behaviours, 0.3, seed=2)


def test_stratified_split_edges():
    assert w2c.stratified_split(["a", "a", "b"], 0.0, 0) == [False, False, False]
    # a tiny fraction still holds one row out of a behaviour with 2+ rows, never the last row, never a lone row
    assert w2c.stratified_split(["a", "a", "b"], 0.01, 0).count(True) == 1
    assert w2c.stratified_split(["a", "a"], 0.99, 0).count(True) == 1


def test_convert_rows_counts_bad_rows_and_splits():
    rows = [(raw_row(b, uuid=f"{b}{i}"), f"f:{n}") for n, (b, i) in
            enumerate([(b, i) for b in ("tool_call", "cannot_answer") for i in range(4)], 1)]
    rows.append(({"question": "q"}, "f:9"))
    result = w2c.convert_rows(rows, heldout_fraction=0.5, seed=0)
    assert result.bad_rows == [("f:9", "correct_answer None is none of direct, tool_call, request_for_info, "
                                       "cannot_answer")]
    assert result.behaviours == {"train": {"tool_call": 2, "cannot_answer": 2},
                                 "heldout": {"tool_call": 2, "cannot_answer": 2}}
    assert len(result.train_pairs) == 12 and len(result.heldout_pairs) == 12
    assert {p["uuid"] for p in result.train_pairs}.isdisjoint({p["uuid"] for p in result.heldout_pairs})


def test_convert_rows_with_a_heldout_set_trains_on_every_row():
    rows = [(raw_row(uuid="a"), "f:1"), (raw_row(uuid="b"), "f:2")]
    result = w2c.convert_rows(rows, heldout=[(raw_row(uuid="c"), "h:1")], heldout_fraction=0.5)
    assert [q["uuid"] for q in result.train_qa] == ["a", "b"]
    assert [q["uuid"] for q in result.heldout_qa] == ["c"]


# ---- files and the CLI -----------------------------------------------------------------------------------------------

WHEN2CALL = "data/when2call/when2call_test_llm_judge.part1.jsonl"


def test_the_shared_file_becomes_600_pairs_stratified(shared, tmp_path):
    result, files = w2c.convert_files([str(shared / WHEN2CALL)], str(tmp_path), heldout_fraction=0.3, seed=0)
    assert result.bad_rows == []
    # 67 cannot_answer, 67 request_for_info, 66 tool_call rows; round(0.3 * 67) = 20, round(0.3 * 66) = 20
    assert result.behaviours["heldout"] == {"cannot_answer": 20, "request_for_info": 20, "tool_call": 20}
    assert result.behaviours["train"] == {"cannot_answer": 47, "request_for_info": 47, "tool_call": 46}
    assert len(result.train_pairs) == 420 and len(result.heldout_pairs) == 180
    assert {q["uuid"] for q in result.train_qa}.isdisjoint({q["uuid"] for q in result.heldout_qa})
    tool_calls = [p["chosen_response"]["content"] for p in result.train_pairs if p["chosen_category"] == "tool_call"]
    assert tool_calls and all(t.startswith("<TOOLCALL>[{") and t.endswith("}]</TOOLCALL>") for t in tool_calls)
    written = [json.loads(line) for line in open(files["heldout_qa"])]
    assert len(written) == 60
    assert json.loads(open(tmp_path / "summary.json").read())["pairs"] == {"train": 420, "heldout": 180}


def test_a_heldout_file_that_overlaps_training_is_refused(shared, tmp_path):
    path = str(shared / WHEN2CALL)
    with pytest.raises(DataError, match="also in the training files"):
        w2c.convert_files([path], str(tmp_path), heldout_paths=[path])


def test_cli_writes_the_sets_and_lists_bad_rows(tmp_path, capsys):
    from launcher.cli import main

    raw = tmp_path / "raw.jsonl"
    rows = [raw_row(b, uuid=f"{b}{i}") for b in ("tool_call", "request_for_info") for i in range(3)]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": "q"}\nnot json\n')
    code = main(["data", "when2call", str(raw), "--out", str(tmp_path / "out"), "--heldout-fraction", "0.34"])
    out = capsys.readouterr().out
    assert code == 2
    assert "train: 12 pairs from rows by correct behaviour: request_for_info 2, tool_call 2" in out
    assert "heldout: 6 pairs" in out
    assert f"{raw}:7  correct_answer None" in out and f"{raw}:8  malformed JSON" in out
    assert len((tmp_path / "out" / "train" / "pairs.jsonl").read_text().splitlines()) == 12


def test_cli_rejects_a_fraction_out_of_range(tmp_path, capsys):
    from launcher.cli import main

    assert main(["data", "when2call", str(tmp_path), "--out", str(tmp_path / "o"), "--heldout-fraction", "1"]) == 2
    assert "--heldout-fraction must be in [0, 1)" in capsys.readouterr().err
