"""`raydpo report` and `raydpo export` through launcher.cli.main: files written, exit codes, S3 round trip."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from tests.s3server import s3_server  # noqa: F401 - the session fixture
from tests.evaluation.test_report import make_run
from core import storage

ROOT = Path(__file__).resolve().parents[2]


def test_report_writes_beside_a_local_run(tmp_path, capsys):
    run = make_run(tmp_path, evaluation=False)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.split("\n")[:2] == [f"wrote {run / 'report.md'}", f"wrote {run / 'report.html'}"]
    assert (run / "plots" / "loss.png").exists()


def test_report_on_a_folder_of_runs_or_nothing_exits_2(tmp_path, capsys):
    make_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder" in err and str(tmp_path / "tiny-run") in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_of_an_s3_run_is_uploaded_beside_it(tmp_path, s3_server, capsys, monkeypatch):  # noqa: F811
    bucket = s3_server.make_bucket("raydpo-report-cli")
    try:
        run = make_run(tmp_path)
        (run / "model").mkdir()
        (run / "model" / "model.safetensors").write_bytes(b"weights")
        storage.upload_dir(str(run), f"{bucket}/out/tiny-run")
        uri = f"{bucket}/out/tiny-run"
        read = []
        real_read = storage.read_bytes
        monkeypatch.setattr(storage, "read_bytes", lambda u, **kw: read.append(u) or real_read(u, **kw))
        monkeypatch.setattr(storage, "download_dir", lambda *a, **kw: pytest.fail(f"downloaded a folder: {a}"))
        assert main(["report", uri]) == 0
        # only the small files the report reads: no model, no per-row eval records
        assert sorted(u[len(uri) + 1:] for u in read) == [
            "data_summary.json", "eval/config.json", "eval/gen_qa/results.json", "eval/preference/results.json",
            "eval/results.json", "metrics.jsonl", "recipe.yaml", "skipped_rows.jsonl", "summary.json"]
        assert capsys.readouterr().out.split("\n")[:2] == [f"wrote {uri}/report.md", f"wrote {uri}/report.html"]
        md = storage.read_bytes(f"{uri}/report.md").decode()
        assert md.startswith(f"# raydpo report: tiny-run\n\nRun: `{uri}`")
        assert "| f1 | 0.25 | 0.5 | +100.0% |" in md and "### preference" in md
        assert storage.read_bytes(f"{uri}/plots/loss.png")[:4] == b"\x89PNG"
        assert "data:image/png;base64," in storage.read_bytes(f"{uri}/report.html").decode()

        assert main(["report", f"{bucket}/out"]) == 2
        assert f"pass one of the runs inside it: {uri}" in capsys.readouterr().err
    finally:
        s3_server.remove_bucket("raydpo-report-cli")


def test_export_errors_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--merge", "--to", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = make_run(tmp_path, evaluation=False)
    assert main(["export", str(run), "--merge", "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no model to export" in err and "fix:" in err
    assert not (tmp_path / "out").exists()


def test_export_merges_through_the_cli(tmp_path, capsys):
    from tests.training.test_export import lora_run
    from tests.tiny import build_tiny_model_dir

    run = lora_run(tmp_path, build_tiny_model_dir(tmp_path / "base"))
    assert main(["export", str(run), "--merge", "--to", str(tmp_path / "merged")]) == 0
    assert "merging the LoRA adapter" in capsys.readouterr().out
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert main(["export", str(run), "--merge", "--to", str(tmp_path / "merged")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--merge", "--to", str(tmp_path / "merged"), "--overwrite"]) == 0


def test_commands_import_no_heavy_modules():
    code = ("import sys, launcher.commands.report, launcher.commands.export; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'mlflow', 'transformers', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
