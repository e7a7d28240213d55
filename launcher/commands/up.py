"""`raydpo up [--num-cpus N] [--num-gpus G]`: a warm local Ray cluster that `raydpo train` runs on.

    eval "$(raydpo up)"      # starts it (or finds the running one) and sets RAY_ADDRESS and its token here
    raydpo train RECIPE      # connects to it: no cluster start or stop per run
    eval "$(raydpo down)"    # stops it and unsets the variables

The exports go to stdout, what happened to stderr. cluster/warm.py says how the cluster is started and stopped.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-cpus", type=int, metavar="N",
                        help="logical CPUs of the cluster (default: the usable cores, at least 4: two training "
                             "replicas and the two CPUs `raydpo train` keeps for Ray Data)")
    parser.add_argument("--num-gpus", type=int, metavar="G", help="GPUs (default: the ones Ray finds)")


def run(args: argparse.Namespace) -> int:
    from cluster import warm
    from cluster.session import local_cpus
    from core.devices import usable_cores
    from launcher.commands.train import DATA_CPUS

    num_cpus = args.num_cpus or local_cpus(2, DATA_CPUS, usable_cores())
    state, started = warm.up(num_cpus, args.num_gpus, warm.state_path())
    print(warm.exports(state), end="")
    what = "started" if started else "already running"
    print(f"warm Ray cluster {what} at {state['address']} ({state['num_cpus']} CPUs, log {state['log']}); runs "
          "in a shell with the variables above use it; `eval \"$(raydpo down)\"` stops it", file=sys.stderr)
    return 0
