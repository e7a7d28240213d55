"""`raydpo data validate|convert`: what the user reads and the exit codes."""
from __future__ import annotations

import gzip
import json

from launcher.cli import main
from tests.core.data.test_formats import build_word_tokenizer, write_jsonl

GOOD = {"prompt": "one two", "chosen": "yes", "rejected": "no no no"}
HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}


def test_validate_good_files_exit_0(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD])
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(json.dumps(HH).encode() + b"\n"))
    assert main(["data", "validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["files: 2", "rows per format: hh 1, trl 2", "good pairs: 3", "bad rows: 0"]

FIX = ("fix: correct or remove the rows listed (file:line: why), or pass --format/--key-map if the rows are of a "
       "format raydpo did not detect; `raydpo train` leaves bad rows out with training_config.data.on_error=skip")


def test_validate_lists_bad_rows_with_file_and_line_and_exits_2(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "rejected": "yes"}, {"prompt": "q"}])
    assert main(["data", "validate", str(path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["files: 1", "rows per format: trl 3", "good pairs: 1", "bad rows: 2"]
    assert out[4:6] == [f"  {path}:2  chosen and rejected responses are identical",
                        f"  {path}:3  missing key 'chosen'"]
    assert out[6:] == [FIX]  # and how to fix it, last


def test_validate_caps_the_list_at_50(shared, capsys):
    path = shared / "data/llamafactory-dpo-demo/kto_en_demo.json"
    assert main(["data", "validate", str(path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["files: 1", "rows per format: kto 300", "good pairs: 0", "bad rows: 300"]
    listed = [line for line in out if line.startswith(f"  {path}:")]
    assert len(listed) == 50 and listed[0].startswith(f"  {path}:1  unpaired KTO data")
    assert out[-2:] == ["  ... and 250 more bad rows", FIX]


def test_validate_with_a_tokenizer_prints_lengths_and_truncation(tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"prompt": "a b c d", "chosen": "x", "rejected": "y"}])
    model = build_word_tokenizer(tmp_path / "tok")
    assert main(["data", "validate", str(data), "--model", str(model), "--max-length", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    # prompts [2, 4]; answers [1, 3, 1, 1]; prompt + longer answer: 2+3=5 > 4, 4+1=5 > 4
    assert out[-3:] == ["prompt tokens: p50 2, p95 4, max 4", "response tokens: p50 1, p95 3, max 3",
                        "pairs over max_length 4 (truncated in training): 2 of 2"]


def test_validate_format_and_key_map(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"q": "one", "good": "yes", "bad": "no"}])
    assert main(["data", "validate", str(path)]) == 2
    assert "no known preference format has the keys ['bad', 'good', 'q']" in capsys.readouterr().out
    key_map = json.dumps({"q": "prompt", "good": "chosen", "bad": "rejected"})
    assert main(["data", "validate", str(path), "--format", "trl", "--key-map", key_map]) == 0
    assert "rows per format: trl 1" in capsys.readouterr().out


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "validate", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"data error: no data files in {tmp_path / 'empty'}")
    assert main(["data", "validate", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"data error: no data at {tmp_path / 'missing.jsonl'}")
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    assert main(["data", "validate", str(path), "--key-map", "{nope"]) == 2
    assert capsys.readouterr().err.startswith("config error: --key-map is not valid JSON")
    assert main(["data", "validate", str(path), "--max-length", "10"]) == 2
    assert capsys.readouterr().err.startswith("config error: --max-length needs --model")


def test_convert_writes_good_rows_and_reports_the_rest(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [GOOD, {**GOOD, "chosen": ""}, GOOD])
    out = tmp_path / "out" / "trl.jsonl"
    assert main(["data", "convert", str(source), "--to", "trl", "--out", str(out)]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert f"  {source}:2  empty chosen response" in printed
    assert printed[-1] == f"wrote 2 trl rows to {out}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": [{"role": "user", "content": "one two"}],
                     "chosen": [{"role": "assistant", "content": "yes"}],
                     "rejected": [{"role": "assistant", "content": "no no no"}]}] * 2
    assert main(["data", "validate", str(out)]) == 0
    assert "rows per format: trl 2" in capsys.readouterr().out


def test_convert_to_nova_reports_rows_it_cannot_hold(shared, tmp_path, capsys):
    source = shared / "data/medicalgpt-reward/toolcall_dpo_zh_demo.jsonl"
    out = tmp_path / "nova.jsonl"
    assert main(["data", "convert", str(source), "--to", "nova", "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert printed.count("has tools or tool turns, which Nova DPO rows cannot hold") == 11
    assert out.read_text() == ""


def test_convert_sharegpt_json_array_to_nova_and_back(shared, tmp_path, capsys):
    source = shared / "data/llamafactory-dpo-demo/dpo_zh_demo.json"
    out = tmp_path / "nova.jsonl"
    assert main(["data", "convert", str(source), "--to", "nova", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 300 nova rows to {out}"
    assert main(["data", "validate", str(out)]) == 0
    assert "rows per format: nova 300" in capsys.readouterr().out
