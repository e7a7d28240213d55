"""`raydpo export OUTPUT --to PATH [--merge] [--overwrite]`: a run's model as a standard Hugging Face folder.

With --merge a LoRA adapter is merged into its base (safetensors, config, generation config, tokenizer with its
chat template); a full-rank model is already that and is copied as is. OUTPUT and PATH: local folders or s3:// URIs.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT",
                        help="a run's output (<output_s3_path>/<run.name>) or its model/ folder; local or s3://")
    parser.add_argument("--to", required=True, metavar="PATH", help="where to write the model: a folder or s3:// URI")
    parser.add_argument("--merge", action="store_true",
                        help="merge a LoRA adapter into its base model (a full-rank model is copied as is)")
    parser.add_argument("--overwrite", action="store_true", help="replace what PATH already holds")


def run(args) -> int:
    from training.export import export_model

    export_model(args.output, args.to, merge=args.merge, overwrite=args.overwrite)
    return 0
