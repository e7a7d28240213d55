"""What `raydpo serve RUN_OR_MODEL...` serves: each argument becomes a named model, grouped by base weights.

A run folder (<output>/<run.name>, local or s3://) serves its model/ under the run's name; a LoRA run's adapter joins
the group of its base (the run's recipe names the base as the user gave it, else adapter_config.json does), so
several LoRA runs of one base share one copy of the base in memory and the request's `model` picks the adapter per
row. A full-rank run, a model folder, a hub id or `smollm2-135m-instruct` is a group of its own. Every group also
serves its base under the base's name, so a client can compare tuned and untuned answers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from core import storage
from core.config import saved_recipe
from core.errors import ConfigError
from core.models import check_weight_files, download_model, resolved_location

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str            # a local folder with adapter_config.json (s3:// runs are downloaded first)
    uri: str             # where the user said it is (shown in /v1/models, written into a RayService)


@dataclass(frozen=True)
class ModelGroup:
    """One base model in memory, served under `name`, with the LoRA adapters trained on it."""
    name: str
    source: str          # what core.models.load_causal_lm / resolve_model_source loads
    adapters: tuple[Adapter, ...] = field(default_factory=tuple)

    @property
    def model_names(self) -> list[str]:
        return [self.name] + [a.name for a in self.adapters]


def model_name(argument: str) -> str:
    """The name a client asks for: a run's or a folder's name, or the hub id / alias as given."""
    text = argument.rstrip("/")
    if text.startswith("s3://") or Path(text).exists() or text.startswith(("/", "./", "../")):
        path = PurePosixPath(text.removeprefix("s3://"))
        return path.parent.name if path.name == "model" else path.name
    return text


def base_of_adapter(model_dir: Path) -> str:
    """The adapter's base as the run's recipe names it (run.model_name_or_path), else adapter_config.json's.
    (training/export.py reads it the same way; serving does not import the training wing.)"""
    if (model_dir.parent / "recipe.yaml").is_file():
        return saved_recipe(model_dir.parent).run.model_name_or_path
    source = json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not source:
        raise ConfigError(f"{model_dir / ADAPTER_CONFIG} names no base model",
                          why="base_model_name_or_path is empty and no recipe.yaml sits beside the adapter",
                          fix="set base_model_name_or_path in adapter_config.json to the base's folder or id")
    return str(source)


def local_model_dir(argument: str) -> Path | None:
    """The local folder holding the model of a run or model folder (downloaded once for s3://); None for a hub id
    or alias, which core.models resolves itself."""
    text = argument.rstrip("/")
    if text.startswith("s3://"):
        return _download_run(text)
    path = Path(text)
    if not (path.exists() or text.startswith(("/", "./", "../"))):
        return None
    for candidate in (path / "model", path):
        if (candidate / ADAPTER_CONFIG).is_file() or (candidate / MODEL_CONFIG).is_file():
            return candidate
    why = ("it does not exist" if not path.exists() else
           "model/ holds neither config.json nor adapter_config.json" if (path / "model").is_dir() else
           "it holds no model/ folder (a run writes model/ when training ends) and no config.json")
    raise ConfigError(f"nothing to serve in {argument}", why=why,
                      fix="pass a run folder (<output>/<run.name>), a model folder, a hub id, or "
                          "smollm2-135m-instruct")


def _download_run(uri: str) -> Path:
    model_uri = f"{uri}/model" if storage.exists(f"{uri}/model") else uri
    if not storage.exists(model_uri):
        raise ConfigError(f"{uri} does not exist", fix="pass a run's output URI (<output_s3_path>/<run.name>)")
    local = download_model(model_uri)
    recipe_uri = f"{uri}/recipe.yaml"
    if model_uri != uri and storage.exists(recipe_uri) and not (local.parent / "recipe.yaml").exists():
        # the recipe goes beside a copy named model/, where base_of_adapter looks for it
        staged = local.parent / f"{local.name}-run"
        if not (staged / "model").exists():
            staged.mkdir(parents=True, exist_ok=True)
            (staged / "model").symlink_to(local, target_is_directory=True)
            (staged / "recipe.yaml").write_bytes(storage.read_bytes(recipe_uri))
        return staged / "model"
    return local


def plan_groups(arguments: list[str]) -> list[ModelGroup]:
    """The base groups to serve, in the order first named; ConfigError when two models would share a name."""
    groups: dict[str, dict] = {}  # resolved base location -> {"name", "source", "adapters"}
    for argument in arguments:
        model_dir = local_model_dir(argument)
        name = model_name(argument)
        if model_dir is not None and (model_dir / ADAPTER_CONFIG).is_file():
            check_weight_files(model_dir)  # safetensors only: a pickled adapter_model.bin is refused, never loaded
            base = base_of_adapter(model_dir)
            group = groups.setdefault(resolved_location(base), {"name": model_name(base), "source": base,
                                                                 "adapters": []})
            group["adapters"].append(Adapter(name=name, path=str(model_dir), uri=argument))
        else:
            source = str(model_dir) if model_dir is not None else argument
            group = groups.setdefault(resolved_location(source), {"name": name, "source": source, "adapters": []})
            group["name"] = name  # named as the user named it rather than as some adapter's base
    planned = [ModelGroup(g["name"], g["source"], tuple(g["adapters"])) for g in groups.values()]
    names = [n for g in planned for n in g.model_names]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError("two served models would answer to the same name", problems=clashes,
                          why="the request's `model` field picks the model by name",
                          fix="rename one of the run folders (the name is the folder's)")
    return planned
