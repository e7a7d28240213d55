"""Time stamps of a run's start-up, for benchmarks/startup.py: where the seconds before step 1 go.

RAYDPO_STARTUP_TRACE=FILE makes the launcher, the driver and the training workers append "<unix time> <pid>
<label>" lines to FILE (the workers of a local cluster inherit the variable); unset, `mark` does nothing. One
line per event, appended whole, so processes writing at once do not interleave within a line.
"""
from __future__ import annotations

import os
import time

ENV = "RAYDPO_STARTUP_TRACE"


def mark(label: str) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as trace:
            trace.write(f"{time.time():.3f} {os.getpid()} {label}\n")


def read_trace(path: str, since: float) -> list[tuple[float, int, str]]:
    """(seconds since `since`, pid, label) per line, in time order."""
    rows = []
    for line in open(path):
        at, pid, label = line.rstrip("\n").split(" ", 2)
        rows.append((float(at) - since, int(pid), label))
    return sorted(rows)


def phases(rows: list[tuple[float, int, str]]) -> list[tuple[str, float]]:
    """(label, seconds since the previous mark) for each mark: the time each phase took to reach it."""
    out, previous = [], 0.0
    for at, _, label in rows:
        out.append((label, at - previous))
        previous = at
    return out
