"""The held-out split and bad-row detection used by the Ray Data stages, and the driver's path for small data."""
import json
import math

import pytest

from core.data.pipeline import is_bad, split_of


def test_split_is_stable_and_close_to_the_fraction():
    sources = [f"data.jsonl:{i}" for i in range(1, 4001)]
    splits = [split_of(s, 0.25, seed=7) for s in sources]
    assert splits == [split_of(s, 0.25, seed=7) for s in sources]  # same on every worker and every run
    share = splits.count("validation") / len(splits)
    assert abs(share - 0.25) < 0.03
    assert [split_of(s, 0.25, seed=8) for s in sources] != splits  # the seed moves it
    assert {split_of(s, 0.0, seed=7) for s in sources} == {"train"}


def test_split_does_not_depend_on_where_the_files_are():
    local = [split_of(f"/tmp/pytest-158/data/pairs.jsonl:{i}", 0.3, seed=1) for i in range(1, 200)]
    assert local == [split_of(f"s3://bucket/prefix/pairs.jsonl:{i}", 0.3, seed=1) for i in range(1, 200)]
    assert local == [split_of(f"pairs.jsonl:{i}", 0.3, seed=1) for i in range(1, 200)]
    assert local != [split_of(f"/tmp/pytest-158/data/other.jsonl:{i}", 0.3, seed=1) for i in range(1, 200)]


def test_only_strings_are_errors():
    assert is_bad("missing key 'chosen'")
    assert not is_bad(None) and not is_bad("") and not is_bad(math.nan)


def test_tokenizer_pool_grows_to_half_the_cluster_or_is_fixed():
    from core.data.pipeline import tokenizer_pool

    assert tokenizer_pool(4) == (1, 2)
    assert tokenizer_pool(1) == (1, 1) and tokenizer_pool(3.0) == (1, 1)
    assert tokenizer_pool(64 * 32) == (1, 1024)
    assert tokenizer_pool(64, actors=2) == (2, 2)


def test_small_local_data_is_read_in_one_process(tmp_path):
    from core.data.pipeline import fits_one_process

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 10)
    assert fits_one_process([str(data)]) and fits_one_process([str(tmp_path)])
    assert not fits_one_process([str(data)], limit=data.stat().st_size - 1)
    assert not fits_one_process(["s3://bucket/pairs.jsonl"])  # remote data goes through Ray Data


@pytest.mark.slow
def test_the_driver_path_gives_the_ray_data_paths_rows(tmp_path, tiny_model_dir, monkeypatch):
    """The pre-flight counts and bad rows, and the tokenised rows of each split, the same both ways."""
    import ray

    from core.data import pipeline
    from core.data.synthetic import answer_format_pairs
    from launcher.recipe import load_recipe

    rows = [json.dumps(r) for r in answer_format_pairs(40, seed=2)]
    rows[3] = '{"prompt": "no answers"}'
    rows[7] = "not json"
    (tmp_path / "a.jsonl").write_text("\n".join(rows[:20]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(rows[20:]) + "\n")
    raw = {"run": {"name": "r", "model_name_or_path": str(tiny_model_dir), "data_s3_path": str(tmp_path),
                   "output_s3_path": str(tmp_path / "out")},
           "training_config": {"max_length": 128, "global_batch_size": 4, "data": {"on_error": "skip"}}}
    recipe = load_recipe(raw)
    data, seed, uris = recipe.training_config.data, recipe.training_config.seed, [str(tmp_path)]

    def tokenized(split):
        ds = pipeline.tokenized_dataset(uris, recipe, split, 0.25)
        return sorted((r["source"], list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"]),
                       bool(r["truncated"])) for r in ds.take_all())

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        here = pipeline.preflight(uris, data, seed, 0.25), tokenized("train"), tokenized("validation")
        monkeypatch.setattr(pipeline, "IN_PROCESS_BYTES", -1)  # everything through Ray Data now
        assert not pipeline.fits_one_process(uris)
        there = pipeline.preflight(uris, data, seed, 0.25), tokenized("train"), tokenized("validation")
    finally:
        ray.shutdown()
    assert here[0].as_dict() == there[0].as_dict() and here[0].bad_rows == there[0].bad_rows
    assert len(here[0].bad_rows) == 2 and here[0].train_pairs + here[0].validation_pairs == 38
    assert here[0].validation_pairs > 0
    assert here[1] == there[1] and len(here[1]) == here[0].train_pairs
    assert here[2] == there[2] and len(here[2]) == here[0].validation_pairs
