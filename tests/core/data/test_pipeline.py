"""The held-out split and bad-row detection used by the Ray Data stages."""
import math

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
