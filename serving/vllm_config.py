"""The vLLM engine: Ray Serve LLM's OpenAI app (ray.serve.llm.build_openai_app) configured from raydpo's models.

Each base group becomes one LLMConfig: the base's weights (model_loading_config), its autoscaling bounds
(deployment_config) and, for LoRA runs, Ray Serve LLM's multi-LoRA (lora_config.dynamic_lora_loading_path), where a
request's `model` is `BASE:ADAPTER` and the adapter is read from `<dynamic_lora_loading_path>/<ADAPTER>/`. A run
folder keeps its adapter in `<run>/model/`, which that layout cannot name, so adapters are served from folders
named after them (`raydpo export RUN --to ADAPTERS/RUN` for each run). The config is plain data, built and checked
without vLLM; only build_vllm_app imports ray.serve.llm (which needs vLLM).
"""
from __future__ import annotations

from core.errors import ConfigError
from serving.sources import ModelGroup


def llm_config(group: ModelGroup, settings: dict) -> dict:
    from serving.app import deployment_options

    options = deployment_options(settings)
    deployment = {k: v for k, v in options.items() if k in ("num_replicas", "autoscaling_config",
                                                            "max_ongoing_requests")}
    config = {"model_loading_config": {"model_id": group.name, "model_source": group.source},
              "deployment_config": deployment,
              "engine_kwargs": {"tensor_parallel_size": 1, "max_num_seqs": settings.get("max_batch_size", 16) * 4}}
    if group.adapters:
        parents = {parent_uri(a.uri) for a in group.adapters}
        misnamed = [a.uri for a in group.adapters if a.uri.rstrip("/").rpartition("/")[2] != a.name
                    or a.uri.rstrip("/").endswith("/model")]
        if misnamed or len(parents) != 1:
            raise ConfigError("vLLM's multi-LoRA reads adapters from <folder>/<adapter name>/, which these runs are "
                              "not laid out as", problems=misnamed or sorted(parents),
                              why="a run keeps its adapter in <run>/model/, and all adapters of one base must sit "
                                  "in one folder",
                              fix="copy each run's adapter out: `raydpo export RUN --to ADAPTERS/RUN-NAME` (local or "
                                  "s3://), then `raydpo serve --engine vllm ADAPTERS/RUN-NAME ...`; or use "
                                  "--engine transformers")
        (parent,) = parents
        config["lora_config"] = {"dynamic_lora_loading_path": parent,
                                 "max_num_adapters_per_replica": max(1, len(group.adapters))}
        config["engine_kwargs"] |= {"enable_lora": True, "max_lora_rank": 64}
    if settings.get("num_gpus"):
        config["accelerator_type"] = settings.get("accelerator_type") or None
        config = {k: v for k, v in config.items() if v is not None}
    return config


def parent_uri(uri: str) -> str:
    """The folder holding `uri`, as text: pathlib would fold s3://bucket into s3:/bucket."""
    return uri.rstrip("/").rpartition("/")[0] or "."


def served_names(group: ModelGroup) -> list[str]:
    """The `model` names Ray Serve LLM answers to: the base, and BASE:ADAPTER for each adapter."""
    return [group.name] + [f"{group.name}:{a.name}" for a in group.adapters]


def openai_app_args(settings: dict) -> dict:
    """build_openai_app's argument (LLMServingArgs): one LLMConfig per base group."""
    from serving.sources import plan_groups

    return {"llm_configs": [llm_config(g, settings) for g in plan_groups(list(settings["models"]))]}


def build_vllm_app(settings: dict):
    from ray.serve.llm import build_openai_app  # imports vLLM

    return build_openai_app(openai_app_args(settings))
