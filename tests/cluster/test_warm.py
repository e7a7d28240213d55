"""`raydpo up` / `raydpo down` (cluster/warm.py): a warm local cluster that runs use, stopped by its own processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster import warm

ROOT = Path(__file__).resolve().parents[2]
RAYDPO = str(Path(sys.executable).parent / "raydpo")


def test_head_command_uses_the_given_ports_and_no_dashboard():
    command = warm.head_command("/v/bin/ray", [1001, 1002, 1003, 1004, 1005], 4, None, "/tmp/w")
    assert command[:4] == ["/v/bin/ray", "start", "--head", "--block"]
    assert "--port=1001" in command and "--ray-client-server-port=1002" in command
    assert "--dashboard-agent-listen-port=1003" in command and "--metrics-export-port=1004" in command
    assert "--runtime-env-agent-port=1005" in command and "--include-dashboard=false" in command
    assert "--num-cpus=4" in command and "--temp-dir=/tmp/w" in command
    assert not any(part.startswith("--num-gpus") for part in command)  # Ray finds the GPUs
    assert "--num-gpus=0" in warm.head_command("ray", [1, 2, 3, 4, 5], 2, 0, "/t")


def test_exports_set_the_address_and_token():
    text = warm.exports({"address": "127.0.0.1:5000", "token": "abc"})
    assert text.splitlines() == ["export RAY_ADDRESS=127.0.0.1:5000", "export RAY_AUTH_MODE=token",
                                 "export RAY_AUTH_TOKEN=abc", "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"]


def test_a_stale_state_file_is_no_cluster_and_is_removed(tmp_path):
    path = tmp_path / "warm.json"
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "address": "127.0.0.1:1", "token": "t", "temp_dir": "/nowhere"}))
    assert warm.read_state(path) is None and not path.exists()
    assert warm.read_state(tmp_path / "missing.json") is None
    assert warm.down(tmp_path / "missing.json") is None


def test_state_path_from_the_environment(tmp_path):
    assert warm.state_path({warm.STATE_ENV: str(tmp_path / "s.json")}) == tmp_path / "s.json"
    assert warm.state_path({}).name == "warm-cluster.json"


INSIDE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from cluster.session import ray_session
    with ray_session(num_cpus=None, num_gpus=None, log_file=Path(sys.argv[1])) as info:
        print(json.dumps(info))
""")


@pytest.mark.slow
def test_up_gives_a_cluster_that_runs_join_and_down_stops_it(tmp_path):
    from tests.cluster.headnode import port_open

    env = {k: v for k, v in os.environ.items() if k not in warm.EXPORTED}
    env[warm.STATE_ENV] = str(tmp_path / "warm.json")
    up = subprocess.run([RAYDPO, "up", "--num-cpus", "2"], env=env, capture_output=True, text=True, timeout=180)
    state = json.loads((tmp_path / "warm.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        assert "warm Ray cluster started" in up.stderr
        assert oct((tmp_path / "warm.json").stat().st_mode & 0o777) == "0o600"  # it holds the token
        exported = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
        assert exported["RAY_ADDRESS"] == state["address"] and exported["RAY_ADDRESS"].startswith("127.0.0.1:")
        again = subprocess.run([RAYDPO, "up"], env=env, capture_output=True, text=True, timeout=60)
        assert "already running" in again.stderr and again.stdout == up.stdout  # one warm cluster, the same exports
        for attempt in range(2):  # two runs, one after the other, on the same cluster
            run = subprocess.run([sys.executable, "-c", INSIDE, str(tmp_path / f"ray{attempt}.log")], cwd=ROOT,
                                 env=env | exported, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr[-3000:]
            info = json.loads(run.stdout.strip().splitlines()[-1])
            assert info["started_here"] is False and info["address"] == state["address"]
            assert info["resources"]["CPU"] == 2.0
        host, port = state["address"].rsplit(":", 1)
        assert port_open(host, int(port))
    finally:
        down = subprocess.run([RAYDPO, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stderr
    assert down.stdout.strip() == "unset RAY_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    assert not port_open(host, int(port)) and not (tmp_path / "warm.json").exists()
    assert not Path(state["temp_dir"]).exists()
    import psutil

    assert not [p.pid for p in psutil.process_iter(["cmdline"])
                if any(state["temp_dir"] in part for part in p.info["cmdline"] or [])], "a Ray process was left"
