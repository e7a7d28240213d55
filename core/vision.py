"""Vision-language models: the one place that decides a model is one, and what differs for it.

A model is a vision-language model (VLM) when its config has a vision_config, or transformers maps its config to an
AutoModelForImageTextToText class (Qwen2-VL/Qwen2.5-VL, Idefics3/SmolVLM, LLaVA, ...). Such a model loads with
AutoModelForImageTextToText and its AutoProcessor; everything else stays a causal LM.

What changes for a VLM (README "Images (vision-language models)"):
- data: core/data/images.py reads and processes the images in the Ray Data stages; each row carries its processor
  outputs (pixel values, grid sizes...) as one `vision` blob (np.savez bytes: Arrow needs one type per column);
- batches: two padded rows per pair (chosen, rejected), each with the pair's images (collate_vision). The shared-prompt
  row is not used: the prompt's image tokens expand there, and some models' position ids (Qwen2-VL's mrope) are
  computed from the image tokens in the row, which a row holding the prompt once and two answers breaks;
- training: the vision tower is frozen unless training_config.model.freeze_vision_tower is false; the projector
  (merger / multi_modal_projector / connector) and the language model train; LoRA adapters never go on a frozen tower;
- reference: LoRA's base with adapters disabled, or a live reference engine; the precompute stage when asked for
  (its rows carry the `vision` blob through the stage and its cache).
"""
from __future__ import annotations

import io

# Submodule names (a path component) of the vision encoder, and of the projector that may sit inside it
# (Qwen2-VL's `visual.merger`). Covers transformers' Qwen2-VL/2.5-VL (visual), LLaVA/LLaVA-NeXT/Gemma 3/Mistral 3
# (vision_tower), Idefics3/SmolVLM/Idefics2 (vision_model).
VISION_TOWERS = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTORS = ("merger", "multi_modal_projector", "connector", "mm_projector")
# forward arguments a VLM takes beside input_ids / attention_mask: they ride in the batch as top-level keys
VISION_KWARGS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask", "mm_token_type_ids",
                 "token_type_ids")
# processor outputs aligned with the prompt's tokens ([1, prompt length]): padded with the row, 0 on answer tokens
TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")


def is_vision_config(config) -> bool:
    if getattr(config, "vision_config", None) is not None:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def model_class(config):
    """The transformers auto class that loads this config's model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def in_vision_tower(name: str) -> bool:
    """Whether a parameter or module name lies in the vision encoder (not in a projector inside it)."""
    parts = name.split(".")
    return any(p in VISION_TOWERS for p in parts) and not any(p in PROJECTORS for p in parts)


def freeze_vision_tower(model) -> int:
    """requires_grad off on the vision encoder's parameters; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if in_vision_tower(name):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def lora_exclusions(model, freeze: bool) -> list[str] | None:
    """Module names LoRA must not adapt: the frozen vision tower's (peft's exclude_modules takes exact names)."""
    if not freeze:
        return None
    return [name for name, _ in model.named_modules() if name and in_vision_tower(name)] or None


def reference_for(strategy: str, lora: bool) -> str:
    """The reference strategy of a VLM run: `auto` is LoRA's adapters disabled, else a live engine, not the
    precompute stage a text run picks: its cache would hold every row's pixel values (training/reference.py).
    `precompute` asked for explicitly runs that stage, images included."""
    if strategy == "auto":
        return "adapter_disabled" if lora else "engine"
    return strategy


# ---------------------------------------------------------------- a micro-batch without images (ZeRO-3)
# Under ZeRO-3 every rank gathers a module's weights when any rank runs it, in the order the modules run: a rank whose
# micro-batch holds no image would skip the vision encoder and the projector while the others gather them (measured
# here: a 2-worker run's rank 0 died in gloo at step 1). Such a batch carries a blank image's inputs under
# DUMMY-prefixed keys; every forward (policy, reference, validation) runs them through the encoder and projector where
# a batch with images runs its own (after the token embedding, before the language model: a pre-hook on the language
# model) and adds the output times zero to the language model's input embeddings (LLaVA's trick): the same modules in
# the same order on every rank, zero gradients, the same log-probs.
DUMMY = "dummy_vision_"
LANGUAGE_MODELS = ("model.language_model", "model.text_model", "language_model", "text_model")


def blank_image_inputs(processor) -> dict:
    """The processor's image inputs (pixel values, grid sizes...) of one blank 64x64 image, DUMMY-prefixed torch
    tensors, made once per worker and added to each micro-batch that has no image (with_blank_image)."""
    from PIL import Image

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    out = processor(text=[text], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    return {DUMMY + k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", *TOKEN_ALIGNED)}


def with_blank_image(batch: dict, blank: dict | None) -> dict:
    """The collated micro-batch, with the blank image's inputs when none of its rows holds an image."""
    return batch if blank is None or "pixel_values" in batch else batch | blank


def _tensors(value):
    import torch

    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):  # transformers' ModelOutput is a dict
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _unwrapped(model):
    """The transformers model under a DeepSpeed engine (.module) and PEFT (.get_base_model())."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model_of(model):
    base = _unwrapped(model)
    for name in LANGUAGE_MODELS:
        try:
            return base.get_submodule(name)
        except AttributeError:
            continue
    raise AttributeError(f"{type(base).__name__} has none of {', '.join(LANGUAGE_MODELS)}")


def blank_image_forward(model, batch: dict):
    """A context for one forward of `model` on `batch`: when the batch carries the blank image (DUMMY keys), the
    language model's input embeddings get 0 x the vision encoder's and projector's output on it, computed just
    before the language model runs. Nothing otherwise."""
    import contextlib

    inputs = {k[len(DUMMY):]: v for k, v in batch.items() if isinstance(k, str) and k.startswith(DUMMY)}
    if not inputs:
        return contextlib.nullcontext()
    base = _unwrapped(model)

    def add_blank(_module, args, kwargs):
        features = base.get_image_features(**inputs)
        zero = sum(t.float().sum() for t in _tensors(features) if t.is_floating_point()) * 0.0
        embeds = kwargs["inputs_embeds"]
        return args, kwargs | {"inputs_embeds": embeds + zero.to(embeds.dtype)}

    @contextlib.contextmanager
    def hooked():
        # prepend: before DeepSpeed's own pre-hook on the language model, as the encoder runs before the language
        # model is entered in a batch with images (ZeRO-3 checks that every rank fetches in the same module order)
        handle = language_model_of(base).register_forward_pre_hook(add_blank, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    return hooked()


# ---------------------------------------------------------------- the `vision` column: processor outputs as bytes

def pack(arrays: dict) -> bytes:
    """Processor outputs of one prompt (numpy arrays) as npz bytes; no pickles (allow_pickle stays off)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def unpack(blob) -> dict:
    import numpy as np

    with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def collate_vision(blobs: list, width: int) -> dict:
    """The VLM forward inputs of a padded pair batch: rows are the B chosen sequences then the B rejected ones, so
    each pair's images come twice, in that order. Per-image tensors (pixel_values [images or patches, ...],
    image_grid_thw, image_sizes) are concatenated; a processor that keeps a batch axis (Idefics3's pixel_values
    [1, images, C, H, W] and pixel_attention_mask) is padded with empty images to the widest row and stacked (its
    model drops all-zero images); prompt-aligned token types are right-padded with 0 to the batch width."""
    import numpy as np
    import torch

    rows = [unpack(b) for b in blobs]
    rows = rows + rows  # chosen rows, then rejected rows
    out: dict = {}
    keys = sorted({k for row in rows for k in row})
    batched = batched_axis(rows)
    for key in keys:
        if batched and key in ("pixel_values", "pixel_attention_mask"):  # a row without images: none, in its slot
            template = next(row[key] for row in rows if key in row)
            rows = [row if key in row else row | {key: template[:, :0]} for row in rows]
        values = [row[key] for row in rows if key in row]
        if key in TOKEN_ALIGNED:
            padded = np.zeros((len(rows), width), dtype=values[0].dtype)
            for i, row in enumerate(rows):
                if key in row:
                    padded[i, : row[key].shape[-1]] = row[key].reshape(-1)
            out[key] = torch.from_numpy(padded)
        elif batched and key in ("pixel_values", "pixel_attention_mask"):
            most = max(v.shape[1] for v in values)
            stacked = [np.concatenate([v, np.zeros((1, most - v.shape[1], *v.shape[2:]), v.dtype)], axis=1)
                       for v in values]
            out[key] = torch.from_numpy(np.concatenate(stacked, axis=0))
        else:
            out[key] = torch.from_numpy(np.concatenate(values, axis=0))
    return out


def batched_axis(rows: list[dict]) -> bool:
    """Whether the processor kept a batch axis on pixel_values ([1, images, C, H, W]: Idefics3, SmolVLM)."""
    return any("pixel_values" in row and row["pixel_values"].ndim == 5 for row in rows)
