"""A `ray start --head` cluster of the tests' own, stopped by its own processes only.

`ray stop` kills every Ray process on the machine (it matches process names, whatever --temp-dir says), and this
machine is shared, so a head is started with `--block` in its own process: SIGTERM to that process makes Ray stop
exactly the processes it started. Anything still alive afterwards whose command line names this head's temp dir is
killed by pid. Every port is chosen free (never Ray's defaults 6379/8265/10001/52365), token authentication is on
with a token of its own (RAY_AUTH_TOKEN), so ~/.ray/auth_token is never touched.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cluster.warm import free_ports  # one finder of free loopback ports, shared with `raydpo up`

BIN = Path(sys.executable).parent
# Logical CPUs of the head that tests share (conftest.py ray_cluster): 2 training replicas + the 2 CPUs `raydpo
# train` keeps for Ray Data (launcher/commands/train.py DATA_CPUS), what a local cluster for 2 replicas gets here.
SHARED_CPUS = 4
ROOT_OF_REPO = Path(__file__).resolve().parents[2]




def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict  # what a client needs: RAY_AUTH_MODE and RAY_AUTH_TOKEN
    log: Path
    extra_pids: list = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict:
        env = user_env()
        env.update(self.env, **extra)
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        return env

    def driver_env(self, **extra: str) -> dict:
        """A `raydpo train` (or any driver) subprocess's environment: RAY_ADDRESS and the token set, so it runs on
        this head instead of starting a local cluster."""
        return self.client_env(RAY_ADDRESS=self.gcs_address, PYTHONUNBUFFERED="1", **extra)

    def processes(self) -> list[psutil.Process]:
        """Live processes whose command line names this head's temp dir (raylet, GCS, dashboard, workers)."""
        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp_dir) in part for part in proc.info["cmdline"] or []):
                    mine.append(proc)
            except psutil.Error:
                pass
        return mine


# What an in-process DeepSpeed test may leave in os.environ, and what points a process at another cluster: a user's
# shell has none of them, and a head started with them would hand them to every worker.
NOT_INHERITED = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def user_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}


def start_head(num_cpus: int = 2, extra_env: dict | None = None) -> Head:
    """extra_env: variables for the head's processes (so its workers) and every driver_env()."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rdpo-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    gcs, dashboard, client, agent, metrics, runtime_env = free_ports(6)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), **(extra_env or {})}
    log = temp_dir / "head.log"
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
               "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    base = user_env()
    base["PATH"] = f"{BIN}:{base.get('PATH', '')}"  # as after `source .venv/bin/activate`: jobs find this python
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**base, **env},
                                   start_new_session=True)
    head = Head(process, temp_dir, gcs, dashboard, env, log)
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            stop_head(head)
            raise RuntimeError(f"ray start --head exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if port_open("127.0.0.1", dashboard) and port_open("127.0.0.1", gcs):
            return head
        time.sleep(0.5)
    stop_head(head)
    raise RuntimeError(f"the head did not come up in 90 s:\n{log.read_text()[-3000:]}")


STOP_GRACE_S = 8


def stop_head(head: Head) -> list[int]:
    """Stops this head only; returns the pids that had to be killed after `ray start --block` went."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            # not 30 s: the session's teardown, where the shared head stops after its runs, jobs and Serve apps,
            # took 33 s on 2026-12-06; whatever is still alive after this is killed below anyway
            head.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait()
    leftovers = head.processes()
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return [p.pid for p in leftovers]
