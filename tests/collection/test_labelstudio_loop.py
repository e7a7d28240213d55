"""The collection loop against a real Label Studio: generate candidates with a tiny model, push, annotate as
simulated annotators through Label Studio's REST API, pull, train 2 steps on the pairs, generate the next round with
the tuned model; and the labeling page rendered in headless Chromium.

One Label Studio server for the whole test session (tests/collection/lsserver.py): it takes ~40 s to start.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml

from launcher.cli import main
from tests.collection.lsserver import label_studio  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.",
           "What is two plus two?", "Give me a fruit.", "Name an animal."]


def cli(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def pushed(label_studio, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Round 1 generated with the tiny model and pushed (with the admin's legacy token)."""
    work = tmp_path_factory.mktemp("collect")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
                       + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Say hello."}]}) + "\n")
    tasks = work / "round1.tasks.json"
    assert cli("collect", "generate", str(prompts), "--model", str(tiny_model_dir), "--candidates", "3",
               "--sampling", "temperature=1.0", "max_new_tokens=12", "seed=3", "--out", str(tasks)) == 0
    doc = json.loads(tasks.read_text())
    assert len(doc["tasks"]) >= 6 and all(len(t["candidates"]) >= 2 for t in doc["tasks"])
    assert doc["tasks"][0]["model"] == str(tiny_model_dir) and doc["tasks"][0]["sampling"]["temperature"] == 1.0
    os.environ["LABEL_STUDIO_API_KEY"] = label_studio.admin_legacy_token
    try:
        assert cli("collect", "push", str(tasks), "--label-studio", label_studio.url, "--project", "round 1") == 0
        assert cli("collect", "push", str(tasks), "--label-studio", label_studio.url, "--project", "round 1") == 0
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]
    auth = {"Authorization": f"Token {label_studio.admin_legacy_token}"}
    projects = requests.get(f"{label_studio.url}/api/projects", headers=auth, timeout=30).json()["results"]
    project = next(p for p in projects if p["title"] == "round 1")
    ls_tasks = requests.get(f"{label_studio.url}/api/tasks", params={"project": project["id"], "page_size": 1000},
                            headers=auth, timeout=60).json()["tasks"]
    pairs = sum(len(t["candidates"]) * (len(t["candidates"]) - 1) // 2 for t in doc["tasks"])
    assert len(ls_tasks) == pairs, "the second push reused the project and imported nothing twice"
    return {"work": work, "tasks": doc, "project": project["id"], "ls_tasks": sorted(ls_tasks, key=lambda t: t["id"])}


def access_token(url: str, pat: str) -> str:
    """A personal access token is a refresh token: trade it for an access token, as the SDK does."""
    got = requests.post(f"{url}/api/token/refresh/", json={"refresh": pat}, timeout=30)
    assert got.ok, got.text
    return got.json()["access"]


def annotation(kind: str, data: dict, preferred: int) -> dict:
    """Annotation body for a pick of candidate `preferred` (shown left or right per the task's order)."""
    if kind == "skip":
        return {"result": [], "was_cancelled": True}
    if kind in ("Tie", "Both bad"):
        return {"result": [{"from_name": "verdict", "to_name": "answer_a", "type": "choices",
                            "value": {"choices": [kind]}}]}
    side = "left" if data["order"][0] == preferred else "right"
    return {"result": [{"from_name": "preference", "to_name": "answer_a,answer_b", "type": "pairwise",
                        "value": {"selected": side}}]}


# Per compared pair (by task order), what each of 3 annotators does: T the pair's "true" pick, O the other one.
PLAN = {0: ("T", "O", "O"), 1: ("T", "T", "skip"), 2: ("T", "T", "Tie"), 3: ("Both bad", "Both bad", "T"),
        4: ("T", "O", None)}
OUTCOME = {0: "O", 1: "T", 2: "T", 3: None, 4: None}  # majority by hand; None: dropped (both bad, split)


def test_generate_push_annotate_pull_train_and_next_round(label_studio, pushed, tiny_model_dir, tmp_path,  # noqa: F811
                                                          capsys):
    url, items = label_studio.url, pushed["ls_tasks"]
    annotators = [label_studio.signup(f"annotator{i}@raydpo.test") for i in range(3)]
    expected = Counter()
    for k, task in enumerate(items):
        data = task["data"]
        truth = data["pair"][k % 2]  # the simulated "true" pick: first candidate on even tasks, second on odd
        other = data["pair"][1 - k % 2]
        for annotator, action in zip(annotators, PLAN.get(k, ("T", "T", "T"))):
            if action is None:
                continue
            preferred = truth if action == "T" else other
            body = annotation(action if action not in ("T", "O") else "pick", data, preferred)
            made = requests.post(f"{url}/api/tasks/{task['id']}/annotations/", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {access_token(url, annotator.token)}"})
            assert made.status_code == 201, made.text
        outcome = OUTCOME.get(k, "T")
        if outcome:
            winner = truth if outcome == "T" else other
            texts = {data["order"][0]: data["answer_a"], data["order"][1]: data["answer_b"]}
            loser = other if winner == truth else truth
            expected[(json.loads(data["messages"])[-1]["content"], texts[winner], texts[loser])] += 1

    # the shuffle is exercised: some pairs are shown in their own order, some swapped
    assert {tuple(t["data"]["order"]) == tuple(t["data"]["pair"]) for t in items} == {True, False}

    # pull with a personal access token (an annotator's), as Nova rows; the key stays in the environment for the
    # rest of the loop (train, next round), as in a user's shell, and must not be written anywhere
    pairs = tmp_path / "pairs" / "round1.jsonl"
    os.environ["LABEL_STUDIO_API_KEY"] = annotators[0].token
    try:
        capsys.readouterr()
        assert cli("collect", "pull", "--label-studio", url, "--project", str(pushed["project"]), "--out",
                   str(pairs), "--format", "nova") == 0
        printed = capsys.readouterr().out
        print(printed)
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        got = Counter((r["messages"][-2]["content"][0]["text"], _nova_answer(r, "preferred"),
                       _nova_answer(r, "non-preferred")) for r in rows)
        assert got == expected, "the chosen answers are exactly the simulated picks"
        summary = json.loads(pairs.with_name("round1.jsonl.summary").read_text())
        assert summary["pairs"] == sum(expected.values())
        assert summary["dropped"] == {"both bad": 1, "annotators split evenly": 1}
        assert summary["annotations"]["skipped"] == 1 and summary["annotations"]["tie"] == 1
        assert summary["per_annotator"][annotators[2].email]["skipped"] == 1
        assert summary["agreement"]["percent"] is not None and summary["agreement"]["fleiss_kappa"] is not None

        # the offline path reads Label Studio's own JSON export the same way
        export = tmp_path / "export.json"
        export.write_bytes(requests.get(f"{url}/api/projects/{pushed['project']}/export",
                                        params={"exportType": "JSON"}, timeout=60,
                                        headers={"Authorization": f"Token {label_studio.admin_legacy_token}"}).content)
        again = tmp_path / "imported.jsonl"
        assert cli("collect", "import", str(export), "--out", str(again), "--format", "trl") == 0
        trl = [json.loads(line) for line in again.read_text().splitlines()]
        assert Counter((r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])
                       for r in trl) == expected

        # 2 training steps on the pulled pairs
        recipe = {"run": {"name": "round1", "model_name_or_path": str(tiny_model_dir), "replicas": 1,
                          "data_s3_path": str(pairs.parent), "output_s3_path": str(tmp_path / "out")},
                  "training_config": {"max_length": 128, "global_batch_size": 2, "trainer": {"max_steps": 2},
                                      "data": {"validation_fraction": 0.0},
                                      "model": {"optim": {"lr": 1e-3}, "peft": {"peft_scheme": None}}}}
        recipe_path = tmp_path / "round1.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(recipe_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        printed += proc.stdout + proc.stderr
        run_dir = tmp_path / "out" / "round1"
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2

        # round 2: the tuned model samples the next candidates
        tasks2 = tmp_path / "round2.tasks.json"
        assert cli("collect", "generate", str(pushed["work"] / "prompts.jsonl"), "--model", str(run_dir),
                   "--candidates", "2", "--sampling", "temperature=1.0", "max_new_tokens=8", "--out",
                   str(tasks2)) == 0
        # and go to their own project, pushed with the personal access token
        assert cli("collect", "push", str(tasks2), "--label-studio", url, "--project", "round 2") == 0
        printed += capsys.readouterr().out
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]
    round2 = json.loads(tasks2.read_text())
    assert round2["model"] == str(run_dir) and round2["tasks"]
    assert {t["id"] for t in round2["tasks"]} <= {t["id"] for t in pushed["tasks"]["tasks"]}  # stable prompt ids
    assert f"created) at {url}: {len(round2['tasks'])} pair(s) imported" in printed  # 2 candidates: 1 pair each

    # no token was written anywhere: the pairs, summaries, tasks, logs, the training run's folder, the output
    secrets = [label_studio.admin_legacy_token, label_studio.admin_pat] + [a.token for a in annotators]
    written = [p for folder in (tmp_path, pushed["work"]) for p in folder.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".log") for p in written) and (run_dir / "recipe.yaml") in written
    for path in written:
        text = path.read_bytes().decode("utf-8", "replace")
        assert not any(secret in text for secret in secrets), f"a token was written to {path}"
    assert not any(secret in printed for secret in secrets)


def _nova_answer(row: dict, label: str) -> str:
    return next(c["content"][0]["text"] for c in row["messages"][-1]["candidates"] if c["preferenceLabel"] == label)


def test_labeling_page_shows_the_prompt_and_both_answers(label_studio, pushed, tmp_path):  # noqa: F811
    from tests.collection.labeling_page import screenshot_task

    task = pushed["ls_tasks"][0]
    # a task the loop test already labelled shows no live submit button: waiting 30 s for one was most of this test
    text = screenshot_task(label_studio.url, pushed["project"], task, tmp_path / "labeling.png", settle_s=3)
    assert (tmp_path / "labeling.png").stat().st_size > 10_000
    assert "Tie" in text and "Both bad" in text and "Answer A" in text and "Answer B" in text
