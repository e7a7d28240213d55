"""The reference model out of the training loop: its log-probabilities computed once, ahead of training.

`precompute_reference` runs a Ray Data stage (ReferenceStage: model actors on the cluster's CPUs or GPUs, which are
all spare before training starts) over the tokenised pairs, adds `ref_chosen_logps` and `ref_rejected_logps` to each
row, and writes the rows as Parquet under <output_s3_path>/_reference_cache/<key>/. The key hashes what the numbers
depend on: the model (its files), the data files (size and modification time or ETag), max_length and the other
tokenisation settings, the split and the precision. A later run on the same data and model (a beta or loss-type
sweep) finds the cache and skips the stage. Training workers then read those rows and hold no reference model.

The stage computes log-probabilities with training/forward.sequence_logps_of, the function the training loop uses
for a live reference, so both give the same numbers for the same model and precision.

Vision-language models (core/vision.py) too: their rows carry the processed images (the `vision` column), which the
stage hands to the model with each pair's two padded rows and writes into the cache beside the tokens, so the cache
holds the pixel values (about as large as the decoded images). The key sees the data files, not the image files: an
image replaced under the same URI needs a new output path or the cache folder removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from core import storage
from core.config import Recipe
from core.batch import collate_for, model_layout
from core.data.pipeline import TOKEN_COLUMNS, pair_width

CACHE_DIR = "_reference_cache"
STAGE_VERSION = 1  # bump when the stage's output changes meaning: old caches are then never read
# padded tokens per reference forward: large enough to be efficient; the response positions' logits ([N, vocab] in fp32,
# 0.8 GB for 4k positions of a 49k vocabulary) bound it from above
TOKENS_PER_FORWARD = 8192


# ---------------------------------------------------------------- the cache key (pure)

def cache_key(model: object, data: object, settings: dict) -> str:
    """A short stable hash of everything the reference log-probabilities depend on."""
    text = json.dumps([STAGE_VERSION, model, data, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def token_settings(recipe: Recipe, precision: str) -> dict:
    """The recipe values that change which tokens a pair has, which pairs a split holds, or the numbers computed."""
    tc = recipe.training_config
    data = tc.data
    settings = {"max_length": tc.max_length, "precision": precision,
                **{k: getattr(data, k) for k in ("format", "key_map", "prompt_truncation", "max_prompt_length",
                                                 "system_prompt", "validation_fraction")}}
    if data.validation_fraction:
        settings["seed"] = tc.seed  # the seed picks the held-out pairs; otherwise a seed sweep shares the cache
    return settings


def model_fingerprint(source: str) -> object:
    """A local model folder by its files' names, sizes and times; anything else (a hub id) by its name."""
    from core.models import resolve_model_source

    folder = Path(resolve_model_source(source))
    if not folder.is_dir():
        return source
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()]


def file_fingerprints(uris: list[str]) -> list:
    """[uri, size, version] per data file: the version is the ETag on S3, the modification time elsewhere."""
    rows = []
    for uri in uris:
        fs, path = storage.filesystem_for(uri)
        info = storage.with_retries("read", uri, lambda: fs.info(path))
        rows.append([uri, info.get("size"), info.get("ETag") or info.get("mtime") or info.get("LastModified")])
    return rows


# ---------------------------------------------------------------- the Ray Data stage

def forward_groups(widths: list[int], tokens_per_forward: int) -> list[list[int]]:
    """Indices grouped for reference forwards: narrowest first, each group's padded tokens (2 rows per pair x
    pairs x widest) within the budget; a pair wider than the budget goes alone."""
    groups: list[list[int]] = []
    for index in sorted(range(len(widths)), key=lambda i: widths[i]):
        group = groups[-1] if groups else None
        if group and 2 * (len(group) + 1) * widths[index] <= tokens_per_forward:
            group.append(index)
        else:
            groups.append([index])
    return groups


class ReferenceStage:
    """Ray Data map_batches stage: one reference model per actor; adds ref_chosen_logps / ref_rejected_logps."""

    def __init__(self, model_source: str, precision: str, chunk_size: int = 1024,
                 tokens_per_forward: int = TOKENS_PER_FORWARD, threads: int | None = None,
                 share_prompt: bool = True, gpus: int = 1, gpu_bytes: int = 0):
        import torch

        from core import devices
        from core.devices import use_threads
        from core.forward import add_logps_head

        use_threads(threads)
        from core.models import load_causal_lm, load_tokenizer

        on_gpu = torch.cuda.is_available()
        precision = devices.precision_for(precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported(),
                                          cpu_bf16=devices.this_cpu_bf16_fast())
        from core.sharding import input_device, load_kwargs

        # on GPU: whole on one GPU, or split by layers over this actor's `gpus` (core/sharding.py), never .to("cuda")
        # of a model that cannot fit one
        self.model = load_causal_lm(model_source, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                    config_overrides=load_kwargs(gpus, gpu_bytes) if on_gpu else None)
        self.model.eval()
        self.device = input_device(self.model)
        add_logps_head(self.model)
        self.pad_id = load_tokenizer(model_source).pad_token_id
        self.chunk_size, self.tokens_per_forward = chunk_size, tokens_per_forward
        # as the training loop lays pairs out (core/batch.py batch_layout): the same sums, within float noise
        self.layout = model_layout(self.model.config, share_prompt=share_prompt)
        self.collate = collate_for(self.layout, self.pad_id)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from core.forward import sequence_logps_of

        # a vision-language model's rows carry their processor outputs (core/vision.py): each pair's images go
        # with it into the padded rows, as in the training loop
        columns = [c for c in (*TOKEN_COLUMNS, "vision") if c in batch]
        rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        chosen = np.zeros(len(rows), dtype=np.float32)
        rejected = np.zeros(len(rows), dtype=np.float32)
        for group in forward_groups([pair_width(r) for r in rows], self.tokens_per_forward):
            pairs = self.collate({c: [rows[i][c] for i in group] for c in columns})
            inputs = {k: v.to(self.device) for k, v in pairs.items() if torch.is_tensor(v)}
            with torch.no_grad():
                logps, _ = sequence_logps_of(self.model, inputs, chunk_size=self.chunk_size)
            logps = logps.float().cpu().numpy()
            chosen[group], rejected[group] = logps[:len(group)], logps[len(group):]
        return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


# ---------------------------------------------------------------- the driver side

def cache_root_uri(recipe: Recipe) -> str:
    return recipe.run.output_s3_path.rstrip("/") + "/" + CACHE_DIR


def read_marker(uri: str) -> dict | None:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def compute_split(dataset, target_uri: str, *, model_source: str, precision: str, chunk_size: int,
                  actors: int, on_gpu: bool, share_prompt: bool = True, vision: bool = False):
    from core.devices import cpu_threads, usable_cores

    from core import devices
    from core.sharding import actors_for, gpus_per_actor

    fs, path = storage.pyarrow_filesystem_for(target_uri)
    # before training every core is spare: CPU actors share the node's cores (Ray would give each one thread)
    threads = None if on_gpu else cpu_threads(usable_cores(), actors)
    gpus, gpu_bytes = 1, 0
    if on_gpu:  # as many GPUs per actor as the weights need (core/sharding.py), and fewer actors for it
        gpus, gpu_bytes = gpus_per_actor(model_source, 2 if devices.precision_for(precision, True) == "bf16" else 4)
        actors = actors_for(actors, gpus, actors)
    dataset.select_columns([*TOKEN_COLUMNS, "source", *(["vision"] if vision else [])]).map_batches(
        ReferenceStage, batch_size=64, concurrency=actors, num_gpus=gpus if on_gpu else 0, num_cpus=1,
        fn_constructor_kwargs=dict(model_source=model_source, precision=precision, chunk_size=chunk_size,
                                   threads=threads, share_prompt=share_prompt, gpus=gpus, gpu_bytes=gpu_bytes),
    ).write_parquet(path, filesystem=fs)


def read_split(uri: str):
    """The cached rows in the order they were written. A small local cache is read here into one block (as small
    data is tokenised in the driver, core/data/pipeline.py): Ray Data's read tasks would start processes on the way
    to step 1 (5 s of a 64-pair run's start-up on 2026-12-06)."""
    import pyarrow.fs
    import pyarrow.parquet as pq
    import ray.data

    from core.data.pipeline import IN_PROCESS_BYTES

    fs, path = storage.pyarrow_filesystem_for(uri)
    files = sorted((f for f in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                    if f.is_file and f.path.endswith(".parquet")), key=lambda f: f.path)
    if not storage.is_remote(uri) and sum(f.size for f in files) <= IN_PROCESS_BYTES:
        tables = [pq.read_table(f.path, filesystem=fs) for f in files]
        return ray.data.from_arrow(pyarrow.concat_tables(tables) if tables else pyarrow.table({}))
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


def cache_uri_for(recipe: Recipe, key_parts: dict, on_gpu: bool) -> str:
    """Where this recipe's reference log-probs are (or will be) cached: the key folder under the output path."""
    from core import devices

    # the driver's CPU stands for its CPU nodes' (auto: bf16 where it has AMX) in the cache key
    precision = devices.precision_for(recipe.training_config.precision, on_gpu, cpu_bf16=devices.this_cpu_bf16_fast())
    key = cache_key(model_fingerprint(recipe.run.model_name_or_path), key_parts, token_settings(recipe, precision))
    return cache_root_uri(recipe) + "/" + key


def cache_missing(root: str, splits) -> bool:
    return any(read_marker(f"{root}/{split}.json") is None for split in splits)


def fill_cache(root: str, datasets: dict, logps: dict | None, *, run_name: str, key_parts: dict, say) -> list[str]:
    """Writes the reference log-probs a LoRA run computed as it trained (training/loop.py, split -> {source:
    [chosen, rejected]}) as the cache a stage would have written; the splits written. A split some of whose pairs
    the run never reached (max_steps short of the epoch) gets no cache: the next run computes it."""
    written = []
    for split, dataset in datasets.items():
        values = (logps or {}).get(split) or {}
        sources = [str(row["source"]) for row in dataset.select_columns(["source"]).iter_rows()]
        missing = sum(source not in values for source in sources)
        if missing or not sources:
            say(f"reference log-probs ({split}): {missing} of {len(sources)} pairs not reached in this run; "
                "no cache written (the next run computes them)")
            continue
        folder = f"{root}/{split}-{uuid.uuid4().hex[:8]}"
        fs, path = storage.pyarrow_filesystem_for(folder)
        dataset.select_columns([*TOKEN_COLUMNS, "source"]).map_batches(
            with_reference_columns, fn_kwargs={"values": values}, batch_format="numpy",
        ).write_parquet(path, filesystem=fs)
        marker = {"folder": folder, "seconds": 0.0, "filled_by_run": run_name, "key_parts": key_parts}
        storage.write_bytes(f"{root}/{split}.json", json.dumps(marker, indent=2).encode())  # the marker last
        say(f"reference log-probs ({split}): kept in {folder} for the next run on this data")
        written.append(split)
    return written


def with_reference_columns(batch: dict, values: dict) -> dict:
    """A Ray Data batch with ref_chosen_logps / ref_rejected_logps looked up by each row's source."""
    import numpy as np

    pairs = np.array([values[str(source)] for source in batch["source"]], dtype=np.float32).reshape(-1, 2)
    return {**batch, "ref_chosen_logps": pairs[:, 0], "ref_rejected_logps": pairs[:, 1]}


def precompute_reference(datasets: dict, recipe: Recipe, *, key_parts: dict, on_gpu: bool, actors: int,
                         chunk_size: int, say, share_prompt: bool = True, vision: bool = False) -> tuple[dict, dict]:
    """The datasets with reference log-probs on every row, from the cache or computed now; and what happened:
    {"cache_uri", "seconds" (time spent computing in this run), "reused" (split names read from the cache)}.
    vision: the rows are a vision-language model's (core/vision.py): their `vision` column (the processed images)
    goes through the stage and into the cache with them."""
    root = cache_uri_for(recipe, key_parts, on_gpu)
    model_source = recipe.run.model_name_or_path
    out, info = {}, {"cache_uri": root, "seconds": 0.0, "reused": []}
    for split, dataset in datasets.items():
        marker_uri = f"{root}/{split}.json"
        marker = read_marker(marker_uri)
        if marker is None:
            started = time.time()
            folder = f"{root}/{split}-{uuid.uuid4().hex[:8]}"  # a crash leaves an orphan folder, never a half cache
            say(f"reference log-probs ({split}): computing with {actors} model actor(s) into {folder}")
            compute_split(dataset, folder, model_source=model_source, precision=recipe.training_config.precision,
                          chunk_size=chunk_size, actors=actors, on_gpu=on_gpu, share_prompt=share_prompt,
                          vision=vision)
            marker = {"folder": folder, "seconds": time.time() - started, "key_parts": key_parts}
            storage.write_bytes(marker_uri, json.dumps(marker, indent=2).encode())
            info["seconds"] += marker["seconds"]
            say(f"reference log-probs ({split}): done in {marker['seconds']:.0f}s")
        else:
            info["reused"].append(split)
            how = (f"kept by run {marker['filled_by_run']} as it trained" if marker.get("filled_by_run") else
                   f"computed in {marker['seconds']:.0f}s")
            say(f"reference log-probs ({split}): reusing {marker['folder']} ({how})")
        out[split] = read_split(marker["folder"])
    return out, info
