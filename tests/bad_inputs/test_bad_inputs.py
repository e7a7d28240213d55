"""Every case of the bad-input corpus (cases.py) through the CLI: the documented exit code, a message that names the
file:line or dotted key, no traceback, nothing written to the output path; and the README lists exactly these."""
from __future__ import annotations

import pytest

from launcher.cli import main
from tests.bad_inputs.cases import CASES, OUT, ROOT, readme_section, table


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_bad_input_is_refused_with_a_message_and_nothing_written(case, tmp_path, tiny_model_dir, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("RAYDPO_CACHE", str(tmp_path / "cache"))  # a GGUF conversion would land here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = tmp_path / "case"
    folder.mkdir()
    argv = case.make(folder, tiny_model_dir)
    try:
        code = main(argv)
        way_out = "fix:"
    except SystemExit as exit_:  # argparse's own refusals (an unknown flag, a value that is not a number)
        code, way_out = exit_.code, "usage: raydpo"  # argparse shows the usage instead
    out, err = capsys.readouterr()
    text = out + err
    assert code == case.exit_code, text
    for words in case.says:
        assert words.format(dir=folder) in text, text
    assert way_out in text, text  # how to fix it
    assert "Traceback" not in text
    assert not (folder / OUT).exists(), "a bad input wrote to the output path"
    import ray

    assert not ray.is_initialized()  # refused before any cluster started


def test_the_corpus_covers_at_least_25_kinds_of_every_sort():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"recipe", "data", "model", "cli"}


def test_the_readme_lists_the_corpus_as_it_is():
    assert readme_section((ROOT / "README.md").read_text()) == table(), \
        "README's bad-input table is stale: paste `python -m tests.bad_inputs.cases` between its markers"
