"""Vision-language models: what core/vision.py decides, and a pair's loss against a hand computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import vision


def test_vision_tower_names_leave_projectors_and_language_model_out():
    assert vision.in_vision_tower("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    assert vision.in_vision_tower("model.visual.blocks.0.attn.qkv.weight")  # Qwen2-VL
    assert vision.in_vision_tower("model.vision_model.embeddings.patch_embedding.weight")  # Idefics3
    assert not vision.in_vision_tower("model.visual.merger.mlp.0.weight")  # Qwen2-VL's projector sits in `visual`
    assert not vision.in_vision_tower("model.multi_modal_projector.linear_1.weight")
    assert not vision.in_vision_tower("model.connector.modality_projection.proj.weight")
    assert not vision.in_vision_tower("model.language_model.layers.0.self_attn.q_proj.weight")
    assert not vision.in_vision_tower("lm_head.weight")


def test_reference_of_a_vision_run():
    assert vision.reference_for("auto", lora=True) == "adapter_disabled"
    assert vision.reference_for("auto", lora=False) == "engine"
    assert vision.reference_for("engine", lora=True) == "engine"
    # the precompute stage takes image rows (tests/training/test_reference.py), when asked for: its cache holds the
    # pixel values, so `auto` does not pick it for a VLM as it does for a full-rank text run
    assert vision.reference_for("precompute", lora=False) == "precompute"


def test_collate_vision_gives_each_pair_its_images_twice_in_row_order():
    first = {"pixel_values": np.full((2, 3, 4, 4), 1.0, np.float32), "image_grid_thw": np.array([[1, 2, 2]] * 2)}
    second = {"pixel_values": np.full((1, 3, 4, 4), 2.0, np.float32), "image_grid_thw": np.array([[1, 2, 2]])}
    out = vision.collate_vision([vision.pack(first), vision.pack(second)], width=9)
    # rows: chosen of pair 1, chosen of pair 2, rejected of pair 1, rejected of pair 2
    assert out["pixel_values"].shape == (6, 3, 4, 4)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1, 1, 2, 1, 1, 2]
    assert out["image_grid_thw"].shape == (6, 3)


def test_collate_vision_pads_token_types_and_a_kept_batch_axis():
    first = {"pixel_values": np.ones((1, 2, 3, 4, 4), np.float32), "mm_token_type_ids": np.array([[0, 1, 1]])}
    second = {"pixel_values": np.ones((1, 1, 3, 4, 4), np.float32), "mm_token_type_ids": np.array([[1, 0]])}
    out = vision.collate_vision([vision.pack(first), vision.pack(second)], width=5)
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]] * 2
    assert out["pixel_values"].shape == (4, 2, 3, 4, 4)  # padded to the most images with an empty (zero) one
    assert out["pixel_values"][1, 1].abs().sum() == 0 and out["pixel_values"][0, 1].abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tests.tiny_vlm import build_tiny_vlm_dir

    folder = tmp_path_factory.mktemp("vlm")
    return build_tiny_vlm_dir(folder / "policy", seed=0), build_tiny_vlm_dir(folder / "reference", seed=1)


def test_a_vlm_config_loads_as_image_text_to_text_with_padded_rows(tiny_vlm):
    from transformers import AutoModelForImageTextToText

    from core.batch import model_layout
    from core.models import load_config

    config = load_config(str(tiny_vlm[0]))
    assert vision.is_vision_config(config) and vision.model_class(config) is AutoModelForImageTextToText
    assert model_layout(config, share_prompt=True) == "padded"  # never the shared-prompt row


def test_freezing_and_lora_leave_the_vision_tower_alone(tiny_vlm):
    from peft import get_peft_model

    from core.config import LoraTuning
    from core.models import load_config, lora_config

    model = vision.model_class(load_config(str(tiny_vlm[0]))).from_pretrained(str(tiny_vlm[0]))
    assert vision.freeze_vision_tower(model) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable) and any("language_model" in n for n in trainable)
    lora = get_peft_model(model, lora_config(LoraTuning(), exclude_modules=vision.lora_exclusions(model, True)))
    adapted = [n for n, _ in lora.named_parameters() if "lora_" in n]
    assert adapted and not any("vision_tower" in n for n in adapted)
    assert any("multi_modal_projector" in n for n in adapted)


def answer_logp_by_hand(model, processor, prompt_ids, answer_ids, pixel_values) -> float:
    """log p(answer | prompt, images) from the model's own full logits of one unpadded sequence."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    logits = model(input_ids=ids, pixel_values=pixel_values).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())


def test_loss_of_an_image_pair_matches_a_hand_computation(tiny_vlm, tmp_path):
    """A Nova image row -> the data stage's tokens and images -> the padded batch -> sequence_logps_of through the
    log-prob head -> TRL's sigmoid loss; against each answer's log-prob from the model's full logits, one sequence at
    a time, and -log sigmoid(beta * margin) by hand."""
    from transformers import AutoModelForImageTextToText

    from core.batch import collate_pairs
    from core.data.formats import parse_line
    from core.data.images import load_processor, vision_tokenize_record
    from core.forward import add_logps_head, sequence_logps_of
    from tests.tiny_vlm import image_bytes, nova_image_row
    from training.losses import dpo_loss

    policy_dir, reference_dir = map(str, tiny_vlm)
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(image_bytes(i))
    row = nova_image_row(["s3://bucket/a.png", "s3://bucket/b.png"], "What differs?", "The colours.", "Nothing.")
    record, error = parse_line(json.dumps(row), "pairs.jsonl:1")
    assert error is None and record["images"] == 2
    # the images are local here (the slow tests read them from S3): point the record's URIs at the files
    record["media"] = record["media"].replace("s3://bucket/a.png", str(tmp_path / "img0.png")) \
        .replace("s3://bucket/b.png", str(tmp_path / "img1.png"))
    processor = load_processor(policy_dir)
    row = vision_tokenize_record(record, processor, max_length=256)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert row["prompt_ids"].count(image_token) == 2 * 4  # two images of 2x2 patches, expanded in the prompt
    batch = collate_pairs({k: [row[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "vision")},
                          pad_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 4  # two rows, each with the pair's two images

    beta = 0.1
    logps = {}
    for name, folder in (("policy", policy_dir), ("reference", reference_dir)):
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        pixels = vision.unpack(row["vision"])["pixel_values"]
        with torch.no_grad():
            by_hand = [answer_logp_by_hand(model, processor, row["prompt_ids"], row[k], torch.from_numpy(pixels))
                       for k in ("chosen_ids", "rejected_ids")]
            add_logps_head(model)
            ours, counts = sequence_logps_of(model, batch)
        assert counts.tolist() == [len(row["chosen_ids"]), len(row["rejected_ids"])]
        assert ours.tolist() == pytest.approx(by_hand, abs=1e-4)
        logps[name] = ours
    losses, _, _ = dpo_loss(logps["policy"][:1], logps["policy"][1:], logps["reference"][:1],
                            logps["reference"][1:], loss_type="sigmoid", beta=beta)
    margin = (logps["policy"][0] - logps["reference"][0]) - (logps["policy"][1] - logps["reference"][1])
    assert float(losses[0]) == pytest.approx(-float(torch.nn.functional.logsigmoid(beta * margin)), abs=1e-6)


def test_preference_evaluation_scores_image_pairs_with_their_images(tiny_vlm, tmp_path):
    """evaluation/preference.py's actor on a VLM: the same log-probs as the training forward, and the images count
    (the same pair with other images scores differently)."""
    from evaluation.preference import LogpsActor, PreferenceSettings
    from core.data.formats import parse_line
    from tests.tiny_vlm import image_bytes, nova_image_row

    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(image_bytes(i))
    record, _ = parse_line(json.dumps(nova_image_row(["s3://bucket/a.png"], "What colour?", "Red.", "Blue.")), "f:1")
    records = [json.loads(json.dumps(record).replace("s3://bucket/a.png", str(tmp_path / f"img{i}.png")))
               for i in range(2)]
    actor = LogpsActor(str(tiny_vlm[0]), reference=None, settings=vars(PreferenceSettings()))
    out = actor({"index": [0, 1], "record": [json.dumps(r) for r in records]})
    assert out["tokens_chosen"][0] == out["tokens_chosen"][1] > 0
    assert out["logp_chosen"][0] != pytest.approx(out["logp_chosen"][1], abs=1e-7)  # the image changes the score


def test_a_batch_without_images_still_runs_the_vision_tower_times_zero(tiny_vlm):
    """ZeRO-3 (core/vision.py DUMMY): a micro-batch of text-only rows gets a blank image's inputs; the forward runs
    the vision encoder and the projector on it where a batch with images runs them (the same modules in the same
    order: ZeRO-3 gathers each module's weights on every rank as it runs) and adds their output x 0: the same
    log-probs, and zero gradients on the encoder and projector where a batch with images has gradients."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from core.batch import collate_pairs
    from core.data.images import load_processor
    from core.forward import add_logps_head, sequence_logps_of

    processor = load_processor(str(tiny_vlm[0]))
    pad_id = processor.tokenizer.pad_token_id
    blank = vision.blank_image_inputs(processor)
    assert set(blank) == {"dummy_vision_pixel_values"} and blank["dummy_vision_pixel_values"].shape[0] == 1
    ids = processor.tokenizer("What colour is the sky?", add_special_tokens=False)["input_ids"]
    pairs = {"prompt_ids": [ids, ids[:3]], "chosen_ids": [[5, 6, 7], [8]], "rejected_ids": [[9], [10, 11]],
             "vision": [vision.pack({}), vision.pack({})]}  # text-only rows of image data: no processor outputs
    plain = collate_pairs(pairs, pad_id=pad_id)
    assert "pixel_values" not in plain
    with_blank = vision.with_blank_image(plain, blank)
    assert set(with_blank) == set(plain) | set(blank)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    real = processor(text=[text], images=[Image.new("RGB", (40, 32), "red")], return_tensors="np")
    images = collate_pairs({"prompt_ids": [real["input_ids"][0].tolist()], "chosen_ids": [[5]], "rejected_ids": [[9]],
                            "vision": [vision.pack({"pixel_values": real["pixel_values"]})]}, pad_id=pad_id)
    assert vision.with_blank_image(images, blank) is images  # a batch with images is left as it is

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vlm[0]))
    add_logps_head(model)
    calls = []
    for name, module in (("embed", model.model.language_model.embed_tokens), ("tower", model.model.vision_tower),
                         ("projector", model.model.multi_modal_projector),
                         ("layer 0", model.model.language_model.layers[0])):
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    # a pre-hook on the language model registered before the forward, as DeepSpeed's ZeRO-3 fetch hook is: it must
    # see the encoder already run, as in a batch with images
    model.model.language_model.register_forward_pre_hook(lambda *_: calls.append("language model"))

    def run(batch):
        calls.clear()
        model.zero_grad(set_to_none=True)
        logps, _ = sequence_logps_of(model, batch)
        logps.sum().backward()
        return logps.detach(), list(calls), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    expected, order, _ = run(plain)
    assert order == ["embed", "language model", "layer 0"]  # without the blank image the encoder is skipped: the ZeRO-3 failure
    _, image_order, image_grads = run(images)
    assert image_order == ["embed", "tower", "projector", "language model", "layer 0"]
    got, order, grads = run(with_blank)
    assert order == image_order and torch.equal(got, expected)
    assert set(grads) == set(image_grads) and any("vision_tower" in n for n in grads)
    assert all(g.abs().sum() == 0 for n, g in grads.items() if "vision_tower" in n or "projector" in n)
