"""How long a run waits for its workers' resources: at the start, and after a node was lost.

raydpo asks Ray Train for a fixed worker count (the run plan's split, training/plan.py). When a node dies, its
workers fail the worker group (one of max_failures) and Ray Train restarts the group at the same size: the placement
group waits for the lost node's resources, gives up after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S and, by default,
tries again forever (FailureConfig.controller_failure_limit is -1). A run on a cluster that does not get its node
back would wait forever, holding the surviving nodes.

NodeWait runs in Ray Train's controller: each attempt to start the group is given only what is left of
training_config.node_wait_timeout_s since the group last ran (the controller reads the start timeout from its
environment each time it makes a group), and once nothing is left it raises NodeWaitTimeout naming the nodes the
last group lost. The driver turns that into a ClusterError with the last complete checkpoint and the command that
goes on (training/failures.py).
"""
from __future__ import annotations

import os
import time

import ray
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback


def wait_left(waiting_since: float | None, now: float, limit_s: float) -> float:
    """Seconds a worker group may still wait for resources: all of limit_s when nothing is waiting yet."""
    if waiting_since is None:
        return float(limit_s)
    return max(0.0, limit_s - (now - waiting_since))


class NodeWaitTimeout(Exception):
    """The worker group could not start again within node_wait_timeout_s. lost: {"ip", "node_id", "ranks"} for each
    node of the last running group that Ray no longer lists as alive."""

    def __init__(self, waited_s: float, limit_s: float, workers: int, lost: list[dict]):
        self.waited_s, self.limit_s, self.workers, self.lost = waited_s, limit_s, workers, lost
        super().__init__(f"{workers} worker(s) could not start within node_wait_timeout_s={limit_s:g} "
                         f"(waited {waited_s:.0f} s); lost: {describe_nodes(lost) or 'no node'}")

    def __reduce__(self):  # it crosses from the controller actor to the driver
        return (self.__class__, (self.waited_s, self.limit_s, self.workers, self.lost))


def describe_nodes(lost: list[dict]) -> str:
    return ", ".join(f"node {n['ip']} (id {n['node_id'][:12]}, rank(s) {', '.join(map(str, n['ranks']))})"
                     for n in lost)


def lost_nodes(group_nodes: dict[str, dict], alive_ids: set[str]) -> list[dict]:
    """The last group's nodes ({node_id: {"ip", "ranks"}}) that are not alive any more."""
    return [{"node_id": node_id, **info} for node_id, info in sorted(group_nodes.items())
            if node_id not in alive_ids]


class NodeWait(ControllerCallback, WorkerGroupCallback):
    def __init__(self, limit_s: float):
        self.limit_s = float(limit_s)
        self.waiting_since: float | None = None
        self.group_nodes: dict[str, dict] = {}  # the last group that started: node id -> ip and ranks

    def on_controller_start_worker_group(self, *, scaling_config, num_workers: int):
        now = time.monotonic()
        self.waiting_since = now if self.waiting_since is None else self.waiting_since
        left = wait_left(self.waiting_since, now, self.limit_s)
        if left <= 0:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            raise NodeWaitTimeout(now - self.waiting_since, self.limit_s, num_workers,
                                  lost_nodes(self.group_nodes, alive))
        # read by the WorkerGroup made right after this hook (worker_group.py), in this process: the controller's
        os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = f"{left:.1f}"
        return None

    def after_worker_group_start(self, worker_group):
        self.waiting_since = None  # running again: the next loss gets the whole wait
        self.group_nodes = {}
        for worker in worker_group.get_workers():
            entry = self.group_nodes.setdefault(worker.metadata.node_id, {"ip": worker.metadata.node_ip,
                                                                          "ranks": []})
            entry["ranks"].append(worker.distributed_context.world_rank)
