"""Alignment study: LoRA DPO of SmolLM2-135M-Instruct on When2Call (or HH harmless), base vs tuned on held-out rows.

    python benchmarks/alignment_study.py [--heldout FILE] [--json PATH] [--work DIR] [--judge] [--train-fit]
                                         [key=value ...]
    python benchmarks/alignment_study.py --dataset hh [--prepare-only] [--json PATH] [--work DIR] [key=value ...]

Runs the same commands a user runs, printing each one (WORK defaults to outputs/, where the recipes look):
  1. raydpo data when2call ../shared/data/when2call/when2call_test_llm_judge.part1.jsonl --out WORK/when2call-data
       (a stratified 30% of the rows held out; with --heldout FILE, every shared row trains and FILE's rows are held
       out)
  2. raydpo train recipes/when2call_lora_dpo.yaml run.data_s3_path=WORK/when2call-data/train [key=value ...]
  3. raydpo eval recipes/when2call_eval_preference.yaml --model RUN --output RUN   (held-out pairs)
  4. raydpo eval recipes/when2call_eval_gen_qa.yaml --model RUN --output RUN       (held-out questions)
  5. raydpo eval recipes/when2call_eval_llm_judge.yaml --model RUN --output RUN    (only with --judge)
     raydpo eval recipes/when2call_eval_preference.yaml run.data_s3_path=WORK/when2call-data/train/pairs.jsonl
       run.name=train-pairs --model RUN --output RUN/train-fit    (only with --train-fit: the training pairs,
       scored the same way, so that a model that did not fit its data is told apart from one that fit it and did not
       generalise; results in RUN/train-fit/train-pairs/eval/preference/)
  6. raydpo report RUN                                    (RUN = WORK/when2call-lora-dpo; its report.html)
then writes WORK/when2call_study.json (or --json PATH), WORK/when2call_study.md and WORK/plots/*.png, and prints the
table: ranking accuracy (summed and per-token log-probabilities), F1, quasi F1, ROUGE-1/2/L, BLEU and the tool-call
rate, for base and tuned, with changes, and whether the issue's targets are met (tuned ranking accuracy >= base +
0.15, F1 >= base * 1.3).

JSON: {"base": {metric: value}, "tuned": {...}, "relative_change": {...}, "absolute_change": {...}, "targets": {...},
"tool_call_rate_by_behaviour": {...}, "train": {...}, "commands": [...], ...}. Values on the evaluators' scales: F1,
quasi F1 and ROUGE in [0, 1], BLEU in [0, 100]; the printed table shows F1/ROUGE as percentages, as the issue does.
key=value arguments go to `raydpo train` (e.g. training_config.model.dpo_cfg.beta=0.2).

--dataset hh: the same flow with recipes/hh_harmless_*.yaml on ../shared's HH harmless-base file; every 10th row
(line number divisible by 10) is held out, the rest trains. No targets, no tool-call rate. --prepare-only writes
the data (WORK/<dataset>-data/train and heldout/) and stops, for running the recipes by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dataset -> its shared file, recipes, run name and the file each evaluation reads (under WORK/data)
DATASETS = {
    "when2call": {"shared_file": "data/when2call/when2call_test_llm_judge.part1.jsonl",
                  "recipe": "recipes/when2call_lora_dpo.yaml", "run": "when2call-lora-dpo",
                  "eval": {"preference": ("recipes/when2call_eval_preference.yaml", "heldout/pairs.jsonl"),
                           "gen_qa": ("recipes/when2call_eval_gen_qa.yaml", "heldout/gen_qa.jsonl"),
                           "llm_judge": ("recipes/when2call_eval_llm_judge.yaml", "heldout/gen_qa.jsonl")}},
    "hh": {"shared_file": "data/hh-rlhf-harmless-base/test.jsonl.gz",
           "recipe": "recipes/hh_harmless_lora_dpo.yaml", "run": "hh-harmless-lora-dpo",
           "eval": {"preference": ("recipes/hh_harmless_eval_preference.yaml", "heldout/pairs.jsonl"),
                    "gen_qa": ("recipes/hh_harmless_eval_gen_qa.yaml", "heldout/pairs.jsonl"),
                    "llm_judge": ("recipes/hh_harmless_eval_llm_judge.yaml", "heldout/pairs.jsonl")}},
}
HH_HELDOUT_EVERY = 10
TITLES = {"when2call": "When2Call", "hh": "HH harmless"}
# (key in the study, task, key in that task's metrics, shown as a percentage)
METRICS = (
    ("ranking_accuracy", "preference", "ranking_accuracy", False),
    ("ranking_accuracy_per_token", "preference", "ranking_accuracy_per_token", False),
    ("f1", "gen_qa", "f1", True),
    ("quasi_f1", "gen_qa", "quasi_f1", True),
    ("rouge1", "gen_qa", "rouge1", True),
    ("rouge2", "gen_qa", "rouge2", True),
    ("rougeL", "gen_qa", "rougeL", True),
    ("bleu", "gen_qa", "bleu", False),
)
TARGET_RANKING_GAIN = 0.15  # absolute, on ranking_accuracy (summed log-probabilities)
TARGET_F1_GAIN = 0.30       # relative, on F1


# ---- pure pieces (hand-worked tests in tests/benchmarks/test_alignment_study.py) ---------------------------------

def relative_change(base: float | None, tuned: float | None) -> float | None:
    """(tuned - base) / |base|; None where base is 0 or a value is missing."""
    if base is None or tuned is None or base == 0:
        return None
    return (tuned - base) / abs(base)


def tool_call_rate(predictions: list[str]) -> float:
    from core.data.when2call import is_tool_call

    return sum(is_tool_call(p) for p in predictions) / len(predictions) if predictions else 0.0


def rates_by_behaviour(rows: list[dict], behaviours: list[str], label: str) -> dict:
    """{behaviour: tool-call rate of `label`'s answers on the rows whose correct behaviour it is}."""
    out = {}
    for behaviour in sorted(set(behaviours)):
        answers = [r[label]["prediction"] for r, b in zip(rows, behaviours) if b == behaviour]
        out[behaviour] = tool_call_rate(answers)
    return out


def ranking_by_pair_kind(pairs: list[dict], rows: list[dict]) -> dict:
    """{"chosen>rejected": {"pairs", "base", "tuned", "tuned_reward"}} from the held-out pairs (with their
    categories) and the preference task's rows (each names its pair's file:line): where ranking moved, and where
    DPO's implicit reward (tuned minus reference log-probability) ranks right when the raw log-probabilities do not."""
    out: dict = {}
    for row in rows:
        pair = pairs[int(row["source"].rpartition(":")[2]) - 1]
        kind = f"{pair['chosen_category']}>{pair['rejected_category']}"
        base, tuned = row["base"], row["tuned"]
        counts = out.setdefault(kind, {"pairs": 0, "base": 0, "tuned": 0, "tuned_reward": 0})
        counts["pairs"] += 1
        counts["base"] += base["logp_chosen"] > base["logp_rejected"]
        counts["tuned"] += tuned["logp_chosen"] > tuned["logp_rejected"]
        counts["tuned_reward"] += (tuned["logp_chosen"] - tuned["ref_logp_chosen"]
                                   > tuned["logp_rejected"] - tuned["ref_logp_rejected"])
    return {kind: {"pairs": c["pairs"], **{k: c[k] / c["pairs"] for k in ("base", "tuned", "tuned_reward")}}
            for kind, c in sorted(out.items())}


def ranking_by_pair_group(by_kind: dict) -> dict:
    """ranking_by_pair_kind folded into two groups, weighted by pairs: "against_direct" (the rejected answer is the
    direct, made-up one: learnable from the answers' form alone) and "between_behaviours" (tool call, request for
    information, cannot answer against each other: the question decides which is right)."""
    out: dict = {}
    for kind, r in by_kind.items():
        group = "against_direct" if kind.endswith(">direct") else "between_behaviours"
        sums = out.setdefault(group, {"pairs": 0, "base": 0.0, "tuned": 0.0, "tuned_reward": 0.0})
        sums["pairs"] += r["pairs"]
        for key in ("base", "tuned", "tuned_reward"):
            sums[key] += r[key] * r["pairs"]
    return {group: {"pairs": s["pairs"], **{k: s[k] / s["pairs"] for k in ("base", "tuned", "tuned_reward")}}
            for group, s in sorted(out.items())}


def study_metrics(preference: dict, gen_qa: dict, gen_rows: list[dict], *, tool_calls: bool = True) -> dict:
    """{"base": {...}, "tuned": {...}} from the two tasks' results.json and gen_qa's rows.jsonl."""
    out = {}
    for label in ("base", "tuned"):
        tasks = {"preference": preference["models"][label]["metrics"], "gen_qa": gen_qa["models"][label]["metrics"]}
        values = {key: tasks[task].get(name) for key, task, name, _ in METRICS}
        values["tool_call_rate"] = tool_call_rate([r[label]["prediction"] for r in gen_rows]) if tool_calls else None
        out[label] = values
    return out


def is_hh_heldout(line: int) -> bool:
    """HH's held-out rows: every HH_HELDOUT_EVERY-th line (1-based), spread evenly over the file."""
    return line % HH_HELDOUT_EVERY == 0


def targets(base: dict, tuned: dict) -> dict:
    ranking_gain = tuned["ranking_accuracy"] - base["ranking_accuracy"]
    f1_change = relative_change(base["f1"], tuned["f1"])
    return {"ranking_accuracy_gain": ranking_gain, "ranking_accuracy_target": TARGET_RANKING_GAIN,
            "ranking_accuracy_met": ranking_gain >= TARGET_RANKING_GAIN - 1e-12,
            "f1_relative_change": f1_change, "f1_target": TARGET_F1_GAIN,
            "f1_met": f1_change is not None and f1_change >= TARGET_F1_GAIN - 1e-12}


def comparison(metrics: dict) -> dict:
    base, tuned = metrics["base"], metrics["tuned"]
    return {"relative_change": {k: relative_change(base[k], tuned[k]) for k in base},
            "absolute_change": {k: None if base[k] is None or tuned[k] is None else tuned[k] - base[k]
                                for k in base},
            "targets": targets(base, tuned)}


def _cell(value, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}" if percent else f"{value:.3f}"


def table_rows(study: dict) -> list[list[str]]:
    """Header + one row per metric: name, base, tuned, change (relative, or absolute for shares of pairs/answers)."""
    shown = [(k, pct) for k, _, _, pct in METRICS] + [("tool_call_rate", False)]
    rows = [["metric", "base", "tuned", "change"]]
    for key, pct in shown:
        base, tuned = study["base"].get(key), study["tuned"].get(key)
        rel = study["relative_change"].get(key)
        if key.startswith("ranking_accuracy") or key == "tool_call_rate":
            delta = study["absolute_change"].get(key)
            change = "-" if delta is None else f"{delta:+.3f}" + ("" if rel is None else f" ({rel:+.1%})")
        else:
            change = "-" if rel is None else f"{rel:+.1%}"
        rows.append([key + (" (x100)" if pct else ""), _cell(base, pct), _cell(tuned, pct), change])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def target_lines(t: dict) -> list[str]:
    f1 = "-" if t["f1_relative_change"] is None else f"{t['f1_relative_change']:+.1%}"
    return [f"ranking accuracy gain {t['ranking_accuracy_gain']:+.3f} (target +{t['ranking_accuracy_target']:.2f}): "
            f"{'met' if t['ranking_accuracy_met'] else 'NOT met'}",
            f"F1 change {f1} (target +{t['f1_target']:.0%}): {'met' if t['f1_met'] else 'NOT met'}"]


# ---- running the commands -------------------------------------------------------------------------------------------

def raydpo_command() -> list[str]:
    beside = Path(sys.executable).with_name("raydpo")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "launcher.cli"]


def run_command(args: list[str], log: list[dict], attempts: int = 1) -> float:
    """Runs `raydpo ARGS` in the repository root, output streaming through; returns its seconds.

    attempts > 1 reruns a failed command: `raydpo train` run again resumes from the run's last complete checkpoint
    (on a shared machine, Ray's memory monitor may kill a whole run when other processes fill the memory).
    """
    command = raydpo_command() + args
    shown = "raydpo " + " ".join(shlex.quote(a) for a in args)
    for attempt in range(1, attempts + 1):
        print(f"\n$ {shown}" + (f"   # attempt {attempt}, resuming" if attempt > 1 else ""), flush=True)
        started = time.time()
        code = subprocess.call(command, cwd=ROOT)
        seconds = time.time() - started
        log.append({"command": shown, "exit_code": code, "seconds": round(seconds, 1), "attempt": attempt})
        if code == 0:
            return seconds
    raise SystemExit(f"`{shown}` failed with exit code {code} after {seconds:.0f}s ({attempts} attempt(s))")


def shared_dir() -> Path:
    return Path(os.environ.get("RAYDPO_SHARED", ROOT.parent / "shared")).resolve()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_summary(run: Path) -> dict:
    """Steps, pairs, epochs and wall time of the run, from its metrics.jsonl and summary.json."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "train"] \
        if (run / "metrics.jsonl").exists() else []
    summary = read_json(run / "summary.json") if (run / "summary.json").exists() else {}
    last = rows[-1] if rows else {}
    return {"steps": last.get("step"), "total_steps": last.get("total_steps"), "epoch": last.get("epoch"),
            "final_loss": last.get("loss"), "final_reward_accuracy": last.get("rewards/accuracies"),
            "elapsed_s": last.get("elapsed_s"), "summary": summary}


def plot(study: dict, run: Path, out: Path) -> list[str]:
    """Bars of base vs tuned per metric, and the training curves (loss, reward accuracy); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _, _, _ in METRICS if k != "bleu"] + ["tool_call_rate"]
    name = "when2call" if "when2call" in run.name else "hh"
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(keys))
    for offset, label in ((-0.2, "base"), (0.2, "tuned")):
        ax.bar([x + offset for x in xs], [study[label].get(k) or 0.0 for k in keys], width=0.4, label=label)
    ax.set_xticks(list(xs), keys, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(f"{TITLES[name]} held-out: base vs tuned SmolLM2-135M-Instruct")
    ax.legend()
    fig.tight_layout()
    paths = [out / f"{name}_base_vs_tuned.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    if "train_fit" in study:
        paths.append(plot_fit(study, out / f"{name}_train_vs_heldout.png"))
    metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    train = [r for r in metrics if r.get("split") == "train"]
    if train:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, key, title in ((axes[0], "loss", "training loss"),
                               (axes[1], "rewards/accuracies", "reward accuracy (per step)")):
            ax.plot([r["step"] for r in train], [r[key] for r in train])
            ax.set_xlabel("step")
            ax.set_title(title)
        fig.tight_layout()
        paths.append(out / f"{name}_training.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return [str(p) for p in paths]


def train_fit(pairs: list[dict], results_dir: Path) -> dict:
    """The preference task on the training pairs: ranking accuracies and the same by-kind and by-group tables."""
    results = read_json(results_dir / "results.json")
    by_kind = ranking_by_pair_kind(pairs, read_jsonl(results_dir / "rows.jsonl"))
    return {"pairs": results["models"]["base"]["n"],
            **{label: results["models"][label]["metrics"] for label in ("base", "tuned")},
            "ranking_by_pair_kind": by_kind, "ranking_by_pair_group": ranking_by_pair_group(by_kind)}


def plot_fit(study: dict, path: Path) -> Path:
    """Ranking accuracy (summed log-probs) by pair group, base vs tuned, on the training and the held-out pairs."""
    import matplotlib.pyplot as plt

    bars = [(f"{split}\n{group.replace('_', ' ')}", r) for split, groups in
            (("training", study["train_fit"]["ranking_by_pair_group"]), ("held out", study["ranking_by_pair_group"]))
            for group, r in groups.items()]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for offset, label in ((-0.2, "base"), (0.2, "tuned")):
        ax.bar([x + offset for x in range(len(bars))], [r[label] for _, r in bars], width=0.4, label=label)
    ax.set_xticks(list(range(len(bars))), [name for name, _ in bars])
    ax.set_ylim(0, 1)
    ax.set_ylabel("ranking accuracy")
    ax.set_title("When2Call ranking accuracy by pair group: training vs held-out pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def prepare_hh(source: Path, data: Path) -> dict:
    """HH rows as they are, split by line number into data/train/pairs.jsonl and data/heldout/pairs.jsonl."""
    from core.data.raw_rows import iter_raw_rows

    splits = {"train": [], "heldout": []}
    for text, where in iter_raw_rows(str(source)):
        line = int(where.rpartition(":")[2])
        splits["heldout" if is_hh_heldout(line) else "train"].append(text)
    for split, rows in splits.items():
        (data / split).mkdir(parents=True, exist_ok=True)
        (data / split / "pairs.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    summary = {"inputs": [str(source)], "heldout": f"every {HH_HELDOUT_EVERY}th line",
               "rows": {k: len(v) for k, v in splits.items()}}
    (data / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"HH: {summary['rows']['train']} training rows, {summary['rows']['heldout']} held-out rows -> {data}")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="when2call")
    parser.add_argument("--heldout", metavar="FILE", help="When2Call test rows (raw) to evaluate on; every row of "
                        "../shared's When2Call file then trains")
    parser.add_argument("--json", metavar="PATH", help="where to write the study's JSON (default WORK/study.json)")
    parser.add_argument("--work", metavar="DIR", help="data, run and results go here (default outputs/, where the "
                        "recipes look: outputs/<dataset>-data, outputs/<run name>)")
    parser.add_argument("--heldout-fraction", type=float, default=0.3,
                        help="When2Call without --heldout: the stratified share of rows held out (default 0.3)")
    parser.add_argument("--judge", action="store_true", help="also run the llm_judge evaluation (slow on CPU)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run already in WORK")
    parser.add_argument("--reuse-eval", action="store_true",
                        help="keep the evaluations already in WORK's run (an interrupted study goes on)")
    parser.add_argument("--prepare-only", action="store_true", help="write the data and stop")
    parser.add_argument("--train-fit", action="store_true",
                        help="When2Call: also score the training pairs, to tell a model that did not fit its data "
                        "from one that fit it and did not generalise (held-out vs training ranking by pair group)")
    parser.add_argument("--train-attempts", type=int, default=3, metavar="N",
                        help="run `raydpo train` up to N times; each rerun resumes from the last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to `raydpo train`")
    args = parser.parse_args(argv)
    if (args.heldout or args.train_fit) and args.dataset != "when2call":
        parser.error("--heldout and --train-fit work with --dataset when2call only")
    return args


def data_dir(work: Path, dataset: str) -> Path:
    """Where the recipes' data_s3_path expects the data: outputs/when2call-data, outputs/hh-harmless-data."""
    return work / {"when2call": "when2call-data", "hh": "hh-harmless-data"}[dataset]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.dataset]
    work = Path(args.work).resolve() if args.work else ROOT / "outputs"
    data, run = data_dir(work, args.dataset), work / spec["run"]
    source = shared_dir() / spec["shared_file"]
    if not source.is_file():
        raise SystemExit(f"{source} not found: set RAYDPO_SHARED to the folder holding data/")
    log: list[dict] = []
    started = time.time()
    if args.dataset == "when2call":
        data_args = ["data", "when2call", str(source), "--out", str(data)]
        data_args += ["--heldout", str(Path(args.heldout).resolve())] if args.heldout else \
            ["--heldout-fraction", str(args.heldout_fraction)]
        run_command(data_args, log)
    else:
        prepare_hh(source, data)
    if args.prepare_only:
        return 0
    if not args.skip_train:
        run_command(["train", spec["recipe"], f"run.data_s3_path={data / 'train'}", f"run.output_s3_path={work}",
                     f"run.name={spec['run']}", *args.overrides], log, attempts=args.train_attempts)
    tasks = ["preference", "gen_qa"] + (["llm_judge"] if args.judge else [])
    for task in tasks:
        recipe, held = spec["eval"][task]
        if args.reuse_eval and (run / "eval" / task / "results.json").is_file():
            print(f"\n{task}: reusing {run / 'eval' / task / 'results.json'}", flush=True)
            continue
        run_command(["eval", recipe, f"run.data_s3_path={data / held}", "--model", str(run), "--output", str(run)],
                    log)
    fit = run / "train-fit" / "train-pairs" / "eval" / "preference"
    if args.train_fit and not (args.reuse_eval and (fit / "results.json").is_file()):
        run_command(["eval", spec["eval"]["preference"][0], f"run.data_s3_path={data / 'train' / 'pairs.jsonl'}",
                     "run.name=train-pairs", "--model", str(run), "--output", str(run / "train-fit")], log)
    run_command(["report", str(run)], log)

    results = {task: read_json(run / "eval" / task / "results.json") for task in tasks}
    gen_rows = read_jsonl(run / "eval" / "gen_qa" / "rows.jsonl")
    when2call = args.dataset == "when2call"
    metrics = study_metrics(results["preference"], results["gen_qa"], gen_rows, tool_calls=when2call)
    study = {"dataset": args.dataset, **metrics, **comparison(metrics),
             "heldout": {"file": args.heldout or f"split of {source}",
                         "pairs": results["preference"]["models"]["base"]["n"],
                         "questions": results["gen_qa"]["models"]["base"]["n"]},
             "data_summary": read_json(data / "summary.json"), "train": train_summary(run),
             "truncated_answers": {label: results["gen_qa"]["models"][label]["truncated"]
                                   for label in ("base", "tuned")},
             "examples": results["gen_qa"]["examples"], "run": str(run), "commands": log,
             "wall_s": round(time.time() - started, 1)}
    if when2call:
        behaviours = [r["behaviour"] for r in read_jsonl(data / spec["eval"]["gen_qa"][1])]
        assert len(behaviours) == len(gen_rows), "one generated answer per held-out question"
        study["tool_call_rate_by_behaviour"] = {label: rates_by_behaviour(gen_rows, behaviours, label)
                                                for label in ("base", "tuned")}
        study["ranking_by_pair_kind"] = ranking_by_pair_kind(read_jsonl(data / spec["eval"]["preference"][1]),
                                                             read_jsonl(run / "eval" / "preference" / "rows.jsonl"))
        study["ranking_by_pair_group"] = ranking_by_pair_group(study["ranking_by_pair_kind"])
        if args.train_fit:
            study["train_fit"] = train_fit(read_jsonl(data / "train" / "pairs.jsonl"), fit)
    else:
        del study["targets"]  # the targets are When2Call's
    if "llm_judge" in results:
        study["llm_judge"] = {label: m["metrics"] for label, m in results["llm_judge"]["models"].items()}
    study["plots"] = plot(study, run, work / "plots")
    rows = table_rows(study)
    json_path = Path(args.json) if args.json else work / f"{args.dataset}_study.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(study, indent=2, ensure_ascii=False))
    command = "python benchmarks/alignment_study.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = target_lines(study["targets"]) if when2call else []
    table_path = work / f"{args.dataset}_study.md"
    table_path.write_text(f"`{command.strip()}`\n\n{markdown_table(rows)}\n\n"
                          + "".join(f"- {line}\n" for line in lines))
    print("\n" + text_table(rows))
    print("\n".join(lines))
    if when2call:
        print(f"tool calls by correct behaviour: {json.dumps(study['tool_call_rate_by_behaviour'])}")
        print("ranking accuracy by pair (chosen>rejected): base -> tuned (tuned's implicit reward)")
        for kind, r in study["ranking_by_pair_kind"].items():
            print(f"  {kind:32s} {r['pairs']:3d} pairs  {r['base']:.2f} -> {r['tuned']:.2f} ({r['tuned_reward']:.2f})")
        for split, groups in (("held-out", study["ranking_by_pair_group"]),
                              ("training", study.get("train_fit", {}).get("ranking_by_pair_group", {}))):
            for group, r in groups.items():
                print(f"  {split:8s} {group:23s} {r['pairs']:3d} pairs  {r['base']:.2f} -> {r['tuned']:.2f} "
                      f"({r['tuned_reward']:.2f})")
    print(f"json: {json_path}\ntable: {table_path}\nplots: {', '.join(study['plots'])}\nrun report: "
          f"{run / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
