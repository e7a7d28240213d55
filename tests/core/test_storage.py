"""core/storage.py: retry schedule, error classification, local and S3 (moto on 127.0.0.1) operations."""
from __future__ import annotations

import errno
import logging
import os

import pytest

from tests.s3server import s3_server  # noqa: F401 - the session fixture
from core import storage
from core.errors import DataError, StorageError

FAST = storage.RetryPolicy(tries=3, first_delay_s=0.01, factor=2.0)


# ---------------------------------------------------------------- the retry schedule, by hand

def test_backoff_delays_default_schedule():
    # 5 tries -> 4 waits: 0.5, 0.5*2, 0.5*4, 0.5*8
    assert storage.backoff_delays(storage.RetryPolicy()) == [0.5, 1.0, 2.0, 4.0]


def test_backoff_delays_are_capped_and_one_try_never_waits():
    # 0.5, 1.0, then 2.0 and 4.0 are capped at 1.5
    assert storage.backoff_delays(storage.RetryPolicy(tries=5, first_delay_s=0.5, max_delay_s=1.5)) == \
        [0.5, 1.0, 1.5, 1.5]
    # first 1, factor 3: 1, 3, 9
    assert storage.backoff_delays(storage.RetryPolicy(tries=4, first_delay_s=1, factor=3)) == [1, 3, 9]
    assert storage.backoff_delays(storage.RetryPolicy(tries=1)) == []


def failing(errors, result="done"):
    """A function that raises the given errors one call after another, then returns result."""
    pending = list(errors)

    def fn():
        if pending:
            raise pending.pop(0)
        return result

    return fn


def test_transient_errors_are_retried_on_the_schedule():
    slept = []
    fn = failing([ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow")])
    assert storage.with_retries("read", "s3://b/k", fn, sleep=slept.append) == "done"
    assert slept == [0.5, 1.0]


def test_transient_errors_give_up_after_the_last_try():
    slept = []
    fn = failing([ConnectionRefusedError(errno.ECONNREFUSED, "refused")] * 5)
    with pytest.raises(StorageError) as caught:
        storage.with_retries("read", "s3://b/k", fn, sleep=slept.append)
    assert slept == [0.5, 1.0, 2.0, 4.0]
    message = str(caught.value)
    assert "could not read s3://b/k" in message and "5 tries" in message and "AWS_ENDPOINT_URL" in message


def test_permanent_errors_are_not_retried():
    slept = []
    with pytest.raises(StorageError) as caught:
        storage.with_retries("write", "s3://b/k", failing([PermissionError("Access Denied")]), sleep=slept.append)
    assert slept == []
    assert "could not write s3://b/k" in str(caught.value) and "access denied" in caught.value.why


def test_errors_that_are_no_storage_failure_pass_through():
    with pytest.raises(KeyError):
        storage.with_retries("read", "x", failing([KeyError("bug")]), sleep=lambda s: None)


def client_error(code: str, status: int, operation: str = "PutObject"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)


def caused_by(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


def test_classify_error():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    cases = [
        (FileNotFoundError("no key"), "not_found"),
        (caused_by(FileNotFoundError("The specified bucket does not exist"), client_error("NoSuchBucket", 404)),
         "no_bucket"),
        (PermissionError("Access Denied"), "denied"),
        (OSError(errno.EACCES, "Permission denied"), "denied"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
        (OSError(errno.EROFS, "Read-only file system"), "read_only"),
        (NoCredentialsError(), "no_credentials"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "transient"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (caused_by(OSError(errno.EBUSY, "Please reduce your request rate"), client_error("SlowDown", 503)),
         "transient"),
        (client_error("InternalError", 500), "transient"),
        (client_error("Throttling", 400), "transient"),
        # s3fs turns codes it does not know into EIO; a 4xx answer will not change on a retry
        (caused_by(OSError(errno.EIO, "odd"), client_error("SomethingNew", 400)), "other"),
        (OSError(errno.EIO, "local I/O error"), "transient"),
        (ValueError("a bug"), None),
    ]
    assert [(type(e).__name__, storage.classify_error(e)) for e, _ in cases] == \
        [(type(e).__name__, kind) for e, kind in cases]


def test_describe_hides_the_endpoint_address():
    from botocore.exceptions import EndpointConnectionError

    text = storage.describe(EndpointConnectionError(endpoint_url="http://user:secret@10.1.2.3:9000/bucket/key"))
    assert "secret" not in text and "10.1.2.3" not in text and "<storage endpoint>" in text


# ---------------------------------------------------------------- paths

def test_where_paths_live(tmp_path):
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/data/x") and not storage.is_remote("file:///x")
    fs, path = storage.filesystem_for(f"file://{tmp_path}/a")
    assert path == f"{tmp_path}/a" and fs.protocol[0] == "file"
    assert storage.filesystem_for("relative/x")[1] == os.path.join(os.getcwd(), "relative/x")
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs://'"):
        storage.filesystem_for("gs://bucket/x")


# ---------------------------------------------------------------- local operations

def make_tree(root, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)


TREE = {"model/config.json": b'{"a": 1}', "model/weights.safetensors": bytes(range(256)) * 10,
        "model/sub/tokenizer.json": "ünïcode".encode()}


def test_local_round_trips(tmp_path):
    target = str(tmp_path / "out" / "run")
    storage.write_bytes(target + "/manifest.json", b"{}")
    assert storage.read_bytes(target + "/manifest.json") == b"{}"
    assert [p.name for p in (tmp_path / "out" / "run").iterdir()] == ["manifest.json"]  # no temporary file left
    assert storage.exists(target) and storage.exists(target + "/manifest.json")
    make_tree(tmp_path / "src", TREE)
    written = storage.upload_dir(str(tmp_path / "src"), target + "/up")
    assert written == sorted(target + "/up/" + k for k in TREE)
    assert storage.list_dirs(target) == [target + "/up"]
    assert storage.list_dirs(target + "/up") == [target + "/up/model"]
    assert storage.list_dirs(str(tmp_path / "missing")) == []
    storage.download_dir(target + "/up", str(tmp_path / "back"))
    assert {k: (tmp_path / "back" / k).read_bytes() for k in TREE} == TREE
    storage.remove(target + "/up")
    storage.remove(target + "/up")  # removing what is gone is not an error
    assert not storage.exists(target + "/up") and storage.exists(target + "/manifest.json")


def test_local_disk_full_is_a_storage_error_without_retries(tmp_path, monkeypatch, caplog):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", disk_full)
    with caplog.at_level(logging.WARNING, logger="core.storage"):
        with pytest.raises(StorageError) as caught:
            storage.write_bytes(str(tmp_path / "m.json"), b"{}")
    assert str(tmp_path / "m.json") in caught.value.what
    assert "no space left" in caught.value.why and "df -h" in caught.value.fix
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
    assert not [r for r in caplog.records if "try 2" in r.getMessage()]


def test_local_permission_denied_is_a_storage_error(tmp_path, monkeypatch):
    fs, _ = storage.filesystem_for(str(tmp_path))
    make_tree(tmp_path / "src", {"a.txt": b"a"})

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(type(fs), "put_file", denied)
    with pytest.raises(StorageError, match="access denied"):
        storage.upload_dir(str(tmp_path / "src"), str(tmp_path / "dst"))


def test_list_data_files_local(tmp_path):
    make_tree(tmp_path, {"d/b.jsonl": b"", "d/a.json": b"", "d/sub/c.jsonl.gz": b"", "d/sub/e.json.gz": b"",
                         "d/readme.md": b"", "d/.ipynb_checkpoints/x.jsonl": b"", "d-2.jsonl": b"",
                         "notes/readme.txt": b""})
    d = str(tmp_path / "d")
    assert storage.list_data_files(d) == [f"{d}/a.json", f"{d}/b.jsonl", f"{d}/sub/c.jsonl.gz", f"{d}/sub/e.json.gz"]
    assert storage.list_data_files(d + "/") == storage.list_data_files(d)
    assert storage.list_data_files(f"{d}/b.jsonl") == [f"{d}/b.jsonl"]
    assert storage.list_data_files(f"{d}-") == [f"{d}-2.jsonl"]  # a name prefix
    assert storage.list_data_files(d, suffixes=(".jsonl",)) == [f"{d}/b.jsonl"]


def test_list_data_files_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    make_tree(tmp_path, {"notes/readme.txt": b"", "notes/x.csv": b""})
    with pytest.raises(DataError) as missing:
        storage.list_data_files(str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing") in missing.value.what and missing.value.why and missing.value.fix
    with pytest.raises(DataError) as empty:
        storage.list_data_files(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in empty.value.what and "(found: nothing)" in empty.value.why
    with pytest.raises(DataError) as other:
        storage.list_data_files(str(tmp_path / "notes"))
    assert "readme.txt, x.csv" in other.value.why and ".jsonl" in other.value.why
    with pytest.raises(DataError, match="is not a data file"):
        storage.list_data_files(str(tmp_path / "notes" / "x.csv"))


# ---------------------------------------------------------------- S3 through moto on 127.0.0.1

@pytest.fixture
def bucket(s3_server, request):  # noqa: F811 - the fixture imported above
    name = "raydpo-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    uri = s3_server.make_bucket(name)
    yield uri
    if name in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]:
        s3_server.remove_bucket(name)


def test_s3_round_trips(bucket, tmp_path):
    storage.write_bytes(f"{bucket}/run/manifest.json", b'{"ok": true}')
    assert storage.read_bytes(f"{bucket}/run/manifest.json") == b'{"ok": true}'
    assert storage.exists(f"{bucket}/run/manifest.json") and storage.exists(f"{bucket}/run")
    assert not storage.exists(f"{bucket}/run/nothing")
    make_tree(tmp_path / "src", TREE)
    assert storage.upload_dir(str(tmp_path / "src"), f"{bucket}/run/") == sorted(f"{bucket}/run/{k}" for k in TREE)
    assert storage.list_dirs(f"{bucket}/run") == [f"{bucket}/run/model"]
    assert storage.list_dirs(f"{bucket}/run/model") == [f"{bucket}/run/model/sub"]
    assert storage.list_dirs(f"{bucket}/nothing") == []
    storage.download_dir(f"{bucket}/run/model", str(tmp_path / "back"))
    assert {k: (tmp_path / "back" / k.removeprefix("model/")).read_bytes() for k in TREE} == TREE
    storage.remove(f"{bucket}/run/model")
    assert not storage.exists(f"{bucket}/run/model/config.json")
    assert storage.exists(f"{bucket}/run/manifest.json")


def test_s3_list_data_files(bucket):
    for key in ("d/b.jsonl", "d/a.json", "d/sub/c.jsonl.gz", "d/readme.md", "d-2.jsonl", "notes/x.txt"):
        storage.write_bytes(f"{bucket}/{key}", b"{}\n")
    assert storage.list_data_files(f"{bucket}/d") == [f"{bucket}/d/a.json", f"{bucket}/d/b.jsonl",
                                                      f"{bucket}/d/sub/c.jsonl.gz"]
    assert storage.list_data_files(f"{bucket}/d/b.jsonl") == [f"{bucket}/d/b.jsonl"]
    assert storage.list_data_files(f"{bucket}/d-") == [f"{bucket}/d-2.jsonl"]
    with pytest.raises(DataError, match=f"no data at {bucket}/nothing"):
        storage.list_data_files(f"{bucket}/nothing")
    with pytest.raises(DataError, match=f"no data files in {bucket}/notes"):
        storage.list_data_files(f"{bucket}/notes")


def test_s3_missing_bucket_is_a_storage_error(s3_server, tmp_path):  # noqa: F811
    make_tree(tmp_path, {"a.txt": b"a"})
    calls = [lambda: storage.read_bytes("s3://raydpo-no-such-bucket/k"),
             lambda: storage.write_bytes("s3://raydpo-no-such-bucket/k", b"x"),
             lambda: storage.upload_dir(str(tmp_path), "s3://raydpo-no-such-bucket/run"),
             lambda: storage.list_data_files("s3://raydpo-no-such-bucket/data"),
             lambda: storage.list_dirs("s3://raydpo-no-such-bucket/run")]
    for call in calls:
        with pytest.raises(StorageError) as caught:
            call()
        assert "s3://raydpo-no-such-bucket/" in caught.value.what
        assert "the bucket does not exist" in caught.value.why and "create the bucket" in caught.value.fix


@pytest.fixture
def no_botocore_retries(monkeypatch):
    # The standard AWS setting, honoured by the client: our own retries are then the only ones, and fast to see.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


def put_file_calls(monkeypatch, uri: str, after_each):
    """Wraps the S3 filesystem's put_file: after_each(number of files uploaded so far) runs after every success."""
    fs, _ = storage.filesystem_for(uri)
    original, done = fs.put_file, []

    def put_file(*args, **kwargs):
        result = original(*args, **kwargs)
        done.append(args[1])
        after_each(len(done))
        return result

    monkeypatch.setattr(fs, "put_file", put_file)
    return done


class RestartOnRetry(logging.Handler):
    """Brings the server back when storage.py announces a retry, so the outage lasts until a retry happens."""

    def __init__(self, server):
        super().__init__(logging.WARNING)
        self.server, self.retries = server, []

    def emit(self, record):
        self.retries.append(record.getMessage())
        self.server.start()


def test_s3_upload_survives_the_server_stopping_midway(s3_server, bucket, tmp_path, monkeypatch,  # noqa: F811
                                                      no_botocore_retries):
    make_tree(tmp_path / "src", TREE)
    target = f"{bucket}/run/model"
    done = put_file_calls(monkeypatch, target, lambda n: s3_server.stop() if n == 1 else None)
    handler = RestartOnRetry(s3_server)
    logging.getLogger("core.storage").addHandler(handler)
    try:
        written = storage.upload_dir(str(tmp_path / "src" / "model"), target,
                                     retry=storage.RetryPolicy(tries=5, first_delay_s=0.05))
    finally:
        logging.getLogger("core.storage").removeHandler(handler)
        s3_server.start()
    assert len(handler.retries) == 1 and "try 2 of 5" in handler.retries[0]
    assert len(done) == 3 and len(written) == 3
    for key, data in TREE.items():
        assert storage.read_bytes(f"{bucket}/run/{key}") == data


def test_s3_unreachable_gives_up_with_a_storage_error(s3_server, bucket, no_botocore_retries):  # noqa: F811
    s3_server.stop()
    try:
        with pytest.raises(StorageError) as caught:
            storage.write_bytes(f"{bucket}/k", b"x", retry=storage.RetryPolicy(tries=2, first_delay_s=0.01))
    finally:
        s3_server.start()
    assert "2 tries" in caught.value.why and "<storage endpoint>" in caught.value.why
    assert s3_server.endpoint_url not in str(caught.value)


def test_s3_bucket_deleted_midway_is_a_storage_error(s3_server, bucket, tmp_path, monkeypatch):  # noqa: F811
    make_tree(tmp_path / "src", TREE)
    name = bucket.removeprefix("s3://")
    put_file_calls(monkeypatch, bucket, lambda n: s3_server.remove_bucket(name) if n == 1 else None)
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    with pytest.raises(StorageError) as caught:
        storage.upload_dir(str(tmp_path / "src"), f"{bucket}/run")
    assert caught.value.what == f"could not upload {tmp_path}/src/model/sub/tokenizer.json to " \
                                f"{bucket}/run/model/sub/tokenizer.json"
    assert "the bucket does not exist" in caught.value.why
    assert slept == []


def test_s3_download_to_a_full_disk_is_a_storage_error(bucket, tmp_path, monkeypatch):
    storage.write_bytes(f"{bucket}/model/config.json", b"{}")
    fs, _ = storage.filesystem_for(bucket)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "get_file", disk_full)
    with pytest.raises(StorageError) as caught:
        storage.download_dir(f"{bucket}/model", str(tmp_path / "local"))
    assert caught.value.what == f"could not download {bucket}/model/config.json to {tmp_path}/local/config.json"
    assert "no space left on the local disk" in caught.value.why


def test_pyarrow_filesystem_reads_and_writes_s3(bucket):
    import pyarrow.fs

    fs, path = storage.pyarrow_filesystem_for(f"{bucket}/arrow/x.bin")
    with fs.open_output_stream(path) as out:
        out.write(b"written by pyarrow")
    assert storage.read_bytes(f"{bucket}/arrow/x.bin") == b"written by pyarrow"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(bucket.removeprefix("s3://") + "/arrow"))
    assert [(i.path, i.size) for i in infos] == [(path, 18)]
    local_fs, local_path = storage.pyarrow_filesystem_for("/tmp/x")
    assert isinstance(local_fs, pyarrow.fs.LocalFileSystem) and local_path == "/tmp/x"
