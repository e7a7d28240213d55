"""Shared fixtures: the ../shared folder, a tiny model and tokenizer built offline."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.s3server import s3_server  # noqa: F401 - the fixture ray_cluster starts first

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # The tests run as after `source .venv/bin/activate` (the Makefile calls .venv/bin/pytest without it), like the
    # Ray heads they start (tests/cluster/headnode.py): DeepSpeed's in-process tests and the clusters' workers then
    # build its CPU op with the same ninja (cluster/session.py environment_first_on_path says why that matters).
    from cluster.session import path_with_environment_first

    os.environ["PATH"] = path_with_environment_first(os.environ.get("PATH", ""), str(Path(sys.executable).parent))
    # `make test` leaves these out and `make test-faults` runs them; .ci/run runs both
    config.addinivalue_line("markers", "faults: a slow fault-injection test (a killed worker or driver, storage cut "
                                       "off, Ctrl-C or SIGTERM on a cluster)")


def shared_dir() -> Path:
    return Path(os.environ.get("RAYDPO_SHARED", ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path}: set RAYDPO_SHARED to the folder that holds data/ and eval/")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder (safetensors, config, tokenizer with a ChatML chat template), made offline."""
    from tests.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One `ray start --head` cluster shared by the slow tests that can share it (tests/cluster/headnode.py: free
    ports, a token of its own, stopped through its own processes only, SHARED_CPUS logical CPUs), started at the
    first test that asks for it and stopped when the session ends.

    How a test opts in: take this fixture and run the command with `env=ray_cluster.driver_env()` (RAY_ADDRESS and
    the token set): `raydpo train` then connects to it (cluster/session.py) instead of starting and stopping a
    local cluster of its own. Not for tests that kill Ray processes, check how a cluster is started or stopped, or
    need an environment variable in the workers: the workers get the head's environment, as it was when it started.
    That environment, and driver_env(), hold this session's S3 server (tests/s3server.py: AWS_ENDPOINT_URL on
    127.0.0.1 and its test keys), so runs that read or write s3:// share the head too: such a test takes the
    `s3_server` fixture of this conftest (a module that imports its own gets another server).
    """
    from tests.cluster.headnode import SHARED_CPUS, port_open, start_head, stop_head
    from tests.s3server import aws_env_for

    head = start_head(num_cpus=SHARED_CPUS, extra_env=aws_env_for(s3_server.endpoint_url))
    yield head
    stop_head(head)
    assert not port_open("127.0.0.1", head.gcs_port) and head.processes() == [], "the shared head was not stopped"
