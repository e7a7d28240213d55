"""`raydpo collect generate|push|pull|import`: human preference collection for the next round of DPO.

  generate PROMPTS... --model M --out TASKS.json   sample 2..4 candidates per prompt (Ray Data actors)
  push TASKS.json --label-studio URL --project NAME     pairwise tasks into a Label Studio project
       (or --manifest FILE: the same comparisons as a SageMaker Ground Truth input manifest)
  pull --label-studio URL --project ID --out PAIRS.jsonl [--format nova|trl]
  import EXPORT --out PAIRS.jsonl   a Label Studio JSON export or a Ground Truth output manifest, offline

The Label Studio API key comes from LABEL_STUDIO_API_KEY only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from core.errors import ConfigError, DataError

SAMPLING_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="collect_command", metavar="STEP")
    sub.required = True
    gen = sub.add_parser("generate", help="sample candidate answers for each prompt")
    gen.add_argument("prompts", nargs="+", help="prompt files or folders (.jsonl/.json[.gz], local or s3://)")
    gen.add_argument("--model", required=True, help="model folder, training run folder, alias or hub id")
    gen.add_argument("--candidates", type=int, default=2, help="answers sampled per prompt, 2..4 (default 2)")
    gen.add_argument("--sampling", nargs="*", default=[], metavar="KEY=VALUE",
                     help="temperature, top_p, top_k, max_new_tokens, seed, batch_size "
                          f"(default {' '.join(f'{k}={v}' for k, v in SAMPLING_DEFAULTS.items())} seed=0)")
    gen.add_argument("--workers", type=int, default=1, help="model actors (default 1)")
    gen.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    gen.add_argument("--out", required=True, help="the tasks file to write (JSON)")
    push = sub.add_parser("push", help="import the tasks' pairs into a Label Studio project")
    push.add_argument("tasks", help="TASKS.json from `raydpo collect generate`")
    push.add_argument("--label-studio", help="Label Studio URL, e.g. http://localhost:8080")
    push.add_argument("--project", help="project title: created, or reused when it exists")
    push.add_argument("--manifest", help="instead: write the pairs as a SageMaker Ground Truth input manifest")
    pull = sub.add_parser("pull", help="annotations of a Label Studio project -> preference pairs")
    pull.add_argument("--label-studio", required=True, help="Label Studio URL")
    pull.add_argument("--project", required=True, help="project id (or exact title)")
    _output_arguments(pull)
    imp = sub.add_parser("import", help="a Label Studio JSON export or Ground Truth output manifest -> pairs")
    imp.add_argument("export", help="the export file")
    imp.add_argument("--source", choices=("auto", "label-studio", "ground-truth"), default="auto",
                     help="what wrote the file (auto: a JSON list is Label Studio's, JSON lines Ground Truth's)")
    _output_arguments(imp)


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the preference pairs to write (JSONL)")
    parser.add_argument("--format", choices=("nova", "trl"), default="nova", help="pair format (default nova)")


def run(args: argparse.Namespace) -> int:
    return {"generate": run_generate, "push": run_push, "pull": run_pull, "import": run_import}[
        args.collect_command](args)


# ---- generate ----

def sampling_settings(pairs: list[str]):
    """GenerationSettings from KEY=VALUE words over the collection defaults; every bad word in one ConfigError."""
    from core.generate import GenerationSettings

    fields = {f.name: f.type for f in dataclasses.fields(GenerationSettings)}
    values, problems = dict(SAMPLING_DEFAULTS), []
    for word in pairs:
        key, sep, text = word.partition("=")
        if not sep or key not in fields:
            problems.append(f"--sampling {word!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
            continue
        try:
            values[key] = float(text) if key in ("temperature", "top_p") else int(text)
        except ValueError:
            problems.append(f"--sampling {key}={text!r}: not a number")
    if not problems and values["temperature"] <= 0:
        problems.append("--sampling temperature must be > 0: greedy decoding gives the same answer every time")
    if not problems and not 0 < values["top_p"] <= 1:
        problems.append("--sampling top_p must be in (0, 1]")
    if problems:
        raise ConfigError("bad sampling settings", problems=problems)
    return GenerationSettings(**values)


def run_generate(args: argparse.Namespace) -> int:
    from collection.prompts import read_prompts
    from collection.tasks import MAX_CANDIDATES, MIN_CANDIDATES, TASKS_SCHEMA, build_tasks
    from launcher.commands.eval import resolve_model

    if not MIN_CANDIDATES <= args.candidates <= MAX_CANDIDATES:
        raise ConfigError(f"--candidates {args.candidates} is out of range",
                          fix=f"sample {MIN_CANDIDATES} to {MAX_CANDIDATES} candidates per prompt")
    settings = sampling_settings(args.sampling)
    model, _ = resolve_model(args.model)
    prompts, bad = read_prompts(args.prompts)
    for source, reason in bad[:10]:
        print(f"bad row {source}: {reason}")
    if not prompts:
        raise DataError(f"no prompts in {', '.join(args.prompts)}", problems=[f"{s}: {r}" for s, r in bad[:10]],
                        fix='give {"prompt": "..."} rows, chat rows {"messages": [...]}, or preference rows')
    out = Path(args.out)
    log_file = out.with_name(out.name + ".log")

    from cluster.session import ray_session
    from core.generate import generate_candidates
    from launcher.console import user_console

    with user_console(log_file) as say, ray_session(num_cpus=None, num_gpus=None, log_file=log_file) as session:
        gpus = int(session["resources"].get("GPU", 0))
        if args.device == "gpu" and gpus == 0:
            raise ConfigError("--device gpu but the Ray cluster has no GPU", fix="use --device cpu or auto")
        use_gpu = args.device == "gpu" or (args.device == "auto" and gpus > 0)
        say(f"sampling {args.candidates} candidate(s) for {len(prompts)} prompt(s) with {model}; Ray's log: "
            f"{log_file}")
        shapes = [{"messages": p["prompt"], "system": p["system"], "tools": p["tools"]} for p in prompts]
        answers = generate_candidates(shapes, model, settings, args.candidates, workers=max(1, args.workers),
                                      use_gpu=use_gpu)
    sampling = {**dataclasses.asdict(settings), "candidates": args.candidates}
    tasks, counts = build_tasks(prompts, [[a["prediction"] for a in group] for group in answers],
                                model=args.model, sampling=sampling)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"schema": TASKS_SCHEMA, "model": args.model, "sampling": sampling,
                               "counts": counts, "bad_rows": len(bad), "tasks": tasks}, indent=1, ensure_ascii=False))
    print(f"{counts['tasks']} task(s) written to {out} ({len(bad)} bad row(s), "
          f"{counts['duplicate_prompts']} duplicate prompt(s); candidates dropped: {counts['empty_candidates']} "
          f"empty, {counts['identical_candidates']} identical)")
    if counts["too_few_candidates"]:
        print(f"{counts['too_few_candidates']} prompt(s) left with fewer than 2 distinct candidates, not written: "
              + ", ".join(counts["too_few_sources"][:5]) + (" ..." if counts["too_few_candidates"] > 5 else ""))
    return 0


# ---- push ----

def read_tasks(path: str) -> list[dict]:
    from collection.tasks import TASKS_SCHEMA

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", fix="write it with `raydpo collect generate`") from None
    except ValueError as err:
        raise DataError(f"{path} is not JSON", why=str(err)) from None
    if not isinstance(doc, dict) or doc.get("schema") != TASKS_SCHEMA:
        raise DataError(f"{path} is not a raydpo tasks file", why=f"it lacks \"schema\": \"{TASKS_SCHEMA}\"",
                        fix="write it with `raydpo collect generate`")
    return doc["tasks"]


def run_push(args: argparse.Namespace) -> int:
    from collection.tasks import comparison_items

    items = [item for task in read_tasks(args.tasks) for item in comparison_items(task)]
    if args.manifest:
        out = Path(args.manifest)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"source": i["prompt"], **i}, ensure_ascii=False) + "\n" for i in items))
        print(f"{len(items)} pair(s) written to {out} as a Ground Truth input manifest "
              "(template: docs/collection/groundtruth-template.html)")
        return 0
    if not (args.label_studio and args.project):
        raise ConfigError("push needs --label-studio URL and --project NAME (or --manifest FILE)")
    from collection.labelstudio import push

    done = push(items, args.label_studio, args.project)
    print(f"project {done['project']} ({'created' if done['created'] else 'reused'}) at {args.label_studio}: "
          f"{done['imported']} pair(s) imported, {done['already_there']} already there")
    print(f"annotate: {args.label_studio.rstrip('/')}/projects/{done['project']}/data")
    return 0


# ---- pull / import ----

def write_pairs(items: list[dict], args: argparse.Namespace) -> int:
    from collection.votes import resolve
    from core.data.formats import write_records

    records, summary = resolve(items)
    count = write_records(records, args.out, args.format)
    # not .json: a folder of pairs handed to `raydpo train` must hold data files only
    summary_path = Path(args.out).with_name(Path(args.out).name + ".summary")
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print_summary(summary, count, args.out, summary_path)
    return 0


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_summary(summary: dict, count: int, out: str, summary_path: Path) -> None:
    print(f"{count} preference pair(s) written to {out} from {summary['items']} compared pair(s)")
    dropped = summary["dropped"]
    if dropped:
        print("dropped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())))
    notes = {k: v for k, v in summary["annotations"].items() if k in ("skipped", "empty", "unreadable")}
    if notes:
        print("annotations that are no vote: " + ", ".join(f"{n} {k}" for k, n in sorted(notes.items())))
    for annotator, counts in summary["per_annotator"].items():
        print(f"  {annotator}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    agreement = summary["agreement"]
    print(f"agreement on {agreement['items_with_two_or_more']} pair(s) with 2+ votes: percent "
          f"{_number(agreement['percent'])}, Fleiss' kappa {_number(agreement['fleiss_kappa'])}")
    for pair, value in agreement["cohen_kappa"].items():
        print(f"  Cohen's kappa {pair}: {_number(value['kappa'])} on {value['items']} pair(s)")
    print(f"summary: {summary_path}")


def run_pull(args: argparse.Namespace) -> int:
    from collection.labelstudio import pull
    from collection.votes import items_from_label_studio

    export, names = pull(args.label_studio, args.project)
    return write_pairs(items_from_label_studio(export, names), args)


def run_import(args: argparse.Namespace) -> int:
    from collection.votes import items_from_ground_truth, items_from_label_studio

    path = Path(args.export)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    source = args.source
    if source == "auto":
        source = "label-studio" if text.lstrip().startswith("[") else "ground-truth"
    if source == "label-studio":
        try:
            export = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path} is not JSON", why=str(err)) from None
        items = items_from_label_studio(export)
    else:
        items = items_from_ground_truth(text.splitlines(), str(path))
    return write_pairs(items, args)
