"""Answers from a model for many prompts, distributed with Ray Data: map_batches over model actors, one per worker.

Rows travel as {"index", "messages" (JSON text), "system", "tools" (JSON text or ""), "media" (a record's media
column, core/data/record.py, or "")}: Arrow keeps a fixed schema, and the index restores the input order after the
actors finish (Ray Data does not keep order across actors by default). Each answer says how many tokens it took and
whether it hit max_new_tokens without ending (a cut answer, counted in the results).

A vision-language model (core/vision.py) answers through its processor: each prompt's images (the media column's
URIs, read from s3:// or local paths) stand where the row had them, as in training (core/data/images.py). A row with
images given to a text model is a DataError: it would answer a question whose picture it never saw.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    batch_size: int = 8
    seed: int = 0


def generation_kwargs(settings: GenerationSettings) -> dict:
    """model.generate() arguments: greedy at temperature 0 (sampling knobs then do nothing), else sampling."""
    if settings.temperature == 0:
        # None overrides a model's generation_config sampling defaults, which greedy decoding would warn about.
        return {"max_new_tokens": settings.max_new_tokens, "do_sample": False,
                "temperature": None, "top_p": None, "top_k": None}
    return {"max_new_tokens": settings.max_new_tokens, "do_sample": True, "temperature": settings.temperature,
            "top_p": settings.top_p, "top_k": settings.top_k if settings.top_k > 0 else 0}  # transformers: 0 = off


def answer_length(new_ids: list[int], eos_ids: set[int]) -> tuple[int, bool]:
    """(answer tokens before the first end-of-sequence token, whether it ended) for one generated row.

    A row that never produced an end token ran into max_new_tokens: generate() pads only rows that ended.
    """
    for position, token in enumerate(new_ids):
        if token in eos_ids:
            return position, True
    return len(new_ids), False


def prompt_text(tokenizer, messages: list[dict], system: str | None, tools: str | None = None) -> str:
    """The model's chat template over the prompt turns, system prompt first, ending with the assistant header.

    tools: JSON text of a list of tool specs (as canonical records carry them), handed to the template.
    """
    from core.data.tokenize import FALLBACK_TEMPLATE

    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_TEMPLATE  # base models: the same fallback training uses
    turns = ([{"role": "system", "content": system}] if system else []) + list(messages)
    extra = {"tools": json.loads(tools)} if tools else {}
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False, **extra)


def eos_token_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def load_for_inference(model_source: str, device: str, gpus: int = 1, gpu_bytes: int = 0):
    """(tokenizer, model in eval mode): a full model, or a LoRA adapter folder on its base. On CUDA whole on one GPU
    or split by layers over the actor's `gpus` (core/sharding.py: device_map under a max_memory budget)."""
    import torch

    from core.models import load_tokenizer, load_trained
    from core.sharding import load_kwargs

    tokenizer = load_tokenizer(model_source)
    tokenizer.padding_side = "left"  # generation continues each row at its right end
    on_gpu = device.startswith("cuda")
    model = load_trained(model_source, dtype=torch.bfloat16 if on_gpu else torch.float32,
                         load_kwargs=load_kwargs(gpus, gpu_bytes) if on_gpu else None)
    model.eval()
    return tokenizer, model


class GeneratorActor:
    """A Ray Data actor: loads the model once, answers a batch of prompts per call."""

    def __init__(self, model_source: str, settings: dict, device: str = "cpu", threads: int | None = None,
                 gpus: int = 1, gpu_bytes: int = 0):
        from core.devices import use_threads
        from core.sharding import input_device

        use_threads(threads)
        self.settings = GenerationSettings(**settings)
        self.tokenizer, self.model = load_for_inference(model_source, device, gpus, gpu_bytes)
        self.device = input_device(self.model)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        from core.data.images import load_processor
        from core.vision import is_vision_config

        self.processor = load_processor(model_source) if is_vision_config(self.model.config) else None
        if self.processor is not None:
            self.processor.tokenizer.padding_side = "left"

    def __call__(self, batch: dict) -> dict:
        import torch

        messages = [json.loads(str(m)) for m in batch["messages"]]
        systems = [str(s) or None for s in batch["system"]]
        tools = [str(t) or None for t in batch["tools"]] if "tools" in batch else [None] * len(messages)
        media = [str(m) or None for m in batch["media"]] if "media" in batch else [None] * len(messages)
        if self.processor is not None:
            encoded = vision_inputs(self.processor, messages, systems, media, self.device,
                                    getattr(self.model, "dtype", None), tools)
        else:
            if any(media):
                from core.errors import DataError

                raise DataError(f"{sum(map(bool, media))} prompt(s) hold images and the model is a text model",
                                why="a text model would answer without seeing the images",
                                fix="generate with a vision-language model, or leave the image rows out")
            texts = [prompt_text(self.tokenizer, m, s, t) for m, s, t in zip(messages, systems, tools)]
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
        if self.settings.temperature > 0:
            torch.manual_seed(self.settings.seed + int(batch["index"][0]))  # same rows, same samples
        with torch.no_grad():
            out = self.model.generate(**encoded, **generation_kwargs(self.settings),
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))
        new = out[:, encoded["input_ids"].shape[1]:].tolist()
        predictions, lengths, cut = [], [], []
        for ids in new:
            n, ended = answer_length(ids, self.eos_ids)
            predictions.append(self.tokenizer.decode(ids[:n], skip_special_tokens=True))
            lengths.append(n)
            cut.append(not ended)
        return {"index": list(batch["index"]), "prediction": predictions, "new_tokens": lengths,
                "hit_max_new_tokens": cut}


def vision_inputs(processor, messages: list[list[dict]], systems: list, media: list, device, dtype,
                  tools: list | None = None) -> dict:
    """generate() inputs of a batch of prompts for a vision-language model: each prompt through the processor's chat
    template with its images where the row had them (core/data/images.conversation, as the training rows), left
    padded; floating-point image inputs in the model's dtype."""
    import torch

    from core.data.images import ImageError, conversation, load_image

    texts, images = [], []
    for turns, system, parts, spec in zip(messages, systems, media, tools or [None] * len(messages)):
        chat, uris = conversation({"prompt": turns, "system": system, "media": parts}, None)
        try:
            images.append([load_image(uri) for uri in uris])
        except ImageError as err:
            from core.errors import DataError

            raise DataError(str(err), fix="replace or fix the image (or leave the row out)") from None
        extra = {"tools": json.loads(spec)} if spec else {}
        texts.append(processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **extra))
    encoded = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    return {k: v.to(device, dtype) if dtype is not None and torch.is_floating_point(v) else v.to(device)
            for k, v in encoded.items()}


def run_actor_pool(items: list[dict], actor_cls, constructor_kwargs: dict, *, workers: int, use_gpu: bool,
                   batch_size: int) -> list[dict]:
    """items through `actor_cls` on `workers` Ray Data actors (one GPU each, or one CPU each); input order kept.

    Every item carries an int "index"; the actors return it with their outputs.
    """
    import ray.data

    if not items:
        return []
    from core.devices import cpu_threads, usable_cores

    resources = {"num_gpus": constructor_kwargs.get("gpus", 1)} if use_gpu else {"num_cpus": 1}
    if not use_gpu:  # the cores of this node shared by the actors (several nodes: fewer threads than cores, safe)
        constructor_kwargs = constructor_kwargs | {"threads": cpu_threads(usable_cores(), workers)}
    ds = ray.data.from_items(items).map_batches(
        actor_cls, fn_constructor_kwargs=constructor_kwargs, compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=batch_size, batch_format="numpy", **resources)
    rows = ds.take_all()
    rows.sort(key=lambda r: int(r["index"]))
    assert [int(r["index"]) for r in rows] == [int(i["index"]) for i in items], "every row comes back once"
    return rows


def generate_answers(prompts: list[dict], model_source: str, settings: GenerationSettings, *, workers: int = 1,
                     use_gpu: bool = False) -> list[dict]:
    """One answer per prompt ({"messages": [...], "system": str | None, "tools": JSON text | None, "media": a
    record's media column, JSON text | None}), in order:
    [{"prediction", "new_tokens", "hit_max_new_tokens"}]."""
    items = [{"index": i, "messages": json.dumps(p["messages"], ensure_ascii=False), "system": p.get("system") or "",
              "tools": p.get("tools") or "", "media": p.get("media") or ""} for i, p in enumerate(prompts)]
    kwargs = {"model_source": model_source, "settings": asdict(settings), "device": "cuda" if use_gpu else "cpu"}
    if use_gpu:  # a model too big for one GPU gets several per actor, and fewer actors (core/sharding.py)
        from core.sharding import actors_for, gpus_per_actor

        kwargs["gpus"], kwargs["gpu_bytes"] = gpus_per_actor(model_source, 2)
        workers = actors_for(workers, kwargs["gpus"], workers)
    rows = run_actor_pool(items, GeneratorActor, kwargs, workers=workers, use_gpu=use_gpu,
                          batch_size=settings.batch_size)
    return [{"prediction": str(r["prediction"]), "new_tokens": int(r["new_tokens"]),
             "hit_max_new_tokens": bool(r["hit_max_new_tokens"])} for r in rows]


def generate_candidates(prompts: list[dict], model_source: str, settings: GenerationSettings, n: int, *,
                        workers: int = 1, use_gpu: bool = False) -> list[list[dict]]:
    """n sampled answers per prompt (the same prompt shapes as generate_answers), grouped per prompt, in order.

    Each prompt is repeated n times as its own row: every row draws its own sample from the batch's seeded generator
    (seed + the batch's first index), so a rerun with the same settings gives the same candidates.
    """
    assert n >= 1, "at least one candidate per prompt"
    repeated = [p for p in prompts for _ in range(n)]
    answers = generate_answers(repeated, model_source, settings, workers=workers, use_gpu=use_gpu)
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]
