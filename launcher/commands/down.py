"""`raydpo down`: stops the warm cluster `raydpo up` started (its own processes only) and prints the `unset` line
for the variables `raydpo up` exported: `eval "$(raydpo down)"`."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from cluster import warm

    state = warm.down(warm.state_path())
    print("unset " + " ".join(warm.EXPORTED))
    print(f"warm Ray cluster at {state['address']} stopped" if state else "no warm Ray cluster was running",
          file=sys.stderr)
    return 0
