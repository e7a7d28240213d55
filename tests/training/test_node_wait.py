"""A worker group that cannot start again (a lost node) waits training_config.node_wait_timeout_s, then the run ends
with a ClusterError naming the lost node, the last complete checkpoint and the command that goes on."""
from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import pytest

from core.errors import ClusterError
from training import failures, node_wait
from training.node_wait import NodeWait, NodeWaitTimeout, lost_nodes, wait_left

START_TIMEOUT = node_wait.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR


def test_the_wait_left_is_the_limit_less_the_time_waited_since_the_group_last_ran():
    assert wait_left(None, now=500.0, limit_s=60) == 60.0  # nothing waiting yet: all of it
    assert wait_left(100.0, now=145.0, limit_s=60) == 15.0  # 45 s waited of 60
    assert wait_left(100.0, now=190.0, limit_s=60) == 0.0  # past it: nothing, never negative


def test_lost_nodes_are_the_last_groups_nodes_ray_no_longer_lists_as_alive():
    group = {"aaa": {"ip": "10.0.0.1", "ranks": [0]}, "bbb": {"ip": "10.0.0.2", "ranks": [1, 2]}}
    assert lost_nodes(group, alive_ids={"aaa", "ccc"}) == [{"node_id": "bbb", "ip": "10.0.0.2", "ranks": [1, 2]}]
    assert lost_nodes(group, alive_ids={"aaa", "bbb"}) == []


def fake_group(nodes):
    workers = [SimpleNamespace(metadata=SimpleNamespace(node_id=node_id, node_ip=ip),
                               distributed_context=SimpleNamespace(world_rank=rank))
               for rank, (node_id, ip) in enumerate(nodes)]
    return SimpleNamespace(get_workers=lambda: workers)


def test_each_start_gets_what_is_left_and_the_run_stops_once_nothing_is(monkeypatch):
    monkeypatch.delenv(START_TIMEOUT, raising=False)
    monkeypatch.setattr(node_wait.ray, "nodes", lambda: [{"NodeID": "head0", "Alive": True},
                                                         {"NodeID": "node1", "Alive": False}])
    wait = NodeWait(60)
    assert wait.on_controller_start_worker_group(scaling_config=None, num_workers=2) is None
    assert float(os.environ[START_TIMEOUT]) == pytest.approx(60, abs=0.5)  # the first start: all of it
    wait.after_worker_group_start(fake_group([("head0", "10.0.0.1"), ("node1", "10.0.0.2")]))
    assert wait.waiting_since is None

    wait.on_controller_start_worker_group(scaling_config=None, num_workers=2)  # node1 lost: the restart waits
    wait.waiting_since -= 45  # 45 s of waiting gone by
    wait.on_controller_start_worker_group(scaling_config=None, num_workers=2)
    assert float(os.environ[START_TIMEOUT]) == pytest.approx(15, abs=0.5)
    wait.waiting_since -= 20
    with pytest.raises(NodeWaitTimeout) as raised:
        wait.on_controller_start_worker_group(scaling_config=None, num_workers=2)
    assert raised.value.lost == [{"node_id": "node1", "ip": "10.0.0.2", "ranks": [1]}]
    assert raised.value.waited_s >= 65 and raised.value.workers == 2
    # it crosses from Ray Train's controller actor to the driver
    again = pickle.loads(pickle.dumps(raised.value))
    assert (again.lost, again.limit_s, str(again)) == (raised.value.lost, 60.0, str(raised.value))


class ControllerError(Exception):  # ray.train.ControllerError's shape: the controller's own exception inside
    def __init__(self, controller_failure):
        super().__init__(f"Training failed due to controller error:\n{controller_failure}")
        self.controller_failure = controller_failure


def test_the_timeout_becomes_a_cluster_error_naming_the_node_the_checkpoint_and_the_command(monkeypatch, capsys):
    timeout = NodeWaitTimeout(61.2, 60, 2, [{"node_id": "f00dfeed" * 7, "ip": "10.0.0.2", "ranks": [1]}])
    monkeypatch.setattr("training.checkpoint.latest_complete",
                        lambda uri: (f"{uri}/checkpoint_2", {"step": 2}))
    monkeypatch.setattr("sys.argv", ["/venv/bin/raydpo", "train", "run.yaml"])
    err = failures.user_error(ControllerError(timeout), ray_train_uri="/out/r/ray_train", max_failures=1)
    assert isinstance(err, ClusterError) and err.exit_code == 3
    text = str(err)
    assert "a lost node did not come back" in text
    assert "lost node 10.0.0.2 (id f00dfeedf00d, rank(s) 1)" in text
    assert "could not be placed for 61 s (training_config.node_wait_timeout_s=60)" in text
    assert "raydpo train run.yaml (goes on from /out/r/ray_train/checkpoint_2, step 2)" in text
    assert "Traceback" not in text
    monkeypatch.setattr("training.checkpoint.latest_complete", lambda uri: None)
    assert "no complete checkpoint was written yet" in str(
        failures.user_error(ControllerError(timeout), ray_train_uri="/out/r/ray_train"))
