"""Collection tasks: a prompt with its sampled candidates, and the pairs annotators compare.

A task is {"id", "prompt" (turns), "system", "tools", "candidates" [text], "model", "sampling", "source"}.
Its id is a hash of the prompt (system, turns, tools), so the same prompt gets the same id in every round.
Candidates that are empty or repeat another (after trimming whitespace) are dropped; a prompt left with fewer than
two cannot make a pair and is reported, not written.

Pairs: every pair of a task's candidates (2 candidates: 1 pair, 3: 3, 4: 6). Which answer is shown on the left is
drawn per pair from a generator seeded by the task id and the pair, so a re-push shows the same order, and the
order is stored in the pair so that reading the annotations undoes it.
"""
from __future__ import annotations

import hashlib
import json
import random
from itertools import combinations

MIN_CANDIDATES, MAX_CANDIDATES = 2, 4
TASKS_SCHEMA = "raydpo-collect-tasks/1"


def prompt_id(prompt: list[dict], system: str | None, tools: str | None) -> str:
    text = json.dumps({"system": system or None, "prompt": prompt, "tools": tools or None}, sort_keys=True,
                      ensure_ascii=False)
    return "p-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def distinct_candidates(answers: list[str]) -> tuple[list[str], int, int]:
    """(kept answers in order, empty ones dropped, repeats dropped)."""
    kept, seen, empty, repeated = [], set(), 0, 0
    for answer in answers:
        key = answer.strip()
        if not key:
            empty += 1
        elif key in seen:
            repeated += 1
        else:
            seen.add(key)
            kept.append(answer)
    return kept, empty, repeated


def build_tasks(prompts: list[dict], answers: list[list[str]], *, model: str, sampling: dict) -> tuple[list, dict]:
    """(tasks, counts): prompts [{"prompt", "system", "tools", "source"}] with their sampled answers.

    counts: prompts, tasks, duplicate_prompts, empty_candidates, identical_candidates, too_few_candidates and
    too_few_sources (the prompts that were left with fewer than two distinct candidates).
    """
    assert len(prompts) == len(answers), "one answer list per prompt"
    tasks, ids = [], set()
    counts = {"prompts": len(prompts), "tasks": 0, "duplicate_prompts": 0, "empty_candidates": 0,
              "identical_candidates": 0, "too_few_candidates": 0, "too_few_sources": []}
    for prompt, sampled in zip(prompts, answers):
        task_id = prompt_id(prompt["prompt"], prompt.get("system"), prompt.get("tools"))
        if task_id in ids:
            counts["duplicate_prompts"] += 1
            continue
        ids.add(task_id)
        kept, empty, repeated = distinct_candidates(sampled)
        counts["empty_candidates"] += empty
        counts["identical_candidates"] += repeated
        if len(kept) < MIN_CANDIDATES:
            counts["too_few_candidates"] += 1
            counts["too_few_sources"].append(prompt.get("source", ""))
            continue
        tasks.append({"id": task_id, "prompt": prompt["prompt"], "system": prompt.get("system"),
                      "tools": prompt.get("tools"), "candidates": kept, "model": model, "sampling": dict(sampling),
                      "source": prompt.get("source", "")})
    counts["tasks"] = len(tasks)
    return tasks, counts


def candidate_pairs(count: int) -> list[tuple[int, int]]:
    """All pairs (i, j), i < j, of `count` candidates."""
    return list(combinations(range(count), 2))


def shown_order(task_id: str, pair: tuple[int, int]) -> list[int]:
    """The pair's candidates in the order shown (left, right): a coin flip seeded by the task id and the pair."""
    flip = random.Random(f"{task_id}:{pair[0]}-{pair[1]}").random() < 0.5
    return [pair[1], pair[0]] if flip else [pair[0], pair[1]]


def comparison_items(task: dict) -> list[dict]:
    """The task's pairs as the data of annotation items: the conversation, the two answers in shown order, and
    everything needed to rebuild a preference pair without the tasks file (`order` undoes the shuffle)."""
    conversation = ([{"role": "system", "content": task["system"]}] if task.get("system") else []) + task["prompt"]
    items = []
    for pair in candidate_pairs(len(task["candidates"])):
        order = shown_order(task["id"], pair)
        items.append({
            "raydpo_task": task["id"], "pair": list(pair), "order": order,
            "conversation": conversation,
            "prompt": next((t["content"] for t in reversed(task["prompt"]) if t["role"] == "user"), ""),
            "answer_a": task["candidates"][order[0]], "answer_b": task["candidates"][order[1]],
            "messages": json.dumps(task["prompt"], ensure_ascii=False), "system": task.get("system") or "",
            "tools": task.get("tools") or "", "model": task["model"],
            "sampling": json.dumps(task["sampling"], sort_keys=True)})
    return items
