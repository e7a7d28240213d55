"""What `raydpo serve` plans before any cluster starts: models grouped by base and named, replica options, the
engine, and the vLLM engine's Ray Serve LLM configuration (checked against Ray's LLMConfig, without vLLM)."""
from __future__ import annotations

import argparse
import json

import pytest

from core.errors import ConfigError
from launcher.commands import serve as serve_cmd
from serving.app import DEFAULTS, deployment_options
from serving.sources import Adapter, ModelGroup, model_name, plan_groups
from serving.vllm_config import llm_config, served_names


def fake_run(root, name, *, base=None, full=False):
    """A run folder as training writes it: <run>/model with config.json (full) or adapter_config.json (LoRA)."""
    model = root / name / "model"
    model.mkdir(parents=True)
    if full:
        (model / "config.json").write_text("{}")
    else:
        (model / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return root / name


def test_lora_runs_of_one_base_share_a_group_and_full_runs_stand_alone(tmp_path, tiny_model_dir):
    a = fake_run(tmp_path, "run-a", base=str(tiny_model_dir))
    b = fake_run(tmp_path, "run-b", base=str(tiny_model_dir))
    full = fake_run(tmp_path, "full-run", full=True)
    groups = plan_groups([str(a), str(full), str(b) + "/"])
    assert [g.name for g in groups] == [tiny_model_dir.name, "full-run"]
    assert [a.name for a in groups[0].adapters] == ["run-a", "run-b"] and groups[1].adapters == ()
    assert groups[0].model_names == [tiny_model_dir.name, "run-a", "run-b"]
    assert groups[1].source == str(full / "model")


def test_naming_the_base_too_keeps_one_group(tmp_path, tiny_model_dir):
    a = fake_run(tmp_path, "run-a", base=str(tiny_model_dir))
    (group,) = plan_groups([str(a), str(tiny_model_dir)])
    assert group.model_names == [tiny_model_dir.name, "run-a"]


def test_clashing_names_and_empty_folders_are_config_errors(tmp_path, tiny_model_dir):
    a = fake_run(tmp_path / "x", "run-a", base=str(tiny_model_dir))
    a2 = fake_run(tmp_path / "y", "run-a", base=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="same name"):
        plan_groups([str(a), str(a2)])
    (tmp_path / "empty" / "model").mkdir(parents=True)
    with pytest.raises(ConfigError, match="nothing to serve") as err:
        plan_groups([str(tmp_path / "empty")])
    assert "neither config.json nor adapter_config.json" in str(err.value.why)


def test_model_names():
    assert model_name("s3://b/runs/hh-lora/") == "hh-lora"
    assert model_name("s3://b/runs/hh-lora/model") == "hh-lora"
    assert model_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_replica_options_fixed_or_autoscaling_between_the_bounds():
    fixed = deployment_options(DEFAULTS | {"replicas": 3})
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 64  # 4 x max_batch_size 16, above Serve's default of 5
    scaled = deployment_options(DEFAULTS | {"min_replicas": 1, "max_replicas": 4, "num_gpus": 1.0})
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert scaled["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert deployment_options(DEFAULTS | {"min_replicas": 2, "max_replicas": 2})["num_replicas"] == 2
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        deployment_options(DEFAULTS | {"min_replicas": 3, "max_replicas": 2})


def test_cli_flags_become_the_app_args():
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    args = serve_cmd.app_args(parser.parse_args(["m", "--min-replicas", "2", "--max-replicas", "5",
                                                 "--batch-wait-ms", "10", "--gpus-per-replica", "1"]))
    assert (args["min_replicas"], args["max_replicas"], args["batch_wait_timeout_s"]) == (2, 5, 0.01)
    assert args["device"] == "cuda" and args["num_gpus"] == 1.0 and args["models"] == ["m"]


def test_engine_choice():
    assert serve_cmd.pick_engine("auto", vllm_installed=False) == "transformers"
    assert serve_cmd.pick_engine("auto", vllm_installed=True) == "vllm"
    with pytest.raises(ConfigError, match="needs vLLM"):
        serve_cmd.pick_engine("vllm", vllm_installed=False)


def llm_config_class():
    try:  # the config model itself imports without vLLM (ray.serve.llm's public module does not)
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    except ImportError as err:
        pytest.skip(f"Ray Serve LLM's LLMConfig not importable here: {err}")
    return LLMConfig


def test_vllm_config_for_a_full_model_passes_ray_serve_llm():
    group = ModelGroup("full-run", "s3://b/runs/full-run/model")
    config = llm_config(group, DEFAULTS | {"min_replicas": 1, "max_replicas": 3, "num_gpus": 1.0})
    parsed = llm_config_class()(**config)
    assert parsed.model_loading_config.model_id == "full-run"
    assert parsed.deployment_config["autoscaling_config"]["max_replicas"] == 3
    assert parsed.lora_config is None and served_names(group) == ["full-run"]


def test_vllm_config_serves_exported_adapters_by_base_colon_name():
    group = ModelGroup("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                       (Adapter("hh", "/tmp/hh", "s3://b/adapters/hh"),
                        Adapter("hh2", "/tmp/hh2", "s3://b/adapters/hh2/")))
    config = llm_config(group, DEFAULTS)
    parsed = llm_config_class()(**config)
    assert parsed.lora_config.dynamic_lora_loading_path == "s3://b/adapters"
    assert parsed.lora_config.max_num_adapters_per_replica == 2 and config["engine_kwargs"]["enable_lora"] is True
    assert served_names(group) == ["smollm2-135m-instruct", "smollm2-135m-instruct:hh", "smollm2-135m-instruct:hh2"]


def test_vllm_refuses_run_folders_with_how_to_export():
    group = ModelGroup("base", "base", (Adapter("run-a", "/tmp/a", "s3://b/runs/run-a/model"),))
    with pytest.raises(ConfigError, match="multi-LoRA") as err:
        llm_config(group, DEFAULTS)
    assert "raydpo export" in err.value.fix


def test_parent_uri_keeps_the_scheme():
    from serving.vllm_config import parent_uri

    assert parent_uri("s3://b/adapters/hh/") == "s3://b/adapters"
    assert parent_uri("/data/adapters/hh") == "/data/adapters" and parent_uri("hh") == "."


def test_a_taken_port_is_a_config_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_cmd.check_port_free("127.0.0.1", port)
