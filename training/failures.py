"""A run that cannot go on (failures exhausted, the Ray cluster gone) as a ClusterError the user can act on.

Ray surfaces these as its own exceptions (ray.train.WorkerGroupError holding each failed rank's exception, a
ControllerError, ActorDiedError / ActorUnavailableError, RaySystemError), whose text is a traceback. The user gets
what failed (rank, node, the worker's own last error line), the last complete checkpoint, the command that goes on
from it and the log file; the traceback goes to the log file only.
"""
from __future__ import annotations

import logging
import re
import shlex
import sys
import traceback
from pathlib import Path

from core.errors import ClusterError, RaydpoError

# Ray writes a worker's node and process three ways: "(pid=4242, ip=10.0.0.7)" in task errors, "node_ip='10.0.0.7'"
# and "pid=4242" in Ray Train's worker info, "\tip: 10.0.0.7" and "\tpid: 4242" in ActorDiedError's text
NODE = re.compile(r"(?:\bnode_ip|\bip)(?:=|: )'?([0-9a-fA-F.:]*[0-9a-fA-F])")
PID = re.compile(r"\bpid(?:=|: )(\d+)")
# lines of a traceback or of Ray's wrapping, never the worker's own error line
NOISE = re.compile(r"^(Traceback |  File |    |\s*\^+\s*$|The above exception|During handling|ray\.\S+Error: |"
                   r"\S*RayTaskError|\(\w+ pid=)")


def last_error_line(text: str) -> str:
    """The worker's own error, e.g. "ValueError: zip() argument 2 is longer than argument 1": the last line of the
    text that is not part of a traceback or of Ray's wrapping around it."""
    lines = [x.rstrip() for x in str(text).splitlines() if x.strip()]
    own = [x for x in lines if not NOISE.match(x)]
    return ((own or lines or [""])[-1]).strip()[:300]


def failed_workers(err: BaseException) -> list[dict]:
    """{"rank", "node", "pid", "error"} for each failed worker Ray names (WorkerGroupError.worker_failures); one
    entry without a rank for anything else (a controller or cluster failure)."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return [_described(f, rank) for rank, f in sorted(failures.items(), key=lambda kv: str(kv[0]))]
    inner = getattr(err, "controller_failure", None)
    return [_described(inner if inner is not None else err, None)]


def _described(err: BaseException, rank) -> dict:
    text = f"{err}\n{type(err).__name__}: {err}" if not str(err).strip() else str(err)
    node, pid = NODE.search(text), PID.search(text)
    return {"rank": rank, "node": node.group(1) if node else None, "pid": pid.group(1) if pid else None,
            "error": last_error_line(text) or type(err).__name__}


def ray_log_file() -> str | None:
    """Where Ray's log records go in this process (cluster/session.py puts a FileHandler on the "ray" logger)."""
    for handler in logging.getLogger("ray").handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def rerun_command(argv: list[str] | None = None) -> str:
    """The command this process was started with, when it was raydpo's: running it again resumes."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "raydpo" and len(argv) > 1:
        return shlex.join(["raydpo", *argv[1:]])
    return "the same `raydpo train ...` command"


def cluster_error(err: BaseException, *, latest_checkpoint: tuple[str, dict] | None, log_file: str | None,
                  command: str, max_failures: int | None = None) -> ClusterError:
    """The ClusterError for a run Ray could not keep going; the traceback itself to the log (stderr is the log
    file inside launcher/console.py's user_console)."""
    traceback.print_exception(err, file=sys.stderr)
    problems = [f"rank {w['rank']}" + (f" on node {w['node']}" if w["node"] else "") +
                (f" (pid {w['pid']})" if w["pid"] else "") + f": {w['error']}" if w["rank"] is not None else
                ("the cluster" + (f" (node {w['node']})" if w["node"] else "") + f": {w['error']}")
                for w in failed_workers(err)]
    tried = f" after max_failures={max_failures} restart(s)" if max_failures is not None else ""
    if latest_checkpoint:
        uri, state = latest_checkpoint
        resume = f"{command} (goes on from {uri}, step {state['step']})"
        fix = f"fix the cause in the log, then resume: {resume}"
    else:
        fix = f"no complete checkpoint was written yet: fix the cause in the log, then run {command} again"
    log_text = f"; the full traceback is in {log_file}" if log_file else ""
    return ClusterError(f"training stopped: {type(err).__name__}{tried}", problems=problems,
                        why=f"Ray could not keep the run going{log_text}", fix=fix)


def node_wait_error(timeout, *, latest_checkpoint: tuple[str, dict] | None, command: str) -> ClusterError:
    """The ClusterError for a worker group that could not start again within node_wait_timeout_s
    (training/node_wait.py NodeWaitTimeout): which node went, how long the run waited, where it goes on from."""
    from training.node_wait import describe_nodes

    lost = describe_nodes(timeout.lost)
    problems = ([f"lost {lost}"] if lost else []) + [
        f"{timeout.workers} worker(s) could not be placed for {timeout.waited_s:.0f} s "
        f"(training_config.node_wait_timeout_s={timeout.limit_s:g})"]
    if latest_checkpoint:
        uri, state = latest_checkpoint
        fix = (f"bring the node back or add one, then run {command} (goes on from {uri}, step {state['step']}); "
               f"with fewer nodes, pass --replicas to match them: the checkpoint is resharded")
    else:
        fix = f"no complete checkpoint was written yet: bring the node back or add one, then run {command} again"
    return ClusterError("training stopped: a lost node did not come back", problems=problems,
                        why="raydpo runs a fixed worker count, and the cluster no longer has room for it", fix=fix)


def _node_wait_timeout(err: BaseException):
    from training.node_wait import NodeWaitTimeout

    for candidate in (err, getattr(err, "controller_failure", None), err.__cause__):
        if isinstance(candidate, NodeWaitTimeout):
            return candidate
    return None


def user_error(err: BaseException, *, ray_train_uri: str, max_failures: int | None = None) -> RaydpoError:
    """The error to raise for what trainer.fit raised: raydpo's own as is, anything else as a ClusterError."""
    if isinstance(err, RaydpoError):
        return err
    try:
        from training import checkpoint as ckpt

        latest = ckpt.latest_complete(ray_train_uri)
    except Exception:  # noqa: BLE001 - the storage may be what failed; the error must still come out
        latest = None
    timeout = _node_wait_timeout(err)
    if timeout is not None:
        traceback.print_exception(err, file=sys.stderr)  # to the log file, as cluster_error does
        return node_wait_error(timeout, latest_checkpoint=latest, command=rerun_command())
    return cluster_error(err, latest_checkpoint=latest, log_file=ray_log_file(), command=rerun_command(),
                         max_failures=max_failures)
