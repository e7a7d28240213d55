"""`raydpo`: the user's door. One small module per command in launcher/commands/.

Each command module has `add_arguments(parser)` and `run(args) -> int`, and imports torch, deepspeed and ray
only inside `run`, so that `raydpo validate` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from core.errors import RaydpoError

# name -> (module, one-line help)
COMMANDS = {
    "validate": ("launcher.commands.validate", "check a recipe (and overrides) and print the resolved recipe"),
    "train": ("launcher.commands.train", "run a DPO recipe on Ray Train"),
    "up": ("launcher.commands.up", "start a warm local Ray cluster that `raydpo train` reuses"),
    "down": ("launcher.commands.down", "stop the warm local Ray cluster `raydpo up` started"),
    "data": ("launcher.commands.data", "validate or convert preference data"),
    "eval": ("launcher.commands.eval", "evaluate base and tuned models with an evaluation recipe"),
    "score": ("launcher.commands.score", "compute gen_qa metrics on a JSONL of predictions"),
    "report": ("launcher.commands.report", "write report.md and report.html for a run's output"),
    "export": ("launcher.commands.export", "export a run's model, merging a LoRA adapter into its base"),
    "launch": ("launcher.commands.launch", "bring a cluster up with `ray up`, run the recipe, bring it down"),
    "k8s": ("launcher.commands.k8s", "render KubeRay manifests for a recipe"),
    "plan": ("launcher.commands.plan", "estimate per-GPU memory for a recipe under ZeRO-3"),
    "serve": ("launcher.commands.serve", "serve runs or models: OpenAI-compatible API and chat page on Ray Serve"),
    "generate": ("launcher.commands.generate", "answer a JSONL of prompts with Ray Data (batch generation)"),
    "collect": ("launcher.commands.collect", "collect human preferences: candidates, Label Studio, pairs"),
    "demo": ("launcher.commands.demo", "the main job: train SmolLM2 on generated data and compare base and tuned"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydpo", description="DPO on Ray Train with DeepSpeed ZeRO-3.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a command not built yet is simply absent
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except RaydpoError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
