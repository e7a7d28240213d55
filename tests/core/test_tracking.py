"""Tracking: names and params by hand; then TensorBoard event files and the MLflow store read back."""
from __future__ import annotations

import math
import socket
import warnings

import pytest

from core import tracking
from core.tracking import TrackerWarning


@pytest.mark.parametrize("name, key", [
    ("train/loss", "train/loss"),
    ("validation/rewards/margins", "validation/rewards/margins"),
    ("eval gen_qa/rouge-L.f1", "eval gen_qa/rouge-L.f1"),
    ("a:b", "a_b"),                 # ':' is refused by MLflow on Windows
    ("/x//y/", "x/y"),              # empty segments would not survive posixpath.normpath
    ("../x/./y", "_/x/_/y"),        # '..' and '.' would resolve to other names
    ("précision@1", "pr_cision_1"),
    ("", "_"),
])
def test_mlflow_key(name, key):
    assert tracking.mlflow_key(name) == key


def test_mlflow_key_is_cut_to_mlflows_limit():
    assert tracking.mlflow_key("x" * 300) == "x" * 250


def test_row_metrics_prefixes_the_split_and_keeps_finite_numbers_only():
    row = {"step": 3, "epoch": 0.5, "split": "validation", "loss": 0.25, "rewards/chosen": 1,
           "lr": None, "flag": True, "bad": math.nan, "note": "x"}
    assert tracking.row_metrics(row) == {"validation/epoch": 0.5, "validation/loss": 0.25,
                                         "validation/rewards/chosen": 1.0}
    assert tracking.row_metrics({"step": 1, "loss": 2.0}) == {"train/loss": 2.0}


def test_param_rows_flattens_and_limits():
    params = {"run": {"name": "r", "mlflow_tracking_uri": None},
              "training_config": {"model": {"optim": {"lr": 1e-5, "betas": [0.9, 0.999]}}, "key_map": {}},
              "long": "y" * 7000}
    rows = tracking.param_rows(params)
    assert rows == {"run.name": "r", "run.mlflow_tracking_uri": "null",
                    "training_config.model.optim.lr": "1e-05",
                    "training_config.model.optim.betas": "[0.9, 0.999]",
                    "training_config.key_map": "{}", "long": "y" * 6000}


def test_passwords_and_secret_query_values_are_redacted_everywhere_a_recipe_is_shown():
    uri = "https://alice:s3cr3t-pw@mlflow.example:5000/api?token=tok-9&x=1"
    assert tracking.redact(uri) == "https://alice:***@mlflow.example:5000/api?token=***&x=1"  # host and path stay
    assert tracking.without_credentials(uri) == "https://mlflow.example:5000/api?token=tok-9&x=1"
    tree = {"run": {"mlflow_tracking_uri": uri, "replicas": 2}, "list": ["s3://k:v@b/x"]}
    assert tracking.redacted(tree) == {"run": {"mlflow_tracking_uri": "https://alice:***@mlflow.example:5000/api"
                                                                      "?token=***&x=1", "replicas": 2},
                                       "list": ["s3://k:***@b/x"]}
    rows = tracking.param_rows(tree)  # MLflow params and TensorBoard's parameter table
    assert "s3cr3t-pw" not in str(rows) and "tok-9" not in str(rows)


def test_the_unreachable_server_warning_shows_no_password(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    recipe = {"run": {"name": "r", "mlflow_tracking_uri": f"http://alice:s3cr3t-pw@127.0.0.1:{port}"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = tracking.open_trackers(str(tmp_path), recipe)
        tracking.close(handle)
    shown = [str(w.message) for w in caught if issubclass(w.category, TrackerWarning)]
    assert shown and all("s3cr3t-pw" not in m for m in shown) and any("alice:***@127.0.0.1" in m for m in shown)


def test_mlflow_settings_defaults_and_recipe_values(tmp_path):
    run_dir = tmp_path / "my-run"
    assert tracking.mlflow_settings(run_dir, {"run": {"name": "my-run"}}, "train") == \
        ((run_dir / "mlruns").resolve().as_uri(), "my-run", "my-run")
    recipe = {"run": {"name": "my-run", "mlflow_tracking_uri": "http://mlflow:5000",
                      "mlflow_experiment_name": "exp", "mlflow_run_name": "try-3"}}
    assert tracking.mlflow_settings(run_dir, recipe, "eval") == ("http://mlflow:5000", "exp", "try-3-eval")


def _tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


ROWS = [
    {"step": 1, "epoch": 0.5, "split": "train", "loss": 0.693, "rewards/accuracies": 0.5, "lr": 1e-6},
    {"step": 2, "epoch": 1.0, "split": "train", "loss": 0.61, "rewards/accuracies": 0.75, "lr": 2e-6},
    {"step": 2, "epoch": 1.0, "split": "validation", "loss": 0.65, "rewards/accuracies": 0.625},
]


def _log_rows(handle):
    for row in ROWS:
        tracking.log_metrics(handle, tracking.row_metrics(row), step=row["step"])


def test_tensorboard_and_default_mlflow_file_store_read_back(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "tiny-run"
    recipe = {"run": {"name": "tiny-run", "model_name_or_path": "m"}, "training_config": {"seed": 7}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackerWarning)  # the happy path warns about nothing
        handle = tracking.open_trackers(str(run_dir), recipe)
        _log_rows(handle)
        tracking.close(handle)

    scalars = _tb_scalars(run_dir / "tensorboard" / "train")
    assert scalars["train/loss"] == [(1, pytest.approx(0.693)), (2, pytest.approx(0.61))]
    assert scalars["validation/rewards/accuracies"] == [(2, pytest.approx(0.625))]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2]

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny-run")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.params["training_config.seed"] == "7"
    assert run.data.params["run.model_name_or_path"] == "m"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.693), (2, 0.61)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation/loss")] == \
        [(2, 0.65)]


def test_recipe_uri_experiment_and_run_name_are_honoured(tmp_path):
    import mlflow

    store = tmp_path / "elsewhere"
    recipe = {"run": {"name": "r1", "mlflow_tracking_uri": store.as_uri(), "mlflow_experiment_name": "nova-exp",
                      "mlflow_run_name": "attempt-2"}}
    for kind in ("train", "eval"):
        handle = tracking.open_trackers(str(tmp_path / "r1"), recipe, kind=kind)
        tracking.log_metrics(handle, {"eval/f1": 0.4} if kind == "eval" else {"train/loss": 1.5}, step=1)
        tracking.close(handle)
    assert not (tmp_path / "r1" / "mlruns").exists()
    mlflow.set_tracking_uri(store.as_uri())
    try:
        runs = mlflow.search_runs(experiment_names=["nova-exp"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"attempt-2", "attempt-2-eval"}
    assert by_name["attempt-2"].data.metrics == {"train/loss": 1.5}
    assert by_name["attempt-2-eval"].data.metrics == {"eval/f1": 0.4}
    assert by_name["attempt-2-eval"].data.tags["raydpo.kind"] == "eval"
    assert (tmp_path / "r1" / "tensorboard" / "eval").is_dir()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mlflow_server_warns_once_and_tensorboard_still_logs(tmp_path):
    recipe = {"run": {"name": "r", "mlflow_tracking_uri": f"http://127.0.0.1:{_closed_port()}"}}
    with pytest.warns(TrackerWarning, match="unreachable") as caught:
        handle = tracking.open_trackers(str(tmp_path), recipe)
        _log_rows(handle)
        tracking.close(handle)
    assert len(caught) == 1
    assert _tb_scalars(tmp_path / "tensorboard" / "train")["train/loss"][-1] == (2, pytest.approx(0.61))


def test_mlflow_failure_mid_run_warns_once_and_switches_mlflow_off(tmp_path):
    handle = tracking.open_trackers(str(tmp_path), {"run": {"name": "r"}})
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("server went away")

    handle.mlflow.log_batch = broken
    with pytest.warns(TrackerWarning, match="server went away") as caught:
        _log_rows(handle)
    assert len(caught) == 1 and len(calls) == 1 and handle.mlflow is None
    tracking.close(handle)
    assert len(_tb_scalars(tmp_path / "tensorboard" / "train")["train/loss"]) == 2


def test_non_numeric_metric_is_skipped_with_one_warning(tmp_path):
    handle = tracking.open_trackers(str(tmp_path), {"run": {"name": "r"}})
    with pytest.warns(TrackerWarning, match="'train/loss'=nan") as caught:
        for step in (1, 2):
            tracking.log_metrics(handle, {"train/loss": math.nan, "train/lr": 0.1}, step=step)
    assert len(caught) == 1
    tracking.close(handle)
    scalars = _tb_scalars(tmp_path / "tensorboard" / "train")
    assert "train/loss" not in scalars and len(scalars["train/lr"]) == 2


# The SQL backends, the server and pandas come with the full mlflow package only, not with mlflow-skinny.
NOT_IN_MLFLOW_SKINNY = ("sqlalchemy", "alembic", "flask", "flask_cors", "pandas", "gunicorn", "graphene", "docker",
                        "scipy", "sklearn", "scikit_learn", "skops", "huey", "mlflow-")
SKINNY_CHECK = """
import importlib.util, sys, tempfile, warnings
sys.path[:0] = [{root!r}, {site!r}]
assert importlib.util.find_spec("sqlalchemy") is None and importlib.util.find_spec("pandas") is None
warnings.simplefilter("error", UserWarning)
from core import tracking
run = tempfile.mkdtemp()
handle = tracking.open_trackers(run, {{"run": {{"name": "s"}}}})
tracking.log_metrics(handle, {{"train/loss": 0.5}}, step=3)
tracking.close(handle)
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri="file:" + run + "/mlruns")
[found] = client.search_runs([client.get_experiment_by_name("s").experiment_id])
print([(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train/loss")], found.info.status)
"""


def test_works_with_mlflow_skinny_alone(tmp_path):
    """A copy of the environment without what only full mlflow brings (links, not files), in a fresh interpreter."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    site_packages = Path(sysconfig.get_paths()["purelib"])
    if not any(site_packages.glob("mlflow_skinny-*.dist-info")):
        pytest.skip(f"mlflow-skinny is not installed in {site_packages}")
    site = tmp_path / "site"
    site.mkdir()
    for entry in site_packages.iterdir():
        if not entry.name.lower().startswith(NOT_IN_MLFLOW_SKINNY):
            (site / entry.name).symlink_to(entry.resolve())
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-S", "-c", SKINNY_CHECK.format(root=root, site=str(site))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[(3, 0.5)] FINISHED"
