"""The Ray cluster a command runs on: the one it is inside of, or a local one started for the run and always stopped.

Inside a cluster means RAY_ADDRESS is set, or the process is a Ray job's entrypoint (Ray's job supervisor sets
RAY_ADDRESS and RAY_JOB_CONFIG_JSON_ENV_VAR for it). Such a cluster is used and left alone. Otherwise
`ray_session` starts a local cluster with `ray.init(address="local")` (never a plain `ray.init()`, which would
attach to any `ray start` cluster on the machine) and shuts it down on every way out: normal end, exception,
Ctrl-C, SIGTERM. Token authentication stays as Ray sets it by default (on in Ray 2.60) unless RAY_AUTH_MODE says
otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator, Mapping

from core.errors import ClusterError

JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint
# Ray's own switch for a node nobody else reaches (ray_constants.ENABLE_RAY_CLUSTER, meant for macOS/Windows): off,
# the node's address is 127.0.0.1 and GCS, raylet, workers, the dashboard agent and the Prometheus metrics export
# all listen on loopback only (checked with `ss -ltnp`: without it they listen on 0.0.0.0 / the node's IP).
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LISTEN_ENV = "RAYDPO_LOCAL_RAY_LISTEN"  # "all": a local cluster other machines may reach (Ray's default binding)
PROBE_TIMEOUT_S = 3.0


def cluster_address_from_env(env: Mapping[str, str]) -> str | None:
    """The address to connect to when running inside a cluster, None when raydpo should start its own."""
    address = env.get("RAY_ADDRESS", "").strip()
    if address:
        return address
    if JOB_ENV_VAR in env:
        return "auto"
    return None


def split_host_port(address: str) -> tuple[str, int] | None:
    """("host", port) of a GCS or Ray client address, None for "auto"; ClusterError for what Ray cannot use."""
    if address == "auto":
        return None
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address, not a cluster address",
            why="ray.init connects to the cluster's GCS (host:6379 by default), not to the dashboard",
            fix=f"submit the run as a job instead: `ray job submit --address {address} --working-dir . -- raydpo "
                "train RECIPE`, or set RAY_ADDRESS to the head's GCS address (host:port)")
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ClusterError(f"RAY_ADDRESS={address} is not an address Ray can connect to",
                           fix="set RAY_ADDRESS to host:port of the head node (what `ray start --head` printed), "
                               "or unset it to run on a local cluster")
    return host.strip("[]"), int(port)


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast when nothing listens at the address: ray.init would retry for minutes."""
    target = split_host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as err:
        raise ClusterError(
            f"no Ray cluster reachable at {address}",
            why=f"connecting to {target[0]}:{target[1]} failed: {err}",
            fix="start the head node (`ray start --head --port=PORT`) or check the address and the network path "
                "to it; unset RAY_ADDRESS to run on a local cluster instead") from None


def check_resources(required: Mapping[str, float], available: Mapping[str, float]) -> None:
    """ClusterError naming each resource the cluster lacks, with how much is asked and how much there is."""
    problems = []
    for name, amount in sorted(required.items()):
        have = available.get(name, 0)
        if amount > have:
            problems.append(f"{name}: the run asks for {_amount(name, amount)}, the cluster has "
                            f"{_amount(name, have)} (short by {_amount(name, amount - have)})")
    if problems:
        raise ClusterError(
            "the cluster does not have the resources the recipe asks for", problems=problems,
            why="Ray Train waits forever for resources that no node provides",
            fix="lower --replicas, or run on a cluster with more nodes (cluster/*.yaml worker count, the KubeRay "
                "worker group) or with GPUs if GPU is short")


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / 2**30:.1f} GiB"
    return f"{value:g}"


# Ray Train's controller, for runs raydpo launches (a user's own setting of either wins): it polls its workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and only then hands their reports on, so each progress line, the
# end of the run and a worker failure reached the driver up to 2 s late; a poll is one small call per worker. A
# cluster started here is one node that nothing preempts, and the preemption watcher Ray Train starts for it is one
# more process starting beside the training worker (2 cores here).
RAY_TRAIN_POLL_S = "0.5"


def ray_train_env(started_here: bool, env: Mapping[str, str]) -> dict[str, str]:
    """The Ray Train variables to set in this process before the run (the controller takes them from the driver's
    environment): what is not already in env."""
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": RAY_TRAIN_POLL_S}
    if started_here:
        wanted["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {name: value for name, value in wanted.items() if name not in env}


@contextlib.contextmanager
def ray_train_environment(started_here: bool) -> Iterator[None]:
    """ray_train_env set in this process for the run (the controller fit() starts reads them), taken back after."""
    added = ray_train_env(started_here, os.environ)
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def local_cpus(replicas: int, data_cpus: int, cores: int) -> int:
    """CPUs of a local cluster started for a run: one per training worker plus data_cpus for the data pipeline, or
    every usable core where the machine has more. replicas + data_cpus alone, on an 8-GPU node with 96 cores, is 10:
    the 8 workers' reservations leave 2 CPUs to the reference stage's actors and Ray Data's tasks, which then queue
    while the other cores idle. More than the cores on a small machine: the workers mostly wait on each other."""
    return max(replicas + data_cpus, cores)


@contextlib.contextmanager
def ray_session(*, num_cpus: int | None, num_gpus: int | None, log_file: Path,
                log_to_driver: bool = False) -> Iterator[dict]:
    """Yields {"started_here", "address", "resources"}; stops the cluster at exit only if it started it here.

    Ray's own log lines go to `log_file`, not the console. log_to_driver: also forward the workers' stdout and
    stderr to this process (off by default: the run's progress reaches the driver through Ray Train, and the
    workers' output stays in Ray's session logs).
    """
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) already holds a session: use it, leave it
        yield {"started_here": False, "address": ray.get_runtime_context().gcs_address,
               "resources": ray.cluster_resources()}
        return
    address = cluster_address_from_env(os.environ)
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with _ray_logs_to(log_file) as handler:
        if address is not None:
            probe(address)
            try:
                ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
                logging.getLogger("ray").addHandler(handler)
            except (ConnectionError, RuntimeError) as err:
                raise ClusterError(f"could not connect to the Ray cluster at {address}", why=str(err).strip(),
                                   fix="check that the cluster is up (`ray status --address ADDRESS`) and, with "
                                       "token authentication, that RAY_AUTH_MODE=token and the cluster's token "
                                       "(RAY_AUTH_TOKEN or ~/.ray/auth_token) are set here") from None
            try:
                yield {"started_here": False, "address": address, "resources": ray.cluster_resources()}
            finally:
                ray.shutdown()  # disconnects this driver only; the cluster keeps running
            return
        try:
            with _sigterm_restored(), loopback_only(os.environ.get(LISTEN_ENV, "") != "all"), \
                    environment_first_on_path():
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                         log_to_driver=log_to_driver, configure_logging=False)
                logging.getLogger("ray").addHandler(handler)
                yield {"started_here": True, "address": ray.get_runtime_context().gcs_address,
                       "resources": ray.cluster_resources()}
        finally:
            ray.shutdown()  # stops the local cluster's processes


def path_with_environment_first(path: str, bin_dir: str) -> str:
    """PATH with this Python environment's bin folder first, as `source .venv/bin/activate` leaves it."""
    parts = [p for p in path.split(os.pathsep) if p and p != bin_dir]
    return os.pathsep.join([bin_dir, *parts])


@contextlib.contextmanager
def environment_first_on_path() -> Iterator[None]:
    """The processes a local cluster starts find this environment's tools first. DeepSpeed compiles its CPU
    shared-memory op with the `ninja` on PATH, and two ninja versions (the virtual environment's 1.13 and the
    system's 1.11 here) read each other's build log as stale: a run started without the environment activated,
    after one with it, rebuilt the op (30-60 s of a small run's start-up)."""
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = path_with_environment_first(saved, str(Path(sys.executable).parent))
    try:
        yield
    finally:
        os.environ["PATH"] = saved


@contextlib.contextmanager
def loopback_only(on: bool = True) -> Iterator[None]:
    """A local cluster started inside listens on 127.0.0.1 only: the switch in the environment for the processes
    Ray starts, and in ray_constants for this one (read when ray was imported, maybe before this)."""
    if not on:
        yield
        return
    from ray._private import ray_constants

    saved_env, saved_constant = os.environ.get(RAY_CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[RAY_CLUSTER_SWITCH] = saved_env


@contextlib.contextmanager
def _ray_logs_to(log_file: Path) -> Iterator[logging.Handler]:
    """Ray's log records go to log_file. `ray.init(configure_logging=False)` clears the "ray" logger's handlers
    (and that logger does not propagate), so the file handler also sits on "ray._private", where ray.init's own
    lines come from, and the caller puts it back on "ray" once ray.init has returned."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger("ray"), logging.getLogger("ray._private")]
    saved = [(lg.propagate, lg.level, list(lg.handlers)) for lg in loggers]
    loggers[0].propagate = False
    loggers[1].propagate = False
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, (propagate, level, handlers) in zip(loggers, saved):
            lg.propagate, lg.level, lg.handlers = propagate, level, handlers
        handler.close()


@contextlib.contextmanager
def _sigterm_restored() -> Iterator[None]:
    """ray.init turns SIGTERM into SystemExit (so the `finally` that stops Ray runs on `kill` too) and leaves
    that handler behind after ray.shutdown: put back what was there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
