"""Two Ray nodes on two "hosts" (network namespaces, tests/cluster/netns.py), a 2-worker Ray Train job with the
placement raydpo picks, and the workers' own reports of where they ran.

`ray.cluster_utils.Cluster` cannot show this: its raylets share one IP, so Ray gives them one node rank. Here each
raylet has its own address, so node ranks, local ranks and the gloo all-reduce across "hosts" are real.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster import netns
from tests.cluster.headnode import BIN, ROOT_OF_REPO

PORT = 6390  # each namespace has its own ports: no clash with the machine's or other tests' clusters

TRAIN = textwrap.dedent("""
    import json, socket, sys
    import ray, ray.train, torch
    import torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from cluster.placement import placement_for

    address, node_ip, storage, interface, report = sys.argv[1:6]
    # GLOO_SOCKET_IFNAME: gloo's own pick (the hostname's address) is not inside the namespaces; RAY_ADDRESS:
    # Ray Train's helper actors look for "the" cluster, and other clusters on this machine are visible to them.
    ray.init(address=address, _node_ip_address=node_ip,
             runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": interface, "RAY_ADDRESS": address}})
    nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    strategy, workers, per_worker = placement_for(2, 0, nodes)

    def loop(config):
        ctx = ray.train.get_context()
        value = torch.tensor([float(ctx.get_world_rank() + 1)])
        dist.all_reduce(value)  # gloo, across the two namespaces
        me = {"world_rank": ctx.get_world_rank(), "node_rank": ctx.get_node_rank(),
              "local_rank": ctx.get_local_rank(), "ip": ray.util.get_node_ip_address(),
              "hostname": socket.gethostname(), "all_reduce": value.item()}
        everyone = [None] * ctx.get_world_size()
        dist.all_gather_object(everyone, me)
        if ctx.get_world_rank() == 0:  # the hosts share this machine's files: rank 0 writes what all reported
            with open(config["report"], "w") as f:
                json.dump(everyone, f)
        ray.train.report({"done": 1})

    trainer = TorchTrainer(loop, train_loop_config={"report": report}, scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                                              placement_strategy=strategy,
                                                              resources_per_worker=per_worker),
                           run_config=RunConfig(storage_path=storage, name="netns"))
    trainer.fit()
    with open(report) as f:
        workers = json.load(f)
    print("RESULT " + json.dumps({"strategy": strategy, "nodes": nodes, "workers": workers}))
""")


def start_node(hosts, index: int, temp_dir: Path, env: dict, log: Path) -> subprocess.Popen:
    address = hosts.addresses[index]
    common = ["--block", f"--node-ip-address={address}", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats"]
    if index == 0:
        args = ["--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    else:
        args = [f"--address={hosts.addresses[0]}:{PORT}"]
    with open(log, "ab") as out:
        return subprocess.Popen([*netns.exec_prefix(hosts, index), str(BIN / "ray"), "start", *args, *common],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_nodes(hosts, env, processes, restart, count: int, timeout_s: float = 300) -> None:
    """Until `count` nodes are alive. A node whose `ray start` gave up is started again (up to twice): Ray gives a
    raylet 30 s to register, which an overloaded machine can miss; that is the machine, not what is tested."""
    probe = (f"import ray; ray.init(address='{hosts.addresses[0]}:{PORT}', _node_ip_address='{hosts.addresses[0]}');"
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline, restarts = time.time() + timeout_s, 0
    while time.time() < deadline:
        for i, process in enumerate(processes):
            if process.poll() is not None and restarts < 2:
                restarts += 1
                processes[i] = restart(i)
        run = subprocess.run([*netns.exec_prefix(hosts, 0), sys.executable, "-c", probe], env=env,
                             capture_output=True, text=True, timeout=120)
        if run.returncode == 0 and run.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(3)
    raise AssertionError(f"{count} nodes did not join in {timeout_s} s")


def stop(processes, temp_dir: Path) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any(str(temp_dir) in part for part in (p.info["cmdline"] or []))]
    for proc in leftovers:
        proc.kill()


@pytest.mark.slow
def test_two_replicas_spread_one_worker_per_host(tmp_path):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"multi-host test: {reason}")
    hosts = netns.make_hosts()
    temp_dir = Path(tempfile.mkdtemp(prefix="rdpo-ns-", dir="/tmp"))
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT_OF_REPO)}
    processes = []
    try:
        def restart(i):
            return start_node(hosts, i, temp_dir, env, tmp_path / f"node{i}.log")

        processes.append(restart(0))
        time.sleep(5)
        processes.append(restart(1))
        wait_for_nodes(hosts, env, processes, restart, 2)
        run = subprocess.run([*netns.exec_prefix(hosts, 0), sys.executable, "-c", TRAIN,
                              f"{hosts.addresses[0]}:{PORT}", hosts.addresses[0], str(tmp_path / "results"),
                              netns.INTERFACE, str(tmp_path / "workers.json")], cwd=ROOT_OF_REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        result = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("RESULT ")).split(" ", 1)[1])
    finally:
        stop(processes, temp_dir)
        netns.remove(hosts)
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert result["nodes"] == 2 and result["strategy"] == "SPREAD"
    workers = sorted(result["workers"], key=lambda w: w["node_rank"])
    # from what each worker reported: one per host, two node ranks, each the only worker on its node
    assert {w["ip"] for w in workers} == set(hosts.addresses)  # two different hosts, one worker each
    assert [w["node_rank"] for w in workers] == [0, 1]
    assert [w["local_rank"] for w in workers] == [0, 0]
    assert sorted(w["world_rank"] for w in workers) == [0, 1]
    assert [w["all_reduce"] for w in workers] == [3.0, 3.0]  # 1 + 2 summed over both hosts
    # and nothing of it is left: namespaces gone, no process of these nodes alive
    listed = subprocess.run([netns.ip_tool(), "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in hosts.names)
    assert all(p.poll() is not None for p in processes)
