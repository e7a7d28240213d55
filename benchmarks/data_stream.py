"""Does the data pipeline stream? Peak memory must not grow with the size of the data set.

    python benchmarks/data_stream.py [--small-mb 120] [--ratio 10] [--shard-mb 64] [--store-budget-mb 128]
                                     [--json PATH]

For two sizes, `ratio` apart (default 120 MB and 1.2 GB), this writes a synthetic preference data set (TRL-style
JSONL rows of varied length, sharded into files of about --shard-mb) to a temporary folder, then streams it like a
training run does: read_raw_rows -> map_batches(formats.parse_batch) -> streaming_split into 2 consumer actors that
iterate batches (as Ray Train workers do). A background thread samples the RSS of the driver and of every process
of the Ray session it started (consumer actors, Ray Data worker processes, Ray's own daemons) with psutil. Each size
runs in a fresh Ray session, and the data is deleted afterwards.

Reported per size: rows/s; peak RSS and peak private memory (RSS minus shared pages: the process's own heap) of
the driver, of each consumer actor, of each Ray Data worker process and of the whole process tree; the object
store's peak fill level and what it spilled; then the ratio large/small of each peak.

Target: the larger size raises no process's private memory and not the object store's fill by more than 20%.
Ray Data buffers ahead of the consumers up to its object-store budget (by default half the store: GBs on a real
node), so the benchmark sets a budget (--store-budget-mb, default 128) that both sizes exceed: otherwise the small
run would measure how much of its whole data set fits in the buffer, not the steady state.
Plain RSS is shown too, but it also counts every object-store (shared memory) page a process has touched, and the
store's allocator moves through its arena over a run, so RSS grows with run length even when the store's fill
level does not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MB = 1 << 20
TARGET_RATIO = 1.2
WORDS = ("the model answers each question with care and detail while the user asks about data pipelines memory "
         "streaming gradients tokens preference optimisation reward margin policy reference batch shard worker "
         "cluster storage object bucket prompt chosen rejected answer helpful harmless honest").split()


# ---------------------------------------------------------------- the synthetic data set

def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def row_pool(seed: int, size: int = 2000) -> list[str]:
    """JSON bodies (without the opening brace) of varied length: prompts 20-400 words, answers 10-200."""
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        row = {"prompt": sentence(rng, rng.randint(20, 400)), "chosen": sentence(rng, rng.randint(10, 200)),
               "rejected": sentence(rng, rng.randint(10, 200))}
        pool.append(json.dumps(row)[1:])
    return pool


def write_dataset(folder: Path, total_bytes: int, shard_bytes: int, seed: int = 0) -> tuple[list[str], int]:
    """Writes JSONL shards of about shard_bytes until total_bytes; returns (files, rows). Every row is distinct."""
    pool = row_pool(seed)
    files, rows, written = [], 0, 0
    while written < total_bytes:
        path = folder / f"train-{len(files):05d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            size = 0
            while size < shard_bytes and written + size < total_bytes:
                line = '{"id": %d, %s\n' % (rows, pool[rows % len(pool)])
                out.write(line)
                size += len(line)
                rows += 1
        files.append(str(path))
        written += size
    return files, rows


# ---------------------------------------------------------------- memory of the process tree

class MemorySampler(threading.Thread):
    """Peak RSS (and RSS minus shared pages) of this process and all its descendants, sampled every interval."""

    def __init__(self, interval_s: float = 0.2, store_probe=None):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peaks: dict[int, dict] = {}
        self.tree_peak = 0
        self.store_probe, self.store_peak, self.spilled = store_probe, None, None
        self._done = threading.Event()

    def run(self) -> None:
        root = psutil.Process()
        while not self._done.is_set():
            if self.store_probe is not None:
                used, spilled = self.store_probe()
                self.store_peak, self.spilled = max(self.store_peak or 0, used), spilled
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    info = proc.memory_info()
                    title = " ".join(proc.cmdline())[:100]
                except psutil.Error:
                    continue
                total += info.rss
                peak = self.peaks.setdefault(proc.pid, {"rss": 0, "private": 0, "titles": set()})
                peak["rss"] = max(peak["rss"], info.rss)
                peak["private"] = max(peak["private"], info.rss - info.shared)
                peak["titles"].add(title)
            self.tree_peak = max(self.tree_peak, total)
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()


RAY_AGENTS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def role_of(pid: int, titles: set[str], driver: int, consumers: set[int]) -> str:
    if pid == driver:
        return "driver"
    if pid in consumers:
        return "consumer"
    if any(t.startswith("ray::") and not t.startswith(RAY_AGENTS) for t in titles):
        return "ray_data_worker"  # ran read/parse tasks or Ray Data's split coordinator
    if any("default_worker.py" in t for t in titles):
        return "ray_idle_worker"  # a worker process started but never given a task while sampled
    return "ray_system"  # raylet, gcs_server, dashboard and runtime-env agents, monitors


# ---------------------------------------------------------------- one run

def object_store_probe():
    """(bytes used, bytes spilled so far) of the session's object store, as `ray memory --stats-only` reads them
    (Ray's internal API: there is no public one for the store's fill level); None if this Ray version lacks it."""
    import ray

    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - an optional figure; the RSS figures stand without it
        return None

    def probe() -> tuple[int, int]:
        stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
        return stats.object_store_bytes_used, stats.spilled_bytes_total

    return probe


def start_ray(tries: int = 3) -> None:
    """A fresh local Ray session (never someone else's: address="local"). Ray waits a fixed 30 s for its raylet,
    which a busy machine can miss; that failure leaves nothing behind, so it is simply tried again."""
    import ray

    for attempt in range(1, tries + 1):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:  # noqa: BLE001 - only Ray's startup timeout is retried
            if "timed out during startup" not in str(err) or attempt == tries:
                raise
            ray.shutdown()
            print(f"Ray did not start in time (try {attempt} of {tries}); trying again", flush=True)


def stream(files: list[str], rows: int, store_budget_mb: float) -> dict:
    import ray

    from core.data.formats import parse_batch
    from core.data.source import read_raw_rows

    @ray.remote(num_cpus=0)
    class Consumer:
        def pid(self) -> int:
            return os.getpid()

        def consume(self, shard) -> dict:
            count, bad, first = 0, 0, None
            for batch in shard.iter_batches(batch_size=256, batch_format="pyarrow"):
                first = first or time.time()
                count += batch.num_rows
                bad += batch.num_rows - batch.column("error").null_count
            return {"rows": count, "bad": bad, "first_batch_at": first, "done_at": time.time()}

    sampler = MemorySampler()
    try:
        start_ray()
        sampler.store_probe = object_store_probe()
        options = ray.data.DataContext.get_current().execution_options
        options.resource_limits = (ray.data.ExecutionResources.for_limits(object_store_memory=store_budget_mb * MB)
                                   if store_budget_mb else ray.data.ExecutionResources.for_limits())
        consumers = [Consumer.remote() for _ in range(2)]
        consumer_pids = set(ray.get([c.pid.remote() for c in consumers]))
        sampler.start()
        started = time.perf_counter()
        ds = read_raw_rows(files, shuffle_files=True, seed=0).map_batches(parse_batch)
        shards = ds.streaming_split(2, equal=False)
        results = ray.get([c.consume.remote(s) for c, s in zip(consumers, shards)])
        seconds = time.perf_counter() - started
    finally:
        sampler.stop()
        ray.shutdown()
    consumed = sum(r["rows"] for r in results)
    if consumed != rows or any(r["bad"] for r in results):
        raise SystemExit(f"wrote {rows} rows but the consumers got {consumed} ({sum(r['bad'] for r in results)} bad)")
    processes = [{"pid": pid, "role": role_of(pid, p["titles"], os.getpid(), consumer_pids),
                  "peak_rss_mb": round(p["rss"] / MB, 1), "peak_private_mb": round(p["private"] / MB, 1),
                  "titles": sorted(t.split(" ")[0] if t.startswith("ray::") else t for t in p["titles"]
                                   if t and not t.startswith("ray::IDLE"))[:4]}
                 for pid, p in sampler.peaks.items()]
    # Steady-state throughput: from the first batch any consumer got to the last one (Ray's start-up excluded).
    streaming_s = max(r["done_at"] for r in results) - min(r["first_batch_at"] for r in results)
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "streaming_rows_per_s": round(rows / streaming_s),
            "per_consumer_rows": [r["rows"] for r in results], "tree_peak_rss_mb": round(sampler.tree_peak / MB, 1),
            "object_store_peak_mb": None if sampler.store_peak is None else round(sampler.store_peak / MB, 1),
            "spilled_mb": None if sampler.spilled is None else round(sampler.spilled / MB, 1),
            "processes": sorted(processes, key=lambda p: (p["role"], -p["peak_rss_mb"]))}


def peaks_by_role(result: dict) -> dict:
    """The largest single-process peak of each role, RSS and private, plus the peak of the whole tree."""
    out = {"tree_rss_mb": result["tree_peak_rss_mb"], "object_store_mb": result["object_store_peak_mb"] or 0.0}
    for role in ("driver", "consumer", "ray_data_worker", "ray_idle_worker", "ray_system"):
        procs = [p for p in result["processes"] if p["role"] == role]
        out[f"{role}_rss_mb"] = max((p["peak_rss_mb"] for p in procs), default=0.0)
        out[f"{role}_private_mb"] = max((p["peak_private_mb"] for p in procs), default=0.0)
    return out


def ratios(small: dict, large: dict) -> dict:
    return {key: round(large[key] / small[key], 3) if small[key] else None for key in small}


def run_size(label: str, megabytes: float, shard_mb: float, store_budget_mb: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"raydpo-bench-{label}-"))
    try:
        written = time.perf_counter()
        files, rows = write_dataset(folder, int(megabytes * MB), int(shard_mb * MB))
        print(f"{label}: wrote {len(files)} file(s), {rows} rows, {megabytes:.0f} MB in "
              f"{time.perf_counter() - written:.0f} s; streaming...", flush=True)
        result = stream(files, rows, store_budget_mb)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"label": label, "megabytes": megabytes, "files": len(files), **result, "peaks": peaks_by_role(result)}


def print_table(runs: list[dict], ratio: dict) -> None:
    keys = list(runs[0]["peaks"])
    print(f"\n{'':34}" + "".join(f"{r['label'] + ' (' + format(r['megabytes'], '.0f') + ' MB)':>20}" for r in runs)
          + f"{'large/small':>14}")
    print(f"{'rows':34}" + "".join(f"{r['rows']:>20}" for r in runs))
    print(f"{'rows/s (start-up included)':34}" + "".join(f"{r['rows_per_s']:>20}" for r in runs))
    print(f"{'rows/s (first batch to last)':34}" + "".join(f"{r['streaming_rows_per_s']:>20}" for r in runs))
    for key in keys:
        shown = "-" if ratio[key] is None else f"{ratio[key]:.3f}"
        print(f"{'peak ' + key:34}" + "".join(f"{r['peaks'][key]:>20.1f}" for r in runs) + f"{shown:>14}")
    print(f"{'spilled to disk (MB)':34}" + "".join(f"{r['spilled_mb'] or 0:>20.1f}" for r in runs))
    for run in runs:
        print(f"\n{run['label']}: every process of the session (peak RSS / private MB)")
        for p in run["processes"]:
            print(f"  {p['role']:16} pid {p['pid']:>7} {p['peak_rss_mb']:>9.1f} {p['peak_private_mb']:>9.1f}  "
                  f"{'; '.join(p['titles'])[:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-mb", type=float, default=120.0)
    parser.add_argument("--ratio", type=float, default=10.0, help="large size = small size x ratio")
    parser.add_argument("--shard-mb", type=float, default=64.0)
    parser.add_argument("--store-budget-mb", type=float, default=128.0,
                        help="Ray Data's object-store budget for the pipeline (0: Ray Data's default, half the "
                             "store). Both sizes must exceed it, or the smaller one measures its own size instead "
                             "of the steady state")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    runs = [run_size("small", args.small_mb, args.shard_mb, args.store_budget_mb),
            run_size("large", args.small_mb * args.ratio, args.shard_mb, args.store_budget_mb)]
    ratio = ratios(runs[0]["peaks"], runs[1]["peaks"])
    # The claim under test: no process holds more memory of its own because the data set is larger, and the object
    # store holds no more than Ray Data's budget. Plain RSS is reported but not checked: it also counts every
    # object-store page a process has touched while the store's allocator moves through its arena, which grows with
    # run length even when the store's fill level does not.
    checked = ("driver_private_mb", "consumer_private_mb", "ray_data_worker_private_mb")
    worst = max(ratio[k] for k in checked)
    small_store, large_store = runs[0]["peaks"]["object_store_mb"], runs[1]["peaks"]["object_store_mb"]
    store_bound = TARGET_RATIO * max(small_store, args.store_budget_mb)
    store_ok = large_store <= store_bound
    print_table(runs, ratio)
    verdict = "PASS" if worst <= TARGET_RATIO and store_ok else "FAIL"
    print(f"\nworst private-memory ratio large/small ({', '.join(checked)}): {worst:.3f} (target <= {TARGET_RATIO})")
    print(f"object store peak: {small_store:.1f} MB small, {large_store:.1f} MB large (bound {store_bound:.1f} MB = "
          f"{TARGET_RATIO} x max(small peak, budget {args.store_budget_mb:.0f} MB)): {'ok' if store_ok else 'over'}")
    print(verdict)
    report = {"runs": runs, "ratios": ratio, "target_ratio": TARGET_RATIO, "worst_private_ratio": worst,
              "store_budget_mb": args.store_budget_mb, "object_store_bound_mb": store_bound, "verdict": verdict,
              "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "python": platform.python_version(), "load_before": load_before,
                          "load_after": os.getloadavg()}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
