"""Raw rows: one JSON document per row, with its "path:line", from .jsonl / .json (JSON arrays too) and their .gz,
local or on S3. The one module that turns file bytes into rows and lists data files; formats.py parses the rows,
source.py streams them through Ray Data with these same rules.

Rules: a .json file holding a JSON array yields each element (line = index + 1; the standard library has no
streaming JSON parser, so an array file is read whole); any other file is JSONL, line by line. Blank lines hold no
document and are not rows (later rows' line numbers still count them). Bytes that cannot become a row (not UTF-8,
a malformed array) still yield a row, `unreadable_row(reason)`, which formats.parse_line reports as a bad row with
its file:line, so nothing is dropped silently.
"""
from __future__ import annotations

import gzip
import itertools
import json
import zlib
from typing import Iterable, Iterator

from core import storage
from core.errors import DataError, StorageError

UNREADABLE_KEY = "__raydpo_unreadable__"  # a raw row standing for bytes that never became a JSON row
BOM = b"\xef\xbb\xbf"
# A row larger than this is refused, not parsed: a 50 MB line took 93 s and 6.5 GB to tokenise. Three 32k-token
# texts (the longest max_length) are well under 1 MB of JSON.
MAX_ROW_BYTES = 8 * 2**20


def is_gzip(path: str) -> bool:
    return path.lower().endswith(".gz")


def is_json_name(path: str) -> bool:
    """A .json or .json.gz file: one that may hold a JSON array (any other data file is JSONL)."""
    return path.lower().removesuffix(".gz").endswith(".json")


def is_json_array(head: bytes) -> bool:
    """Whether a file's first bytes open a JSON array (after an optional UTF-8 byte-order mark and whitespace)."""
    return head.removeprefix(BOM).lstrip().startswith(b"[")


def unreadable_row(reason: str) -> str:
    return json.dumps({UNREADABLE_KEY: reason})


def _undecodable(raw: bytes, err: UnicodeDecodeError, where: str) -> str:
    return f"undecodable bytes: not UTF-8 (byte 0x{raw[err.start]:02x} at {where})"


def jsonl_rows(lines: Iterable[bytes], path: str) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(lines, 1):
        if number == 1:
            raw = raw.removeprefix(BOM)
        if not raw.strip():
            continue  # blank lines are not rows
        if len(raw) > MAX_ROW_BYTES:
            yield unreadable_row(f"row of {len(raw) / 2**20:.1f} MiB is over the {MAX_ROW_BYTES // 2**20} MiB row "
                                 "limit (a preference pair is far smaller; is this file one JSON document per "
                                 "line?)"), f"{path}:{number}"
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield unreadable_row(_undecodable(raw, err, f"column {err.start + 1}")), f"{path}:{number}"
            continue
        yield text.strip(), f"{path}:{number}"


def array_rows(data: bytes, path: str) -> Iterator[tuple[str, str]]:
    data = data.removeprefix(BOM)
    try:
        elements = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        yield unreadable_row(_undecodable(data, err, f"line {line}") + "; the whole JSON array is unreadable"), \
            f"{path}:1"
        return
    except json.JSONDecodeError as err:
        yield unreadable_row(f"malformed JSON array: {err.msg} at line {err.lineno} column {err.colno}; the whole "
                             "file is unreadable"), f"{path}:1"
        return
    for index, element in enumerate(elements, 1):
        yield json.dumps(element, ensure_ascii=False), f"{path}:{index}"


def iter_raw_rows(path: str, fs=None) -> Iterator[tuple[str, str]]:
    """(raw JSON text, "path:line") for each row of a data file, local or on an fsspec filesystem (by default the
    one the path names: local or s3://). .gz is decompressed here (Ray Data's reader does it for source.py)."""
    try:
        with (fs or storage.filesystem_for(path)[0]).open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if is_gzip(path) else raw
            lines = iter(stream)
            head = []  # up to the first line that is not blank: enough to tell an array from JSONL
            for line in lines:
                head.append(line)
                if line.strip(BOM + b" \t\r\n"):
                    break
            if is_json_name(path) and is_json_array(b"".join(head)):
                yield from array_rows(b"".join(head) + stream.read(), path)
            else:
                yield from jsonl_rows(itertools.chain(head, lines), path)
    except (OSError, EOFError, zlib.error) as err:
        raise read_error(path, err, damaged_if_unknown=True) from err


def read_error(name: str, err: Exception, *, damaged_if_unknown: bool = False) -> Exception:
    """What a failure while reading a file means to the user: a damaged file (DataError) or storage trouble
    (StorageError); anything else is returned as it is, unless damaged_if_unknown (an OSError of a local read)."""
    kind = storage.classify_error(err)
    if kind == "other" or (kind is None and damaged_if_unknown):
        # pyarrow's gzip reader says "Truncated compressed stream", "zlib inflate failed", ...
        return DataError(f"cannot read {name}", why=storage.describe(err),
                         fix="check that the file is complete (a .gz file must be whole gzip data)")
    if kind is None:
        return err
    if kind == "transient":
        return StorageError(f"cannot read {name}", why=f"storage stopped answering ({storage.describe(err)})",
                            fix="check the network and the S3 endpoint (AWS_ENDPOINT_URL), then run again")
    why, fix = storage.PERMANENT[kind]
    return StorageError(f"cannot read {name}", why=f"{why} ({storage.describe(err)})", fix=fix)


def data_files(paths: list[str], *, listed: bool = False) -> list[str]:
    """Every data file that the paths name (a file, a folder searched recursively, an s3:// prefix), in order,
    without duplicates. listed: the paths are storage.list_data_files's answer already, so a path that ends like a
    data file is taken as named, without asking the storage again."""
    files: list[str] = []
    for path in map(str, paths):
        named = listed and path.lower().endswith(storage.DATA_SUFFIXES)
        files += [path] if named else storage.list_data_files(path)
    return list(dict.fromkeys(files))
