"""Where Ray Train puts a run's workers, and how many there are: one pure function, decided once by the launcher
and carried to the trainer's ScalingConfig in the run plan (training/plan.py).

A replica is a node (Nova's meaning): on GPU nodes it brings one worker per GPU, on CPU nodes one worker.

- One worker per replica on a cluster of several nodes (CPU replicas, or nodes with one GPU): SPREAD, so that
  each replica's worker lands on its own node, as a replica is a node.
- Several workers per replica (nodes with several GPUs): PACK, so that a node's GPUs fill before the next node's
  (Ray packs bundles onto as few nodes as possible, which puts exactly gpus_per_node workers on each node).
- A single node (a laptop, a local cluster): PACK, there is nowhere to spread to.

Both strategies are soft in Ray: a cluster with fewer nodes than replicas still runs, with workers sharing nodes.
"""
from __future__ import annotations

from typing import NamedTuple

from core.errors import ConfigError

STRATEGIES = ("PACK", "SPREAD")


class Placement(NamedTuple):
    strategy: str       # PACK or SPREAD (Ray's placement group strategy)
    workers: int        # Ray Train workers: the one worker count of a run (training/plan.py RunPlan.workers)
    per_worker: dict    # resources each worker takes: {"GPU": 1} or {"CPU": 1}

    @property
    def use_gpu(self) -> bool:
        return "GPU" in self.per_worker


def placement_for(replicas: int, gpus_per_node: int, nodes_known: int) -> Placement:
    """(placement strategy, Ray Train worker count, resources per worker) for `replicas` replicas.

    gpus_per_node: GPUs each replica node brings (0 on CPU). nodes_known: nodes in the cluster that can hold a
    worker (1 for a local cluster).
    """
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}", fix="pass --replicas 1 or more")
    if gpus_per_node < 0 or nodes_known < 1:
        raise ValueError(f"gpus_per_node={gpus_per_node} and nodes_known={nodes_known} must be >= 0 and >= 1")
    if gpus_per_node > 0:
        workers, per_worker = replicas * gpus_per_node, {"GPU": 1}
        one_worker_per_node = gpus_per_node == 1
    else:
        workers, per_worker = replicas, {"CPU": 1}
        one_worker_per_node = True
    spread = one_worker_per_node and nodes_known > 1 and replicas > 1
    return Placement("SPREAD" if spread else "PACK", workers, per_worker)
