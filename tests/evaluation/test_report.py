"""The run report: pure helpers by hand, the markdown's content, and report.html rendered in headless Chromium."""
from __future__ import annotations

import json
import math
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from evaluation import report

CHROMIUM = Path("/usr/bin/chromium")


# ---- a fake run folder, shaped as training and evaluation write it

def metrics_rows(steps: int = 12, with_validation: bool = True) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        margin = 0.1 * step
        rows.append({"step": step, "epoch": step / steps, "split": "train", "loss": math.log(2) - 0.02 * step,
                     "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,
                     "rewards/accuracies": 0.5 + step / 40,
                     "rewards/margins": margin, "logps/chosen": -40.0, "logps/rejected": -45.0,
                     "lr": 1e-5 * min(1.0, step / 4), "grad_norm": 1.0, "tokens_per_s": 900.0, "elapsed_s": step})
        if with_validation and step % 4 == 0:
            rows.append({"step": step, "epoch": step / steps, "split": "validation", "loss": 0.7 - 0.01 * step,
                         "rewards/chosen": margin / 3, "rewards/rejected": -margin / 3,
                         "rewards/accuracies": 0.55, "rewards/margins": 2 * margin / 3})
    return rows


EVAL_RESULT = {  # shaped as launcher/commands/eval.py documents results.json
    "task": "gen_qa", "name": "tiny-run", "base": "base", "tuned": ["tuned"],
    "models": {"base": {"path": "/models/base", "metrics": {"f1": 0.25, "rouge1": 0.3, "exact_match": 0.0},
                        "n": 32, "truncated": 2, "truncated_rate": 0.0625},
               "tuned": {"path": "/runs/tiny-run/model", "metrics": {"f1": 0.5, "rouge1": 0.45, "exact_match": 0.125},
                         "n": 32, "truncated": 0, "truncated_rate": 0.0}},
    "relative_change": {"f1": 1.0, "rouge1": 0.5, "exact_match": None},
    "relative_change_by_model": {"tuned": {"f1": 1.0, "rouge1": 0.5, "exact_match": None}},
    "examples": [{"prompt": f"Question {i}: what is | a *pipe*?\nSecond line <b>", "reference": f"ref {i}",
                  "base": f"base answer {i}", "tuned": f"tuned answer {i}"} for i in range(5)],
    "data": {"path": "data/qa.jsonl", "rows": 32, "skipped": 0, "skipped_rows": []},
    "partial": False, "rows_file": "rows.jsonl",
}
PREFERENCE_RESULT = {"task": "preference", "models": {"base": {"metrics": {"accuracy": 0.5}, "n": 10},
                                                      "tuned": {"metrics": {"accuracy": 0.8}, "n": 10}}}


def make_run(root: Path, *, validation: bool = True, evaluation: bool = True) -> Path:
    run = root / "tiny-run"
    run.mkdir(parents=True)
    recipe = {"run": {"name": "tiny-run", "model_name_or_path": "tiny", "data_s3_path": "data/train.jsonl"},
              "training_config": {"global_batch_size": 8, "model": {"optim": {"lr": 1e-5},
                                                                     "dpo_cfg": {"beta": 0.1, "loss_type": "sigmoid"}}}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (run / "data_summary.json").write_text(json.dumps({
        "rows": {"hh": 90, "sharegpt": 10}, "good": 97, "bad": 3, "skipped": 3, "truncated": 4,
        "prompt_tokens": {"p50": 120, "p95": 480, "max": 900}, "response_tokens": {"p50": 60, "p95": 200, "max": 310}}))
    (run / "skipped_rows.jsonl").write_text("".join(json.dumps({"source": f"train.jsonl:{i}", "reason": "x"}) + "\n"
                                                    for i in (3, 9, 20)))
    (run / "summary.json").write_text(json.dumps({"steps": 12, "wall_s": 30.5, "final_train": {"loss": 0.45}}))
    with open(run / "metrics.jsonl", "w") as f:
        for row in metrics_rows(with_validation=validation):
            f.write(json.dumps(row) + "\n")
    if evaluation:  # as `raydpo eval` leaves it: each task's latest under eval/<task>/, the latest at eval/
        for task, result in (("preference", PREFERENCE_RESULT), ("gen_qa", EVAL_RESULT)):
            (run / "eval" / task).mkdir(parents=True)
            for folder in (run / "eval" / task, run / "eval"):
                (folder / "results.json").write_text(json.dumps(result))
                (folder / "rows.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
        (run / "eval" / "config.json").write_text(json.dumps({"not": "a result"}))
    return run


# ---- pure helpers, by hand

@pytest.mark.parametrize("value, text", [
    (3, "3"), (0.69314718, "0.6931"), (12.5, "12.5"), (1e-5, "1.000e-05"), (123456.0, "1.235e+05"),
    (0.0, "0"), (True, "True"), ("x", "x"), (math.nan, "nan"),
])
def test_fmt_number(value, text):
    assert report.fmt_number(value) == text


def test_fmt_percent_and_value():
    assert report.fmt_percent(0.125) == "+12.5%"
    assert report.fmt_percent(-0.5) == "-50.0%"
    assert report.fmt_value([1, 2, 3, 4, 5, 6, 7]) == "1, 2, 3, 4, 5, ... (7 in all)"
    assert report.fmt_value(None) == "null"


def test_md_cell_escapes_markup_pipes_and_newlines():
    assert report.md_cell("a|b *c*\n<x> & [y]") == r"a\|b \*c\*<br>&lt;x&gt; &amp; \[y\]"
    assert report.md_cell("_x_ a_b") == r"\_x\_ a_b"
    assert report.md_cell("abcdef", limit=3) == "abc ... (3 more chars)"


def test_md_cell_round_trips_through_markdown():
    import markdown

    text = "if a|b and *not* _this_ c_d\n<script>alert(1)</script> `code` [link](x)"
    rendered = markdown.markdown(report.md_table(["h"], [[text]]), extensions=["tables"])
    cell = re.search(r"<td>(.*)</td>", rendered, re.S).group(1)
    assert cell == ("if a|b and *not* _this_ c_d<br>&lt;script&gt;alert(1)&lt;/script&gt; `code` [link](x)")


def test_series_sorts_by_step_and_drops_missing_values():
    rows = [{"step": 2, "split": "train", "loss": 0.5}, {"step": 1, "loss": 0.7},
            {"step": 3, "split": "train", "loss": None}, {"step": 3, "split": "validation", "loss": 0.6},
            {"step": 4, "split": "train", "loss": math.inf}]
    assert report.series(rows, "loss", "train") == ([1, 2], [0.7, 0.5])
    assert report.series(rows, "loss", "validation") == ([3], [0.6])
    assert report.series(rows, "lr", "train") == ([], [])


def test_read_jsonl_reports_bad_lines_with_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\nnot json\n[1, 2]\n{"step": 2}\n')
    rows, bad = report.read_jsonl(path)
    assert rows == [{"step": 1}, {"step": 2}]
    assert [b.split(": ")[0] for b in bad] == ["metrics.jsonl:3", "metrics.jsonl:4"]


def test_eval_table_has_a_change_column_per_tuned_model():
    result = {"models": {"b": {"metrics": {"acc": 0.5}, "n": 4, "path": "/p"},
                         "t1": {"metrics": {"acc": 0.75}, "n": 4}, "t2": {"metrics": {"acc": 0.25, "x": 1}}},
              "relative_change": {"acc": 0.5},
              "relative_change_by_model": {"t1": {"acc": 0.5}, "t2": {"acc": -0.5}}}
    headers, rows = report.eval_table(result)
    assert headers == ["metric", "b", "t1", "t2", "change (t1)", "change (t2)"]
    assert rows == [["acc", "0.5", "0.75", "0.25", "+50.0%", "-50.0%"],
                    ["x", "", "", "1", "", ""],
                    ["n", "4", "4", "", "", ""]]
    del result["relative_change_by_model"]
    assert report.eval_table(result)[0][-1] == "change vs base"


def test_ci_errors_are_distances_to_the_interval():
    result = {"models": {"a": {"metrics": {"win": 0.5, "win_ci_low": 0.25, "win_ci_high": 0.75}},
                         "b": {"metrics": {"win": 0.9, "win_ci_low": 0.8, "win_ci_high": 0.95}}}}
    below, above = report.ci_errors(result, ["a", "b"], "win", [0.5, 0.9])
    assert below == pytest.approx([0.25, 0.1]) and above == pytest.approx([0.25, 0.05])
    del result["models"]["b"]["metrics"]["win_ci_high"]
    assert report.ci_errors(result, ["a", "b"], "win", [0.5, 0.9]) is None


def test_last_rows_per_split():
    rows = [{"step": 1, "split": "train"}, {"step": 2, "split": "validation"}, {"step": 2, "split": "train"}]
    assert report.last_rows(rows) == {"train": rows[2], "validation": rows[1]}


# ---- the report's content

@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One full fake run and its report, shared by the tests that only read it (plots take seconds)."""
    run = make_run(tmp_path_factory.mktemp("report"))
    return (run, *report.write_report(run))


def test_report_holds_every_section_and_plot(written):
    run, md_path, html_path = written
    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    md = md_path.read_text()
    images = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", md)
    # base vs tuned first, then the curves
    assert images == ["plots/eval_gen_qa_results.png", "plots/eval_preference_results.png", "plots/loss.png",
                      "plots/reward_accuracy.png", "plots/margins.png", "plots/rewards.png", "plots/lr.png"]
    for image in images:
        assert (run / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # recipe, data summary (nested keys flattened), skipped rows
    assert "| training_config.model.dpo_cfg.beta | 0.1 |" in md
    assert "| prompt_tokens.p95 | 480 |" in md and "| rows.hh | 90 |" in md
    assert "3 row(s) skipped" in md
    # evaluation: each task once (eval/results.json repeats gen_qa's), metrics x models, changes as percentages
    assert re.findall(r"^### .*$", md, re.M) == ["### gen_qa (eval/gen_qa/results.json)",
                                                 "### preference (eval/preference/results.json)"]
    assert "| metric | base | tuned | change vs base |" in md
    assert "| exact_match | 0 | 0.125 | n/a |" in md
    assert "| f1 | 0.25 | 0.5 | +100.0% |" in md
    assert "| n | 32 | 32 |  |\n| truncated | 2 | 0 |  |\n| truncated_rate | 0.0625 | 0 |  |" in md
    assert "Models: base = /models/base; tuned = /runs/tiny-run/model" in md
    assert "Data: path data/qa.jsonl, rows 32, skipped 0" in md
    assert "eval/config.json is not an evaluation result" in md
    # examples side by side, the first three of five, escaped
    assert "Examples (3 of 5)" in md
    assert "| prompt | reference | base | tuned |" in md
    assert (r"| Question 0: what is \| a \*pipe\*?<br>Second line &lt;b&gt; | ref 0 | base answer 0 "
            r"| tuned answer 0 |") in md
    assert "Question 3" not in md
    # last logged values per split
    assert "| validation | 12 | 0.58 |" in md


C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours: the base (or train) and the tuned (or validation)


def pixels_of(png: Path, color: tuple[int, int, int]):
    """A boolean [rows, columns] mask of the pixels drawn in `color` (antialiased edges left out)."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return np.abs(image - np.array(color)).max(axis=2) <= 8


def test_the_plots_draw_the_numbers(written):
    """The pixels, not just the PNG signature: the bars stand in the ratios of the metrics, the curves follow the
    rows."""
    run = written[0]
    # gen_qa: one panel per metric (exact_match, f1, rouge1, sorted), base and tuned bars from a zero baseline
    chart = run / "plots/eval_gen_qa_results.png"
    base, tuned = pixels_of(chart, C0), pixels_of(chart, C1)
    width = base.shape[1]
    heights = [(int(base[:, i * width // 3:(i + 1) * width // 3].sum(axis=0).max()),
                int(tuned[:, i * width // 3:(i + 1) * width // 3].sum(axis=0).max())) for i in range(3)]
    (em_base, em_tuned), (f1_base, f1_tuned), (rouge_base, rouge_tuned) = heights
    assert em_base == 0 and em_tuned > 50  # exact_match 0 -> 0.125
    assert f1_tuned / f1_base == pytest.approx(0.5 / 0.25, rel=0.05)
    assert rouge_tuned / rouge_base == pytest.approx(0.45 / 0.3, rel=0.05)
    # the learning rate warms up over 4 of 12 steps, then stays: the line starts low and ends high
    lr = pixels_of(run / "plots/lr.png", C0)
    columns = [c for c in range(lr.shape[1]) if lr[:, c].any()]
    first, last = columns[2], columns[-3]
    assert lr[:, first].nonzero()[0].mean() > lr[:, last].nonzero()[0].mean() + 100  # rows grow downwards
    # the loss plot draws both splits
    loss = run / "plots/loss.png"
    assert pixels_of(loss, C0).sum() > 200 and pixels_of(loss, C1).sum() > 50


def test_the_outcome_leads_and_the_internals_come_last_folded(written):
    md = written[1].read_text()
    headings = re.findall(r"^## (.*)$", md, re.M)
    assert headings == ["Outcome", "Evaluation", "Training curves", "Data", "Recipe", "Run details"]
    outcome = md.split("## Evaluation")[0]
    assert "| final train loss | 0.45 |" in outcome  # summary.json's final_train
    assert "| final validation reward accuracy | 55.0% of pairs |" in outcome  # the last validation row
    assert "| throughput | 900 tokens/s (mean over logged steps) |" in outcome
    assert "| gen_qa: exact_match | 0 (base) -&gt; 0.125 (tuned) |" in outcome
    details = md.split("## Run details")[1]
    assert details.lstrip().startswith('<details markdown="1">') and "| wall_s | 30.5 |" in details
    assert "<details><summary>The resolved recipe (recipe.yaml)</summary>" in md.split("## Recipe")[1]


class LiveMarkup(HTMLParser):
    """The elements a page really has: scripts, and any attribute that runs code (on...)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script" or any(name.startswith("on") for name, _ in attrs):
            self.found.append(f"<{tag} {attrs}>")


def live_markup(page: str) -> list[str]:
    parser = LiveMarkup()
    parser.feed(page)
    return parser.found


PAYLOAD = "```\n<img src=x onerror=\"document.title='pwned'\">\n<script>document.title='pwned'</script>"


@pytest.mark.parametrize("how", ["a value", "raw lines that break the YAML"])
def test_a_crafted_recipe_cannot_inject_markup(tmp_path, how):
    """recipe.yaml is shown as text: a ``` closing the fence and tags after it stay text, in report.html as
    Chromium builds it (and in report.md, which GitHub renders the same way)."""
    run = make_run(tmp_path, evaluation=False)
    with open(run / "recipe.yaml", "a") as f:
        # raw lines: shown as is, where a ``` at the start of a line closed the old report's code fence
        f.write(yaml.safe_dump({"notes": PAYLOAD}) if how == "a value" else f"{PAYLOAD}\n")
    md_path, html_path = report.write_report(run)
    page = html_path.read_text()
    assert live_markup(page) == [] and "&lt;img src=x onerror=" in page  # shown, as text
    assert "<img src=x" not in md_path.read_text()
    dom = chromium(["--virtual-time-budget=5000", "--dump-dom", html_path.as_uri()], tmp_path)
    assert "<body" in dom and live_markup(dom) == []  # no element built from it
    assert "pwned" not in dom.split("<body")[0]  # the title was never rewritten
    assert all(src.startswith("data:image/png") for src in re.findall(r'<img[^>]*src="([^"]*)"', dom))


def test_html_is_self_contained(written):
    html_path = written[2]
    page = html_path.read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)
    assert len(sources) == 7 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script>" not in page and "http" not in page.split("<body>")[1]
    assert "<td>Question 0: what is | a *pipe*?<br>Second line &lt;b&gt;</td>" in page


def test_missing_pieces_are_lines_not_crashes(tmp_path):
    run = make_run(tmp_path, validation=False, evaluation=False)
    (run / "summary.json").unlink()
    (run / "data_summary.json").write_text("{broken")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    md = report.write_report(run)[0].read_text()
    assert "No validation rows in metrics.jsonl" in md
    assert "No evaluation results yet" in md
    assert "No summary.json yet" in md
    assert "data_summary.json could not be read" in md
    assert "1 malformed line(s) left out: metrics.jsonl:13" in md
    assert "(validation)" not in md


def test_title_names_the_run_from_its_recipe_wherever_it_is_staged(tmp_path):
    run = make_run(tmp_path, evaluation=False).rename(tmp_path / "raydpo-run-x1y2")
    md = report.write_report(run, source="s3://bucket/out/tiny-run")[0].read_text()
    assert md.startswith("# raydpo report: tiny-run\n\nRun: `s3://bucket/out/tiny-run`")
    (run / "recipe.yaml").write_text("just a string")
    assert report.write_report(run)[0].read_text().startswith("# raydpo report: raydpo-run-x1y2\n")


def test_a_run_with_only_a_recipe_still_reports(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "recipe.yaml").write_text("run: {name: r}\n")
    md_path, html_path = report.write_report(run)
    md = md_path.read_text()
    assert "No metrics.jsonl" in md and "No data_summary.json" in md and "No evaluation results yet" in md
    assert "<img" not in html_path.read_text()


def test_a_folder_of_runs_is_refused_with_the_runs_named(tmp_path):
    make_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        report.write_report(tmp_path)
    assert "is not a run folder" in str(err.value) and str(tmp_path / "tiny-run") in err.value.fix
    with pytest.raises(ConfigError, match="does not exist"):
        report.write_report(tmp_path / "nope")


# ---- report.html in a real browser

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}));
  const out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = JSON.stringify(imgs);
  document.body.appendChild(out);
});
</script>"""


def chromium(args: list[str], tmp_path: Path) -> str:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium "
                                                   "(Debian: apt-get install -y chromium)")
def test_plots_render_in_headless_chromium(written, tmp_path):
    html_path = written[2]
    # The check runs in a copy: the report itself carries no script.
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    images = json.loads(found.group(1))
    assert len(images) == 7
    assert all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    # the 7.0 x 3.6 inch curves at 100 dpi, after the two evaluation charts
    assert images[2] == {"w": 700, "h": 360, "ok": True}
