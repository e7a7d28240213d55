"""Preference evaluation on held-out pairs: does each model prefer the preferred answer?

Per model: ranking accuracy (the share of pairs where the chosen answer gets the strictly higher log-probability),
both with summed log-probabilities and with per-token means, so base and tuned compare directly; the mean
log-probabilities of chosen and rejected answers (summed and per token). For a tuned model, also its implicit DPO
reward against its reference, beta * (log pi(y|x) - log pi_ref(y|x)): reward accuracy (chosen reward strictly
higher, as TRL's rewards/accuracies) and mean margin (chosen minus rejected reward).

Pairs are templated and tokenised exactly as training does (core.data.tokenize, core.batch,
core.logprobs), so the numbers line up with a run's validation metrics. The reference of a LoRA model is its
base with the adapter disabled; of a full model, the model it was trained from (a second model in the actor).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

METRICS = ("ranking_accuracy", "ranking_accuracy_per_token", "logps_chosen", "logps_rejected",
           "logps_chosen_per_token", "logps_rejected_per_token", "reward_accuracy", "reward_margin",
           "rewards_chosen", "rewards_rejected")
EXAMPLES = 5  # pairs shown in results.json
ADAPTER_DISABLED = "adapter_disabled"  # the reference of a LoRA model: its base, adapters off


@dataclass(frozen=True)
class PreferenceSettings:
    max_length: int = 1024
    system_prompt: str | None = None
    batch_size: int = 4


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def per_token(logps: list[float], tokens: list[int]) -> list[float]:
    # An answer cut to nothing has no tokens; its mean log-prob is taken as 0 rather than dividing by zero.
    return [lp / n if n else 0.0 for lp, n in zip(logps, tokens)]


def ranking_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs where the chosen answer scores strictly higher (a tie is not a preference)."""
    return _mean([float(c > r) for c, r in zip(chosen, rejected)])


def implicit_rewards(chosen: list[float], rejected: list[float], ref_chosen: list[float],
                     ref_rejected: list[float], beta: float) -> dict:
    """DPO's implicit rewards r = beta * (logp - ref_logp): accuracy, mean margin, mean chosen/rejected reward."""
    r_chosen = [beta * (p - q) for p, q in zip(chosen, ref_chosen)]
    r_rejected = [beta * (p - q) for p, q in zip(rejected, ref_rejected)]
    return {"reward_accuracy": ranking_accuracy(r_chosen, r_rejected),
            "reward_margin": _mean([c - r for c, r in zip(r_chosen, r_rejected)]),
            "rewards_chosen": _mean(r_chosen), "rewards_rejected": _mean(r_rejected)}


def preference_metrics(rows: list[dict], beta: float | None) -> dict:
    """Aggregate of per-pair rows {logp_chosen, logp_rejected, tokens_chosen, tokens_rejected[, ref_logp_*]}.

    Reward metrics only when the rows carry reference log-probabilities (a tuned model) and beta is given.
    """
    chosen = [r["logp_chosen"] for r in rows]
    rejected = [r["logp_rejected"] for r in rows]
    chosen_tok = per_token(chosen, [r["tokens_chosen"] for r in rows])
    rejected_tok = per_token(rejected, [r["tokens_rejected"] for r in rows])
    out = {"ranking_accuracy": ranking_accuracy(chosen, rejected),
           "ranking_accuracy_per_token": ranking_accuracy(chosen_tok, rejected_tok),
           "logps_chosen": _mean(chosen), "logps_rejected": _mean(rejected),
           "logps_chosen_per_token": _mean(chosen_tok), "logps_rejected_per_token": _mean(rejected_tok)}
    if rows and beta is not None and all("ref_logp_chosen" in r for r in rows):
        out.update(implicit_rewards(chosen, rejected, [r["ref_logp_chosen"] for r in rows],
                                    [r["ref_logp_rejected"] for r in rows], beta))
    return out


class LogpsActor:
    """A Ray Data actor: summed answer log-probs of chosen and rejected under a model (and its reference)."""

    def __init__(self, model_source: str, reference: str | None, settings: dict, device: str = "cpu",
                 threads: int | None = None):
        from core.batch import collate_for, model_layout
        from core.devices import use_threads
        from core.generate import load_for_inference
        from core.forward import add_logps_head

        use_threads(threads)
        self.settings = PreferenceSettings(**settings)
        self.device = device
        self.tokenizer, self.model = load_for_inference(model_source, device)
        self.reference_mode = reference
        self.reference_model = None
        if reference not in (None, ADAPTER_DISABLED):
            self.reference_model = load_for_inference(reference, device)[1]
        for model in filter(None, (self.model, self.reference_model)):
            # the training forward: answer positions only, the prompt once per pair (core/forward.py, batch.py)
            add_logps_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.collate = collate_for(model_layout(self.model.config, share_prompt=True), self.tokenizer.pad_token_id)
        from core.data.images import load_processor
        from core.vision import is_vision_config

        # a vision-language model: pairs through its processor, with their images (core/data/images.py)
        self.processor = load_processor(model_source) if is_vision_config(self.model.config) else None

    def _logps(self, model, batch: dict):
        import torch

        from core.forward import sequence_logps_of

        with torch.no_grad():
            logps, counts = sequence_logps_of(model, batch)
        half = logps.shape[0] // 2
        return logps[:half].tolist(), logps[half:].tolist(), counts[:half].tolist(), counts[half:].tolist()

    def __call__(self, batch: dict) -> dict:
        import torch

        from core.data.tokenize import tokenize_record

        records = [json.loads(str(r)) for r in batch["record"]]
        if self.processor is not None:
            from core.data.images import vision_tokenize_record

            tokenized = [vision_tokenize_record(r, self.processor, max_length=self.settings.max_length,
                                                default_system=self.settings.system_prompt) for r in records]
        else:
            tokenized = [tokenize_record(r, self.tokenizer, max_length=self.settings.max_length,
                                         default_system=self.settings.system_prompt) for r in records]
        columns = ("prompt_ids", "chosen_ids", "rejected_ids") + (("vision",) if self.processor is not None else ())
        pairs = self.collate({k: [t[k] for t in tokenized] for k in columns})
        pairs = {k: v.to(self.device) for k, v in pairs.items() if torch.is_tensor(v)}
        chosen, rejected, n_chosen, n_rejected = self._logps(self.model, pairs)
        out = {"index": list(batch["index"]), "logp_chosen": chosen, "logp_rejected": rejected,
               "tokens_chosen": n_chosen, "tokens_rejected": n_rejected,
               "truncated": [bool(t["truncated"]) for t in tokenized]}
        if self.reference_mode == ADAPTER_DISABLED:
            with self.model.disable_adapter():
                out["ref_logp_chosen"], out["ref_logp_rejected"] = self._logps(self.model, pairs)[:2]
        elif self.reference_model is not None:
            out["ref_logp_chosen"], out["ref_logp_rejected"] = self._logps(self.reference_model, pairs)[:2]
        return out


def score_pairs(records: list[dict], model_source: str, reference: str | None, settings: PreferenceSettings, *,
                workers: int = 1, use_gpu: bool = False) -> list[dict]:
    """Per pair, in order: {logp_chosen, logp_rejected, tokens_chosen, tokens_rejected, truncated[, ref_logp_*]}.

    reference: None (no rewards), ADAPTER_DISABLED (a LoRA model's base), or a model source.
    """
    from dataclasses import asdict

    from core.generate import run_actor_pool

    items = [{"index": i, "record": json.dumps(r, ensure_ascii=False)} for i, r in enumerate(records)]
    rows = run_actor_pool(items, LogpsActor,
                          {"model_source": model_source, "reference": reference, "settings": asdict(settings),
                           "device": "cuda" if use_gpu else "cpu"},
                          workers=workers, use_gpu=use_gpu, batch_size=settings.batch_size)
    keys = ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected")
    return [{**{k: float(r[k]) for k in keys if k in r}, "tokens_chosen": int(r["tokens_chosen"]),
             "tokens_rejected": int(r["tokens_rejected"]), "truncated": bool(r["truncated"])} for r in rows]


def read_pairs(path: str, *, fmt: str = "auto", key_map: dict | None = None,
               max_rows: int | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(canonical records, bad rows [(file:line, reason)]) of held-out preference pairs in any training format."""
    from core.data.formats import parsed_rows
    from core.data.raw_rows import data_files

    records, bad = [], []
    for record, reason, source, _ in parsed_rows(data_files([path]), fmt, key_map):
        if max_rows is not None and len(records) >= max_rows:
            break
        if record is None:
            bad.append((source, reason))
        else:
            records.append(record)
    return records, bad


def with_reference(scored: list[dict], reference: list[dict]) -> list[dict]:
    """Per-pair scores with the reference's log-probabilities, taken from another model's scores on the same pairs."""
    return [s | {"ref_logp_chosen": r["logp_chosen"], "ref_logp_rejected": r["logp_rejected"]}
            for s, r in zip(scored, reference, strict=True)]


def evaluate(records: list[dict], models: list[dict], settings: PreferenceSettings, *, workers: int = 1,
             use_gpu: bool = False) -> tuple[dict, list[dict], list[dict]]:
    """(per-model entries, per-pair records, examples) for models [{"label", "path", "reference", "beta"[,
    "reference_scored_as"]}]; reference_scored_as names an earlier model that is the reference, whose scores are
    reused (the reference forward is not run again).

    An entry is {"path", "metrics", "n", "reference", "beta", "truncated_pairs"}; reward metrics need a reference.
    """
    per_row = [{"source": r["source"]} for r in records]
    entries, scores = {}, {}
    for model in models:
        reused = scores.get(model.get("reference_scored_as"))
        scored = score_pairs(records, model["path"], None if reused else model.get("reference"), settings,
                             workers=workers, use_gpu=use_gpu)
        scored = with_reference(scored, reused) if reused else scored
        scores[model["label"]] = scored
        beta = model.get("beta") if model.get("reference") else None
        entries[model["label"]] = {"path": model["path"], "metrics": preference_metrics(scored, beta),
                                   "n": len(records), "reference": model.get("reference"), "beta": beta,
                                   "truncated_pairs": sum(s["truncated"] for s in scored)}
        for record, score in zip(per_row, scored):
            record[model["label"]] = score
    examples = []
    for record, row in zip(records[:EXAMPLES], per_row):
        users = [t["content"] for t in record["prompt"] if t["role"] == "user"]
        examples.append({"prompt": users[-1] if users else record["prompt"][-1]["content"],
                         "reference": record["chosen"], "rejected": record["rejected"],
                         **{m["label"]: {"logp_chosen": row[m["label"]]["logp_chosen"],
                                         "logp_rejected": row[m["label"]]["logp_rejected"]} for m in models}})
    return entries, per_row, examples
