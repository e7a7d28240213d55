"""A tiny vision-language model (LLaVA class: a CLIP vision tower, a projector, a Llama language model) with its own
tiny tokenizer and image processor, built offline in a second and saved like a real hub folder; and Nova image rows
whose images are generated here (PIL)."""
from __future__ import annotations

import io
from pathlib import Path

from tests.tiny import build_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 28  # 2 x 2 patches of 14 pixels: 4 image tokens per image
# the chat template of a VLM: content is a string or a list of {"type": "text"|"image"} parts
VLM_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = VLM_TEMPLATE
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=VLM_TEMPLATE, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_tiny_vlm_dir(path: Path, *, seed: int = 0, hidden: int = 32) -> Path:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    processor = build_processor()
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14,
                                       projection_dim=hidden),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, tie_word_embeddings=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=None),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (40, 32)) -> bytes:
    """A small random-colour image, different per seed."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def nova_image_row(uris: list[str], question: str, chosen: str, rejected: str) -> dict:
    """A Nova DPO row in the shape of Nova's documented example: a system prompt, a user turn with text and images
    (s3Location with bucketOwner), the assistant turn holding a preferred and a non-preferred candidate."""
    images = [{"image": {"format": "png", "source": {"s3Location": {"uri": uri, "bucketOwner": "123456789012"}}}}
              for uri in uris]
    return {
        "system": [{"text": "You describe pictures."}],
        "messages": [
            {"role": "user", "content": [{"text": question}, *images]},
            {"role": "assistant", "candidates": [
                {"content": [{"text": chosen}], "preferenceLabel": "preferred"},
                {"content": [{"text": rejected}], "preferenceLabel": "non-preferred"},
            ]},
        ],
    }
