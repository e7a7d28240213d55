"""The bad-input corpus: each case makes its files in a fresh folder and names the `raydpo` command that must refuse
them, with the exit code (core/errors.py) and the words of the message the user needs (the file:line or dotted key
and the way out). tests/bad_inputs/test_bad_inputs.py runs each through launcher.cli.main; the README's table is
this module's output:

    .venv/bin/python -m tests.bad_inputs.cases     # prints the README's bad-input table
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
README_START, README_END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"
PAIR = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
# the output folder every recipe case points at: nothing may appear there
OUT = "out"


@dataclass(frozen=True)
class Case:
    kind: str                          # recipe, data, model, cli
    name: str                          # what is wrong, as the README lists it
    make: Callable[[Path, Path], list[str]]   # (folder, tiny model folder) -> argv after `raydpo`
    exit_code: int
    says: tuple[str, ...]              # words the message must hold ({dir}: the case's folder)


def recipe(folder: Path, model: Path, run: dict | None = None, tc: dict | None = None, *,
           name: str = "r.yaml") -> Path:
    data = folder / "train.jsonl"
    data.write_text(json.dumps(PAIR) + "\n")
    tree = {"run": {"name": "bad-input", "model_name_or_path": str(model), "replicas": 1,
                    "data_s3_path": str(data), "output_s3_path": str(folder / OUT), **(run or {})},
            "training_config": {"global_batch_size": 2, **(tc or {})}}
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def train(**kwargs) -> Callable[[Path, Path], list[str]]:
    def make(folder: Path, model: Path) -> list[str]:
        return ["train", str(recipe(folder, model, **kwargs))]
    return make


def text_recipe(text: str | bytes) -> Callable[[Path, Path], list[str]]:
    def make(folder: Path, model: Path) -> list[str]:
        path = folder / "r.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", str(path)]
    return make


def data_file(name: str, content: bytes | Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def make(folder: Path, model: Path) -> list[str]:
        path = folder / name
        content(path) if callable(content) else path.write_bytes(content)
        return ["data", "validate", str(path)]
    return make


def truncated_gz(path: Path) -> None:
    whole = gzip.compress((json.dumps(PAIR) + "\n").encode() * 200)
    path.write_bytes(whole[: len(whole) // 2])


def huge_line(path: Path) -> None:
    from core.data.raw_rows import MAX_ROW_BYTES

    path.write_text(json.dumps({**PAIR, "prompt": "x" * (MAX_ROW_BYTES + 1)}) + "\n")


def model_case(damage: Callable[[Path], Path | str]) -> Callable[[Path, Path], list[str]]:
    """A copy of the tiny model, damaged; `raydpo train` on a recipe that names it."""
    def make(folder: Path, model: Path) -> list[str]:
        import shutil

        copy = folder / "model"
        shutil.copytree(model, copy)
        source = damage(copy)
        return ["train", str(recipe(folder, Path(source)))]
    return make


def cut_safetensors(copy: Path) -> Path:
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return copy


def cut_gguf(copy: Path) -> Path:
    from core.models import offline_smollm2_gguf

    target = copy.parent / "model.gguf"
    with open(offline_smollm2_gguf(), "rb") as src:
        target.write_bytes(src.read(4_000_000))
    return target


def unknown_architecture(copy: Path) -> Path:
    config = json.loads((copy / "config.json").read_text())
    config |= {"model_type": "frobnicator", "architectures": ["FrobnicatorForCausalLM"]}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def pickle_only(copy: Path) -> Path:
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
    return copy


def cli(*argv: str) -> Callable[[Path, Path], list[str]]:
    def make(folder: Path, model: Path) -> list[str]:
        return [a.format(recipe=recipe(folder, model), dir=folder) for a in argv]
    return make


def k8s_check(content: bytes) -> Callable[[Path, Path], list[str]]:
    def make(folder: Path, model: Path) -> list[str]:
        (folder / "m.yaml").write_bytes(content)
        from cluster.k8s_checks import CRD_FILES

        for name in CRD_FILES.values():  # the file is refused before any schema is read
            (folder / name).write_text("{}")
        return ["k8s", "check", str(folder / "m.yaml"), "--schemas", str(folder)]
    return make


CASES = [
    # ---- recipes, through `raydpo train`
    Case("recipe", "not YAML", text_recipe("run: {name: x\ntraining_config: [\n"), 2, ("r.yaml:2:16", "not valid YAML")),
    Case("recipe", "a YAML list instead of a mapping", text_recipe("- run\n- training_config\n"), 2,
         ("r.yaml", "mapping")),
    Case("recipe", "an empty recipe file", text_recipe(""), 2, ("r.yaml",)),
    Case("recipe", "not UTF-8", text_recipe(b"run:\n  name: caf\xe9\n"), 2, ("r.yaml:2", "UTF-8")),
    Case("recipe", "a recipe file that does not exist", cli("train", "{dir}/missing.yaml"), 2, ("missing.yaml",)),
    Case("recipe", "an unknown key", train(tc={"global_batch_sise": 2}), 2,
         ("training_config.global_batch_sise", "global_batch_size")),
    Case("recipe", "a wrong type", train(tc={"max_length": "long"}), 2, ("training_config.max_length",)),
    Case("recipe", "an out-of-range value", train(tc={"model": {"dpo_cfg": {"beta": 5.0}}}), 2,
         ("training_config.model.dpo_cfg.beta", "allowed")),
    Case("recipe", "contradictory keys: fewer pairs per step than replicas",
         train(run={"replicas": 16}, tc={"global_batch_size": 8}), 2,
         ("training_config.global_batch_size", "run.replicas=16")),
    Case("recipe", "contradictory keys: a micro batch that does not divide the busiest replica's share",
         train(run={"replicas": 6}, tc={"global_batch_size": 32, "micro_batch_size": 4}), 2,
         ("training_config.micro_batch_size", "busiest replica's share 6")),
    Case("recipe", "contradictory keys: LoRA+ without LoRA",
         train(tc={"model": {"peft": {"lora_tuning": {"loraplus_lr_ratio": 16.0}}}}), 2,
         ("loraplus_lr_ratio", "peft_scheme is null")),
    Case("recipe", "a relative output path with ..", train(run={"output_s3_path": "../../../../etc"}), 2,
         ("run.output_s3_path", "'..'")),
    Case("recipe", "an s3:// output without a bucket", train(run={"output_s3_path": "s3://"}), 2,
         ("run.output_s3_path", "bucket")),
    Case("recipe", "an s3:// data path without a bucket", train(run={"data_s3_path": "s3:///x.jsonl"}), 2,
         ("run.data_s3_path", "bucket")),
    Case("recipe", "an unknown override key", cli("train", "{recipe}", "training_config.bta=0.1"), 2,
         ("training_config.bta",)),
    # ---- data, through `raydpo data validate`
    Case("data", "a path that does not exist", cli("data", "validate", "{dir}/nothing.jsonl"), 2,
         ("nothing.jsonl",)),
    Case("data", "an empty file", data_file("empty.jsonl", b""), 2, ("no preference pairs", "empty.jsonl")),
    Case("data", "rows of only whitespace", data_file("blank.jsonl", b"   \n\t\n  \n"), 2,
         ("no preference pairs", "blank lines")),
    Case("data", "a binary file named .jsonl", data_file("bin.jsonl", bytes(range(256)) * 4), 2,
         ("bin.jsonl:1", "not UTF-8")),
    Case("data", "a 50 MB single line (over the row limit)", data_file("huge.jsonl", huge_line), 2,
         ("huge.jsonl:1", "row limit")),
    Case("data", "a truncated .gz", data_file("cut.jsonl.gz", truncated_gz), 2, ("cut.jsonl.gz",)),
    Case("data", "a wrong encoding (Latin-1)",
         data_file("latin.jsonl", json.dumps(PAIR).replace("4", "\u00e9").encode("latin-1") + b"\n"), 2,
         ("latin.jsonl:1", "not UTF-8")),
    Case("data", "a row that is not JSON", data_file("nojson.jsonl", b"prompt: hi\n"), 2, ("nojson.jsonl:1",)),
    Case("data", "an s3:// URI without a bucket", cli("data", "validate", "s3://"), 4, ("s3://", "bucket")),
    # ---- models, through `raydpo train`
    Case("model", "a model folder that does not exist", train(run={"model_name_or_path": "/nonexistent/model"}), 2,
         ("/nonexistent/model",)),
    Case("model", "a truncated safetensors file", model_case(cut_safetensors), 2,
         ("model.safetensors", "not a complete safetensors file")),
    Case("model", "a truncated GGUF file", model_case(cut_gguf), 2, ("model.gguf", "not a readable GGUF")),
    Case("model", "an architecture transformers does not know", model_case(unknown_architecture), 2,
         ("frobnicator",)),
    Case("model", "pickled weights only (.bin)", model_case(pickle_only), 2, ("pytorch_model.bin", "safetensors")),
    # ---- the command line
    Case("cli", "--replicas 0", cli("train", "{recipe}", "--replicas", "0"), 2,
         ("run.replicas (from --replicas): 0", ">= 1")),
    Case("cli", "--replicas -1", cli("train", "{recipe}", "--replicas", "-1"), 2, ("run.replicas", ">= 1")),
    Case("cli", "--replicas abc", cli("train", "{recipe}", "--replicas", "abc"), 2, ("--replicas", "abc")),
    Case("cli", "an unknown flag", cli("train", "{recipe}", "--frobnicate"), 2, ("--frobnicate",)),
    Case("cli", "k8s check on a non-UTF-8 file", k8s_check(b"kind: RayJob\nname: \xff\xfe\n"), 2,
         ("m.yaml", "UTF-8")),
]


def table() -> str:
    """The README's table: one row per case, what raydpo answers and with which exit code."""
    lines = ["| input | what is wrong | exit | the message names |", "| --- | --- | --- | --- |"]
    for case in CASES:
        says = ", ".join(f"`{s}`" for s in case.says)
        lines.append(f"| {case.kind} | {case.name} | {case.exit_code} | {says} |")
    return "\n".join(lines)


def readme_section(readme: str) -> str:
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[start:end].strip()


if __name__ == "__main__":
    print(table())
