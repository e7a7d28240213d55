"""Raw preference rows as a Ray Data dataset: one row per JSON document, with where it came from.

`read_raw_rows` gives two string columns: "text" (one raw JSON document) and "source" ("path:line", 1-based; for a
JSON-array file "path:index+1"); parsing them into records is formats.parse_batch's job, in a later stage.

Ray Data's own read_json is not used: it drops line numbers (a bad row could not be reported as file:line) and fails
the whole read on one malformed line. Instead a FileBasedDatasource reads each file as a stream -- .gz is
decompressed on the fly by pyarrow, JSONL goes line by line and leaves in blocks of at most ROWS_PER_BLOCK rows or
CHARS_PER_BLOCK characters of text -- so a large file is never held whole. A .json file holding a JSON array is parsed
whole (the standard library has no streaming JSON parser) and emitted element by element; any other .json is read
as JSONL. Blank lines hold no document and are not rows (the line numbers of later rows still count them).

Bytes that cannot become a row (not UTF-8, an array file that is not valid JSON) still yield a row (raw_rows.py
unreadable_row), which formats.parse_line reports as a bad row with its file:line, so nothing is dropped silently.
The line-to-row rules are raw_rows.py's, the same `raydpo data validate` and evaluation read with.
"""
from __future__ import annotations

import io

from ray.data.datasource import FileBasedDatasource

from core import storage
from core.data.raw_rows import array_rows, data_files, is_json_array, is_json_name, jsonl_rows, read_error
from core.errors import DataError

ROWS_PER_BLOCK = 10_000
CHARS_PER_BLOCK = 16 << 20  # long rows (4k-token prompts) would make 10k-row blocks hundreds of MB
READ_BUFFER = 1 << 20


def block_ready(rows: int, text_chars: int) -> bool:
    return rows >= ROWS_PER_BLOCK or text_chars >= CHARS_PER_BLOCK


def raw_row_blocks(stream, name: str):
    """pyarrow tables (text, source) of one open binary stream; `name` is the path shown in sources."""
    import pyarrow as pa

    reader = io.BufferedReader(stream, READ_BUFFER)
    if is_json_name(name) and is_json_array(reader.peek(READ_BUFFER)):
        rows = array_rows(reader.read(), name)
    else:
        rows = jsonl_rows(reader, name)
    texts, sources, size = [], [], 0
    for text, source in rows:
        texts.append(text)
        sources.append(source)
        size += len(text)
        if block_ready(len(texts), size):
            yield pa.table({"text": pa.array(texts, pa.string()), "source": pa.array(sources, pa.string())})
            texts, sources, size = [], [], 0
    if texts:
        yield pa.table({"text": pa.array(texts, pa.string()), "source": pa.array(sources, pa.string())})


class RawRowsDatasource(FileBasedDatasource):
    """Each file as a stream of raw-row blocks; sources name files by their URI (s3:// kept)."""

    def __init__(self, paths, *, uri_prefix: str, **kwargs):
        super().__init__(paths, **kwargs)
        self._uri_prefix = uri_prefix

    def _read_stream(self, f, path: str):
        name = self._uri_prefix + path
        try:
            yield from raw_row_blocks(f, name)
        except Exception as err:  # noqa: BLE001 - classified here; anything that is no I/O failure goes on whole
            raise read_error(name, err) from err


def read_raw_rows(uris: list[str], *, shuffle_files: bool, seed: int):
    """A lazy ray.data.Dataset of columns text, source over every row of every data file under uris.

    shuffle_files: the order in which files are read is shuffled with `seed` (Ray Data's FileShuffleConfig); each
    execution of the dataset (each epoch) gets its own order, the same in every run with the same seed. Rows keep
    their file order within a file.
    """
    import ray.data

    files = data_files(uris, listed=True)
    if not files:
        raise DataError("no data files given", fix="give a data file, folder or s3:// prefix")
    if len({storage.is_remote(f) for f in files}) > 1:
        raise DataError("the data mixes s3:// and local files", problems=files[:5],
                        why="one read goes through one file system",
                        fix="put all the data files of one split in the same place (all s3:// or all local)")
    filesystem, _ = storage.pyarrow_filesystem_for(files[0])
    paths = [storage.filesystem_for(f)[1] for f in files]
    shuffle = ray.data.FileShuffleConfig(seed=seed) if shuffle_files else None
    datasource = RawRowsDatasource(paths, filesystem=filesystem, shuffle=shuffle,
                                   uri_prefix=storage.S3 if storage.is_remote(files[0]) else "")
    return ray.data.read_datasource(datasource)
