"""A run Ray cannot keep going ends in a ClusterError (exit 3) naming rank, node, the worker's own error line, the
last complete checkpoint, the command that resumes and the log; the traceback goes to the log only."""
from __future__ import annotations

import io
import os
import re
import signal
import sys

import pytest

from core.errors import ClusterError, ConfigError
from training import failures

RAY_TEXT = ("ray::RayTrainWorker.run_train_fn() (pid=4242, ip=10.0.0.7, actor_id=abc, repr=<RayTrainWorker>)\n"
            "  File \"/app/training/loop.py\", line 190, in train_loop\n"
            "    engine.step()\n"
            "    ^^^^^^^^^^^^^\n"
            "ValueError: zip() argument 2 is longer than argument 1")


class WorkerGroupError(Exception):  # ray.train.WorkerGroupError's shape: a message and each rank's exception
    def __init__(self, message, worker_failures):
        super().__init__(message)
        self.worker_failures = worker_failures


def test_the_workers_own_line_is_found_under_rays_wrapping():
    assert failures.last_error_line(RAY_TEXT) == "ValueError: zip() argument 2 is longer than argument 1"
    assert failures.last_error_line("ActorDiedError: The actor died unexpectedly before finishing this task.") \
        == "ActorDiedError: The actor died unexpectedly before finishing this task."


def test_failed_workers_name_rank_node_and_pid():
    err = WorkerGroupError("Training failed due to worker errors:\n[Rank 1]\n" + RAY_TEXT,
                           {1: RuntimeError(RAY_TEXT)})
    assert failures.failed_workers(err) == [{"rank": 1, "node": "10.0.0.7", "pid": "4242",
                                             "error": "ValueError: zip() argument 2 is longer than argument 1"}]
    assert failures.failed_workers(ConnectionError("GCS unreachable"))[0] == {
        "rank": None, "node": None, "pid": None, "error": "GCS unreachable"}


# What Ray Train 2.60 holds for a worker process that was killed (worker_group.py's health check: the worker's
# repr, then ActorDiedError's text): the node and pid in two other spellings than a task error's "ip=", "pid="
KILLED_TEXT = ("A worker health check failed.\nWorker info: Worker(\n  actor=Actor(RayTrainWorker, 3f2a),\n"
               "  metadata=ActorMetadata(\n    hostname='box',\n    node_id='8d1c',\n    node_ip='127.0.0.1',\n"
               "    pid=5151,\n  ),\n  distributed_context=None,\n  log_file_path=None,\n)\n"
               "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
               "\tactor_id: 3f2a\n\tpid: 5151\n\tnamespace: ns\n\tip: 127.0.0.1\n"
               "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
               "detail: Worker unexpectedly exits with a connection error code 2. End of file.")


def test_a_killed_workers_node_pid_and_reason_are_found_in_ray_trains_text():
    err = WorkerGroupError("Training failed due to worker errors", {1: RuntimeError(KILLED_TEXT)})
    (found,) = failures.failed_workers(err)
    assert (found["rank"], found["node"], found["pid"]) == (1, "127.0.0.1", "5151")
    assert found["error"].startswith("The actor is dead because its worker process has died.")
    actor_died = "The actor died unexpectedly.\n\tpid: 77\n\tip: 10.1.2.3\nThe actor is dead: node lost."
    assert failures.failed_workers(ConnectionError(actor_died))[0] == {
        "rank": None, "node": "10.1.2.3", "pid": "77", "error": "The actor is dead: node lost."}


def test_the_cluster_error_says_what_failed_where_to_resume_and_where_the_log_is(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)  # stderr is the log file while a run is on (launcher/console.py)
    try:
        raise WorkerGroupError("Training failed", {1: RuntimeError(RAY_TEXT)})
    except WorkerGroupError as raised:
        err = raised
    out = failures.cluster_error(err, latest_checkpoint=("/runs/r/ray_train/checkpoint_2", {"step": 2}),
                                 log_file="/runs/r/logs/ray.log", command="raydpo train r.yaml", max_failures=1)
    assert isinstance(out, ClusterError) and out.exit_code == 3
    text = str(out)
    assert "rank 1 on node 10.0.0.7 (pid 4242): ValueError: zip() argument 2 is longer than argument 1" in text
    assert "resume: raydpo train r.yaml (goes on from /runs/r/ray_train/checkpoint_2, step 2)" in text
    assert "/runs/r/logs/ray.log" in text and "max_failures=1" in text
    assert "Traceback" not in text and "Traceback" in log.getvalue()  # the traceback: in the log only
    none_yet = failures.cluster_error(err, latest_checkpoint=None, log_file=None, command="raydpo train r.yaml")
    assert "no complete checkpoint was written yet" in str(none_yet)


def test_raydpos_own_errors_pass_through_and_the_command_is_the_one_run(tmp_path):
    own = ConfigError("x")
    assert failures.user_error(own, ray_train_uri=str(tmp_path)) is own
    assert failures.rerun_command(["/venv/bin/raydpo", "train", "my recipe.yaml", "--replicas", "2"]) == \
        "raydpo train 'my recipe.yaml' --replicas 2"


@pytest.mark.slow
@pytest.mark.faults
def test_a_run_out_of_restarts_ends_in_a_cluster_error_without_a_traceback(workspace):  # noqa: F811
    from tests.training.test_resume import (EVERY, Run, checkpoint_step, fresh_name, held, trace_lines,
                                            write_recipe)

    output, name = str(workspace / "out"), fresh_name(workspace, "no-restarts")
    log, trace = workspace / f"{name}.log", workspace / f"trace-{name}"
    recipe = write_recipe(workspace, name, output, max_failures=0)
    run = Run(recipe, trace, log, hold_at=3)
    run.wait_for(lambda: held(trace) and checkpoint_step(f"{output}/{name}/ray_train") == EVERY,
                 "a hold after step 3 with the step-2 checkpoint written")
    victim = next(x["pid"] for x in reversed(trace_lines(trace)) if x["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    out = run.finish()
    assert run.proc.returncode == 3, out[-3000:]
    assert "cluster error: training stopped" in out and "max_failures=0" in out
    assert re.search(r"rank 1 on node [\d.]+ \(pid \d+\): \S", out), out[-3000:]  # rank, node, pid, its error
    assert f"{output}/{name}/ray_train/checkpoint_" in out and "step 2)" in out
    assert f"resume: raydpo train {recipe} (goes on from" in out  # the command Run started
    assert f"{output}/{name}/logs/ray.log" in out
    assert "Traceback" not in out
    assert "Traceback" in (workspace / "out" / name / "logs" / "ray.log").read_text()


from tests.training.test_resume import workspace  # noqa: E402,F401 - fixture
