"""Every input format -> the canonical record; every bad-row reason; the shared real files; reading and writing."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from core.data import formats, raw_rows
from core.data.format_parsers import UNPAIRED_REASON
from core.data.formats import (detect_format, length_stats, nearest_rank, parse_batch, parse_line, scan,
                               write_records)
from core.data.raw_rows import iter_raw_rows
from core.data.record import RECORD_KEYS, make_record
from core.errors import DataError
from tests.s3server import s3_server  # noqa: F401 - the session fixture
from tests.s3server import s3_server  # noqa: F401 - the session fixture

HH_EMPTY_CHOSEN = (87, 517, 926, 1104)  # SOURCE.txt: chosen ends with an empty "Assistant: " turn
HH_PROMPTS_DIFFER = (1255, 1689, 1951, 1953, 2037)  # SOURCE.txt: rfind("\n\nAssistant:") prefixes differ


def parse(row, fmt="auto", key_map=None, source="f.jsonl:1"):
    return parse_line(json.dumps(row, ensure_ascii=False), source, fmt, key_map, {})


def good(row, fmt="auto", **kw) -> dict:
    record, reason = parse(row, fmt, **kw)
    assert reason is None, reason
    return record


def reason_of(row, fmt="auto") -> str:
    record, reason = parse(row, fmt)
    assert record is None and reason
    return reason


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def nova_text(*texts):
    return [{"text": t} for t in texts]


def nova_image(fmt="png", uri="s3://my-bucket/img/cat.png", owner="123456789012"):
    location = {"uri": uri, **({"bucketOwner": owner} if owner is not None else {})}
    return {"image": {"format": fmt, "source": {"s3Location": location}}}


def nova_row(candidates=None, user_content=None):
    return {
        "system": nova_text("Be brief.", "Be kind."),
        "messages": [
            {"role": "user", "content": nova_text("Hi", "there")},
            {"role": "assistant", "content": nova_text("Hello!")},
            {"role": "user", "content": user_content or [{"text": "What is this?"}, nova_image()]},
            {"role": "assistant", "candidates": candidates or [
                {"content": nova_text("A cat."), "preferenceLabel": "non-preferred"},
                {"content": nova_text("A cat", "on a mat."), "preferenceLabel": "preferred"},
            ]},
        ],
    }


# --- each format from hand-written rows -----------------------------------------------------------------------------

def test_nova_row_becomes_the_canonical_record():
    image_turn = user("What is this?") | {"parts": [{"type": "text", "text": "What is this?"}, {
        "type": "image", "uri": "s3://my-bucket/img/cat.png", "format": "png"}]}
    record = good(nova_row())
    assert record == make_record(
        [user("Hi\nthere"), assistant("Hello!"), image_turn], "A cat\non a mat.", "A cat.",
        system="Be brief.\nBe kind.", images=1, source="f.jsonl:1")
    # the text turns keep no parts; the image turn keeps its text and image in order, for vision-language models
    assert json.loads(record["media"]) == [None, None, image_turn["parts"]]


def test_trl_standard_row():
    row = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    assert detect_format(row) == "trl"
    assert good(row) == make_record([user("Capital of France?")], "Paris.", "Lyon.", source="f.jsonl:1")


def test_trl_conversational_explicit_prompt_with_system_and_tools():
    row = {"prompt": [{"role": "system", "content": "S"}, user("q1"), assistant("a1"), user("q2")],
           "chosen": [assistant("yes")], "rejected": [assistant("no")], "tools": [{"name": "f"}]}
    assert good(row) == make_record([user("q1"), assistant("a1"), user("q2")], "yes", "no", system="S",
                                    tools='[{"name": "f"}]', source="f.jsonl:1")


def test_trl_conversational_implicit_prompt_is_extracted_as_trl_does():
    from trl.data_utils import extract_prompt

    row = {"chosen": [user("q1"), assistant("a1"), user("q2"), assistant("good")],
           "rejected": [user("q1"), assistant("a1"), user("q2"), assistant("bad")]}
    reference = extract_prompt(row)
    record = good(row)
    assert record["prompt"] == reference["prompt"] == [user("q1"), assistant("a1"), user("q2")]
    assert (record["chosen"], record["rejected"]) == ("good", "bad")


def test_hh_dialogues_split_at_the_last_assistant_turn():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Go away."}
    assert detect_format(row) == "hh"
    assert good(row) == make_record([user("Hi"), assistant("Hello."), user("How are you?")], "Fine, thanks.",
                                    "Go away.", source="f.jsonl:1")


def test_sharegpt_with_system_tool_turns_and_tools_as_json_text():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "weather?"},
                             {"from": "function_call", "value": '{"name": "w"}'},
                             {"from": "observation", "value": "sunny"}],
           "chosen": {"from": "gpt", "value": "It is sunny."}, "rejected": "No idea.",
           "tools": '[{"name": "w", "parameters": {}}]'}
    assert good(row) == make_record(
        [user("weather?"), assistant('{"name": "w"}'), {"role": "tool", "content": "sunny"}],
        "It is sunny.", "No idea.", system="S", tools='[{"name": "w", "parameters": {}}]', source="f.jsonl:1")


def test_openai_dpo_row_with_tools_and_a_tool_call_in_the_prompt():
    call = [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]
    row = {"input": {"messages": [{"role": "system", "content": "S"}, user("weather?"),
                                  {"role": "assistant", "content": None, "tool_calls": call},
                                  {"role": "tool", "content": "sunny", "tool_call_id": "c1"}],
                     "tools": [{"type": "function", "function": {"name": "w"}}]},
           "preferred_output": [assistant("Sunny.")], "non_preferred_output": [assistant("Rainy.")]}
    assert good(row) == make_record(
        [user("weather?"), assistant(json.dumps(call)), {"role": "tool", "content": "sunny"}], "Sunny.", "Rainy.",
        system="S", tools='[{"type": "function", "function": {"name": "w"}}]', source="f.jsonl:1")


def test_nemo_lower_rank_is_preferred_whatever_the_order():
    row = {"context": [user("q")], "completions": [{"rank": 1, "completion": [assistant("worse")]},
                                                   {"rank": 0, "completion": [assistant("better")]}]}
    assert good(row) == make_record([user("q")], "better", "worse", source="f.jsonl:1")
    assert good({**row, "context": "q"}) == good(row)


def test_when2call_pair():
    row = {"tools": [{"name": "f"}], "messages": [user("call f")],
           "chosen_response": assistant("<TOOLCALL>[f()]</TOOLCALL>"), "rejected_response": assistant("I can't."),
           "chosen_category": "tool_call", "rejected_category": "cannot_answer"}
    assert good(row) == make_record([user("call f")], "<TOOLCALL>[f()]</TOOLCALL>", "I can't.",
                                    tools='[{"name": "f"}]', source="f.jsonl:1")


def test_key_map_renames_keys_before_parsing():
    row = {"question": "2+2?", "good": "4", "bad": "5"}
    record = good(row, key_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert record == make_record([user("2+2?")], "4", "5", source="f.jsonl:1")


# --- bad rows -------------------------------------------------------------------------------------------------------

def _nova_candidates(*labels):
    return [{"content": nova_text(f"answer {i}"), "preferenceLabel": label} for i, label in enumerate(labels)]


@pytest.mark.parametrize("row, fmt, expected", [
    ({"prompt": "q", "chosen": "a"}, "auto", "no known preference format has the keys ['chosen', 'prompt']; "
                                             "closest: trl, which also needs 'rejected'"),
    ({"input": {}, "non_preferred_output": []}, "auto", "closest: openai, which also needs 'preferred_output'"),
    ({"prompt": "q", "chosen": "a"}, "trl", "missing key 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "trl", "missing key 'prompt'"),
    (nova_row(_nova_candidates("non-preferred", "non-preferred")), "auto", "no preferred candidate"),
    (nova_row(_nova_candidates("preferred", "preferred")), "auto", "two preferred candidates"),
    (nova_row(_nova_candidates("preferred", "non-preferred", "non-preferred")), "auto", "3 candidates"),
    (nova_row(_nova_candidates("preferred", "maybe")), "auto", "'maybe' is neither"),
    ({"context": "q", "completions": [{"rank": i, "completion": f"a{i}"} for i in range(3)]}, "auto",
     "3 completions"),
    ({"context": "q", "completions": [{"rank": 0, "completion": "a"}, {"rank": 0, "completion": "b"}]}, "auto",
     "both completions have rank 0"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "auto", "empty chosen response"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "auto", "empty rejected response"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "auto", "chosen and rejected responses are identical"),
    ({"messages": [user("q"), assistant("a")], "label": True}, "auto", UNPAIRED_REASON),
    ({"prompt": "q", "completion": "a", "label": False}, "trl", UNPAIRED_REASON),
    (nova_row(user_content=[{"text": "look"}] + [nova_image()] * 11), "auto",
     "holds 11 images; Nova allows at most 10"),
    (nova_row(user_content=[nova_image(fmt="bmp")]), "auto", "image format 'bmp' is not one of"),
    (nova_row(user_content=[nova_image(uri="https://x/y.png")]), "auto", "is not an s3://bucket/key address"),
    (nova_row(user_content=[nova_image(owner="12345")]), "auto", "is not a 12-digit AWS account id"),
    (nova_row(user_content=[{"video": {}}]), "auto", "unsupported content object ['video']"),
    ({"prompt": [user("q"), assistant("a")], "chosen": [assistant("x")], "rejected": [assistant("y")]}, "auto",
     "the prompt ends with an assistant turn"),
    ({"conversations": [{"from": "system", "value": "A"}, {"from": "human", "value": "q"}], "system": "B",
      "chosen": "x", "rejected": "y"}, "auto", "two system prompts"),
    ({"conversations": [{"from": "narrator", "value": "q"}], "chosen": "x", "rejected": "y"}, "auto",
     "unknown speaker 'narrator'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": "x", "rejected": "y", "tools": "[{oops"},
     "auto", "'tools' is not valid JSON"),
    ({"prompt": "q", "chosen": [assistant("x"), assistant("y")], "rejected": "z"}, "auto",
     "'chosen' holds 2 messages"),
    ({"input": {"messages": [{"role": ["user"], "content": "q"}]}, "preferred_output": [assistant("a")],
      "non_preferred_output": [assistant("b")]}, "auto", "unexpected row structure for openai: TypeError"),
])
def test_bad_rows_have_a_reason(row, fmt, expected):
    assert expected in reason_of(row, fmt)


@pytest.mark.parametrize("text, expected", [
    ('{"prompt": "q", "chosen": "a",', "malformed JSON: "),
    ("[1, 2]", "a row must be a JSON object, not a JSON list"),
])
def test_unparseable_text(text, expected):
    record, reason = parse_line(text, "f.jsonl:3")
    assert record is None and reason.startswith(expected)


def test_undecodable_bytes_become_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    rows = list(iter_raw_rows(str(path)))
    assert [s for _, s in rows] == [f"{path}:1", f"{path}:2"]
    assert parse_line(*rows[0])[1] is None
    assert parse_line(*rows[1]) == (None, "undecodable bytes: not UTF-8 (byte 0xff at column 13)")


def test_a_row_of_another_shape_in_a_detected_file_says_so():
    cache = {}
    trl_row = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    hh_row = json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"})
    assert parse_line(trl_row, "f.jsonl:1", file_format=cache)[1] is None
    assert parse_line(hh_row, "g.jsonl:1", file_format=cache)[1] is None  # another file: detected on its own
    _, reason = parse_line(hh_row, "f.jsonl:2", file_format=cache)
    assert reason.startswith("missing key 'prompt'") and "detected as trl from its first row; this row looks like hh" \
        in reason
    assert cache == {"f.jsonl": "trl", "g.jsonl": "hh"}


def test_detection_waits_for_the_first_readable_row():
    cache = {}
    assert parse_line("{oops", "f.jsonl:1", file_format=cache)[1].startswith("malformed JSON")
    assert cache == {}
    assert parse_line(json.dumps({"conversations": [{"from": "human", "value": "q"}], "chosen": "a",
                                  "rejected": "b"}), "f.jsonl:2", file_format=cache)[1] is None
    assert cache == {"f.jsonl": "sharegpt"}


# --- parse_batch (the Ray Data stage) -------------------------------------------------------------------------------

def test_parse_batch_columns_and_empty_values_for_bad_rows():
    batch = {"text": [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}), "{bad"],
             "source": ["f.jsonl:1", "f.jsonl:2"]}
    out = parse_batch(batch)
    assert set(out) == {*RECORD_KEYS, "error"}
    assert [out[k][0] for k in RECORD_KEYS] == [None, [user("q")], "a", "b", None, 0, None, "f.jsonl:1"]
    assert [out[k][1] for k in RECORD_KEYS] == [None, [], "", "", None, 0, None, "f.jsonl:2"]
    assert out["error"][0] is None and out["error"][1].startswith("malformed JSON")


def test_parse_batch_output_has_a_fixed_arrow_schema():
    import pyarrow as pa

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "system": "s", "tools": [{"name": "f"}]}, "{bad",
            nova_row()]
    out = parse_batch({"text": [r if isinstance(r, str) else json.dumps(r) for r in rows],
                       "source": ["f:1", "f:2", "g:1"]})
    schema = pa.Table.from_pydict(out).schema
    assert {name: str(schema.field(name).type) for name in schema.names} == {
        "system": "string", "prompt": "list<item: struct<role: string, content: string>>", "chosen": "string",
        "rejected": "string", "tools": "string", "images": "int64", "media": "string", "source": "string",
        "error": "string"}


def test_parse_batch_is_picklable():
    import pickle

    assert pickle.loads(pickle.dumps(parse_batch)) is parse_batch


# --- reading files --------------------------------------------------------------------------------------------------

def _rows_text(path):
    return [(json.loads(text), source.rsplit(":", 1)[1]) for text, source in iter_raw_rows(str(path))]


def test_jsonl_keeps_line_numbers_across_blank_lines_and_a_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\r\n')
    assert _rows_text(path) == [({"a": 1}, "1"), ({"a": 2}, "3")]


def test_json_array_and_jsonl_named_json_and_gz(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('\n  [{"a": 1},\n {"a": "ü"}]', encoding="utf-8")
    lines = tmp_path / "l.json"
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    packed = tmp_path / "a.json.gz"
    packed.write_bytes(gzip.compress(array.read_bytes()))
    packed_lines = tmp_path / "l.jsonl.gz"
    packed_lines.write_bytes(gzip.compress(lines.read_bytes()))
    assert _rows_text(array) == _rows_text(packed) == [({"a": 1}, "1"), ({"a": "ü"}, "2")]
    assert _rows_text(lines) == _rows_text(packed_lines) == [({"a": 1}, "1"), ({"a": 2}, "2")]


def test_malformed_json_array_is_one_bad_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1},\n {"a": 2}')
    ((text, source),) = list(iter_raw_rows(str(path)))
    assert source == f"{path}:1"
    assert parse_line(text, source)[1].startswith("malformed JSON array: Expecting ',' delimiter at line 2")


def test_corrupt_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:-10])  # cut inside the stream's end
    with pytest.raises(DataError, match="cannot read"):
        list(iter_raw_rows(str(path)))


def test_fsspec_filesystem(tmp_path):
    import fsspec

    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n'))
    assert list(iter_raw_rows(str(path), fsspec.filesystem("file"))) == [('{"a": 1}', f"{path}:1")]


def test_listing_folders_and_files_in_order_without_duplicates(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.jsonl.gz", "a.json", "c.jsonl", "notes.txt", ".hidden.jsonl"):
        (tmp_path / name).write_text("")
    expected = [str(tmp_path / n) for n in ("a.json", "b/2.jsonl.gz", "c.jsonl")]
    assert raw_rows.data_files([str(tmp_path / "c.jsonl"), str(tmp_path)]) == [expected[2]] + expected[:2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files in"):
        raw_rows.data_files([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no data at"):
        raw_rows.data_files([str(tmp_path / "nope")])


def test_scan_reads_s3_and_keeps_the_uri_in_sources(s3_server, tmp_path):  # noqa: F811
    from core import storage

    fs, _ = storage.filesystem_for("s3://raydpo-formats/")
    fs.mkdir("raydpo-formats")
    fs.pipe_file("raydpo-formats/pairs/a.jsonl.gz", gzip.compress(b'{"prompt": "q", "chosen": "a", "rejected": "a"}\n'))
    fs.pipe_file("raydpo-formats/pairs/b.json", json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}]).encode())
    report = scan(["s3://raydpo-formats/pairs/"])
    assert report.files == ("s3://raydpo-formats/pairs/a.jsonl.gz", "s3://raydpo-formats/pairs/b.json")
    assert (report.good, report.bad_rows) == (
        1, (("s3://raydpo-formats/pairs/a.jsonl.gz:1", "chosen and rejected responses are identical"),))


# --- the shared real files ------------------------------------------------------------------------------------------

def test_hh_harmless_edge_lines_from_source_txt(shared):
    path = shared / "data/hh-rlhf-harmless-base/test.jsonl.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    for number in HH_EMPTY_CHOSEN:
        assert parse_line(lines[number - 1], f"hh:{number}") == (None, "empty chosen response")
    for number in HH_PROMPTS_DIFFER:
        _, reason = parse_line(lines[number - 1], f"hh:{number}")
        assert reason.startswith("chosen and rejected differ before their last")
    report = scan([str(path)])
    assert report.rows_per_format == {"hh": 2312}
    assert sorted(int(s.rsplit(":", 1)[1]) for s, _ in report.bad_rows) == sorted(HH_EMPTY_CHOSEN + HH_PROMPTS_DIFFER)
    assert report.good == 2312 - 9


def test_hh_good_line_prompt_is_the_prefix_before_the_last_assistant(shared):
    line = gzip.open(shared / "data/hh-rlhf-harmless-base/test.jsonl.gz", "rt", encoding="utf-8").readline()
    row = json.loads(line)
    record, reason = parse_line(line, "hh:1")
    assert reason is None
    cut = row["chosen"].rfind("\n\nAssistant:")
    speaker = {"user": "Human", "assistant": "Assistant"}
    rebuilt = "".join(f"\n\n{speaker[t['role']]}: {t['content']}" for t in record["prompt"])
    assert rebuilt.split() == row["chosen"][:cut].split()  # the same words, turn by turn
    assert record["chosen"] == row["chosen"][cut + len("\n\nAssistant:"):].strip()
    assert record["rejected"] == row["rejected"][cut + len("\n\nAssistant:"):].strip()


@pytest.mark.parametrize("name, with_system", [("dpo_en_demo.json", 80), ("dpo_zh_demo.json", 64)])
def test_llamafactory_sharegpt_json_arrays(shared, name, with_system):
    path = shared / "data/llamafactory-dpo-demo" / name
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = [parse_line(text, source, file_format={}) for text, source in iter_raw_rows(str(path))]
    assert all(reason is None for _, reason in records) and len(records) == len(raw) == 300
    assert sum(r["system"] is not None for r, _ in records) == with_system
    for (record, _), row in zip(records, raw):
        turns = [t for t in row["conversations"] if t["from"] != "system"]
        assert [t["content"] for t in record["prompt"]] == [t["value"] for t in turns]
        assert (record["chosen"], record["rejected"]) == (row["chosen"]["value"], row["rejected"]["value"])
    assert records[-1][0]["source"] == f"{path}:300"


def test_medicalgpt_jsonl_with_tools(shared):
    path = shared / "data/medicalgpt-reward/toolcall_dpo_zh_demo.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    records = [parse_line(text, source)[0] for text, source in iter_raw_rows(str(path))]
    assert all(records) and len(records) == 11
    for record, row in zip(records, raw):
        assert json.loads(record["tools"]) == json.loads(row["tools"])
        speakers = {"human": "user", "function_call": "assistant", "observation": "tool"}
        assert [t["role"] for t in record["prompt"]] == [speakers[t["from"]] for t in row["conversations"]]
    assert scan([str(shared / "data/medicalgpt-reward/dpo_zh_500.jsonl")]).good == 500


def test_kto_file_is_a_clear_unpaired_error(shared):
    report = scan([str(shared / "data/llamafactory-dpo-demo/kto_en_demo.json")])
    assert (report.good, report.bad, report.rows_per_format) == (0, 300, {"kto": 300})
    assert {reason for _, reason in report.bad_rows} == {UNPAIRED_REASON}
    assert "unpaired KTO data" in UNPAIRED_REASON and "pairs" in UNPAIRED_REASON


# --- scanning ------------------------------------------------------------------------------------------------------

def test_nearest_rank_percentiles_by_hand():
    values = list(range(1, 11))  # 1..10: p50 -> the 5th value, p95 -> ceil(9.5) = the 10th
    assert (nearest_rank(values, 50), nearest_rank(values, 95), nearest_rank(values, 0)) == (5, 10, 1)
    assert length_stats([7, 3, 9]) == formats.LengthStats(p50=7, p95=9, max=9)  # ceil(1.5)=2nd, ceil(2.85)=3rd
    assert length_stats([]) is None


def build_word_tokenizer(folder: Path) -> Path:
    """A tokenizer with one token per whitespace-separated word and a template that only joins contents."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_scan_counts_formats_bad_rows_and_token_lengths(tmp_path):
    from transformers import AutoTokenizer

    data = tmp_path / "data"
    data.mkdir()
    trl = write_jsonl(data / "a.jsonl", [
        {"prompt": "one two three", "chosen": "yes", "rejected": "no no"},            # prompt 3, answers 1 and 2
        {"prompt": "one", "chosen": "a b c d e f", "rejected": "x", "system": "s"},     # prompt 2, answers 6 and 1
        {"prompt": "q", "chosen": "same", "rejected": "same"}])                        # bad: identical
    hh = write_jsonl(data / "b.jsonl", [{"chosen": "\n\nHuman: w1 w2\n\nAssistant: r1",
                                         "rejected": "\n\nHuman: w1 w2\n\nAssistant: r2 r3 r4"}])  # 2; 1 and 3
    tokenizer = AutoTokenizer.from_pretrained(build_word_tokenizer(tmp_path / "tok"))
    report = scan([str(data)], tokenizer=tokenizer, max_length=5)
    assert report.files == (str(trl), str(hh))
    assert report.rows_per_format == {"trl": 3, "hh": 1} and (report.good, report.bad) == (3, 1)
    assert report.bad_rows == ((f"{trl}:3", "chosen and rejected responses are identical"),)
    # prompts [3, 2, 2] sorted [2, 2, 3]: p50 = ceil(1.5) = 2nd = 2, p95 = ceil(2.85) = 3rd = 3
    # answers [1, 2, 6, 1, 1, 3] sorted [1, 1, 1, 2, 3, 6]: p50 = 3rd = 1, p95 = ceil(5.7) = 6th = 6
    assert report.prompt_tokens == formats.LengthStats(p50=2, p95=3, max=3)
    assert report.response_tokens == formats.LengthStats(p50=1, p95=6, max=6)
    # prompt + longer answer: 3+2=5, 2+6=8, 2+3=5 -> only the second exceeds 5
    assert (report.max_length, report.truncated) == (5, 1)


# --- writing back out ----------------------------------------------------------------------------------------------

ROUND_TRIP_ROWS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    {"prompt": [{"role": "system", "content": "S"}, user("q1"), assistant("a1"), user("q2")],
     "chosen": [assistant("yes")], "rejected": [assistant("no")]},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant: No.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant: A pun."},
    {"system": nova_text("Be brief."), "messages": [
        {"role": "user", "content": nova_text("Hi", "there")},
        {"role": "assistant", "candidates": [{"content": nova_text("yo"), "preferenceLabel": "preferred"},
                                             {"content": nova_text("bye"), "preferenceLabel": "non-preferred"}]}]},
]
TOOL_ROW = {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{}"},
                              {"from": "observation", "value": "sunny"}],
            "chosen": "Sunny.", "rejected": "Rainy.", "tools": '[{"name": "w"}]'}


@pytest.mark.parametrize("to", ["nova", "trl"])
def test_convert_then_parse_gives_the_same_records(tmp_path, to):
    rows = ROUND_TRIP_ROWS + ([TOOL_ROW] if to == "trl" else [])
    records = [good(row, source=f"in:{i}") for i, row in enumerate(rows, 1)]
    out = tmp_path / f"out.{to}.jsonl"
    assert write_records(records, str(out), to) == len(records)
    again = [parse_line(text, source, file_format={}) for text, source in iter_raw_rows(str(out))]
    assert all(reason is None for _, reason in again)
    strip = lambda r: {k: v for k, v in r.items() if k != "source"}  # noqa: E731
    assert [strip(r) for r, _ in again] == [strip(r) for r in records]
    assert {detect_format(json.loads(line)) for line in out.read_text().splitlines()} == {to}


def test_nova_cannot_hold_tools_or_images(tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(DataError, match="Nova DPO rows cannot hold"):
        write_records([good(TOOL_ROW)], str(out), "nova")
    with pytest.raises(DataError, match="cannot write them back"):
        write_records([good(nova_row())], str(out), "trl")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_gz_output(tmp_path):
    out = tmp_path / "x.jsonl.gz"
    write_records([good(ROUND_TRIP_ROWS[0])], str(out), "trl")
    assert json.loads(gzip.decompress(out.read_bytes()))["chosen"] == [assistant("Paris.")]


def test_raw_rows_of_an_s3_file_need_no_filesystem_argument(s3_server):  # noqa: F811
    import s3fs

    bucket = s3_server.make_bucket("raydpo-raw-rows")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.pipe(f"{bucket}/pairs/a.jsonl", b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"prompt": "r"}\n')
    rows = list(iter_raw_rows(f"{bucket}/pairs/a.jsonl"))
    assert [source for _, source in rows] == [f"{bucket}/pairs/a.jsonl:1", f"{bucket}/pairs/a.jsonl:3"]
    assert json.loads(rows[0][0])["chosen"] == "a"
