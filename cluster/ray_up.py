"""Ray's cluster launcher around one job: `ray up`, submit, stream the logs, fetch files, `ray down`.

The cluster YAML is Ray's own format (cluster/*.yaml); raydpo only sets its worker count from --replicas and checks
it before anything starts. The job goes through the head's dashboard, reached over the SSH tunnel that
`ray dashboard CLUSTER.yaml` opens, with the working directory uploaded as the job's runtime_env, the way Ray's
docs submit to launcher clusters. `ray down` runs in a `finally`: after success, failure, or Ctrl-C, unless the
caller asks to keep the cluster.

Token authentication: nodes start with RAY_AUTH_MODE=token and get the client's token through the YAML's
file_mounts ("~/.ray/auth_token"); `ensure_local_token` makes that token before `ray up`.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import yaml

from core.errors import ClusterError, ConfigError

TOKEN_MOUNT = "~/.ray/auth_token"
PROGRESS = re.compile(r"^step \d+/\d+ \|")  # the line `raydpo train` prints at each logged step
DEFAULT_DASHBOARD_PORT = 8265
Say = Callable[[str], None]


# ---- the YAML: read, check, scale (pure but for reading the file) ----


def load_cluster_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClusterError(f"cluster YAML {path} not found",
                           fix="pass --cluster with one of cluster/*.yaml, or a Ray cluster launcher YAML of your "
                               "own") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ClusterError(f"{where}: the cluster YAML is not valid YAML",
                           why=str(getattr(err, "problem", err)), fix="fix the YAML there") from None
    if not isinstance(config, dict):
        raise ClusterError(f"{path}: a cluster YAML is a mapping (cluster_name:, provider:, ...)",
                           fix="start from cluster/launcher_aws_gpu.yaml or cluster/local.yaml")
    return config


def config_problems(config: dict) -> list[str]:
    """What would make `ray up` fail or the run misbehave, found before anything starts."""
    problems = []
    for key in ("cluster_name", "provider"):
        if key not in config:
            problems.append(f"{key}: missing")
    name = str(config.get("cluster_name", ""))
    if name and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"cluster_name: {name!r} must be lowercase letters, digits and '-' (it names cloud "
                        "resources)")
    provider = config.get("provider") or {}
    if not isinstance(provider, dict) or "type" not in provider:
        problems.append("provider.type: missing (aws, gcp, azure, local, ...)")
        return problems
    if provider["type"] == "local":
        if "head_ip" not in provider or not isinstance(provider.get("worker_ips"), list):
            problems.append("provider: a local provider needs head_ip and a list worker_ips")
        return problems
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        problems.append("available_node_types: missing; list a head node type and one worker node type")
        return problems
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type: {head!r} is not one of available_node_types {sorted(types)}")
    workers = [t for t in types if t != head]
    if len(workers) != 1:
        problems.append(f"available_node_types: raydpo scales exactly one worker node type, found {len(workers)} "
                        f"({', '.join(workers) or 'none'}); keep one")
    for name_, node_type in types.items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers")
        if hi is not None and lo > hi:
            problems.append(f"available_node_types.{name_}: min_workers {lo} > max_workers {hi}")
    return problems


def ray_schema_problems(config: dict) -> list[str]:
    """The checks `ray up` itself makes (defaults merged, then Ray's JSON schema), run here without side effects."""
    # Ray's private helpers are the only implementation of these checks; a failure to import them skips them.
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return []
    quiet = logging.getLogger("ray.autoscaler")  # prepare_config narrates its defaults at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # noqa: BLE001 - jsonschema, ValueError, click's abort: all mean "bad YAML"
        message = getattr(err, "message", None) or str(err) or type(err).__name__
        path = "/".join(str(p) for p in getattr(err, "absolute_path", []) or [])
        return [f"{path + ': ' if path else ''}{message}".strip()]
    finally:
        quiet.setLevel(level)
    return []


def check_cluster_config(config: dict, label: str) -> None:
    problems = config_problems(config)
    if not problems:
        problems = ray_schema_problems(config)
    if problems:
        raise ClusterError(f"{label}: {len(problems)} problem(s) in the cluster YAML", problems=problems,
                           fix="fix each key listed; cluster/launcher_aws_gpu.yaml and cluster/local.yaml are "
                               "commented examples, and `ray up` documents the format")


def worker_node_type(config: dict) -> str:
    head = config["head_node_type"]
    (worker,) = [t for t in config["available_node_types"] if t != head]
    return worker


def with_replicas(config: dict, replicas: int) -> dict:
    """The config with exactly `replicas` worker nodes (min = max), everything else as written."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    out = yaml.safe_load(yaml.safe_dump(config))  # deep copy that stays plain YAML data
    if out["provider"]["type"] == "local":
        ips = out["provider"]["worker_ips"]
        if len(ips) < replicas:
            raise ClusterError(f"--replicas {replicas} needs {replicas} worker nodes, the local provider lists "
                               f"{len(ips)} worker_ips", fix=f"add worker_ips or pass --replicas {len(ips)} or less")
        out["min_workers"] = out["max_workers"] = replicas
        return out
    node_type = out["available_node_types"][worker_node_type(out)]
    node_type["min_workers"] = node_type["max_workers"] = replicas
    out["max_workers"] = max(int(out.get("max_workers", 0)), replicas)
    return out


def dashboard_port(config: dict) -> int:
    """The head's dashboard port, from --dashboard-port in head_start_ray_commands (Ray's default otherwise)."""
    for command in config.get("head_start_ray_commands") or []:
        found = re.search(r"--dashboard-port[= ](\d+)", str(command))
        if found:
            return int(found.group(1))
    return DEFAULT_DASHBOARD_PORT


def is_progress_line(line: str) -> bool:
    return bool(PROGRESS.match(line))


def job_entrypoint(command: Iterable[str]) -> str:
    return shlex.join(list(command))


# ---- running it ----


def ensure_local_token(config: dict, env: dict) -> None:
    """When the YAML mounts the client's auth token onto the nodes, make sure that token exists here."""
    mounts = config.get("file_mounts") or {}
    source = mounts.get(TOKEN_MOUNT)
    if source is None:
        return
    path = Path(os.path.expanduser(source)) if source.startswith("~") else Path(source)
    if path.is_file() and path.read_text().strip():
        return
    if env.get("RAY_AUTH_TOKEN"):
        write_private(path, env["RAY_AUTH_TOKEN"])
        return
    ray_cli(["get-auth-token", "--generate"], env, capture=True)  # writes ~/.ray/auth_token
    if path.is_file():
        path.chmod(0o600)


def write_private(path: Path, text: str) -> None:
    """Writes a secret into a file only its owner can read, from its first byte: created 0600 (write-then-chmod
    leaves it readable to everyone for a moment), and an existing file narrowed before it is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (`timeout`, a CI job cancelled, `kill`) handled as Ctrl-C is: the job stopped and `ray down` run, so
    that no cloud nodes are left running. A second SIGTERM while the cluster goes down is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ray_cli(args: list[str], env: dict, *, log: Path | None = None, capture: bool = False,
            timeout: float | None = None) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "ray"), *args]
    if log is not None:
        with open(log, "ab") as out:
            out.write(f"\n$ {shlex.join(command)}\n".encode())
            out.flush()
            return subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
    return subprocess.run(command, env=env, capture_output=capture, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def tail(path: Path, lines: int = 12) -> list[str]:
    """The launcher output's error lines (Ray's ERR/PANIC/Error...), else its last lines, colour codes removed."""
    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
    except OSError:
        return []
    all_lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in all_lines if re.search(r"\b(ERR|PANIC|Error|error:|failed)\b", line)]
    return (errors or all_lines)[-lines:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_new_cluster(config: dict, **kwargs) -> dict:
    """_run_on_new_cluster with SIGTERM treated as Ctrl-C (sigterm_as_interrupt): the cluster still goes down."""
    with sigterm_as_interrupt():
        return _run_on_new_cluster(config, **kwargs)


def _run_on_new_cluster(config: dict, *, entrypoint: str, working_dir: Path, workdir_env: dict | None = None,
                        replicas: int, keep_cluster: bool, log_dir: Path, say: Say,
                        fetch: dict[str, Path] | None = None, nodes_timeout_s: float = 900,
                        up_attempts: int = 2) -> dict:
    """Up, wait for the worker nodes, submit, stream, fetch, down. Returns {"job_id", "status", "message"}.

    config: the cluster YAML already scaled by with_replicas and checked. fetch: remote path -> local path, copied
    with `ray rsync-down` before the cluster goes down (after success and after failure). Raises ClusterError
    when the cluster cannot come up or the job fails; KeyboardInterrupt stops the job first. The cluster goes
    down in every case unless keep_cluster.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    if config["provider"]["type"] == "local":
        # Ray 2.60's autoscaler v2 counts the local provider's head towards the worker type's min_workers (they
        # share one node type there), so it starts one worker node too few; v1 starts them all.
        env.setdefault("RAY_UP_enable_autoscaler_v2", "0")
    log = log_dir / "launcher.log"
    name = config["cluster_name"]
    ensure_local_token(config, env)
    tunnel = None
    try:
        say(f"cluster {name}: `ray up` ({replicas} worker node(s)); launcher output in {log}")
        for attempt in range(1, up_attempts + 1):
            # `ray up` picks up where a failed run stopped: a node that was slow to start (Ray gives a raylet
            # 30 s to register, which a busy machine can miss) gets a second chance.
            up = ray_cli(["up", "-y", "--no-config-cache", str(config_path)], env, log=log)
            if up.returncode == 0:
                break
            if attempt < up_attempts:
                say(f"`ray up` failed (exit {up.returncode}); trying once more")
        if up.returncode != 0:
            raise ClusterError(f"`ray up` failed for cluster {name} (exit {up.returncode})", problems=tail(log),
                               why=f"the full launcher output is in {log}",
                               fix="fix what the output names (credentials, quotas, SSH access, the YAML), then "
                                   "run again; the cluster is brought down now")
        local_port = free_port()
        tunnel = open_dashboard_tunnel(config_path, local_port, dashboard_port(config), env, log)
        client = job_client(f"http://127.0.0.1:{local_port}", env)
        wait_for_nodes(f"http://127.0.0.1:{local_port}", replicas + 1, nodes_timeout_s, say, env)
        runtime_env = {"working_dir": str(working_dir), "env_vars": dict(workdir_env or {})}
        job_id = submit_job(client, entrypoint, runtime_env)
        say(f"job {job_id} submitted: {entrypoint}")
        try:
            stream_logs(client, job_id, say)
            status = wait_for_end(client, job_id)
        except KeyboardInterrupt:
            say(f"interrupted: stopping job {job_id}")
            client.stop_job(job_id)
            raise
        info = client.get_job_info(job_id)
        for remote, local in (fetch or {}).items():
            Path(local).parent.mkdir(parents=True, exist_ok=True)
            ray_cli(["rsync-down", str(config_path), remote, str(local)], env, log=log)
        result = {"job_id": job_id, "status": str(status.value if hasattr(status, "value") else status),
                  "message": info.message or ""}
        if result["status"] != "SUCCEEDED":
            raise ClusterError(f"job {job_id} {result['status'].lower()} on the cluster",
                               why=result["message"] or "see the job's log above",
                               fix="read the log above; rerun with --keep-cluster to look around on the head "
                                   f"(`ray attach {config_path}`), then `ray down {config_path}`")
        return result
    finally:
        if tunnel is not None:
            tunnel.terminate()
            try:
                tunnel.wait(timeout=10)
            except subprocess.TimeoutExpired:
                tunnel.kill()
        if keep_cluster:
            say(f"cluster {name} kept (--keep-cluster): bring it down with `ray down -y {config_path}`")
        else:
            bring_down(config_path, name, env, log, say)


def bring_down(config_path: Path, name: str, env: dict, log: Path, say: Say) -> None:
    say(f"cluster {name}: `ray down`")
    try:
        down = ray_cli(["down", "-y", str(config_path)], env, log=log, timeout=600)
        ok = down.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        say(f"warning: `ray down` failed; nodes may still be running and costing money. Run `ray down -y "
            f"{config_path}` yourself (launcher output in {log})")
        return
    output = log.read_text(errors="replace")[-20000:]
    if re.search(r"Head node of cluster \(.*\) not found", output):
        # After a failed `ray up`, `ray down` skips `ray stop` on the head: on machines that outlive the cluster
        # (the local provider) Ray may still run there.
        say("warning: `ray down` found no healthy head and did not run `ray stop` on it; on a machine you keep "
            "(local provider), run `ray stop` there")
    say("cluster down")


def open_dashboard_tunnel(config_path: Path, local_port: int, remote_port: int, env: dict, log: Path,
                          timeout_s: float = 120) -> subprocess.Popen:
    """`ray dashboard` keeps an SSH port forward open to the head's dashboard while it runs."""
    with open(log, "ab") as out:
        tunnel = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "dashboard", str(config_path),
                                   "--port", str(local_port), "--remote-port", str(remote_port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if tunnel.poll() is not None:
            raise ClusterError("the SSH tunnel to the head's dashboard closed", problems=tail(log),
                               fix="check SSH access to the head (auth: in the YAML)")
        try:
            with socket.create_connection(("127.0.0.1", local_port), timeout=1):
                return tunnel
        except OSError:
            time.sleep(1)
    tunnel.kill()
    raise ClusterError(f"no tunnel to the head's dashboard after {timeout_s:.0f} s", problems=tail(log),
                       fix="check SSH access to the head and that its dashboard runs (--dashboard-port)")


def auth_headers(env: dict) -> dict:
    """The Authorization header for the cluster's token: given explicitly, because Ray's clients read RAY_AUTH_MODE
    once per process, and this process may have touched Ray before the mode was set."""
    if env.get("RAY_AUTH_MODE", "token").lower() == "disabled":
        return {}
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        home = Path(env.get("HOME") or Path.home())
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or home / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(url: str, env: dict, timeout_s: float = 120):
    """A JobSubmissionClient once the dashboard answers (it starts a few seconds after `ray up` returns)."""
    from ray.job_submission import JobSubmissionClient

    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            return JobSubmissionClient(url, headers=auth_headers(env))
        except Exception as err:  # noqa: BLE001 - ConnectionError, HTTP errors while the dashboard starts
            last = err
            time.sleep(2)
    raise ClusterError(f"the head's dashboard at {url} did not answer", why=str(last),
                       fix="check the head's dashboard (`ray exec CLUSTER.yaml 'ray status'`) and the auth token "
                           "(RAY_AUTH_MODE=token, ~/.ray/auth_token here and on the head)")


def wait_for_nodes(url: str, count: int, timeout_s: float, say: Say, env: dict) -> None:
    """Worker nodes join after `ray up` returns (the head's autoscaler starts them): wait for all of them."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    headers = {"Content-Type": "application/json", **auth_headers(env)}
    deadline, alive, said = time.time() + timeout_s, 0, -1
    while time.time() < deadline:
        try:
            nodes = StateApiClient(address=url, headers=headers).list(
                StateResource.NODES, options=ListApiOptions(), raise_on_missing_output=False)
            alive = sum(1 for n in nodes if n.state == "ALIVE")
        except Exception:  # noqa: BLE001 - the state API answers errors while the head starts
            alive = 0
        if alive != said:
            say(f"nodes up: {alive}/{count}")
            said = alive
        if alive >= count:
            return
        time.sleep(3)
    raise ClusterError(f"only {alive} of {count} nodes joined the cluster in {timeout_s:.0f} s",
                       why="the head's autoscaler could not start every worker node",
                       fix="look at the autoscaler's log on the head (`ray exec CLUSTER.yaml 'tail -n 100 "
                           "/tmp/ray/session_latest/logs/monitor.*'`); check the provider's quotas")


def submit_job(client, entrypoint: str, runtime_env: dict, timeout_s: float = 180) -> str:
    """submit_job, again while the head's job agent is still starting (Ray answers "try again later")."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(5)


def stream_logs(client, job_id: str, say: Say) -> None:
    """Prints the job's log as it comes; progress lines overwrite each other on a terminal."""
    on_tty = sys.stdout.isatty()

    async def follow():
        last_was_progress = False
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                if on_tty and is_progress_line(line):
                    sys.stdout.write("\r\033[K" + line)
                    sys.stdout.flush()
                    last_was_progress = True
                    continue
                if last_was_progress:
                    sys.stdout.write("\n")
                    last_was_progress = False
                say(line)
        if last_was_progress:
            sys.stdout.write("\n")

    asyncio.run(follow())


def wait_for_end(client, job_id: str, timeout_s: float = 60):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) or time.time() > deadline:
            return status
        time.sleep(1)
