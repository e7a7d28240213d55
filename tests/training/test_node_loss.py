"""A lost node: a Ray cluster of two nodes on this machine (a head and a second `ray start --address` node, one CPU
each, so one training worker on each), the second node's raylet SIGKILLed after step 3 (the step-2 checkpoint
written). raydpo runs a fixed worker count, so the restarted worker group waits for the node's CPU:
- the node comes back (a new `ray start --address`): the run goes on from the step-2 checkpoint and finishes, with
  the losses of an uninterrupted run on the same cluster;
- it does not: after training_config.node_wait_timeout_s the run stops with a ClusterError (exit 3) that names the
  lost node, the last complete checkpoint and the command that goes on.

Nothing here runs `ray stop` (it kills every Ray process on the machine): each node is a `ray start --block`
process of this test with a temp dir of its own; SIGTERM to it stops what it started, and what is left is killed by
pid (tests/cluster/headnode.py). The workers inherit the trace settings (training/checkpoint.py trace_step) from the
raylets, which read them through a link that each run points at its own folder.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.warm import free_ports
from core import storage
from tests.cluster import headnode
from tests.training.test_resume import (BATCH, EVERY, PAIRS, STEPS, checkpoint_step, metrics, sources_by_step,
                                        trace_lines, train_losses, write_recipe)
from training import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.faults]

RAYDPO = str(Path(sys.executable).parent / "raydpo")
WAIT_S = 900  # one run on a busy 2-core machine
HOLD_AT = 3
NO_RETURN_WAIT_S = 30  # node_wait_timeout_s of the run whose node stays away (the recipe's smallest)


class SecondNode:
    """`ray start --address HEAD --block` with one CPU and a temp dir and ports of its own."""

    def __init__(self, head: headnode.Head, env: dict, log: Path):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rdpo-n2-", dir="/tmp"))
        self.node_id = ""  # known once it has joined
        manager, objects, metrics_port, agent, agent_grpc, runtime_env = free_ports(6)
        command = [str(headnode.BIN / "ray"), "start", f"--address={head.gcs_address}", "--block", "--num-cpus=1",
                   "--num-gpus=0", f"--node-manager-port={manager}", f"--object-manager-port={objects}",
                   f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={agent}",
                   f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"])
                if any(str(self.temp_dir) in part for part in (p.info["cmdline"] or []))]

    def raylet(self) -> psutil.Process:
        return next(p for p in self.processes() if Path(p.info["cmdline"][0]).name == "raylet")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def alive_cpu_nodes(head: headnode.Head) -> list[str]:
    """The node ids Ray lists as alive with a CPU."""
    probe = ("import ray, json; ray.init(address='auto', log_to_driver=False); print('ALIVE ' + json.dumps("
             "[n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0)]))")
    run = subprocess.run([sys.executable, "-c", probe], env=head.driver_env(), capture_output=True, text=True,
                         timeout=120)
    # Ray prints its own lines here too (a lost node's "raylet has lagging heartbeats ..."): only the marked one
    marked = [line for line in run.stdout.splitlines() if line.startswith("ALIVE ")]
    return json.loads(marked[-1].removeprefix("ALIVE ")) if run.returncode == 0 and marked else []


class TwoNodes:
    def __init__(self, root: Path):
        self.root, self.trace_link = root, root / "trace-current"
        self.trace_link.symlink_to(root)  # repointed by each run (use_trace)
        saved = dict(os.environ)
        os.environ.update({ckpt.TRACE_DIR_ENV: str(self.trace_link), ckpt.TRACE_HOLD_ENV: str(HOLD_AT)})
        try:  # the head's processes take the environment it is started with
            self.head = headnode.start_head(num_cpus=1)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.node_env = self.head.client_env(**{ckpt.TRACE_DIR_ENV: str(self.trace_link),
                                                ckpt.TRACE_HOLD_ENV: str(HOLD_AT)})
        self.nodes: list[SecondNode] = []
        self.runs: list[subprocess.Popen] = []  # `raydpo train` processes, ended with the cluster
        self.start_second_node()

    def start_second_node(self) -> SecondNode:
        before = set(alive_cpu_nodes(self.head))
        for attempt in range(3):  # Ray gives a raylet 30 s to register, which a loaded machine can miss
            node = SecondNode(self.head, self.node_env, self.root / "node2.log")
            self.nodes.append(node)
            deadline = time.time() + 120
            while time.time() < deadline and node.process.poll() is None:
                new = set(alive_cpu_nodes(self.head)) - before
                if new:
                    node.node_id = new.pop()
                    return node
                time.sleep(2)
            node.stop()
        raise AssertionError(f"the second node did not join:\n{(self.root / 'node2.log').read_text()[-3000:]}")

    def use_trace(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "trace-link-new"
        tmp.symlink_to(folder)
        tmp.replace(self.trace_link)

    def stop(self) -> None:
        for run in self.runs:  # a test that failed half way leaves its run going
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        for node in self.nodes:
            node.stop()
        headnode.stop_head(self.head)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.tiny import build_tiny_workspace

    return build_tiny_workspace(tmp_path_factory.mktemp("nodeloss"), PAIRS)


@pytest.fixture(scope="module")
def cluster(workspace):
    nodes = TwoNodes(workspace)
    yield nodes
    nodes.stop()


def start_run(cluster: TwoNodes, workspace: Path, name: str, node_wait_s: int, *, hold: bool = True):
    recipe_path = write_recipe(workspace, name, str(workspace / "out"), max_failures=1)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["training_config"]["node_wait_timeout_s"] = node_wait_s
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    trace = workspace / f"trace-{name}"
    cluster.use_trace(trace)
    if not hold:  # the trace hold is once per rank and folder: marked as done
        for rank in (0, 1):
            (trace / f"held_rank{rank}").touch()
    log = workspace / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([RAYDPO, "train", str(recipe_path)], stdout=out, stderr=subprocess.STDOUT,
                                env=cluster.head.driver_env(), cwd=workspace, start_new_session=True)
    cluster.runs.append(proc)
    return proc, log, trace


def wait_for(proc, log: Path, condition, what: str) -> None:
    deadline = time.time() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} after {WAIT_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def finish(proc, log: Path) -> str:
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"raydpo train did not finish in {WAIT_S} s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def kill_second_nodes_raylet_after_step_3(cluster, workspace, proc, log, trace, name) -> tuple[int, int, float]:
    """Waits for the hold after step 3 (the step-2 checkpoint written, step 3 reported), finds the rank that runs
    on the second node (Ray Train numbers the workers itself), SIGKILLs that node's raylet; returns the rank, its
    pid and when."""
    ray_train = f"{workspace / 'out'}/{name}/ray_train"
    wait_for(proc, log, lambda: all((trace / f"held_rank{r}").exists() for r in (0, 1))
             and checkpoint_step(ray_train) == 2 and f"step {HOLD_AT}/{STEPS} |" in log.read_text(),
             "a hold after step 3 with the step-2 checkpoint written and step 3 reported")
    node = cluster.nodes[-1]
    raylet = node.raylet()
    pids = {x["rank"]: x["pid"] for x in trace_lines(trace)}
    on_node = {p.pid for p in raylet.children(recursive=True)}
    ranks = [rank for rank, pid in pids.items() if pid in on_node]
    assert len(ranks) == 1, (pids, on_node)  # one worker on each node
    raylet.kill()
    return ranks[0], pids[ranks[0]], time.time()


@pytest.fixture(scope="module")
def reference(cluster, workspace):
    proc, log, trace = start_run(cluster, workspace, "reference", 300, hold=False)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    rows = metrics(f"{workspace / 'out'}/reference")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))
    return {"losses": train_losses(rows), "sources": sources_by_step(trace_lines(trace))}


def test_a_lost_node_that_comes_back_the_run_waits_and_goes_on_from_the_last_checkpoint(cluster, workspace,
                                                                                        reference):
    name = "node-back"
    proc, log, trace = start_run(cluster, workspace, name, 300)
    rank, victim, killed_at = kill_second_nodes_raylet_after_step_3(cluster, workspace, proc, log, trace, name)
    # the worker group failed (rank 1 gone) and its restart waits for a second CPU: bring the node back
    wait_for(proc, log, lambda: "worker failure 1" in log.read_text(), "the worker failure")
    failed_at = time.time()
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    cluster.start_second_node()
    back_at = time.time()
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]

    run_uri = f"{workspace / 'out'}/{name}"
    summary = json.loads(storage.read_bytes(f"{run_uri}/summary.json"))
    assert summary["steps"] == summary["planned_steps"] == STEPS and summary["worker_failures"] == 1
    assert summary["restarts"] == [{"last_reported_step": 3, "resumed_from_step": 2, "reported_steps_redone": 1}]
    lines = trace_lines(trace)
    lost_rank = [(x["step"], x["pid"]) for x in lines if x["rank"] == rank]
    assert [s for s, p in lost_rank if p == victim] == [1, 2, 3]
    assert [s for s, p in lost_rank if p != victim] == list(range(3, STEPS + 1))  # redone from step 3
    rows = metrics(run_uri)
    losses = train_losses(rows)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sources_by_step(lines) == reference["sources"]  # the same pairs in each step on each rank
    worst = max(abs(losses[s] - v) / abs(v) for s, v in reference["losses"].items())
    assert worst < 1e-4
    lost = 3 - 2  # trained step 3 again: the last checkpoint was step 2
    print(f"failure-record: second node's raylet SIGKILLed after step 3, node started again | survived: "
          f"{summary['steps']}/{STEPS} steps on 2 workers | went on from the step-2 checkpoint | steps lost: {lost} "
          f"| worst relative loss difference {worst:.1e} | worker failure seen {failed_at - killed_at:.0f} s after "
          f"the kill, node back {back_at - killed_at:.0f} s after it")


def test_a_lost_node_that_stays_away_ends_the_run_after_node_wait_timeout_with_a_cluster_error(cluster, workspace):
    node = cluster.nodes[-1]  # a node killed by an earlier test may still be listed alive for a few seconds
    if node.process.poll() is not None or node.node_id not in alive_cpu_nodes(cluster.head):
        cluster.start_second_node()
    name = "node-gone"
    proc, log, trace = start_run(cluster, workspace, name, NO_RETURN_WAIT_S)
    lost_id = cluster.nodes[-1].node_id
    rank, _, killed_at = kill_second_nodes_raylet_after_step_3(cluster, workspace, proc, log, trace, name)
    out = finish(proc, log)
    ended_at = time.time()
    assert proc.returncode == 3, out[-4000:]  # ClusterError
    assert "cluster error: training stopped: a lost node did not come back" in out
    assert f"(id {lost_id[:12]}, rank(s) {rank})" in out  # the second node, by its Ray node id (both share one IP)
    assert f"(training_config.node_wait_timeout_s={NO_RETURN_WAIT_S})" in out
    assert f"{workspace / 'out'}/{name}/ray_train/checkpoint_" in out and "step 2)" in out
    assert f"raydpo train {workspace / name}.yaml" in out
    assert "Traceback" not in out
    print(f"failure-record: second node's raylet SIGKILLed after step 3, node not started again, "
          f"node_wait_timeout_s={NO_RETURN_WAIT_S} | not survived: cluster error (exit 3) naming the lost node, the "
          f"step-2 checkpoint and the command, {ended_at - killed_at:.0f} s after the kill | steps lost: -")
