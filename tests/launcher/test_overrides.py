"""Overrides: dotted keys, the JSON object, precedence (JSON, then dotted, then --replicas), and their errors."""
from __future__ import annotations

import copy

import pytest

from launcher.overrides import (
    apply_overrides,
    deep_merge,
    parse_dotted,
    parse_overrides_json,
    parse_value,
    set_path,
)
from launcher.recipe import load_recipe
from core.errors import ConfigError


def minimal() -> dict:
    return {"run": {"name": "t", "model_name_or_path": "org/model", "data_s3_path": "s3://b/train.jsonl",
                    "output_s3_path": "s3://b/out"}}


def problems_of(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(*args, **kwargs)
    return info.value.problems


# ---- parsing ----


@pytest.mark.parametrize("text,value", [
    ("0.05", 0.05),
    ("1e-5", 1e-5),
    ("5E-7", 5e-7),
    ("3", 3),
    ("[0.9, 0.95]", [0.9, 0.95]),
    ("[0.9,0.95]", [0.9, 0.95]),
    ("null", None),
    ("", None),
    ("true", True),
    ("lora", "lora"),
    ("'0.1'", "0.1"),
    ("{question: prompt}", {"question": "prompt"}),
])
def test_parse_value_reads_yaml(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_parse_value_error_says_how_to_quote():
    with pytest.raises(ConfigError, match="cannot read the value") as info:
        parse_value("[0.9,")
    assert "quote" in info.value.fix


def test_parse_dotted():
    assert parse_dotted("training_config.model.dpo_cfg.beta=0.05") == (
        ("training_config", "model", "dpo_cfg", "beta"), 0.05)
    assert parse_dotted("training_config.data.system_prompt=a=b") == (
        ("training_config", "data", "system_prompt"), "a=b")  # only the first '=' splits
    assert parse_dotted(" beta = 0.2 ") == (("beta",), 0.2)


@pytest.mark.parametrize("item", ["beta", "a..b=1", ".a=1", "a b=1", "=3"])
def test_parse_dotted_rejects_malformed(item):
    with pytest.raises(ConfigError, match="is not of the form dotted.key=value"):
        parse_dotted(item)


def test_parse_overrides_json_errors():
    assert parse_overrides_json('{"run": {"replicas": 2}}') == {"run": {"replicas": 2}}
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        parse_overrides_json("{run: 2}")
    assert "line 1 column 2" in info.value.why
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        parse_overrides_json("[1, 2]")


# ---- pure tree edits ----


def test_set_path_creates_sections_and_leaves_input_alone():
    tree = {"a": {"b": 1}}
    before = copy.deepcopy(tree)
    out, problems = set_path(tree, ["a", "c", "d"], 5)
    assert problems == [] and out == {"a": {"b": 1, "c": {"d": 5}}}
    assert tree == before
    assert set_path({"a": None}, ["a", "b"], 1) == ({"a": {"b": 1}}, [])  # a null section becomes one


def test_set_path_through_a_value_is_a_problem():
    tree = {"training_config": {"max_length": 1024}}
    out, problems = set_path(tree, ["training_config", "max_length", "x"], 1)
    assert out is tree
    assert problems == [("training_config.max_length.x",
                         "cannot set: training_config.max_length is the value 1024, not a section with keys")]


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"run": {"name": "a", "replicas": 1}, "training_config": {"model": {"optim": {"betas": [0.9, 0.999]}}}}
    before = copy.deepcopy(base)
    patch = {"run": {"replicas": 4}, "training_config": {"model": {"optim": {"betas": [0.8, 0.9]}}}}
    out, problems = deep_merge(base, patch)
    assert problems == []
    assert out == {"run": {"name": "a", "replicas": 4},
                   "training_config": {"model": {"optim": {"betas": [0.8, 0.9]}}}}
    assert base == before


def test_deep_merge_mapping_onto_a_value_is_a_problem():
    out, problems = deep_merge({"run": {"replicas": 1}}, {"run": {"replicas": {"n": 2}}})
    assert problems == [("run.replicas", "cannot set: run.replicas is the value 1, not a section with keys")]


def test_apply_overrides_json_then_dotted_in_order():
    out, problems = apply_overrides(
        {"x": {"y": 1}},
        dotted=["x.y=2", "x.z=[1, 2]", "x.y=3"],
        overrides_json='{"x": {"y": 10, "w": true}}',
    )
    assert problems == [] and out == {"x": {"y": 3, "w": True, "z": [1, 2]}}


def test_apply_overrides_collects_every_problem():
    out, problems = apply_overrides({"a": 1}, dotted=["nokey", "a.b=2", "c=3"], overrides_json="[1]")
    assert [p[0] for p in problems] == ["--overrides", "nokey", "a.b"]
    assert out == {"a": 1, "c": 3}  # the good one still applies


# ---- through load_recipe ----


def test_precedence_json_then_dotted_then_replicas():
    raw = minimal()
    raw["training_config"] = {"global_batch_size": 16, "model": {"dpo_cfg": {"beta": 0.3}}}
    recipe = load_recipe(raw, overrides_json='{"run": {"replicas": 8}, "training_config": {"model": '
                                             '{"dpo_cfg": {"beta": 0.2, "loss_type": "ipo"}}}}')
    assert (recipe.run.replicas, recipe.training_config.model.dpo_cfg.beta) == (8, 0.2)
    recipe = load_recipe(raw, overrides=["run.replicas=4", "beta=0.05"],
                         overrides_json='{"run": {"replicas": 8}, "training_config": {"model": '
                                        '{"dpo_cfg": {"beta": 0.2, "loss_type": "ipo"}}}}')
    dpo = recipe.training_config.model.dpo_cfg
    assert (recipe.run.replicas, dpo.beta, dpo.loss_type) == (4, 0.05, "ipo")
    recipe = load_recipe(raw, overrides=["run.replicas=4"], overrides_json='{"run": {"replicas": 8}}', replicas=2)
    assert recipe.run.replicas == 2


def test_short_keys_resolve_to_their_only_full_path():
    recipe = load_recipe(minimal(), overrides=[
        "beta=0.05", "dpo_cfg.loss_type=hinge", "lr=1e-5", "sched.min_lr=1e-7", "betas=[0.9, 0.95]",
        "peft_scheme=lora", "adapter_dim=8", "key_map.question=prompt", "replicas=2"])
    model = recipe.training_config.model
    assert (model.dpo_cfg.beta, model.dpo_cfg.loss_type) == (0.05, "hinge")
    assert model.optim.lr == 1e-5 and model.optim.sched.min_lr == 1e-7
    assert model.optim.betas == (0.9, 0.95)
    assert (model.peft.peft_scheme, model.peft.lora_tuning.adapter_dim) == ("lora", 8)
    assert recipe.training_config.data.key_map == {"question": "prompt"}
    assert recipe.run.replicas == 2


def test_null_override_turns_lora_off():
    raw = minimal()
    raw["training_config"] = {"model": {"peft": {"peft_scheme": "lora"}}}
    assert load_recipe(raw, overrides=["peft_scheme=null"]).training_config.model.peft.peft_scheme is None


def test_ambiguous_short_key():
    (problem,) = problems_of(minimal(), overrides=["name=adamw"])
    assert problem == "name: ambiguous short key; write the full path: run.name or training_config.model.optim.name"


def test_unknown_override_key_reads_like_an_unknown_key_in_the_file():
    in_file = minimal()
    in_file["training_config"] = {"model": {"dpo_cfg": {"betta": 0.2}}}
    (from_file,) = problems_of(in_file)
    (from_override,) = problems_of(minimal(), overrides=["training_config.model.dpo_cfg.betta=0.2"])
    (short,) = problems_of(minimal(), overrides=["dpo_cfg.betta=0.2"])
    assert from_file == from_override == short
    assert "did you mean training_config.model.dpo_cfg.beta?" in from_file


def test_unknown_short_key_suggests_the_full_path():
    (problem,) = problems_of(minimal(), overrides=["bta=0.2"])
    assert problem.startswith("bta: unknown key (value 0.2); did you mean training_config.model.dpo_cfg.beta?")


def test_override_through_a_default_value_is_a_problem():
    (problem,) = problems_of(minimal(), overrides=["training_config.max_length.tokens=5"])
    assert problem == ("training_config.max_length.tokens: cannot set: training_config.max_length is a value "
                       "(an integer), not a section with keys")
    (problem,) = problems_of(minimal(), overrides=["lr.x=5"])
    assert problem.startswith("training_config.model.optim.lr.x: cannot set")


def test_override_values_are_checked_like_file_values():
    problems = problems_of(minimal(), overrides=["beta=0.9", "max_epochs=2.5"], replicas=0)
    assert problems == [
        "run.replicas (from --replicas): 0 is not allowed; allowed: >= 1",
        "training_config.trainer.max_epochs: 2.5 is a number; expected an integer (1..5)",
        "training_config.model.dpo_cfg.beta: 0.9 is not allowed; allowed: [0.001, 0.5]",
    ]


def test_override_and_file_problems_come_together():
    raw = minimal()
    raw["training_config"] = {"max_length": 50}
    problems = problems_of(raw, overrides=["nope", "beta=2"], overrides_json="{bad")
    assert [p.split(":")[0] for p in problems] == [
        "--overrides", "nope", "training_config.max_length", "training_config.model.dpo_cfg.beta"]
