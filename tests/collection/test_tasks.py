"""Tasks: stable ids, dropped candidates counted, all pairs, a remembered shown order."""
from __future__ import annotations

from collection import tasks as t

PROMPT = [{"role": "user", "content": "hi"}]


def test_prompt_id_is_stable_and_depends_on_the_whole_prompt():
    assert t.prompt_id(PROMPT, None, None) == t.prompt_id([dict(PROMPT[0])], "", "")
    assert t.prompt_id(PROMPT, None, None) != t.prompt_id(PROMPT, "be brief", None)
    assert t.prompt_id(PROMPT, None, None).startswith("p-")


def test_distinct_candidates_drops_empty_and_repeated_answers():
    assert t.distinct_candidates(["a", " ", "a ", "b", ""]) == (["a", "b"], 2, 1)


def test_build_tasks_counts_what_it_drops():
    prompts = [{"prompt": PROMPT, "source": "f:1"}, {"prompt": [{"role": "user", "content": "yo"}], "source": "f:2"},
               {"prompt": PROMPT, "source": "f:3"}]
    tasks, counts = t.build_tasks(prompts, [["x", "y", "x"], ["same", "same "], ["p", "q"]], model="m",
                                  sampling={"temperature": 0.8})
    assert [task["candidates"] for task in tasks] == [["x", "y"]]
    assert tasks[0]["model"] == "m" and tasks[0]["sampling"] == {"temperature": 0.8}
    assert counts["duplicate_prompts"] == 1 and counts["identical_candidates"] == 2
    assert counts["too_few_candidates"] == 1 and counts["too_few_sources"] == ["f:2"]


def test_all_pairs_and_a_seeded_shown_order():
    assert t.candidate_pairs(2) == [(0, 1)]
    assert t.candidate_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    orders = [t.shown_order(f"p-{i}", (0, 1)) for i in range(40)]
    assert orders == [t.shown_order(f"p-{i}", (0, 1)) for i in range(40)]  # the same on every push
    assert [0, 1] in orders and [1, 0] in orders  # and really shuffled


def test_comparison_items_show_the_candidates_in_the_stored_order():
    task = {"id": "p-x", "prompt": PROMPT, "system": "sys", "tools": None, "candidates": ["c0", "c1", "c2"],
            "model": "m", "sampling": {"seed": 1}}
    items = t.comparison_items(task)
    assert [i["pair"] for i in items] == [[0, 1], [0, 2], [1, 2]]
    for item in items:
        assert [item["answer_a"], item["answer_b"]] == [task["candidates"][k] for k in item["order"]]
        assert sorted(item["order"]) == item["pair"]
    assert items[0]["conversation"][0] == {"role": "system", "content": "sys"} and items[0]["prompt"] == "hi"


def test_a_re_push_recognises_the_same_comparison_but_not_the_next_rounds():
    from collection.labelstudio import comparison_key

    round1 = {"id": "p-x", "prompt": PROMPT, "candidates": ["c0", "c1"], "model": "m", "sampling": {}}
    round2 = {**round1, "candidates": ["d0", "d1"], "model": "run1"}
    first, again, swapped = t.comparison_items(round1)[0], t.comparison_items(dict(round1))[0], {
        **t.comparison_items(round1)[0], "answer_a": "c1", "answer_b": "c0"}
    assert comparison_key(first) == comparison_key(again) == comparison_key(swapped)
    assert comparison_key(t.comparison_items(round2)[0]) != comparison_key(first)
