"""Image rows: checked (missing, oversized, not an image) with the URI in the reason, read from S3, processed."""
from __future__ import annotations

import json

import pytest

from core.data import images
from core.data.formats import parse_line
from core.errors import ConfigError, DataError
from tests.s3server import s3_server  # noqa: F401 - the fixture
from tests.tiny_vlm import image_bytes, nova_image_row


def record_of(row: dict, source: str = "pairs.jsonl:3") -> dict:
    record, error = parse_line(json.dumps(row), source)
    assert error is None, error
    return record


@pytest.fixture(scope="module")
def bucket(s3_server):  # noqa: F811
    import s3fs

    name = s3_server.make_bucket("raydpo-images")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.pipe(f"{name}/img/ok.png", image_bytes(0))
    fs.pipe(f"{name}/img/big.png", image_bytes(1, size=(300, 200)))
    fs.pipe(f"{name}/img/text.png", b"not an image at all")
    fs.pipe(f"{name}/img/cut.png", image_bytes(2)[:120])  # a header, then nothing: fails only when decoded
    return name


def test_image_uris_in_prompt_order():
    record = record_of(nova_image_row(["s3://bkt/1.png", "s3://bkt/2.png"], "q", "a", "b"))
    assert images.image_uris(record["media"]) == ["s3://bkt/1.png", "s3://bkt/2.png"]
    assert images.image_uris(None) == []


def test_nova_limits_for_image_data():
    """At most 20000 pairs and max_length 16384 when the data holds images; text data is not limited here."""
    images.check_image_data_limits(20_000, 1, 16_384, "training data")  # both at the limit: fine
    images.check_image_data_limits(50_000, 0, 32_768, "training data")  # no images: Nova's text limits apply
    with pytest.raises(ConfigError, match="max_length=16385 is above 16384 and the training data holds 3 image"):
        images.check_image_data_limits(10, 3, 16_385, "training data")
    with pytest.raises(DataError, match="validation data holds 20001 pairs with 5 image.*limited to 20000") as err:
        images.check_image_data_limits(20_001, 5, 4096, "validation data")
    assert err.value.why and err.value.fix


def test_a_text_model_refuses_image_rows():
    record = record_of(nova_image_row(["s3://bkt/1.png"], "q", "a", "b"))
    assert "text model" in images.row_image_problem(record, vision=False)
    from core.data.tokenize import tokenize_record
    from tests.tiny import build_tokenizer

    with pytest.raises(DataError, match="pairs.jsonl:3: the row holds 1 image"):
        tokenize_record(record, build_tokenizer(), max_length=128)


def test_image_checks_name_the_uri_and_the_reason(bucket, monkeypatch):
    good = record_of(nova_image_row([f"{bucket}/img/ok.png"], "q", "a", "b"))
    assert images.row_image_problem(good, vision=True) is None
    missing = images.row_image_problem(record_of(nova_image_row([f"{bucket}/img/ok.png", f"{bucket}/img/no.png"],
                                                                "q", "a", "b")), vision=True)
    assert f"image {bucket}/img/no.png cannot be read" in missing
    not_image = images.row_image_problem(record_of(nova_image_row([f"{bucket}/img/text.png"], "q", "a", "b")),
                                         vision=True)
    assert f"image {bucket}/img/text.png is not a readable image" in not_image
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    big = images.row_image_problem(record_of(nova_image_row([f"{bucket}/img/big.png"], "q", "a", "b")), vision=True)
    assert f"image {bucket}/img/big.png is 300x200 pixels" in big
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    assert "MiB" in images.row_image_problem(good, vision=True)


def test_check_images_stage_marks_only_good_image_rows(bucket):
    rows = [record_of(nova_image_row([f"{bucket}/img/no.png"], "q", "a", "b"), "f:1"),
            record_of(nova_image_row([f"{bucket}/img/ok.png"], "q", "a", "b"), "f:2")]
    batch = {key: [r[key] for r in rows] + [None] for key in ("images", "media")}
    batch["error"] = [None, None, "malformed JSON"]
    out = images.check_images(batch, vision=True)
    assert "no.png cannot be read" in out["error"][0] and out["error"][1] is None
    assert out["error"][2] == "malformed JSON"


def test_an_image_that_fails_to_decode_is_a_data_error_with_file_line_and_uri(bucket, tmp_path):
    from tests.tiny_vlm import build_tiny_vlm_dir

    processor = images.load_processor(str(build_tiny_vlm_dir(tmp_path / "vlm")))
    record = record_of(nova_image_row([f"{bucket}/img/cut.png"], "q", "a", "b"), "s3://data/pairs.jsonl:7")
    with pytest.raises(DataError, match=f"s3://data/pairs.jsonl:7: image {bucket}/img/cut.png cannot be decoded"):
        images.vision_tokenize_record(record, processor, max_length=128)
    ok = record_of(nova_image_row([f"{bucket}/img/ok.png"], "q", "a long answer " * 8, "b"))
    row = images.vision_tokenize_record(ok, processor, max_length=60)  # image tokens are kept, answers are cut
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 60 and row["truncated"]
    with pytest.raises(DataError, match="leaves no room for the answers"):
        images.vision_tokenize_record(ok, processor, max_length=len(row["prompt_ids"]))


def test_the_vision_stage_rows_survive_arrow_and_collate(tmp_path):
    """VisionTokenizeStage's output as Ray Data keeps it (an Arrow table; numpy batches on the workers), then the
    padded collate: each pair's images come back in its rows."""
    import pyarrow as pa

    from core.batch import collate_pairs
    from core.data.formats import parse_batch
    from core.data.pipeline import as_columns
    from tests.tiny_vlm import build_tiny_vlm_dir

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
    rows = [nova_image_row(["s3://bkt/0.png", "s3://bkt/1.png"], "q", "yes", "no"),
            nova_image_row(["s3://bkt/2.png"], "r", "one two three", "four")]
    parsed = parse_batch({"text": [json.dumps(r) for r in rows], "source": ["f:1", "f:2"]})
    parsed["media"] = [m.replace("s3://bkt/", str(tmp_path) + "/") for m in parsed["media"]]  # local images here
    stage = images.VisionTokenizeStage(str(build_tiny_vlm_dir(tmp_path / "vlm")), max_length=128,
                                       default_system=None, max_prompt_length=None, keep="keep_end")
    table = pa.Table.from_pydict(stage(parsed))
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    shard = [dict(zip(batch, values)) for values in zip(*batch.values())]  # as core/data/pipeline.shard_rows
    collated = collate_pairs(as_columns(shard), pad_id=0)
    assert collated["input_ids"].shape[0] == 4
    assert collated["pixel_values"].shape[0] == 2 * (2 + 1)  # chosen rows' images, then the rejected rows'
