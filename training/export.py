"""Export a run's model as a standard Hugging Face folder, merging a LoRA adapter into its base.

A run's model/ is either a full model (config.json + safetensors + tokenizer: already the standard shape, copied
as is) or a LoRA adapter (adapter_config.json + adapter_model.safetensors + tokenizer). With merge, the adapter is
folded into its base with peft's merge_and_unload and saved as safetensors with config, generation config and the
tokenizer with its chat template, so `AutoModelForCausalLM.from_pretrained(PATH)` needs neither peft nor the base.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.config import saved_recipe
from core.errors import ConfigError
from core.models import check_weight_files

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
# what a run folder holds beside model/ that the export reads: the recipe names the base model as the user gave it
RUN_FILES = ("recipe.yaml",)


@dataclass(frozen=True)
class ExportResult:
    kind: str  # "merged" | "adapter" | "full"
    source: str
    target: str
    base: str | None = None
    merged_from_quantized: str | None = None  # QLoRA: nf4 | fp4 | int8, the base the adapter was merged into


def model_kind(model_dir: Path) -> str | None:
    """'adapter', 'full', or None when the folder holds neither."""
    if (model_dir / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (model_dir / MODEL_CONFIG).is_file():
        return "full"
    return None


def find_model_dir(output: Path) -> Path:
    """OUTPUT/model of a run, or OUTPUT itself when it is a model folder; a ConfigError saying which otherwise."""
    if not output.is_dir():
        raise ConfigError(f"{output} does not exist", fix="pass a run's output folder (<output_s3_path>/<run.name>) "
                                                          "or its model/ folder")
    for candidate in (output / "model", output):
        if candidate.is_dir() and model_kind(candidate):
            return candidate
    why = ("model/ holds neither config.json nor adapter_config.json" if (output / "model").is_dir()
           else "it has no model/ folder: a run writes model/ when training ends")
    raise ConfigError(f"no model to export in {output}", why=why,
                      fix="wait for the run to finish, or pass the folder that holds config.json or "
                          "adapter_config.json")


def base_model_source(model_dir: Path) -> str:
    """The base of an adapter: the run's recipe (run.model_name_or_path, any source raydpo loads) when the
    adapter sits in a run folder, else the adapter's own base_model_name_or_path."""
    if (model_dir.parent / "recipe.yaml").is_file():
        return saved_recipe(model_dir.parent).run.model_name_or_path
    config = json.loads((model_dir / ADAPTER_CONFIG).read_text())
    source = config.get("base_model_name_or_path")
    if not source:
        raise ConfigError(f"{model_dir / ADAPTER_CONFIG} names no base model",
                          why="base_model_name_or_path is empty and no recipe.yaml sits beside the adapter",
                          fix="set base_model_name_or_path in adapter_config.json to the base model's folder or id")
    return str(source)


def merge_adapter(model_dir: Path, target: Path, base_source: str) -> str | None:
    """Loads base + adapter, merges, and saves a plain transformers folder at target. A QLoRA adapter (its run's
    recipe.yaml names the quantization) is merged into the quantized base it trained on, dequantized first (bf16 on
    a GPU, fp32 on CPU); config.json then says so ("merged_from_quantized": "nf4"). Returns that label, or None."""
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from core import quantization
    from core.models import load_causal_lm, resolve_model_source

    quant = quantization.run_quantization(model_dir)
    if quantization.quantized(quant):
        import torch

        precision = "bf16" if torch.cuda.is_available() else "fp32"
        base = load_causal_lm(base_source, dtype=getattr(torch, quantization.DTYPES[precision]),
                              config_overrides=quantization.inference_kwargs(quant, precision)).dequantize()
    else:  # the base's own dtype ("auto"): peft merges half-precision CPU weights in fp32 and rounds once
        base = load_causal_lm(base_source, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
    merged_from = quantization.label(quant)
    if merged_from:
        merged.config.merged_from_quantized = merged_from  # kept in config.json, read back as a config attribute
    merged.save_pretrained(str(target))
    tokenizer_dir = model_dir if any(model_dir.glob("tokenizer*")) else Path(resolve_model_source(base_source))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(target))
    from core.vision import is_vision_config

    if is_vision_config(merged.config):  # a vision-language model: its processor (image processor, template) too
        from core.data.images import load_processor

        load_processor(str(tokenizer_dir)).save_pretrained(str(target))
    if not (target / "generation_config.json").exists():
        GenerationConfig.from_model_config(merged.config).save_pretrained(str(target))
    return merged_from


def _check_target(to: str, overwrite: bool, output: str) -> None:
    from core import storage

    if storage.is_remote(to):
        taken = storage.exists(to)
    else:
        path = Path(to).resolve()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--to {to} is a file", fix="give a folder path")
        if not storage.is_remote(output) and (path == Path(output).resolve() or path in Path(output).resolve().parents):
            raise ConfigError(f"--to {to} would write over the run it exports from", fix="choose a folder outside it")
        taken = path.is_dir() and any(path.iterdir())
    if taken and not overwrite:
        raise ConfigError(f"--to {to} already holds files", why="an export never mixes with an older one",
                          fix="choose a new folder, or pass --overwrite to replace what is there")


def _fetch_remote(output: str, local: Path) -> Path:
    """Downloads a remote run's model/ (or a remote model folder) and its recipe.yaml; returns the local output."""
    from core import storage

    base = output.rstrip("/")
    if storage.exists(f"{base}/model"):
        storage.download_dir(f"{base}/model", str(local / "model"))
        for name in RUN_FILES:
            if storage.exists(f"{base}/{name}"):
                (local / name).write_bytes(storage.read_bytes(f"{base}/{name}"))
    elif storage.exists(base):
        storage.download_dir(base, str(local / "model"))
        return local / "model"
    else:
        raise ConfigError(f"{output} does not exist", fix="pass a run's output URI (<output_s3_path>/<run.name>)")
    return local


def export_model(output: str, to: str, *, merge: bool, overwrite: bool = False,
                 say: Callable[[str], None] = print) -> ExportResult:
    """Writes OUTPUT's model to `to` (a local folder or s3:// URI); merges a LoRA adapter when merge is set."""
    from core import storage

    remote = storage.is_remote(output)
    if not remote:
        find_model_dir(Path(output))  # a missing run is the first thing to hear about
    _check_target(to, overwrite, output)
    with tempfile.TemporaryDirectory(prefix="raydpo-export-") as tmp:
        tmp_path = Path(tmp)
        model_dir = find_model_dir(_fetch_remote(output, tmp_path / "run") if remote else Path(output))
        check_weight_files(model_dir)  # safetensors only: a pickled adapter_model.bin is refused, never loaded
        kind = model_kind(model_dir)
        staging = tmp_path / "export"
        base, merged_from = None, None
        if kind == "adapter" and merge:
            base = base_model_source(model_dir)
            say(f"merging the LoRA adapter {model_dir} into its base {base}")
            merged_from = merge_adapter(model_dir, staging, base)
            if merged_from:
                say(f"the run trained on a {merged_from}-quantized base: merged into that base dequantized "
                    f"(config.json: merged_from_quantized={merged_from!r})")
            kind = "merged"
        else:
            if kind == "full" and merge:
                say(f"{model_dir} is a full-rank model, already a standard Hugging Face folder: copied as is")
            elif kind == "adapter":
                say(f"{model_dir} is a LoRA adapter: copied as is (pass --merge for a standalone model)")
            shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(".complete"))
        if storage.is_remote(to):
            if overwrite:
                storage.remove(to)
            storage.upload_dir(str(staging), to)
        else:
            target = Path(to)
            if overwrite and target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(staging, target, dirs_exist_ok=True)
    say(f"wrote {to}")
    return ExportResult(kind=kind, source=str(output), target=str(to), base=base, merged_from_quantized=merged_from)
