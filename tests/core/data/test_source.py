"""core/data/source.py: raw rows (text, source) from JSONL / JSON-array / .gz files, local and s3:// (moto)."""
from __future__ import annotations

import gzip
import io
import json

import pytest

from tests.s3server import s3_server  # noqa: F401 - the session fixture
from core import storage
from core.data import source
from core.data.formats import parse_line
from core.data.raw_rows import is_json_array, read_error, unreadable_row
from core.errors import DataError, StorageError

# Each file's bytes and the rows they must give: (text, line). Blank lines are not rows but still count.
JSONL = b'\xef\xbb\xbf{"prompt": "p1", "chosen": "a", "rejected": "b"}\n\n  \r\n{"prompt": "p2"}\r\n{"x": \xff}\n[1, 2]'
JSONL_ROWS = [('{"prompt": "p1", "chosen": "a", "rejected": "b"}', 1), ('{"prompt": "p2"}', 4),
              (unreadable_row("undecodable bytes: not UTF-8 (byte 0xff at column 7)"), 5), ("[1, 2]", 6)]
GZ = gzip.compress(b'{"k": "\xc3\xa9t\xc3\xa9"}\n{"k": 2}\n')
GZ_ROWS = [('{"k": "été"}', 1), ('{"k": 2}', 2)]
ARRAY = '\n  [{"a": 1, "b": "ü"},\n {"a": 2},\n "text", [3]]\n'.encode()
ARRAY_ROWS = [('{"a": 1, "b": "ü"}', 1), ('{"a": 2}', 2), ('"text"', 3), ("[3]", 4)]
JSON_LINES = b'{"a": 1}\n{"a": 2}\n'  # a .json file that is JSONL after all
JSON_LINES_ROWS = [('{"a": 1}', 1), ('{"a": 2}', 2)]
FILES = {"a.jsonl": (JSONL, JSONL_ROWS), "b.jsonl.gz": (GZ, GZ_ROWS), "c.json": (ARRAY, ARRAY_ROWS),
         "d/e.json": (JSON_LINES, JSON_LINES_ROWS)}


def expected_rows(root: str) -> list[dict]:
    return [{"text": text, "source": f"{root}/{name}:{line}"}
            for name in sorted(FILES) for text, line in FILES[name][1]]


def blocks_of(data: bytes, name: str) -> list[dict]:
    return [table.to_pydict() for table in source.raw_row_blocks(io.BytesIO(data), name)]


# ---------------------------------------------------------------- without Ray

def test_is_json_array():
    assert is_json_array(b"\xef\xbb\xbf \n\t[{}]")
    assert is_json_array(b"[")
    assert not is_json_array(b'{"a": [1]}')
    assert not is_json_array(b"")


def test_block_ready():
    assert not source.block_ready(source.ROWS_PER_BLOCK - 1, source.CHARS_PER_BLOCK - 1)
    assert source.block_ready(source.ROWS_PER_BLOCK, 0)
    assert source.block_ready(1, source.CHARS_PER_BLOCK)


@pytest.mark.parametrize("name", sorted(FILES))
def test_raw_row_blocks_of_each_kind_of_file(name):
    data, rows = FILES[name]
    data = gzip.decompress(data) if name.endswith(".gz") else data  # Ray's reader hands over decompressed bytes
    assert blocks_of(data, name) == [{"text": [t for t, _ in rows], "source": [f"{name}:{n}" for _, n in rows]}]


def test_rows_leave_in_blocks_of_at_most_rows_per_block():
    lines = source.ROWS_PER_BLOCK * 2 + 5
    blocks = blocks_of(b"".join(b'{"i": %d}\n' % i for i in range(lines)), "big.jsonl")
    assert [len(b["text"]) for b in blocks] == [source.ROWS_PER_BLOCK, source.ROWS_PER_BLOCK, 5]
    assert blocks[1]["source"][0] == f"big.jsonl:{source.ROWS_PER_BLOCK + 1}"
    assert blocks[2]["text"][-1] == '{"i": %d}' % (lines - 1)


def test_long_rows_close_a_block_early(monkeypatch):
    monkeypatch.setattr(source, "CHARS_PER_BLOCK", 25)
    # rows of 10 characters: the third brings the block to 30 >= 25
    blocks = blocks_of(b'{"a": "1"}\n' * 7, "long.jsonl")
    assert [len(b["text"]) for b in blocks] == [3, 3, 1]


def test_parser_reports_rows_that_stand_for_unreadable_bytes():
    text = blocks_of(b'{"x": 1}\n\xfe\n', "f.jsonl")[0]["text"][1]
    assert parse_line(text, "f.jsonl:2") == (None, "undecodable bytes: not UTF-8 (byte 0xfe at column 1)")


def test_a_malformed_json_array_is_one_reported_row():
    rows = blocks_of(b'[{"a": 1},\n {"a": }]', "bad.json")
    assert rows[0]["source"] == ["bad.json:1"]
    record, reason = parse_line(rows[0]["text"][0], "bad.json:1")
    assert record is None and reason.startswith("malformed JSON array") and "line 2" in reason


def test_read_errors_say_what_went_wrong():
    from botocore.exceptions import EndpointConnectionError

    corrupt = read_error("s3://b/x.jsonl.gz", OSError("zlib inflate failed: incorrect header check"))
    assert isinstance(corrupt, DataError) and corrupt.what == "cannot read s3://b/x.jsonl.gz"
    assert "gzip" in corrupt.fix
    down = read_error("s3://b/x.jsonl", EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(down, StorageError) and "stopped answering" in down.why
    gone = read_error("s3://b/x.jsonl", PermissionError("Access Denied"))
    assert isinstance(gone, StorageError) and "access denied" in gone.why
    bug = KeyError("x")
    assert read_error("f", bug) is bug


def test_mixing_local_and_s3_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"{}\n")
    with pytest.raises(DataError, match="mixes s3:// and local"):
        source.read_raw_rows([str(tmp_path / "a.jsonl"), "s3://bucket/b.jsonl"], shuffle_files=False, seed=0)


# ---------------------------------------------------------------- through Ray Data

@pytest.fixture(scope="module")
def ray_session(s3_server):  # noqa: F811 - the S3 environment must be set before Ray starts its workers
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows in file order, files in (shuffled) list order
    yield ray
    context.execution_options.preserve_order = saved
    if started:
        ray.shutdown()


def write_files(tmp_path) -> str:
    for name, (data, _) in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return str(tmp_path)


@pytest.mark.slow
def test_local_files_give_exact_rows_and_sources(ray_session, tmp_path):
    root = write_files(tmp_path)
    ds = source.read_raw_rows([root], shuffle_files=False, seed=0)
    assert ds.take_all() == expected_rows(root)


@pytest.mark.slow
def test_s3_shards_give_the_same_rows(ray_session, s3_server, tmp_path):  # noqa: F811
    bucket = s3_server.make_bucket("raydpo-source-rows")
    root = write_files(tmp_path)
    storage.upload_dir(root, f"{bucket}/data")
    files = storage.list_data_files(f"{bucket}/data")
    ds = source.read_raw_rows(files, shuffle_files=False, seed=0)
    assert ds.take_all() == expected_rows(f"{bucket}/data")


@pytest.mark.slow
def test_a_corrupt_gzip_file_fails_with_a_data_error(ray_session, tmp_path):
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    with pytest.raises(DataError) as caught:
        source.read_raw_rows([str(tmp_path)], shuffle_files=False, seed=0).take_all()
    assert f"cannot read {tmp_path}/broken.jsonl.gz" in str(caught.value)


@pytest.mark.slow
def test_file_shuffling_is_deterministic_by_seed(ray_session, tmp_path):
    names = [f"shard-{i}.jsonl" for i in range(8)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text("".join(json.dumps({"shard": i, "row": r}) + "\n" for r in range(3)))

    def file_order(shuffle: bool, seed: int) -> list[str]:
        rows = source.read_raw_rows([str(tmp_path)], shuffle_files=shuffle, seed=seed).take_all()
        files = [r["source"].rsplit(":", 1)[0].rsplit("/", 1)[1] for r in rows]
        assert [r["source"].rsplit(":", 1)[1] for r in rows] == ["1", "2", "3"] * 8  # whole files, in line order
        return files[::3]

    assert file_order(False, 0) == names
    first, again, other = file_order(True, 1), file_order(True, 1), file_order(True, 2)
    assert sorted(first) == names and first != names
    assert again == first
    assert other != first
