"""A step's metrics from its micro-batches: detached tensors stay on the device until the step ends, then one copy to
the host, one gather across workers, and the numbers through the tested helpers (training/losses.py).

Each micro-batch leaves a `part` (its total loss and per-pair rewards and log-probs, still on the device, plus its
token counts); `step_record` concatenates a step's parts and copies them to the host once; `gather` collects every
worker's record; `metrics_of` turns the records into the rows of metrics.jsonl. Pure apart from the one copy and
the one collective.
"""
from __future__ import annotations

import torch

from training.losses import reward_metrics

TENSORS = ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")
COUNTS = ("real_tokens", "computed_tokens", "unique_tokens")


def micro_part(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, *, real_tokens: int,
               computed_tokens: int, unique_tokens: int) -> dict:
    """What one micro-batch adds to its step's metrics; nothing leaves the device here. real_tokens count the prompt
    in both answers (as two padded rows hold it), unique_tokens once (core/batch.py unique_tokens). The loss is kept
    summed over the micro-batch's pairs (its mean × pairs): micro-batches of an uneven split differ in size, and the
    step's loss is the mean over its pairs (training/batch_split.py)."""
    return {"loss": (loss.detach() * chosen_rewards.shape[0]).reshape(1), "chosen_rewards": chosen_rewards.detach(),
            "rejected_rewards": rejected_rewards.detach(), "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach(), "real_tokens": int(real_tokens),
            "computed_tokens": int(computed_tokens), "unique_tokens": int(unique_tokens)}


def step_record(parts: list[dict]) -> dict:
    """The parts of one step (or one validation pass), concatenated and copied to the host in one transfer."""
    if not parts:
        return {k: [] for k in TENSORS} | dict.fromkeys(COUNTS, 0)
    columns = [torch.cat([p[k].float() for p in parts]) for k in TENSORS]
    sizes = [len(c) for c in columns]
    flat = torch.cat(columns).cpu().tolist()  # the one host sync of the step
    record, start = {}, 0
    for key, size in zip(TENSORS, sizes):
        record[key], start = flat[start:start + size], start + size
    return record | {key: sum(p[key] for p in parts) for key in COUNTS}


def gather(record: dict, world: int) -> list[dict]:
    """Every worker's record (a list of one without other workers). A collective: every rank calls it."""
    if world == 1:
        return [record]
    import torch.distributed as dist

    records: list = [None] * world
    dist.all_gather_object(records, record)
    return records


def metrics_of(records: list[dict], elapsed: float) -> dict:
    """The metrics of one step over every worker's pairs: TRL's rewards/* (reward_metrics), the loss per pair (each
    micro-batch's weighs its pairs), the mean log-probs, tokens per second and the padding the layout computed beyond
    the real tokens: per real token (padding_waste, the prompt counted twice as padded rows hold it) and per unique
    token (padding_unique, the prompt counted once: what the data holds)."""
    column = {k: [v for r in records for v in r[k]] for k in TENSORS}
    pairs = len(column["chosen_rewards"])
    real = sum(r["real_tokens"] for r in records)
    computed = sum(r["computed_tokens"] for r in records)
    unique = sum(r["unique_tokens"] for r in records)
    rewards = reward_metrics(torch.tensor(column["chosen_rewards"]), torch.tensor(column["rejected_rewards"])) \
        if pairs else dict.fromkeys(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
                                    0.0)
    return {"loss": sum(column["loss"]) / pairs if pairs else 0.0, **rewards,
            "logps/chosen": _mean(column["chosen_logps"]), "logps/rejected": _mean(column["rejected_logps"]),
            "tokens_per_s": real / max(elapsed, 1e-9), "real_tokens": real,
            "padding_waste": computed / max(real, 1), "padding_unique": computed / max(unique, 1), "pairs": pairs}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
