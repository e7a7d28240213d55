"""Experiment tracking for rank 0 of training and for evaluation: TensorBoard event files and MLflow.

TensorBoard writes under <run>/tensorboard/<kind>/. MLflow uses run.mlflow_tracking_uri, or by default a file store
at <run>/mlruns (it works with mlflow-skinny, which has no SQL backend); experiment = run.mlflow_experiment_name or
run.name, run name = run.mlflow_run_name or run.name. Tracking never stops training: an MLflow failure (an
unreachable server, a rejected value) is warned about once and MLflow is switched off for that handle.
"""
from __future__ import annotations

import math
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MLFLOW_KEY_MAX = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
MLFLOW_PARAM_VALUE_MAX = 6000  # MLflow's MAX_PARAM_VAL_LENGTH (500 before MLflow 2.x)
MLFLOW_BATCH_MAX_METRICS = 1000  # MLflow's per-request limit for log_batch
# metrics.jsonl keys that index a row rather than measure anything
ROW_INDEX_KEYS = ("step", "split")


class TrackerWarning(UserWarning):
    pass


# A password in a URI's user info (https://user:PASSWORD@host), and secret-looking query values (?token=...).
USERINFO_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@:\s]*):(?P<secret>[^/@\s]+)@")
SECRET_QUERY = re.compile(r"(?i)(?P<head>[?&;](?:token|access_token|api_key|apikey|key|password|passwd|secret|"
                          r"sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)(?P<secret>[^&#\s]+)")
REDACTED = "***"


def redact(text: str) -> str:
    """text with the passwords of URIs and secret query values replaced by ***; the rest (host, path) stays, so
    that a message still says which server it is about."""
    text = USERINFO_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", str(text))
    return SECRET_QUERY.sub(lambda m: f"{m['head']}{REDACTED}", text)


def without_credentials(text: str) -> str:
    """URIs with their user info (user:password@) removed: for a copy that must work without the password, which
    then comes from the environment (MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""
    return USERINFO_PASSWORD.sub(lambda m: m["head"].rsplit("://", 1)[0] + "://", str(text))


def redacted(tree, redact=redact):
    """A copy of a recipe-shaped tree (dicts, lists, strings) with every string redacted (or passed through
    another function of a string, e.g. without_credentials)."""
    if isinstance(tree, dict):
        return {k: redacted(v, redact) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redacted(v, redact) for v in tree)
    return redact(tree) if isinstance(tree, str) else tree


@dataclass
class Trackers:
    """What open_trackers returns; pass it to log_metrics, log_params and close."""
    run_dir: Path
    kind: str
    tensorboard: Any = None  # torch.utils.tensorboard.SummaryWriter, or None when unavailable
    mlflow: Any = None  # mlflow.tracking.MlflowClient, or None when off
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    warned: set = field(default_factory=set)


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts on every platform: [A-Za-z0-9_.- /], no empty or '..' path segments.

    MLflow also allows ':' except on Windows; we replace it so that stores can be moved between machines.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.\- /]", "_", str(name))
    segments = [seg if seg not in (".", "..") else "_" for seg in cleaned.split("/") if seg != ""]
    key = "/".join(segments) or "_"
    return key[:MLFLOW_KEY_MAX].rstrip("/")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": [1, 2]}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def row_metrics(row: dict) -> dict[str, float]:
    """A metrics.jsonl row -> tracker metrics named <split>/<key>, e.g. train/loss, validation/rewards/margins."""
    split = row.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in row.items()
            if key not in ROW_INDEX_KEYS and is_number(value)}


def mlflow_settings(run_dir: Path, recipe: dict, kind: str) -> tuple[str, str, str]:
    """(tracking_uri, experiment_name, run_name) from the recipe's run section, with our defaults."""
    run = recipe.get("run") or {}
    name = run.get("name") or run_dir.name
    uri = run.get("mlflow_tracking_uri") or (run_dir / "mlruns").resolve().as_uri()
    experiment = run.get("mlflow_experiment_name") or name
    run_name = run.get("mlflow_run_name") or name
    if kind != "train":
        run_name = f"{run_name}-{kind}"
    return uri, experiment, run_name


def _warn_once(handle: Trackers, topic: str, message: str) -> None:
    if topic not in handle.warned:
        handle.warned.add(topic)
        warnings.warn(redact(message), TrackerWarning, stacklevel=3)  # an MLflow URI may carry a password


def _http_reachable(uri: str, timeout_s: float = 5.0) -> bool:
    # MLflow retries an unreachable server with exponential backoff for minutes; one quick connect avoids that.
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _open_mlflow(handle: Trackers, uri: str, experiment: str, run_name: str) -> None:
    if uri.startswith("file:") or "://" not in uri:
        # MLflow >= 3.x refuses its file store unless this is set; mlflow-skinny has no other local backend.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if uri.startswith(("http://", "https://")) and not _http_reachable(uri):
        _warn_once(handle, "mlflow", f"MLflow tracking server {uri} is unreachable: MLflow logging is off for this "
                                     "run (TensorBoard still logs). Check run.mlflow_tracking_uri.")
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={"raydpo.kind": handle.kind, "raydpo.run_dir": str(handle.run_dir)})
    except Exception as err:  # noqa: BLE001 -- any MLflow failure must leave training running
        _warn_once(handle, "mlflow", f"MLflow at {uri} failed ({type(err).__name__}: {err}); MLflow logging is off "
                                     "for this run (TensorBoard still logs).")
        return
    handle.mlflow, handle.mlflow_run_id, handle.mlflow_uri = client, run.info.run_id, uri


def _mlflow_call(handle: Trackers, what: str, fn, *args, **kwargs) -> None:
    if handle.mlflow is None:
        return
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 -- see _open_mlflow
        _warn_once(handle, "mlflow", f"MLflow {what} failed ({type(err).__name__}: {err}); MLflow logging is off "
                                     "for the rest of this run (TensorBoard still logs).")
        handle.mlflow = None


def open_trackers(run_dir_local: str, recipe: dict, *, kind: str = "train") -> Trackers:
    """Open TensorBoard and MLflow for a run folder and log the recipe as parameters.

    kind: "train" for training, e.g. "eval" for evaluation: its own TensorBoard folder and MLflow run (<name>-eval).
    """
    run_dir = Path(run_dir_local)
    handle = Trackers(run_dir=run_dir, kind=kind)
    try:
        from torch.utils.tensorboard import SummaryWriter

        handle.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard" / kind))
    except Exception as err:  # noqa: BLE001 -- e.g. the tensorboard package missing: tracking is optional
        _warn_once(handle, "tensorboard", f"TensorBoard logging is off ({type(err).__name__}: {err}); "
                                          "install the tensorboard package.")
    _open_mlflow(handle, *mlflow_settings(run_dir, recipe, kind))
    log_params(handle, recipe)
    return handle


def log_metrics(handle: Trackers, metrics: dict, step: int) -> None:
    """Log numeric metrics at a step. Non-numeric or non-finite values are skipped with one warning per name."""
    numbers = {}
    for name, value in metrics.items():
        if is_number(value):
            numbers[name] = float(value)
        else:
            _warn_once(handle, f"metric:{name}", f"metric {name!r}={value!r} is not a finite number: not tracked")
    if handle.tensorboard is not None:
        for name, value in numbers.items():
            handle.tensorboard.add_scalar(name, value, global_step=step)
    if handle.mlflow is not None and numbers:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        entries = [Metric(mlflow_key(name), value, now_ms, int(step)) for name, value in numbers.items()]
        for start in range(0, len(entries), MLFLOW_BATCH_MAX_METRICS):
            _mlflow_call(handle, "log_batch", handle.mlflow.log_batch, handle.mlflow_run_id,
                         metrics=entries[start:start + MLFLOW_BATCH_MAX_METRICS])


def param_rows(params: dict) -> dict[str, str]:
    """Nested params -> {mlflow key: string value}, values cut to MLflow's length limit."""
    rows = {}
    for name, value in flatten(params).items():
        text = "null" if value is None else redact(str(value))  # params are shown to whoever reads MLflow
        rows[mlflow_key(name)] = text[:MLFLOW_PARAM_VALUE_MAX]
    return rows


def log_params(handle: Trackers, params: dict) -> None:
    """Log (nested) parameters: MLflow params, and one TensorBoard text table."""
    rows = param_rows(params)
    if not rows:
        return
    if handle.tensorboard is not None:
        table = "| parameter | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())
        handle.tensorboard.add_text("params", table, global_step=0)
    if handle.mlflow is not None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param; a second log of the same key with a new value would fail.
        _mlflow_call(handle, "log_batch", handle.mlflow.log_batch, handle.mlflow_run_id,
                     params=[Param(k, v) for k, v in rows.items()])


def close(handle: Trackers, *, status: str = "FINISHED") -> None:
    """Flush TensorBoard and end the MLflow run (status FINISHED, FAILED or KILLED)."""
    if handle.tensorboard is not None:
        handle.tensorboard.flush()
        handle.tensorboard.close()
        handle.tensorboard = None
    if handle.mlflow is not None:
        _mlflow_call(handle, "set_terminated", handle.mlflow.set_terminated, handle.mlflow_run_id, status=status)
        handle.mlflow = None
