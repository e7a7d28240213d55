"""A warm local Ray cluster for iterating on a recipe: `raydpo up` starts it, `raydpo train` runs on it, `raydpo down`
stops it.

Without it every `raydpo train` starts a local cluster and stops it after the run. With it a run connects to the
running head (RAY_ADDRESS, as for any cluster: cluster/session.py) and skips the cluster's start and stop. The head
is `ray start --head --block` in a process of its own: `raydpo down` sends that process SIGTERM, which makes Ray
stop exactly the processes it started (never `ray stop`, which kills every Ray process on the machine), then kills
by pid whatever still names the head's temp dir. It listens on 127.0.0.1 only, on free ports, without a dashboard,
with token authentication and a token of its own; the state file (mode 0600) keeps the pid, address and token.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.session import path_with_environment_first
from core.errors import ClusterError

STATE_ENV = "RAYDPO_WARM_STATE"  # where the state file lives; default ~/.cache/raydpo/warm-cluster.json
START_TIMEOUT_S = 90


def state_path(env=os.environ) -> Path:
    return Path(env.get(STATE_ENV) or Path.home() / ".cache" / "raydpo" / "warm-cluster.json")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def head_command(ray_bin: str, ports: list[int], num_cpus: int, num_gpus: int | None, temp_dir: str) -> list[str]:
    """`ray start --head` for a warm cluster: GCS, client server, dashboard agent, metrics and runtime-env agent on
    the given ports (never Ray's fixed defaults, which a second cluster on the machine would clash with), no
    dashboard (a run needs none and it costs start-up time and memory)."""
    gcs, client, agent, metrics, runtime_env = ports
    command = [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=false",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    return command


# What `raydpo up` exports and `raydpo down` unsets. The loopback switch (cluster/session.py RAY_CLUSTER_SWITCH):
# the head's node is 127.0.0.1, and a driver on this machine must take 127.0.0.1 as its own address too, or it waits
# for a raylet at the machine's other address that never comes.
EXPORTED = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def exports(state: dict) -> str:
    """Shell lines that point `raydpo train` at the warm cluster (for `eval "$(raydpo up)"`)."""
    values = (state["address"], "token", state["token"], "0")
    return "".join(f"export {key}={value}\n" for key, value in zip(EXPORTED, values))


def read_state(path: Path) -> dict | None:
    """The warm cluster's state if its head process still runs, else None (a stale file is removed)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _alive(state.get("pid")) and _port_open(state["address"]):
        return state
    path.unlink(missing_ok=True)
    return None


def up(num_cpus: int, num_gpus: int | None, path: Path) -> tuple[dict, bool]:
    """(state, started): the running warm cluster, or a new one started and waited for."""
    state = read_state(path)
    if state is not None:
        return state, False
    temp_dir = tempfile.mkdtemp(prefix="raydpo-warm-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    ports = free_ports(5)
    token = secrets.token_hex(16)
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    # loopback only (cluster/session.py RAY_CLUSTER_SWITCH) and token authentication with this cluster's token
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            # the workers find this environment's tools first (cluster/session.py environment_first_on_path)
            "PATH": path_with_environment_first(env.get("PATH", ""), str(Path(sys.executable).parent))}
    log = Path(temp_dir) / "head.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(head_command(ray_bin, ports, num_cpus, num_gpus, temp_dir), stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state = {"pid": process.pid, "address": f"127.0.0.1:{ports[0]}", "token": token, "temp_dir": temp_dir,
             "num_cpus": num_cpus, "log": str(log)}
    deadline = time.time() + START_TIMEOUT_S
    while not _port_open(state["address"]):
        if process.poll() is not None or time.time() > deadline:
            _stop(state)
            raise ClusterError("the warm Ray cluster did not start", why=log.read_text()[-2000:].strip(),
                               fix="see the log above; `raydpo train` without `raydpo up` starts a cluster per run")
        time.sleep(0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(state, f)
    return state, True


def down(path: Path) -> dict | None:
    """Stops the warm cluster; returns its state, None when none was running."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    _stop(state)
    path.unlink(missing_ok=True)
    return state


def _stop(state: dict) -> None:
    import psutil

    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 30
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(state["temp_dir"] in part for part in proc.info["cmdline"] or []):
                leftovers.append(proc)
                proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaps it when this process started it
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
