"""Each rank's micro-batches, cut from one global order of pairs that every worker computes alike.

Every worker reads the whole training set in the same order (Ray Data preserve_order, not split across workers),
makes the same global batches from it (the same seeded shuffle and length grouping), and trains its own slice of each:
ranks take consecutive parts of a step's global batch (training/ds_config.py batch_split: 32 over 6 is 6,6,5,5,5,5).
So the data position is a count of global batches, the same whatever the worker count: a run resumed on another
number of workers trains exactly the pairs the interrupted one had not reached, and a worker count that does not
divide the global batch works (the lighter ranks' loss weighted, ds_config.loss_weight). The cost: each worker reads
every pair's tokens (the driver materialises the tokenised set once, so nothing is tokenised twice).
"""
from __future__ import annotations

from typing import Iterable, Iterator

from core.data.pipeline import length_grouped, pair_width
from training import ds_config


def global_batches(rows: Iterable[dict], *, global_batch_size: int, buffer_size: int, rng,
                   group_by_length: bool) -> Iterator[list[dict]]:
    """The epoch's global batches, in order; a last partial one is dropped (steps_per_epoch).

    Length grouping: batches of pairs of similar width within a buffer (core/data/pipeline.py length_grouped, which
    also shuffles with an rng). Without it, a buffered shuffle with an rng, else the rows' own order."""
    if group_by_length:
        yield from length_grouped(rows, global_batch_size, buffer_size, rng)
        return
    stream = buffered_shuffle(rows, buffer_size, rng) if rng is not None else rows
    batch: list[dict] = []
    for row in stream:
        batch.append(row)
        if len(batch) == global_batch_size:
            yield batch
            batch = []


def buffered_shuffle(rows: Iterable[dict], buffer_size: int, rng) -> Iterator[dict]:
    """A local shuffle over a window of buffer_size rows: each full window shuffled, the rest at the end."""
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= max(buffer_size, 1):
            rng.shuffle(buffer)
            yield from buffer
            buffer = []
    rng.shuffle(buffer)
    yield from buffer


def rank_micro_batches(batch: list[dict], *, shares: tuple[int, ...], rank: int, micro_batch: int, accum: int,
                       by_width: bool) -> list[tuple[list[dict], int]]:
    """This rank's accum micro-batches of a global batch, each as (rows, real pairs). shares: the plan's split
    (RunPlan.rank_pairs); rank r takes the shares[r] pairs after those of the ranks before it.

    by_width: the batch is sorted by width before it is cut, so each micro-batch holds pairs of similar width. An
    empty micro-step (a light rank, see ds_config.micro_sizes) trains one pair at weight 0: the real pairs count 0."""
    ordered = sorted(batch, key=pair_width) if by_width else list(batch)
    assert sum(shares) == len(batch), (shares, len(batch))
    share, start = shares[rank], sum(shares[:rank])
    mine = ordered[start:start + share]
    out, taken = [], 0
    for size in ds_config.micro_sizes(share, micro_batch, accum):
        if size:
            out.append((mine[taken:taken + size], size))
            taken += size
        else:
            out.append(([(mine or ordered)[-1]], 0))  # a padding pair: loss weight 0, collectives still run
    return out
