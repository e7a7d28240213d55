"""Images in preference rows, for vision-language models (core/vision.py): checked, read, decoded and processed in
the Ray Data stages, never on the training workers.

Two stages:
- `check_images` (map_batches over parsed records, in the pre-flight pass and again before tokenising, so both see
  the same good rows): every image a row names must exist, be at most MAX_IMAGE_BYTES, and have a readable header of
  at most MAX_IMAGE_PIXELS (one metadata call and one ranged read of its first bytes per image). With a text model,
  a row holding images is bad: a text model would silently train on the prompt without its images.
- `VisionTokenizeStage` (the tokenising stage for a VLM): the prompt through the model's processor (its chat template
  with image placeholders, its image processor), so prompt_ids hold the expanded image tokens and a `vision` column
  holds the processor's image outputs (core/vision.pack); the answers tokenised as text. An image that fails to
  decode there is a DataError naming file:line and the image's URI.
"""
from __future__ import annotations

import io
import json

from core.errors import DataError

MAX_IMAGE_BYTES = 20 * 1024**2     # per image file; a larger one is a bad row (and likely a mistake)
MAX_IMAGE_PIXELS = 50_000_000      # width x height: beyond it PIL's decoder guards against decompression bombs
HEADER_BYTES = 256 * 1024          # the ranged read that reads an image's header in the check
# Nova's recipes for image data: at most this many samples per data set and this max_length (text data: 32768)
NOVA_IMAGE_MAX_SAMPLES = 20_000
NOVA_IMAGE_MAX_LENGTH = 16_384


class ImageError(Exception):
    """An image a row names cannot be used; the message names its URI and the reason."""


def image_uris(media: str | None) -> list[str]:
    """The URIs of a record's images, in prompt order, from its media column (core/data/record.py)."""
    if not isinstance(media, str) or not media:
        return []
    return [part["uri"] for turn in json.loads(media) if turn for part in turn if part.get("type") == "image"]


def _open(uri: str):
    from core import storage

    return storage.filesystem_for(uri)


def image_problem(uri: str) -> str | None:
    """Why the image at uri cannot be used (missing, too large, not an image), or None. Reads its header only."""
    from PIL import Image

    from core import storage

    try:
        fs, path = _open(uri)
        info = storage.with_retries("read", uri, lambda: fs.info(path))
        size = int(info.get("size") or 0)
        if size > MAX_IMAGE_BYTES:
            return f"image {uri} is {size / 1024**2:.1f} MiB; at most {MAX_IMAGE_BYTES // 1024**2} MiB per image"
        head = storage.with_retries("read", uri, lambda: fs.cat_file(path, start=0, end=min(size, HEADER_BYTES)))
    except Exception as err:  # noqa: BLE001 - StorageError (missing, denied) or a bad URI: the row's reason
        return f"image {uri} cannot be read: {getattr(err, 'what', None) or err}" + (
            f" ({err.why})" if getattr(err, "why", "") else "")
    try:
        with Image.open(io.BytesIO(head)) as image:
            width, height = image.size
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a non-image
        return f"image {uri} is not a readable image ({type(err).__name__}: {err})"
    if width * height > MAX_IMAGE_PIXELS:
        return f"image {uri} is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels per image"
    return None


def row_image_problem(record: dict, vision: bool) -> str | None:
    """Why a parsed record cannot train with this model because of its images, or None."""
    count = int(record.get("images") or 0)
    if not count:
        return None
    if not vision:
        return (f"holds {count} image(s), but run.model_name_or_path is a text model; train a vision-language model "
                "(one AutoModelForImageTextToText loads) on image rows, or drop them")
    uris = image_uris(record.get("media"))
    if len(uris) != count:
        return f"holds {count} image(s) but their URIs are not kept for this format; use Nova rows for images"
    return next((problem for problem in map(image_problem, uris) if problem), None)


def check_images(batch: dict, vision: bool) -> dict:
    """Ray Data stage over parsed records: a good row whose images cannot be used gets its reason as the error."""
    errors = list(batch["error"])
    for i, error in enumerate(errors):
        if (isinstance(error, str) and error) or not int(batch["images"][i] or 0):
            continue
        record = {"images": batch["images"][i], "media": batch["media"][i]}
        errors[i] = row_image_problem(record, vision) or None
    return {**batch, "error": errors}


def check_image_data_limits(pairs: int, images: int, max_length: int, what: str) -> None:
    """Nova's limits for a data set holding images (`pairs` good rows, `images` images in them): max_length at most
    NOVA_IMAGE_MAX_LENGTH (a ConfigError: the recipe is wrong) and at most NOVA_IMAGE_MAX_SAMPLES rows (a DataError).
    A data set without images is not limited here. Called by the driver right after the pre-flight pass."""
    from core.errors import ConfigError

    if not images:
        return
    if max_length > NOVA_IMAGE_MAX_LENGTH:
        raise ConfigError(f"training_config.max_length={max_length} is above {NOVA_IMAGE_MAX_LENGTH} and the {what} "
                          f"holds {images} image(s)",
                          why=f"Nova's recipes limit data with images to max_length {NOVA_IMAGE_MAX_LENGTH} (text "
                              "data: 32768); raydpo keeps its recipes portable to Nova",
                          fix=f"set training_config.max_length to at most {NOVA_IMAGE_MAX_LENGTH}")
    if pairs > NOVA_IMAGE_MAX_SAMPLES:
        raise DataError(f"the {what} holds {pairs} pairs with {images} image(s); data with images is limited to "
                        f"{NOVA_IMAGE_MAX_SAMPLES} pairs",
                        why=f"Nova's recipes limit a data set with images to {NOVA_IMAGE_MAX_SAMPLES:,} samples; "
                            "raydpo keeps its recipes portable to Nova",
                        fix=f"train on at most {NOVA_IMAGE_MAX_SAMPLES} pairs (a sample of the data, or several runs "
                            "each resuming from the last one's model)")


# ---------------------------------------------------------------- reading and processing

def load_image(uri: str):
    """The decoded image (RGB), or ImageError naming the URI."""
    from PIL import Image

    from core import storage

    try:
        data = storage.read_bytes(uri)
    except Exception as err:  # noqa: BLE001
        raise ImageError(f"image {uri} cannot be read: {getattr(err, 'what', None) or err}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image {uri} is {len(data) / 1024**2:.1f} MiB; at most {MAX_IMAGE_BYTES // 1024**2} MiB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
                raise ImageError(f"image {uri} is {image.size[0]}x{image.size[1]} pixels; at most "
                                 f"{MAX_IMAGE_PIXELS:,}")
            return image.convert("RGB")  # decodes fully: a truncated file fails here
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ImageError(f"image {uri} cannot be decoded ({type(err).__name__}: {err})") from None


def conversation(record: dict, default_system: str | None) -> tuple[list[dict], list[str]]:
    """(chat messages with content parts, image URIs in order) of a record's prompt: images stand where the row had
    them, as {"type": "image"} parts that the processor's chat template turns into its image placeholder."""
    media = json.loads(record["media"]) if isinstance(record.get("media"), str) else None
    system = record.get("system") or default_system
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    uris: list[str] = []
    for index, turn in enumerate(record["prompt"]):
        parts = (media[index] if media else None) or [{"type": "text", "text": turn["content"]}]
        content = []
        for part in parts:
            if part["type"] == "image":
                uris.append(part["uri"])
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part["text"]})
        messages.append({"role": turn["role"], "content": content})
    return messages, uris


def answer_text(processor, messages: list[dict], answer: str, prompt_text: str) -> str:
    """The answer's turn as the chat template writes it after the prompt (with its end-of-turn tokens)."""
    full = processor.apply_chat_template(messages + [{"role": "assistant", "content": [{"type": "text",
                                                                                         "text": answer}]}],
                                         tokenize=False)
    if not full.startswith(prompt_text):  # a template that rewrites earlier turns: the answer alone, as TRL does
        return answer
    return full[len(prompt_text):]


def vision_tokenize_record(record: dict, processor, *, max_length: int, default_system: str | None = None) -> dict:
    """prompt_ids (image tokens expanded), chosen_ids, rejected_ids, truncated, source and `vision` (npz bytes of the
    processor's image outputs). The prompt is never cut (cutting through image tokens breaks the model's inputs):
    answers are cut to what max_length leaves; a prompt that leaves no room is a DataError."""
    from core import vision

    source = record.get("source", "")
    messages, uris = conversation(record, default_system)
    try:
        images = [load_image(uri) for uri in uris]
    except ImageError as err:
        raise DataError(f"{source}: {err}", why="the image was checked before training but cannot be used now",
                        fix="replace or fix the image (or drop the row) and run again") from None
    prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    outputs = processor(text=[prompt_text], images=images or None, return_tensors="np")
    prompt = [int(t) for t in outputs["input_ids"][0]]
    tokenizer = processor.tokenizer
    answers = [tokenizer(answer_text(processor, messages, record[k], prompt_text),
                         add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected")]
    room = max_length - len(prompt)
    if room < 1:
        raise DataError(f"{source}: the prompt takes {len(prompt)} tokens with its {len(images)} image(s), "
                        f"training_config.max_length={max_length} leaves no room for the answers",
                        why="image tokens are never cut, so a prompt with images must fit max_length",
                        fix="raise training_config.max_length (Nova allows 16384 for image data) or use smaller "
                            "images (the processor's min/max pixels)")
    chosen, rejected = (a[:room] for a in answers)
    extras = {k: v for k, v in outputs.items() if k not in ("input_ids", "attention_mask")}
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "truncated": len(chosen) < len(answers[0]) or len(rejected) < len(answers[1]), "source": source,
            "vision": vision.pack(extras)}


def load_processor(source: str):
    from transformers import AutoProcessor

    from core.models import resolve_model_source

    processor = AutoProcessor.from_pretrained(resolve_model_source(source))
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


class VisionTokenizeStage:
    """Ray Data map_batches stage for a VLM: loads the processor once per actor, processes a batch of records."""

    def __init__(self, model_source: str, max_length: int, default_system: str | None, **_text_only):
        self.processor = load_processor(model_source)
        self.kwargs = dict(max_length=max_length, default_system=default_system)

    def __call__(self, batch: dict) -> dict:
        from core.data.tokenize import _plain

        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [vision_tokenize_record(_media(_plain(row)), self.processor, **self.kwargs) for row in rows]
        return {key: [row[key] for row in out] for key in ("prompt_ids", "chosen_ids", "rejected_ids", "truncated",
                                                           "source", "vision")}


def _media(row: dict) -> dict:
    """An all-null media column arrives as NaN floats (Arrow): None."""
    return {**row, "media": row["media"] if isinstance(row.get("media"), str) else None}
