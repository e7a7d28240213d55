import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster.session import (check_resources, cluster_address_from_env, local_cpus, probe, ray_session,
                             ray_train_env, ray_train_environment, split_host_port)
from tests.cluster.headnode import SHARED_CPUS, free_ports, port_open
from core.errors import ClusterError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RAY_ADDRESS": "10.1.2.3:6380"}, "10.1.2.3:6380"),
    ({"RAY_ADDRESS": "  "}, None),
    ({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, "auto"),  # a Ray job's entrypoint
    ({"RAY_ADDRESS": "1.2.3.4:7000", "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, "1.2.3.4:7000"),
])
def test_cluster_address_from_env(env, expected):
    assert cluster_address_from_env(env) == expected


def test_a_local_cluster_gets_every_usable_core():
    # an 8-GPU node with 96 cores: all 96, not 8 workers + 2 (the reference and data actors would queue on 2)
    assert local_cpus(8, 2, 96) == 96
    # a 2-core laptop with 2 replicas: one per worker plus the data CPUs, more than its cores
    assert local_cpus(2, 2, 2) == 4


def test_ray_train_polls_faster_and_a_local_cluster_has_no_preemption_watcher():
    local = ray_train_env(True, {})
    assert local == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    # a cluster raydpo joins may lose nodes to preemption: its watcher stays
    assert ray_train_env(False, {}) == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    # the user's own settings win
    assert ray_train_env(True, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "5"}) == {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def test_ray_train_environment_is_set_for_the_run_and_taken_back(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    with ray_train_environment(True):
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"  # the user's, left alone


def test_split_host_port():
    assert split_host_port("auto") is None
    assert split_host_port("10.0.0.1:6380") == ("10.0.0.1", 6380)
    assert split_host_port("ray://head:10001") == ("head", 10001)
    with pytest.raises(ClusterError, match="dashboard") as err:
        split_host_port("http://127.0.0.1:8265")
    assert "ray job submit --address http://127.0.0.1:8265" in err.value.fix
    with pytest.raises(ClusterError, match="not an address"):
        split_host_port("headnode")


def test_probe_names_the_unreachable_address_and_the_next_step():
    (port,) = free_ports(1)  # bound and released: nothing listens there now
    with pytest.raises(ClusterError) as err:
        probe(f"127.0.0.1:{port}")
    text = str(err.value)
    assert f"no Ray cluster reachable at 127.0.0.1:{port}" in text
    assert "ray start --head" in text and "unset RAY_ADDRESS" in text
    assert err.value.exit_code != 0


def test_check_resources_names_what_is_short_and_by_how_much():
    check_resources({"CPU": 2, "GPU": 0}, {"CPU": 2.0, "memory": 1e9})  # enough: no error
    with pytest.raises(ClusterError) as err:
        check_resources({"CPU": 4, "GPU": 2, "memory": 3 * 2**30},
                        {"CPU": 2.0, "memory": 2 * 2**30})
    assert err.value.problems == [
        "CPU: the run asks for 4, the cluster has 2 (short by 2)",
        "GPU: the run asks for 2, the cluster has 0 (short by 2)",
        "memory: the run asks for 3.0 GiB, the cluster has 2.0 GiB (short by 1.0 GiB)",
    ]
    assert "--replicas" in err.value.fix


def test_unreachable_ray_address_is_a_cluster_error_and_starts_nothing(monkeypatch, tmp_path):
    import ray
    (port,) = free_ports(1)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="no Ray cluster reachable"):
        with ray_session(num_cpus=1, num_gpus=0, log_file=tmp_path / "ray.log"):
            pytest.fail("the body must not run")
    assert not ray.is_initialized()


class Boom(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["normal", pytest.param("error", marks=pytest.mark.faults),
                                    pytest.param("ctrl-c", marks=pytest.mark.faults)])
def test_local_cluster_is_stopped_on_every_way_out(ending, tmp_path, monkeypatch, capfd):
    import ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    log = tmp_path / "logs" / "ray.log"
    seen = {}
    body_raises = {"normal": None, "error": Boom, "ctrl-c": KeyboardInterrupt}[ending]
    try:
        with ray_session(num_cpus=2, num_gpus=0, log_file=log) as info:
            seen.update(info)
            host, port = info["address"].rsplit(":", 1)
            seen["gcs"] = (host, int(port))
            assert port_open(*seen["gcs"])
            if ending == "error":
                raise Boom()
            if ending == "ctrl-c":
                raise KeyboardInterrupt()
    except BaseException as err:  # noqa: BLE001 - each ending's own exception must come through unchanged
        assert body_raises is not None and isinstance(err, body_raises), err
    else:
        assert body_raises is None
    assert seen["started_here"] is True
    assert seen["resources"]["CPU"] == 2.0 and seen["resources"].get("GPU", 0) == 0
    assert not ray.is_initialized()
    deadline = time.time() + 30
    while port_open(*seen["gcs"]) and time.time() < deadline:
        time.sleep(0.5)
    assert not port_open(*seen["gcs"]), "the local cluster's GCS still listens after the session ended"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert "Started a local Ray instance" in log.read_text()
    out, err = capfd.readouterr()
    assert "Started a local Ray instance" not in out + err  # Ray's own lines went to the log file only


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cluster.session import ray_session
    with ray_session(num_cpus=1, num_gpus=0, log_file=Path(sys.argv[1])) as info:
        print("ADDRESS " + info["address"], flush=True)
        time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.faults
def test_local_cluster_is_stopped_when_the_process_gets_sigterm(tmp_path):
    # In a process of its own, as `kill` would hit `raydpo train`: Ray's driver turns SIGTERM into SystemExit, and
    # Ray's core aborts the process later on its way out, which must not take pytest with it.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    process = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "ray.log")], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("ADDRESS "), line
        host, port = line.split()[1].rsplit(":", 1)
        assert port_open(host, int(port))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) != 0
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.time() + 30
    while port_open(host, int(port)) and time.time() < deadline:
        time.sleep(0.5)
    assert not port_open(host, int(port)), "the local cluster's GCS still listens after SIGTERM"


INSIDE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from cluster.session import ray_session
    with ray_session(num_cpus=None, num_gpus=None, log_file=Path(sys.argv[1])) as info:
        print(json.dumps(info))
""")


@pytest.mark.slow
def test_inside_a_cluster_it_connects_and_leaves_the_cluster_running(tmp_path, ray_cluster):
    # the tests' shared head (conftest.py), whose stop (port closed, no process left) is checked when it stops
    head = ray_cluster
    run = subprocess.run([sys.executable, "-c", INSIDE, str(tmp_path / "ray.log")], cwd=ROOT,
                         env=head.driver_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["started_here"] is False and info["address"] == head.gcs_address
    assert info["resources"]["CPU"] == SHARED_CPUS
    assert head.process.poll() is None and port_open("127.0.0.1", head.gcs_port)  # left alone

    # The same cluster without its token: a clear cluster error, not a hang
    env = head.driver_env(RAY_AUTH_TOKEN="not-the-token")
    run = subprocess.run([sys.executable, "-c", INSIDE, str(tmp_path / "ray2.log")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "cluster error: could not connect to the Ray cluster" in run.stderr, run.stderr[-3000:]


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses the given processes listen on (TCP), from `ss -ltnp`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()
            if any(f"pid={pid}," in line for pid in pids)}


@pytest.mark.slow
def test_a_local_cluster_listens_on_loopback_only(tmp_path, monkeypatch):
    """GCS, raylet, workers, the dashboard agent and Prometheus metrics: none on 0.0.0.0 or the node's address."""
    import psutil
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    me = psutil.Process()
    # not the processes this test session started before (the shared ray_cluster head, a Label Studio server)
    earlier = {p.pid for p in me.children(recursive=True)}
    with ray_session(num_cpus=1, num_gpus=0, log_file=tmp_path / "ray.log") as info:
        assert info["address"].startswith("127.0.0.1:")
        ray.get(ray.remote(lambda: 1).remote())  # a worker process too
        pids = ({p.pid for p in me.children(recursive=True)} - earlier) | {me.pid}
        addresses = listening_addresses(pids)
    assert addresses and addresses <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}, addresses
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # put back after the session


def test_path_puts_the_environment_first_once():
    from cluster.session import path_with_environment_first

    assert path_with_environment_first("/usr/bin:/bin", "/v/bin") == "/v/bin:/usr/bin:/bin"
    assert path_with_environment_first("/usr/bin:/v/bin:/bin", "/v/bin") == "/v/bin:/usr/bin:/bin"
    assert path_with_environment_first("", "/v/bin") == "/v/bin"
