"""LLM-as-a-judge: a judge model compares each model's answer with the reference (or with the base model's answer).

Every comparison is asked in both orders (candidate as A, then as B) to cancel position bias: the candidate wins only
when both orders pick it, loses only when both pick the other, and ties otherwise. A verdict the judge's reply does
not state clearly counts as a tie and is counted in "unparseable". Win, tie and loss rates come with Wilson 95%
score intervals.

The judge is a local or hub model (run through generate.py's Ray Data actors, greedy) or any OpenAI-compatible
endpoint (POST /v1/chat/completions with urllib; bounded retries with exponential backoff, then a ConfigError that
names the endpoint). The prompt is a text file with {question}, {answer_a} and {answer_b} placeholders; users can
replace it (evaluation.judge.prompt_file).
"""
from __future__ import annotations

import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from core.errors import ConfigError

METRICS = ("win_rate", "tie_rate", "loss_rate")
PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")
DEFAULT_PROMPT = Path(__file__).with_name("judge_prompt.txt")
Z95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval

# Most explicit form first: [[A]], then "verdict: A", then a reply that is only the verdict.
_VERDICT_PATTERNS = (
    re.compile(r"\[\[\s*(a|b|tie)\s*\]\]", re.I),
    re.compile(r"\b(?:verdict|winner|answer|better|choice)\s*(?:is)?\s*[:=]?\s*\**\s*\(?(a|b|tie)\b\)?", re.I),
    re.compile(r"^\W*(a|b|tie)\W*$", re.I),
)


def load_judge_prompt(path: str | None) -> str:
    file = Path(path) if path else DEFAULT_PROMPT
    if not file.is_file():
        raise ConfigError(f"judge prompt file {file} does not exist",
                          fix=f"give evaluation.judge.prompt_file an existing file, or null for {DEFAULT_PROMPT.name}")
    text = file.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ConfigError(f"judge prompt file {file} lacks {', '.join(missing)}",
                          why="the judge must see the question and both answers",
                          fix="put {question}, {answer_a} and {answer_b} where they belong in the prompt")
    return text


def fill_prompt(template: str, question: str, answer_a: str, answer_b: str) -> str:
    # str.replace, not str.format: a user's prompt may hold other braces (JSON examples).
    return (template.replace("{question}", question).replace("{answer_a}", answer_a)
            .replace("{answer_b}", answer_b))


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge's reply, or None when the reply does not state one verdict clearly."""
    for pattern in _VERDICT_PATTERNS:
        found = {m.lower() for m in pattern.findall(text or "")}
        if len(found) == 1:
            verdict = found.pop()
            return "tie" if verdict == "tie" else verdict.upper()
        if len(found) > 1:
            return None  # contradictory verdicts in the same form
    return None


def combine_orders(candidate_first: str | None, candidate_second: str | None) -> str:
    """The candidate's outcome from the verdict with it as A and the verdict with it as B."""
    if candidate_first == "A" and candidate_second == "B":
        return "win"
    if candidate_first == "B" and candidate_second == "A":
        return "loss"
    return "tie"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when there is nothing to go on."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def judge_metrics(outcomes: list[str], unparseable: int = 0) -> dict:
    n = len(outcomes)
    out: dict = {}
    for name, outcome in (("win", "win"), ("tie", "tie"), ("loss", "loss")):
        k = outcomes.count(outcome)
        low, high = wilson_interval(k, n)
        out.update({f"{name}_rate": k / n if n else 0.0, f"{name}_rate_ci_low": low, f"{name}_rate_ci_high": high})
    out.update({"wins": outcomes.count("win"), "ties": outcomes.count("tie"), "losses": outcomes.count("loss"),
                "unparseable_verdicts": unparseable})
    return out


# ---- the judges ----


def endpoint_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def chat_completion(url: str, prompt: str, *, model: str | None, api_key: str | None, max_tokens: int,
                    timeout_s: float, max_retries: int, backoff_s: float = 0.5,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """The reply text of one chat completion; retries connection errors, timeouts, 429 and 5xx."""
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens}
    if model:
        body["model"] = model
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"] or "")
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code} {err.reason}"
            if err.code != 429 and err.code < 500:
                raise ConfigError(f"judge endpoint {url} refused the request: {last}",
                                  why=err.read().decode("utf-8", "replace")[:300],
                                  fix="check evaluation.judge.endpoint_model and the API key "
                                      "(evaluation.judge.api_key_env)") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            last = str(getattr(err, "reason", err))
        except (ValueError, KeyError, IndexError, TypeError) as err:
            last = f"a reply that is not a chat completion ({type(err).__name__}: {err})"
    raise ConfigError(f"judge endpoint {url} did not answer after {max_retries + 1} tries",
                      why=f"last error: {last}",
                      fix="check that the server runs and evaluation.judge.endpoint is its URL; the comparisons "
                          "judged so far are kept in the results (partial: true)")


def endpoint_judge(judge) -> Callable[[list[str]], list[str]]:
    """ask(prompts) -> replies, one request at a time, for an OpenAI-compatible endpoint (Judge settings)."""
    url = endpoint_url(judge.endpoint)
    api_key = os.environ.get(judge.api_key_env) if judge.api_key_env else None

    def ask(prompts: list[str]) -> list[str]:
        return [chat_completion(url, p, model=judge.endpoint_model, api_key=api_key,
                                max_tokens=judge.max_new_tokens, timeout_s=judge.timeout_s,
                                max_retries=judge.max_retries) for p in prompts]

    return ask


def model_judge(judge_source: str, max_new_tokens: int, *, workers: int, use_gpu: bool,
                batch_size: int = 8) -> Callable[[list[str]], list[str]]:
    """ask(prompts) -> replies from a local or hub judge model, greedy, through Ray Data actors."""
    from core.generate import GenerationSettings, generate_answers

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)

    def ask(prompts: list[str]) -> list[str]:
        rows = generate_answers([{"messages": [{"role": "user", "content": p}]} for p in prompts], judge_source,
                                settings, workers=workers, use_gpu=use_gpu)
        return [r["prediction"] for r in rows]

    return ask


def judge_comparisons(comparisons: list[dict], template: str, ask: Callable[[list[str]], list[str]], *,
                      chunk: int) -> Iterator[dict]:
    """Each comparison {"model", "row", "question", "candidate", "other"} judged in both orders, `chunk`
    comparisons per call of `ask`; yields them with both replies, both verdicts and the outcome, in order."""
    for start in range(0, len(comparisons), chunk):
        part = comparisons[start:start + chunk]
        prompts = []
        for c in part:
            prompts.append(fill_prompt(template, c["question"], c["candidate"], c["other"]))
            prompts.append(fill_prompt(template, c["question"], c["other"], c["candidate"]))
        replies = ask(prompts)
        for i, c in enumerate(part):
            first, second = replies[2 * i], replies[2 * i + 1]
            v1, v2 = parse_verdict(first), parse_verdict(second)
            yield {**c, "reply_candidate_first": first, "reply_candidate_second": second,
                   "verdict_candidate_first": v1, "verdict_candidate_second": v2, "outcome": combine_orders(v1, v2)}


# ---- the task: generate with each model, judge against the reference or the base's answers ----


def conversation_text(messages: list[dict]) -> str:
    """What the judge sees as the question: a lone user turn as it is, a conversation turn by turn."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def summarize(judged: list[dict], models: list[dict], compare: str, cut: dict) -> dict:
    """Per-model entries from the comparisons judged so far; with compare=base the base itself has no metrics."""
    base = models[0]["label"]
    entries = {}
    for model in models:
        label = model["label"]
        mine = [j for j in judged if j["model"] == label]
        unparseable = sum((j["verdict_candidate_first"] is None) + (j["verdict_candidate_second"] is None)
                          for j in mine)
        judged_here = compare == "reference" or label != base
        entries[label] = {"path": model["path"], "n": len(mine), "truncated": cut[label],
                          "compared_with": ("reference" if compare == "reference" else base) if judged_here else None,
                          "metrics": judge_metrics([j["outcome"] for j in mine], unparseable) if judged_here else {}}
    return entries


def evaluate(rows: list[dict], models: list[dict], judge, generation, *, workers: int = 1, use_gpu: bool = False,
             on_partial: Callable[[dict, list[dict], list[dict], str], None] | None = None):
    """(per-model entries, judged comparisons, examples) for qa rows and models [{"label", "path"}].

    judge: the recipe's evaluation.judge settings. When the judge fails part-way, `on_partial(entries, judged,
    examples, error)` gets what was judged before the error is raised again.
    """
    from core.errors import RaydpoError
    from core.generate import generate_answers

    template = load_judge_prompt(judge.prompt_file)
    answers = {m["label"]: generate_answers(rows, m["path"], generation, workers=workers, use_gpu=use_gpu)
               for m in models}
    cut = {label: sum(a["hit_max_new_tokens"] for a in got) for label, got in answers.items()}
    base = models[0]["label"]
    candidates = models if judge.compare == "reference" else models[1:]
    comparisons = []
    for model in candidates:
        for i, row in enumerate(rows):
            reference = row["reference"] if isinstance(row["reference"], str) else row["reference"][0]
            other = reference if judge.compare == "reference" else answers[base][i]["prediction"]
            comparisons.append({"model": model["label"], "source": row["source"], "row": i,
                                "question": conversation_text(row["messages"]),
                                "candidate": answers[model["label"]][i]["prediction"], "other": other})
    examples = [{"prompt": conversation_text(row["messages"]), "reference": row["reference"],
                 **{m["label"]: answers[m["label"]][i]["prediction"] for m in models}}
                for i, row in enumerate(rows[:5])]
    if judge.endpoint:
        ask, chunk = endpoint_judge(judge), 1  # one comparison at a time: a failure keeps everything before it
    else:
        ask = model_judge(judge.model, judge.max_new_tokens, workers=workers, use_gpu=use_gpu)
        chunk = max(1, len(comparisons))  # one Ray Data pass over every prompt
    judged: list[dict] = []
    try:
        for result in judge_comparisons(comparisons, template, ask, chunk=chunk):
            judged.append(result)
    except RaydpoError as err:
        if on_partial is not None:
            on_partial(summarize(judged, models, judge.compare, cut), judged, _with_outcomes(examples, judged),
                       str(err))
        raise
    return summarize(judged, models, judge.compare, cut), judged, _with_outcomes(examples, judged)


def _with_outcomes(examples: list[dict], judged: list[dict]) -> list[dict]:
    outcomes: dict = {}
    for j in judged:
        if j["row"] < len(examples):
            outcomes.setdefault(j["row"], {})[j["model"]] = j["outcome"]
    return [{**e, "judge_outcomes": outcomes.get(i, {})} for i, e in enumerate(examples)]
