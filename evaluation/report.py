"""A run's report: report.md and report.html beside the run, PNG plots under <run>/plots/.

Reads only the run folder: recipe.yaml, data_summary.json, summary.json, metrics.jsonl, skipped_rows.jsonl and
eval/*.json. Every missing piece is a line in the report saying so, never a crash. report.html is report.md
rendered by the `markdown` package with every PNG embedded as a data URI, so it opens anywhere on its own.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.tracking import flatten, is_number  # one definition for the trackers and the report

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "summary.json", "data_summary.json", "model", "eval")
MAX_EXAMPLES = 3
MAX_CELL_CHARS = 600
MAX_LIST_ITEMS = 5
SPLIT_STYLES = {"train": {"linestyle": "-"}, "validation": {"linestyle": "--", "marker": "o"}}


@dataclass(frozen=True)
class CurvePlot:
    slug: str
    title: str
    keys: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "validation")


CURVES = (
    CurvePlot("loss", "Loss", ("loss",)),
    CurvePlot("reward_accuracy", "Reward accuracy", ("rewards/accuracies",)),
    CurvePlot("margins", "Reward margins (chosen - rejected)", ("rewards/margins",)),
    CurvePlot("rewards", "Chosen and rejected rewards", ("rewards/chosen", "rewards/rejected")),
    CurvePlot("lr", "Learning rate", ("lr",), splits=("train",)),
)
RECIPE_HIGHLIGHTS = ("run.name", "run.model_name_or_path", "run.data_s3_path", "run.validation_data_s3_path",
                     "run.replicas", "training_config.max_length", "training_config.global_batch_size",
                     "training_config.trainer.max_epochs", "training_config.trainer.max_steps",
                     "training_config.model.optim.lr", "training_config.model.dpo_cfg.beta",
                     "training_config.model.dpo_cfg.loss_type", "training_config.model.peft.peft_scheme")


# ---- small pure helpers

def fmt_number(value) -> str:
    """Ints as they are; floats to 4 significant digits, scientific when very small or large."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"


def fmt_percent(fraction) -> str:
    """relative_change is a fraction ((tuned - base) / base): 0.125 -> '+12.5%'."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not math.isfinite(fraction):
        return str(fraction)
    return f"{fraction * 100:+.1f}%"


def fmt_value(value) -> str:
    """A summary value: numbers formatted, short lists joined, long ones cut with a count."""
    if isinstance(value, list):
        shown = ", ".join(fmt_value(v) for v in value[:MAX_LIST_ITEMS])
        return shown + (f", ... ({len(value)} in all)" if len(value) > MAX_LIST_ITEMS else "")
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return fmt_number(value)


def md_cell(value, limit: int = MAX_CELL_CHARS) -> str:
    """Text made safe for one markdown table cell: markup escaped, pipes escaped, newlines as <br>."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + f" ... ({len(text) - limit} more chars)"
    text = re.sub(r"([\\`*\[\]])", r"\\\1", text)
    # intraword underscores (training_config, exact_match) are not emphasis in Python-Markdown or on GitHub
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def series(rows: list[dict], key: str, split: str) -> tuple[list, list]:
    """(steps, values) of one metric in one split, by step; rows without a finite value are left out."""
    points = sorted((row["step"], row[key]) for row in rows
                    if row.get("split", "train") == split and is_number(row.get("step")) and is_number(row.get(key)))
    return [s for s, _ in points], [v for _, v in points]


def last_rows(rows: list[dict]) -> dict[str, dict]:
    """The last logged row of each split, in the order the splits first appear."""
    last: dict[str, dict] = {}
    for row in rows:
        last[row.get("split", "train")] = row
    return last


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a JSONL file and the 'file:line: reason' of each line that is not a JSON object."""
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(f"{path.name}:{number}: {err.msg}")
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(f"{path.name}:{number}: not a JSON object")
    return rows, bad


def is_eval_result(obj) -> bool:
    models = obj.get("models") if isinstance(obj, dict) else None
    return isinstance(models, dict) and bool(models) and all(
        isinstance(m, dict) and isinstance(m.get("metrics"), dict) for m in models.values())


# ---- plots (matplotlib's object API: no pyplot global state, the Agg canvas whatever the backend)

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_curve(rows: list[dict], spec: CurvePlot, out: Path) -> list[str]:
    """Draws one curve plot; returns the series drawn ('loss (train)', ...), empty when nothing to draw."""
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    drawn = []
    for key in spec.keys:
        for split in spec.splits:
            steps, values = series(rows, key, split)
            if steps:
                style = dict(SPLIT_STYLES.get(split, {}))
                if len(steps) < 30:
                    style.setdefault("marker", ".")
                ax.plot(steps, values, label=f"{key} ({split})", **style)
                drawn.append(f"{key} ({split})")
    if drawn:
        ax.set_title(spec.title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize="small")
        if spec.slug == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    return drawn


CI_SUFFIXES = ("_ci_low", "_ci_high")  # llm_judge's Wilson intervals: error bars, not bars of their own


def plot_eval(result: dict, title: str, out: Path) -> bool:
    labels = list(result["models"])
    metrics = sorted({name for m in result["models"].values() for name, v in m["metrics"].items()
                      if is_number(v) and not name.endswith(CI_SUFFIXES)})
    if not metrics:
        return False
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = _figure(3.4 * cols, 2.8 * rows + 0.4)
    fig.suptitle(title)
    colors = [f"C{i}" for i in range(len(labels))]
    for index, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, index + 1)
        values = [result["models"][label]["metrics"].get(metric) for label in labels]
        heights = [v if is_number(v) else 0.0 for v in values]
        bars = ax.bar(labels, heights, color=colors, yerr=ci_errors(result, labels, metric, heights), capsize=4)
        ax.bar_label(bars, labels=[fmt_number(v) if is_number(v) else "n/a" for v in values], fontsize="small")
        ax.set_title(metric, fontsize="medium")
        ax.margins(y=0.15)
        ax.tick_params(axis="x", labelsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return True


def ci_errors(result: dict, labels: list[str], metric: str, heights: list[float]):
    """[[below...], [above...]] for matplotlib's yerr when every model has metric_ci_low/high, else None."""
    bounds = [(result["models"][label]["metrics"].get(metric + "_ci_low"),
               result["models"][label]["metrics"].get(metric + "_ci_high")) for label in labels]
    if not all(is_number(low) and is_number(high) for low, high in bounds):
        return None
    return [[max(h - low, 0.0) for h, (low, _) in zip(heights, bounds)],
            [max(high - h, 0.0) for h, (_, high) in zip(heights, bounds)]]


# ---- sections: each returns markdown

def _load_json(path: Path, notes: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        notes.append(f"_{path.name} could not be read ({err}); left out._")
        return None


def _key_value_table(data: dict) -> str:
    return md_table(["key", "value"], [[k, fmt_value(v)] for k, v in flatten(data).items()])


def folded_text(summary: str, text: str) -> str:
    """Raw text folded away, HTML-escaped in a <pre>: nothing in it (a ``` that would close a markdown fence, a
    tag) can become markup, in report.md on GitHub or in report.html."""
    return (f"<details><summary>{html.escape(summary)}</summary>\n<pre><code>{html.escape(text.rstrip())}"
            "</code></pre>\n</details>")


def recipe_section(run: Path) -> str:
    path = run / "recipe.yaml"
    if not path.exists():
        return "## Recipe\n\n_No recipe.yaml in the run folder._"
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return (f"## Recipe\n\n_recipe.yaml is not valid YAML ({md_cell(err)}); shown as is:_\n\n"
                + folded_text("recipe.yaml", text))
    flat = flatten(recipe) if isinstance(recipe, dict) else {}
    highlights = [[k, fmt_value(flat[k])] for k in RECIPE_HIGHLIGHTS if k in flat]
    table = md_table(["setting", "value"], highlights) + "\n\n" if highlights else ""
    return f"## Recipe\n\n{table}" + folded_text("The resolved recipe (recipe.yaml)", text)


def data_section(run: Path) -> str:
    parts = ["## Data"]
    path = run / "data_summary.json"
    if path.exists():
        data = _load_json(path, parts)
        if isinstance(data, dict):
            parts.append(_key_value_table(data) if data else "_data_summary.json is empty._")
        elif data is not None:
            parts.append(f"_data_summary.json holds a {type(data).__name__}, not an object:_ "
                         f"{md_cell(json.dumps(data)[:300])}")
    else:
        parts.append("_No data_summary.json in the run folder._")
    skipped = run / "skipped_rows.jsonl"
    if skipped.exists():
        rows, _ = read_jsonl(skipped)
        parts.append(f"{len(rows)} row(s) skipped, listed in skipped_rows.jsonl." if rows else "No rows skipped.")
    return "\n\n".join(parts)


def headline_section(run: Path) -> str:
    """What a reader opens the report for: how far training got, where loss and reward accuracy ended, the speed,
    and base vs tuned in each evaluation."""
    parts = ["## Outcome"]
    summary = _load_json(run / "summary.json", parts) if (run / "summary.json").exists() else None
    summary = summary if isinstance(summary, dict) else {}
    rows_file = run / "metrics.jsonl"
    rows = read_jsonl(rows_file)[0] if rows_file.exists() else []
    last = last_rows(rows)
    train = summary.get("final_train") if isinstance(summary.get("final_train"), dict) else last.get("train", {})
    validation = summary.get("final_validation") if isinstance(summary.get("final_validation"), dict) \
        else last.get("validation", {})
    figures = []
    if is_number(summary.get("steps")):
        planned = f" of {summary['planned_steps']}" if is_number(summary.get("planned_steps")) else ""
        took = f" in {summary['wall_s'] / 60:.1f} min" if is_number(summary.get("wall_s")) else ""
        figures.append(["trained", f"{summary['steps']}{planned} optimizer steps{took}"])
    if is_number(summary.get("train_pairs")):
        figures.append(["training pairs", f"{summary['train_pairs']} pairs"])
    for split, row in (("train", train), ("validation", validation)):
        if is_number((row or {}).get("loss")):
            figures.append([f"final {split} loss", fmt_number(row["loss"])])
        if is_number((row or {}).get("rewards/accuracies")):
            figures.append([f"final {split} reward accuracy", f"{row['rewards/accuracies'] * 100:.1f}% of pairs"])
        if is_number((row or {}).get("rewards/margins")):
            figures.append([f"final {split} reward margin", f"{fmt_number(row['rewards/margins'])} (beta x "
                                                            "log-ratio, chosen - rejected)"])
    speeds = [r["tokens_per_s"] for r in rows
              if r.get("split", "train") == "train" and is_number(r.get("tokens_per_s"))]
    if speeds:
        figures.append(["throughput", f"{sum(speeds) / len(speeds):.0f} tokens/s (mean over logged steps)"])
    for name, result in eval_results(run, []):
        labels = list(result["models"])
        if len(labels) < 2:
            continue
        base, tuned = labels[0], labels[1]
        for metric, value in sorted(result["models"][tuned]["metrics"].items())[:3]:
            before = result["models"][base]["metrics"].get(metric)
            if is_number(value) and is_number(before) and not metric.endswith(CI_SUFFIXES):
                figures.append([f"{result.get('task', name)}: {metric}",
                                f"{fmt_number(before)} ({base}) -> {fmt_number(value)} ({tuned})"])
    parts.append(md_table(["figure", "value"], figures) if figures else
                 "_Nothing to show yet: no summary.json, metrics.jsonl or evaluation results in the run folder._")
    return "\n\n".join(parts)


def details_section(run: Path) -> str:
    """summary.json in full (the plan's internals among it), folded: for whoever debugs the run."""
    path = run / "summary.json"
    if not path.exists():
        return "## Run details\n\n_No summary.json yet: the run has not finished._"
    parts = ["## Run details"]
    data = _load_json(path, parts)
    if isinstance(data, dict) and data:
        parts.append('<details markdown="1"><summary>Everything in summary.json, the run plan included'
                     "</summary>\n\n" + _key_value_table(data) + "\n\n</details>")
    return "\n\n".join(parts)


def training_section(run: Path) -> str:
    parts = ["## Training curves"]
    path = run / "metrics.jsonl"
    if not path.exists():
        return "## Training curves\n\n_No metrics.jsonl in the run folder: no training step has been logged._"
    rows, bad = read_jsonl(path)
    if bad:
        parts.append(f"{len(bad)} malformed line(s) left out: " + "; ".join(md_cell(b) for b in bad[:10])
                     + (" ..." if len(bad) > 10 else ""))
    splits = {row.get("split", "train") for row in rows}
    if "validation" not in splits:
        parts.append("_No validation rows in metrics.jsonl: curves show the training split only._")
    for spec in CURVES:
        out = run / "plots" / f"{spec.slug}.png"
        if plot_curve(rows, spec, out):
            parts.append(f"![{spec.title}](plots/{out.name})")
        else:
            parts.append(f"_{spec.title}: not plotted, no {' or '.join(spec.keys)} values in metrics.jsonl._")
    final_rows = [[split] + [fmt_value(row.get(k, "")) for k in FINAL_KEYS] for split, row in last_rows(rows).items()]
    if final_rows:
        parts.append("Last logged values:\n\n" + md_table(["split"] + list(FINAL_KEYS), final_rows))
    return "\n\n".join(parts)


FINAL_KEYS = ("step", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


MODEL_ENTRY_SKIP = ("metrics", "path")  # shown elsewhere (metrics) or too long for a table column (path)


def change_columns(result: dict) -> dict[str, dict]:
    """{column header: {metric: fractional change}}: one column per tuned model, from relative_change_by_model,
    else the single relative_change."""
    by_model = result.get("relative_change_by_model")
    if isinstance(by_model, dict) and by_model and all(isinstance(v, dict) for v in by_model.values()):
        if len(by_model) == 1:
            return {"change vs base": next(iter(by_model.values()))}
        return {f"change ({label})": changes for label, changes in by_model.items()}
    change = result.get("relative_change")
    return {"change vs base": change} if isinstance(change, dict) and change else {}


def eval_table(result: dict) -> tuple[list[str], list[list]]:
    """Metrics (then n and the other per-model scalars) by model, with the relative changes as percentages."""
    models = result["models"]
    labels = list(models)
    changes = change_columns(result)
    metrics = sorted({k for m in models.values() for k in m["metrics"]})
    extras = sorted({k for m in models.values() for k, v in m.items()
                     if k not in MODEL_ENTRY_SKIP and not isinstance(v, (dict, list))}, key=lambda k: (k != "n", k))
    rows = [[metric] + [fmt_value(models[label]["metrics"].get(metric, "")) for label in labels]
            + [fmt_percent(c[metric]) if c.get(metric) is not None else ("n/a" if metric in c else "")
               for c in changes.values()]
            for metric in metrics]
    rows += [[key] + [fmt_value(models[label].get(key, "")) for label in labels] + [""] * len(changes)
             for key in extras]
    return ["metric"] + labels + list(changes), rows


def eval_result_markdown(result: dict, name: str, chart: str | None) -> str:
    task = result.get("task", name)
    labels = list(result["models"])
    parts = [f"### {md_cell(task)} ({md_cell(name)})"]
    if result.get("partial"):
        parts.append(f"**Partial result**: {md_cell(result.get('error', 'the evaluation stopped part-way'))}")
    parts.append(md_table(*eval_table(result)))
    paths = [[label, entry.get("path")] for label, entry in result["models"].items() if entry.get("path")]
    if paths:
        parts.append("Models: " + "; ".join(f"{md_cell(label)} = {md_cell(path)}" for label, path in paths))
    data = result.get("data")
    if isinstance(data, dict):
        parts.append("Data: " + ", ".join(f"{md_cell(k)} {md_cell(fmt_value(v))}" for k, v in data.items()
                                          if not isinstance(v, (dict, list))))
    if chart:
        parts.append(f"![{md_cell(task)}: metrics by model]({chart})")
    examples = [e for e in result.get("examples") or [] if isinstance(e, dict)]
    if examples:
        shown = examples[:MAX_EXAMPLES]
        columns = [c for c in ("prompt", "reference") if any(c in e for e in shown)]
        columns += labels + sorted({k for e in shown for k in e} - set(columns) - set(labels))
        parts.append(f"Examples ({len(shown)} of {len(examples)}):\n\n"
                     + md_table(columns, [[e.get(c, "") for c in columns] for e in shown]))
    else:
        parts.append("_No example generations in this result._")
    return "\n\n".join(parts)


def eval_results(run: Path, notes: list[str]) -> list[tuple[str, dict]]:
    """(name, result) of each eval/*.json and eval/<task>/*.json shaped as an evaluation result; a file that
    repeats another one (eval/results.json is a copy of the latest task's) is shown once."""
    folder = run / "eval"
    if not folder.is_dir():
        return []
    results: list[tuple[str, dict]] = []
    for path in sorted(folder.glob("*/*.json")) + sorted(folder.glob("*.json")):
        name = path.relative_to(run).as_posix()
        data = _load_json(path, notes)
        if not is_eval_result(data):
            if data is not None:
                notes.append(f"_{md_cell(name)} is not an evaluation result (no models with metrics); left out._")
        elif all(data != seen for _, seen in results):
            results.append((name, data))
    return results


def eval_section(run: Path) -> str:
    parts = ["## Evaluation"]
    results = eval_results(run, parts)
    if not results:
        parts.append("_No evaluation results yet (no eval/*.json with models and metrics): run `raydpo eval` "
                     "on this run's output._")
    for name, result in results:
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name.removeprefix("eval/").removesuffix(".json"))
        out = run / "plots" / f"eval_{slug}.png"
        chart = f"plots/{out.name}" if plot_eval(result, str(result.get("task", slug)), out) else None
        parts.append(eval_result_markdown(result, name, chart))
    return "\n\n".join(parts)


# ---- the report

def check_run_dir(run: Path) -> None:
    if not run.is_dir():
        raise ConfigError(f"run folder {run} does not exist",
                          fix="pass the run's output folder, <output_s3_path>/<run.name>")
    if not any((run / marker).exists() for marker in RUN_MARKERS):
        runs = sorted(p.name for p in run.iterdir() if p.is_dir() and any((p / m).exists() for m in RUN_MARKERS))
        raise ConfigError(f"{run} is not a run folder", problems=[f"holds none of: {', '.join(RUN_MARKERS)}"],
                          why="a report reads one run's outputs",
                          fix=(f"pass one of the runs inside it: {', '.join(str(run / r) for r in runs)}" if runs
                               else "pass <output_s3_path>/<run.name> of a run that has started"))


def run_name(run: Path) -> str:
    """run.name from recipe.yaml (training writes the report in a staging folder), else the folder's name."""
    import yaml

    try:
        return str(yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))["run"]["name"])
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return run.name


def build_markdown(run: Path, source: str) -> str:
    """The report as markdown, making the plots under run/plots/ on the way."""
    title = f"# raydpo report: {md_cell(run_name(run))}\n\nRun: `{source}`"
    # the outcome first (figures, base vs tuned, curves), then what went in, the internals last and folded
    sections = [title, headline_section(run), eval_section(run), training_section(run), data_section(run),
                recipe_section(run), details_section(run)]
    return "\n\n".join(sections) + "\n"


def embed_images(html_text: str, run: Path) -> str:
    """src="plots/x.png" -> a base64 data URI, so the HTML needs nothing beside it."""
    def inline(match: re.Match) -> str:
        path = run / html.unescape(match.group(2))
        if not path.is_file():
            return match.group(0)
        return f'{match.group(1)}"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
    return re.sub(r'(<img[^>]*?\ssrc=)"(plots/[^"]+\.png)"', inline, html_text)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; color: #1f2328; line-height: 1.5; }}
h1 {{ border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }}
h2 {{ border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: .92em; }}
th, td {{ border: 1px solid #d0d7de; padding: .35em .7em; vertical-align: top; text-align: left;
          overflow-wrap: anywhere; }}
th {{ background: #f6f8fa; }}
img {{ max-width: 100%; height: auto; display: block; margin: .5em 0 1.2em; }}
pre {{ background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .85em; border-radius: 6px; }}
em {{ color: #656d76; }}
summary {{ cursor: pointer; color: #0969da; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def write_report(run_dir, *, source: str | None = None) -> tuple[Path, Path] | tuple[str, str]:
    """Writes report.md, report.html and plots/*.png beside a run; returns (md, html).

    run_dir: a local run folder (returns Paths), or an s3:// run URI: its small files are fetched to a temporary
    folder (never the model or checkpoints) and the report is uploaded beside the run (returns URIs).
    source: where the run lives, for the report's header, when run_dir is a local copy.
    """
    from core import storage

    if storage.is_remote(str(run_dir)):
        return write_remote_report(str(run_dir))
    import markdown

    run = Path(run_dir).resolve()
    check_run_dir(run)
    text = build_markdown(run, source or str(run))
    md_path, html_path = run / "report.md", run / "report.html"
    md_path.write_text(text, encoding="utf-8")
    body = embed_images(markdown.markdown(text, extensions=["tables", "fenced_code", "md_in_html"]), run)
    html_path.write_text(HTML_PAGE.format(title=html.escape(f"raydpo report: {run_name(run)}"), body=body),
                         encoding="utf-8")
    return md_path, html_path


# what the report reads from a run; *.json under eval/ come as well
REPORT_INPUTS = ("recipe.yaml", "data_summary.json", "summary.json", "metrics.jsonl", "skipped_rows.jsonl")


def fetch_report_inputs(uri: str, local: Path) -> int:
    """Copies the report's inputs of a remote run into local; returns how many files came."""
    from core import storage
    from core.errors import DataError

    local.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for name in REPORT_INPUTS:
        if storage.exists(f"{uri}/{name}"):
            (local / name).write_bytes(storage.read_bytes(f"{uri}/{name}"))
            fetched += 1
    if storage.exists(f"{uri}/eval"):
        try:
            files = storage.list_data_files(f"{uri}/eval", suffixes=(".json",))
        except DataError:  # an eval/ folder without results: the report says so
            files = []
        for file_uri in files:
            target = local / "eval" / file_uri[len(uri) + len("/eval/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(file_uri))
            fetched += 1
    return fetched


def write_remote_report(uri: str) -> tuple[str, str]:
    import tempfile

    from core import storage

    uri = uri.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="raydpo-report-") as tmp:
        local = Path(tmp) / uri.rsplit("/", 1)[-1]
        if not fetch_report_inputs(uri, local):
            runs = [d for d in storage.list_dirs(uri) if storage.exists(f"{d}/recipe.yaml")]
            raise ConfigError(f"{uri} holds no run outputs", problems=[f"holds none of: {', '.join(RUN_MARKERS)}"],
                              why="a report reads one run's outputs",
                              fix=(f"pass one of the runs inside it: {', '.join(runs)}" if runs
                                   else "pass <output_s3_path>/<run.name> of a run that has started"))
        write_report(local, source=uri)
        for name in ("report.md", "report.html"):
            storage.write_bytes(f"{uri}/{name}", (local / name).read_bytes())
        if (local / "plots").is_dir():
            storage.upload_dir(str(local / "plots"), f"{uri}/plots")
    return f"{uri}/report.md", f"{uri}/report.html"
