"""Files in object storage (s3://) and on local disk behind one small API, with bounded retries.

s3fs and pyarrow do the work. Where S3 is and who we are -- endpoint (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or a
profile's endpoint_url, for S3-compatible stores), region, credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID..., the
instance role) -- come only from the standard AWS environment and config files that botocore reads: never from the
recipe, and never logged (messages below replace any http(s) endpoint address with "<storage endpoint>").

Every operation retries transient failures (connection errors, timeouts, 5xx answers, throttling) on the schedule
of `backoff_delays`, and turns permanent ones (no such bucket, access denied, no credentials, disk full, read-only
file system) into a StorageError that names the path and says why and how to fix it.

Paths: an "s3://bucket/key" URI, a "file://" URI, or a plain local path. `filesystem_for` hands back the fsspec
filesystem and the path in that filesystem's own form ("bucket/key" for S3, an absolute path locally).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from core.errors import DataError, StorageError

log = logging.getLogger(__name__)

S3 = "s3://"
FILE = "file://"
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# The settings that decide which S3 endpoint and identity a client gets: a new filesystem when any changes.
AWS_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID",
                "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 5
    first_delay_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 30.0


DEFAULT_RETRY = RetryPolicy()


def backoff_delays(policy: RetryPolicy) -> list[float]:
    """Seconds to wait after each failed try but the last: first, first*factor, ... each capped at max_delay_s."""
    return [min(policy.first_delay_s * policy.factor ** i, policy.max_delay_s) for i in range(policy.tries - 1)]


# ---------------------------------------------------------------- where a path lives

def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith(FILE)


def check_uri(uri: str, *, output: bool = False) -> str | None:
    """What is wrong with a data or output location, or None. An s3:// URI needs a bucket ("s3://" alone or
    "s3:///x" would otherwise become a local folder "./s3:" or a request for no bucket); an output path that climbs
    out with ".." lands somewhere nobody meant (../../../../etc is /etc)."""
    uri = str(uri)
    if uri.startswith(S3):
        bucket = uri[len(S3):].split("/", 1)[0]
        if not bucket:
            return f"{uri!r} names no bucket; write s3://BUCKET/prefix"
    elif output and ".." in Path(uri.removeprefix(FILE)).parts:
        return f"{uri!r} climbs out of its folder with '..'; write the output folder as an absolute path without '..'"
    return None


def filesystem_for(uri: str):
    """(fsspec filesystem, path inside it). One S3 filesystem per process and AWS environment."""
    uri = str(uri)
    if uri.startswith(S3):
        if (problem := check_uri(uri)) is not None:
            raise StorageError(f"{uri}: not an S3 location", why=problem,
                               fix="give s3://BUCKET/prefix (the bucket is the first part after s3://)")
        return _s3_filesystem(), uri[len(S3):]
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: unsupported storage scheme '{scheme}://'",
                           why="raydpo reads and writes s3:// URIs and local (or shared) folders only",
                           fix="copy the data to S3 or an S3-compatible store (point AWS_ENDPOINT_URL at it), "
                               "or to a folder every node can read")
    return _local_filesystem(), _local_path(uri)


def pyarrow_filesystem_for(uri: str):
    """(pyarrow filesystem, path) for Ray Data and Ray Train.

    S3 goes through s3fs wrapped for pyarrow rather than pyarrow's own S3FileSystem: pyarrow's client does not read
    AWS_ENDPOINT_URL, so it would ignore the endpoint of an S3-compatible store (and of the test server).
    """
    import pyarrow.fs

    fs, path = filesystem_for(uri)
    if str(uri).startswith(S3):
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
    return pyarrow.fs.LocalFileSystem(), path


def uri_for(fs_path: str, like: str) -> str:
    """The URI of a path that `filesystem_for(like)` returned, with the scheme put back."""
    return S3 + fs_path if str(like).startswith(S3) else fs_path


_S3_FILESYSTEMS: dict = {}


def _s3_filesystem():
    import s3fs

    key = (os.getpid(), tuple(os.environ.get(k) for k in AWS_ENV_KEYS))
    if key not in _S3_FILESYSTEMS:
        # No listing cache: other workers and processes write the same prefixes, and a stale listing would hide a
        # checkpoint or show a deleted one. No fsspec instance cache: the AWS environment may have changed.
        _S3_FILESYSTEMS[key] = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    return _S3_FILESYSTEMS[key]


def _local_filesystem():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(auto_mkdir=True)


def _local_path(uri: str) -> str:
    path = uri[len(FILE):] if uri.startswith(FILE) else uri
    return os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------- what a failure means

TRANSIENT_ERRNOS = {errno.EBUSY, errno.EIO, errno.EAGAIN, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                    errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                    getattr(errno, "EREMOTEIO", errno.EIO)}
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                  "TooManyRequestsException", "RequestThrottled", "RequestTimeout", "RequestTimeoutException",
                  "InternalError", "ServiceUnavailable"}
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# kind -> (why, fix) for the failures that another try cannot cure.
PERMANENT = {
    "no_bucket": ("the bucket does not exist",
                  "create the bucket or correct its name in the path; for an S3-compatible store check that "
                  "AWS_ENDPOINT_URL points at it"),
    "not_found": ("nothing exists at this path", "check the path (list its folder with `aws s3 ls` or `ls`)"),
    "denied": ("access denied",
               "check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the instance role) "
               "and that they allow this action on this bucket; for a local path, check the folder's permissions"),
    "no_credentials": ("no AWS credentials were found",
                       "set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an IAM role "
                       "is attached; on a Ray cluster every node needs them"),
    "disk_full": ("no space left on the local disk",
                  "free space on the disk that holds this path (`df -h`), or point the path or TMPDIR at a larger "
                  "disk"),
    "read_only": ("the file system is read-only", "write to a writable folder or bucket"),
    "invalid": ("the store rejected the request as invalid",
                "check the path (bucket names are 3-63 lower-case letters, digits, dots and hyphens)"),
    "other": ("the storage operation failed", "read the message above; if the store was briefly unavailable, "
                                              "run again"),
}


def _aws_error(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of the botocore ClientError behind `exc` (s3fs keeps it as the cause)."""
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return response["Error"].get("Code"), int(status) if status else None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None, None


def _is_transient_client_error(exc: BaseException) -> bool:
    try:
        from aiohttp import ClientError as AiohttpError
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
        from botocore.parsers import ResponseParserError
    except ImportError:  # local-only installs: no S3 client, no S3 errors
        return False
    return isinstance(exc, (BotoConnectionError, HTTPClientError, ResponseParserError, AiohttpError))


def classify_error(exc: BaseException) -> str | None:
    """"transient", a key of PERMANENT, or None when `exc` is no storage failure at all (a bug: let it through)."""
    code, status = _aws_error(exc)
    if code == "NoSuchBucket":
        return "no_bucket"
    if code in THROTTLE_CODES or (status is not None and status >= 500):
        return "transient"
    if type(exc).__name__ == "NoCredentialsError":
        return "no_credentials"
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "denied"
    if _is_transient_client_error(exc) or isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    if isinstance(exc, OSError):
        if exc.errno in DISK_FULL_ERRNOS:
            return "disk_full"
        if exc.errno == errno.EROFS:
            return "read_only"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "denied"
        if exc.errno in (errno.EINVAL, errno.ENAMETOOLONG):
            return "invalid"
        if exc.errno in TRANSIENT_ERRNOS and not (status is not None and status < 500):
            return "transient"
        return "other"
    return None


def describe(exc: BaseException) -> str:
    """The failure in one line, with endpoint addresses hidden (an endpoint URL may carry user:password@)."""
    text = re.sub(r"https?://[^\s\"'<>]+", "<storage endpoint>", str(exc)) or "no message"
    return f"{type(exc).__name__}: {text}"


def with_retries(action: str, uri: str, fn: Callable[[], T], *, retry: RetryPolicy = DEFAULT_RETRY,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Runs fn, retrying transient failures; a permanent one, or the last transient one, becomes a StorageError."""
    delays = backoff_delays(retry)
    for attempt in range(retry.tries):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right here; anything unknown is re-raised whole
            kind = classify_error(exc)
            if kind is None:
                raise
            if kind != "transient":
                why, fix = PERMANENT[kind]
                raise StorageError(f"could not {action} {uri}", why=f"{why} ({describe(exc)})", fix=fix) from exc
            if attempt == retry.tries - 1:
                raise StorageError(
                    f"could not {action} {uri}",
                    why=f"storage did not answer in {retry.tries} tries ({sum(delays):.1f} s of back-off): "
                        f"{describe(exc)}",
                    fix="check the network and the S3 endpoint (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an "
                        "S3-compatible store), then run again") from exc
            log.warning("%s %s: %s; try %d of %d in %.1f s", action, uri, describe(exc), attempt + 2, retry.tries,
                        delays[attempt])
            sleep(delays[attempt])
    raise AssertionError("unreachable: the loop returns or raises")


# ---------------------------------------------------------------- operations

def read_bytes(uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> bytes:
    fs, path = filesystem_for(uri)
    return with_retries("read", uri, lambda: fs.cat_file(path), retry=retry)


def write_bytes(uri: str, data: bytes, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Writes the whole object at once: an S3 PUT is atomic; locally a temporary file is renamed into place, so a
    reader never sees half a file (manifest.json's presence must mean the run is complete)."""
    fs, path = filesystem_for(uri)
    if is_remote(uri):
        with_retries("write", uri, lambda: fs.pipe_file(path, data), retry=retry)
    else:
        with_retries("write", uri, lambda: _write_local_atomically(path, data), retry=retry)


def _write_local_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exists(uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> bool:
    fs, path = filesystem_for(uri)

    def probe() -> bool:
        try:
            fs.info(path)
            return True
        except FileNotFoundError:
            return False

    return with_retries("check", uri, probe, retry=retry)


def remove(uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Removes a file or a whole folder/prefix. Removing what is not there is not an error."""
    fs, path = filesystem_for(uri)

    def rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    with_retries("remove", uri, rm, retry=retry)


def list_dirs(uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """The sub-folders (prefixes) directly under uri, as sorted URIs; [] when uri holds nothing."""
    fs, path = filesystem_for(uri)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError as exc:
            if classify_error(exc) == "no_bucket":
                raise
            return []
        return sorted(uri_for(e["name"].rstrip("/"), uri) for e in entries if e["type"] == "directory")

    return with_retries("list", uri, ls, retry=retry)


def upload_dir(local_dir: str, uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """Copies every file under local_dir to uri/<relative path>; returns the URIs written. Each file is retried
    on its own, so a failure late in a large upload does not send the earlier files again."""
    local = Path(local_dir)
    if not local.is_dir():
        raise StorageError(f"could not upload {local_dir} to {uri}", why="the local folder does not exist",
                           fix="check the folder's path")
    fs, root = filesystem_for(uri)
    written = []
    for source in sorted(p for p in local.rglob("*") if p.is_file()):
        relative = source.relative_to(local).as_posix()
        target_uri = str(uri).rstrip("/") + "/" + relative
        target = root.rstrip("/") + "/" + relative
        with_retries(f"upload {source} to", target_uri, lambda: fs.put_file(str(source), target), retry=retry)
        written.append(target_uri)
    return written


def download_dir(uri: str, local_dir: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """Copies every file under uri into local_dir (keeping sub-folders); returns the local paths written."""
    fs, root = filesystem_for(uri)
    root = root.rstrip("/")
    sources = with_retries("list", uri, lambda: fs.find(root), retry=retry)
    if not sources:
        why, fix = PERMANENT["not_found"]
        raise StorageError(f"could not download {uri}", why=why, fix=fix)
    written = []
    for source in sorted(sources):
        relative = source[len(root) + 1:] if source != root else os.path.basename(root)
        target = Path(local_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries(f"download {uri_for(source, uri)} to", str(target),
                     lambda: fs.get_file(source, str(target)), retry=retry)
        written.append(str(target))
    return written


def list_data_files(uri: str, suffixes: tuple[str, ...] = DATA_SUFFIXES, *,
                    retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """The data files that uri names -- a file, a folder (searched recursively) or a name prefix -- sorted, as URIs
    (s3:// ones keep their scheme). Names starting with "." below uri are skipped."""
    fs, path = filesystem_for(uri)
    path = path.rstrip("/") or path
    shown = ", ".join(suffixes)

    def kind_of() -> str | None:
        try:
            return fs.info(path)["type"]
        except FileNotFoundError as exc:
            if classify_error(exc) == "no_bucket":
                raise
            return None

    kind = with_retries("read", uri, kind_of, retry=retry)
    if kind == "file":
        if not path.lower().endswith(suffixes):
            raise DataError(f"{uri} is not a data file", why=f"data files end in {shown}",
                            fix="give a JSONL or JSON file (optionally gzipped) with one of those endings, or a "
                                "folder of them")
        return [uri_for(path, uri)]
    if kind == "directory":
        found = with_retries("list", uri, lambda: fs.find(path), retry=retry)
    else:
        found = with_retries("list", uri, lambda: _find_with_prefix(fs, path, is_remote(uri)), retry=retry)
        if not found:
            raise DataError(f"no data at {uri}", why="no file, folder or name prefix exists at this path",
                            fix="check the path (list its folder with `aws s3 ls` or `ls`); training data is a "
                                f"file or a folder of files ending in {shown}")
    # Hidden files and folders (.ipynb_checkpoints/, editor swap files) are never data.
    files = sorted(f for f in found if f.lower().endswith(suffixes) and not _hidden(f[len(path):]))
    if not files:
        sample = ", ".join(os.path.basename(f) for f in sorted(found)[:5]) or "nothing"
        raise DataError(f"no data files in {uri}", why=f"none of its files end in {shown} (found: {sample})",
                        fix=f"put the JSONL/JSON shards under this path, named *{suffixes[0]} or similar")
    return [uri_for(f, uri) for f in files]


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _find_with_prefix(fs, path: str, remote: bool) -> list[str]:
    parent, _, name = path.rpartition("/")
    try:
        if remote:
            found = fs.find(parent, prefix=name) if parent else []
        else:
            found = fs.find(parent)
    except FileNotFoundError as exc:
        if classify_error(exc) == "no_bucket":
            raise
        return []
    return [f for f in found if f.startswith(path)]


def download_dir_once(uri: str, target: Path, *, marker: str = ".complete",
                      retry: RetryPolicy = DEFAULT_RETRY) -> Path:
    """uri's files in `target`, downloaded by one process of the machine at a time and made visible whole.

    Several workers of a node share one cache folder: each takes the folder's file lock (flock on <target>.lock; it
    is released when a process dies), finds the folder complete or downloads into a fresh temporary folder beside
    it, writes `marker` there, and renames it to `target` (one rename(2): readers see no folder or the complete
    one, never a half-written safetensors file). Whoever waited on the lock then finds the folder complete."""
    import fcntl
    import shutil

    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the with block closes the file
        if (target / marker).exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            download_dir(uri, str(staging), retry=retry)
            (staging / marker).write_text(uri)
            if target.exists():  # an incomplete folder of an older raydpo that wrote in place
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
