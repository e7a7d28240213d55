"""Ray Data stages: read raw rows -> parse to canonical records -> split -> template + tokenise.

Runs as Ray Data map_batches stages on the cluster, off the training workers; the workers take their shard with
get_dataset_shard. The driver counts pairs with a streaming pre-flight pass (parse only), never on the workers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from core.config import Data, Recipe
from core.data.formats import parse_batch

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def split_of(source: str, validation_fraction: float, seed: int) -> str:
    """A row's split from a hash of its file name and line: stable across runs, shards and workers, and wherever the
    files are (a local folder, its copy in S3, a test's temporary directory)."""
    if validation_fraction <= 0:
        return "train"
    path, _, line = source.rpartition(":")
    digest = hashlib.sha256(f"{seed}:{path.rpartition('/')[2]}:{line}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def parse_and_split(batch: dict, fmt: str, key_map: dict, validation_fraction: float, seed: int) -> dict:
    parsed = parse_batch(batch, fmt=fmt, key_map=key_map)
    parsed["split"] = [split_of(s, validation_fraction, seed) for s in parsed["source"]]
    return parsed


def is_bad(error) -> bool:
    """Arrow turns an all-null error column into NaN floats: only a string is an error."""
    return isinstance(error, str) and bool(error)


def summarize_batch(batch: dict) -> dict:
    """One row per batch: pair counts per split and the bad rows (source, reason), for the driver to add up."""
    errors = [(str(s), e) for s, e in zip(batch["source"], batch["error"]) if is_bad(e)]
    good = [sp for sp, e in zip(batch["split"], batch["error"]) if not is_bad(e)]
    images = sum(int(n or 0) for n, e in zip(batch["images"], batch["error"]) if not is_bad(e))
    return {"train": [good.count("train")], "validation": [good.count("validation")], "bad": [json.dumps(errors)],
            "images": [images]}


@dataclass
class DataSummary:
    train_pairs: int = 0
    validation_pairs: int = 0
    bad_rows: list = field(default_factory=list)  # [(source, reason)]
    files: list = field(default_factory=list)
    images: int = 0  # images in the good rows (a vision-language model's data)

    def as_dict(self) -> dict:
        return {"files": self.files, "good": self.train_pairs + self.validation_pairs, "train": self.train_pairs,
                "validation": self.validation_pairs, "bad": len(self.bad_rows), "images": self.images}


def parsed_rows(uris: list[str], data: Data, seed: int, validation_fraction: float, vision: bool | None = None):
    """vision: None reads rows only; True/False also checks their images for a vision-language / text model
    (core/data/images.py check_images: a text model's image rows are bad, a VLM's images must be usable)."""
    from core.data.source import read_raw_rows

    ds = read_raw_rows(uris, shuffle_files=data.shuffle, seed=seed)
    ds = ds.map_batches(parse_and_split, fn_kwargs=dict(fmt=data.format, key_map=dict(data.key_map),
                                                        validation_fraction=validation_fraction, seed=seed))
    if vision is not None:
        from core.data.images import check_images

        ds = ds.map_batches(check_images, fn_kwargs=dict(vision=vision))
    return ds


def preflight(uris: list[str], data: Data, seed: int, validation_fraction: float,
              vision: bool | None = None) -> DataSummary:
    """Streams every row through the parser once and adds up what is good and what is bad, with file:line."""
    if vision is None and fits_one_process(uris):
        return preflight_here(uris, data, seed, validation_fraction)
    summary = DataSummary(files=list(uris))
    for row in parsed_rows(uris, data, seed, validation_fraction, vision).map_batches(summarize_batch).iter_rows():
        summary.train_pairs += int(row["train"])
        summary.validation_pairs += int(row["validation"])
        summary.images += int(row["images"])
        summary.bad_rows.extend(tuple(pair) for pair in json.loads(row["bad"]))
    summary.bad_rows.sort()
    return summary


def tokenizer_pool(cluster_cpus: float, actors: int | None = None) -> tuple[int, int]:
    """(min, max) actors of the tokenize stage's autoscaling pool: from one up to half the cluster's CPUs (Ray Data
    adds an actor only while rows wait and a CPU is free; the other half is for reading, parsing and the training
    workers), or exactly `actors` when given."""
    if actors is not None:
        return actors, actors
    return 1, max(1, int(cluster_cpus) // 2)


def tokenized_dataset(uris: list[str], recipe: Recipe, split: str, validation_fraction: float, *,
                      tokenizer_actors: int | None = None, vision: bool | None = None):
    """The tokenised pairs of one split, lazily: Ray Data runs it while the workers read their shards, tokenising in
    an autoscaling actor pool (tokenizer_pool). vision: as for preflight (the same rows must come out); True
    tokenises through the model's processor with the images. Small local data: tokenized_here."""
    from core.data.images import VisionTokenizeStage
    from core.data.tokenize import TokenizeStage

    tc = recipe.training_config
    if vision is None and fits_one_process(uris):
        return tokenized_here(uris, recipe, split, validation_fraction)
    import ray
    from ray.data import ActorPoolStrategy

    smallest, largest = tokenizer_pool(ray.cluster_resources().get("CPU", 1), tokenizer_actors)
    ds = parsed_rows(uris, tc.data, tc.seed, validation_fraction, vision)
    ds = ds.filter(lambda row: not is_bad(row["error"]) and row["split"] == split)
    return ds.map_batches(
        VisionTokenizeStage if vision else TokenizeStage, batch_size=16 if vision else 64,
        compute=ActorPoolStrategy(min_size=smallest, max_size=largest), num_cpus=1,
        fn_constructor_kwargs=dict(model_source=recipe.run.model_name_or_path, max_length=tc.max_length,
                                   max_prompt_length=tc.data.max_prompt_length,
                                   keep=tc.data.prompt_truncation, default_system=tc.data.system_prompt))


# ---------------------------------------------------------------- data that fits one process
# Read, parsed, split and tokenised in the driver, into an in-memory dataset: the same rows as the stages above
# without their Ray tasks and tokenizer actor, whose process start-ups cost seconds for milliseconds of work (the
# pre-flight of 32 pairs took 7 s as Ray Data tasks in a test run on this machine). Remote data, and local data over
# IN_PROCESS_BYTES, go through Ray Data.
IN_PROCESS_BYTES = 16 << 20


def fits_one_process(uris: list[str], limit: int | None = None) -> bool:
    import os

    from core import storage
    from core.data.raw_rows import data_files

    files = data_files(uris, listed=True)
    if not files or any(storage.is_remote(f) for f in files):
        return False
    try:
        return sum(os.path.getsize(f) for f in files) <= (IN_PROCESS_BYTES if limit is None else limit)
    except OSError:
        return False  # Ray Data's read reports it with the path


def rows_here(uris: list[str], data: Data, seed: int, validation_fraction: float):
    """(record or None, reason or None, source, split) of every row; the files in the order a seeded shuffle gives
    them when data.shuffle (as Ray Data's FileShuffleConfig does, though not the same permutation), rows in order."""
    import random

    from core.data.formats import parsed_rows as parse_files
    from core.data.raw_rows import data_files

    files = data_files(uris, listed=True)
    if data.shuffle:
        random.Random(seed).shuffle(files)
    for record, reason, source, _ in parse_files(files, data.format, dict(data.key_map) or None):
        yield record, reason, source, split_of(source, validation_fraction, seed)


def preflight_here(uris: list[str], data: Data, seed: int, validation_fraction: float) -> DataSummary:
    summary = DataSummary(files=list(uris))
    for _, reason, source, split in rows_here(uris, data, seed, validation_fraction):
        if is_bad(reason):
            summary.bad_rows.append((source, reason))
        elif split == "train":
            summary.train_pairs += 1
        else:
            summary.validation_pairs += 1
    summary.bad_rows.sort()
    return summary


def tokenized_here(uris: list[str], recipe: Recipe, split: str, validation_fraction: float):
    import ray.data

    from core.data.tokenize import TokenizeStage

    tc = recipe.training_config
    stage = TokenizeStage(model_source=recipe.run.model_name_or_path, max_length=tc.max_length,
                          max_prompt_length=tc.data.max_prompt_length, keep=tc.data.prompt_truncation,
                          default_system=tc.data.system_prompt)
    records = [record for record, reason, _, row_split in rows_here(uris, tc.data, tc.seed, validation_fraction)
               if not is_bad(reason) and row_split == split]
    if not records:
        return ray.data.from_items([])
    columns = stage({key: [r[key] for r in records] for key in records[0]})
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return ray.data.from_items(rows, override_num_blocks=1)


# ---------------------------------------------------------------- length-aware batching (on the workers)
# Grouping runs on each worker over its own shard (streaming_split(equal=True) gives every worker the same number of
# pairs, hence the same number of micro-batches), within a buffer like a local shuffle: the buffer is shuffled, sorted
# by width and cut into micro-batches of pairs of about the same width, whose order is shuffled again. The seed is
# the recipe's seed plus the epoch, and the shard's order is fixed (preserve_order), so a resumed run sees the same
# micro-batches in the same order and can skip exactly those it trained on.

def pair_width(row: dict) -> int:
    """Tokens the pair's longer sequence needs: the padded width of a batch holding it."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def length_groups(widths: list[int], group_size: int, rng) -> tuple[list[list[int]], list[int]]:
    """Indices into `widths` as groups of `group_size` of similar width, and the remainder (< group_size) to carry.

    With an rng (a random.Random): the remainder is a random pick, ties fall randomly and the groups come in random
    order. Without one (no shuffling): the remainder is the last arrivals and the groups come narrowest first.
    """
    order = list(range(len(widths)))
    if rng is not None:
        rng.shuffle(order)
    spare = len(order) % group_size
    rest, order = (order[:spare], order[spare:]) if rng is not None else (order[len(order) - spare:],
                                                                         order[:len(order) - spare])
    order.sort(key=lambda i: widths[i])  # stable: equal widths keep the (shuffled) order
    groups = [order[i:i + group_size] for i in range(0, len(order), group_size)]
    if rng is not None:
        rng.shuffle(groups)
    return groups, sorted(rest)


def length_grouped(rows, group_size: int, buffer_size: int, rng):
    """Lists of `group_size` rows of similar width, from an iterable of rows, looking `buffer_size` rows ahead.

    Rows left over at the end (fewer than group_size) are dropped, as drop_last would: equal work on every worker.
    """
    buffer_size = max(buffer_size, group_size)
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= buffer_size:
            groups, rest = length_groups([pair_width(r) for r in buffer], group_size, rng)
            yield from ([buffer[i] for i in group] for group in groups)
            buffer = [buffer[i] for i in rest]
    groups, _ = length_groups([pair_width(r) for r in buffer], group_size, rng)
    yield from ([buffer[i] for i in group] for group in groups)


def as_columns(rows: list[dict]) -> dict:
    return {key: [row[key] for row in rows] for key in rows[0]}


def shard_rows(shard, columns: tuple[str, ...]):
    """A worker's shard (a Ray DataIterator) as row dicts of the columns the loss needs."""
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=1):
        present = [c for c in (*columns, "vision") if c in batch]  # a VLM's images ride along (core/vision.py)
        yield from (dict(zip(present, values)) for values in zip(*(batch[c] for c in present)))


def grouped_micro_batches(shard, *, micro_batch: int, buffer_size: int, seed: int | None, collate):
    """Collated micro-batches of similar-width pairs from a worker's shard; seed None keeps the shard's order."""
    import random

    from core.batch import REFERENCE_COLUMNS

    rng = random.Random(seed) if seed is not None else None
    rows = shard_rows(shard, (*TOKEN_COLUMNS, "source", *REFERENCE_COLUMNS))
    for group in length_grouped(rows, micro_batch, buffer_size, rng):
        yield collate(as_columns(group))


def padding_waste(groups: list[list[dict]]) -> float:
    """Computed tokens / real tokens when each group of pairs is one padded batch: 2 x pairs rows x widest pair."""
    computed = sum(2 * len(group) * max(pair_width(r) for r in group) for group in groups)
    real = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for g in groups for r in g)
    return computed / max(real, 1)
