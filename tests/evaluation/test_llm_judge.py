"""LLM-as-a-judge: verdict parsing, both orders, Wilson intervals, the endpoint client (against local HTTP servers on
127.0.0.1 that answer, fail with 500s, or refuse) and a small local judge model on CPU."""
from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from launcher.eval_recipe import Judge
from core.errors import ConfigError
from evaluation import llm_judge as lj

TEMPLATE = "Q:{question}\nA:{answer_a}\nB:{answer_b}\n{not a placeholder}"


# ---- pure parts ----


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), ("After thought, [[ b ]].", "B"), ("[[tie]]", "tie"), ("Verdict: B", "B"),
    ("The winner is A.", "A"), ("A", "A"), (" tie. ", "tie"), ("(b)", "B"),
    ("[[A]] or maybe [[B]]", None), ("both are fine", None), ("", None), ("Answer A is worse than answer B", None),
])
def test_parse_verdict(reply, verdict):
    assert lj.parse_verdict(reply) == verdict


def test_a_win_needs_both_orders():
    assert lj.combine_orders("A", "B") == "win"
    assert lj.combine_orders("B", "A") == "loss"
    assert lj.combine_orders("A", "A") == "tie"  # the judge always picks the first position: no information
    assert lj.combine_orders("tie", "B") == "tie"
    assert lj.combine_orders(None, "B") == "tie"


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71673; half 1.41602 * sqrt(0.025604) = 0.22658
    low, high = lj.wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94331, abs=1e-4)
    # 0 of 10: centre = half = 0.19208 / 1.38416 = 0.13877
    assert lj.wilson_interval(0, 10) == pytest.approx((0.0, 0.27755), abs=1e-4)
    assert lj.wilson_interval(0, 0) == (0.0, 1.0)


def test_judge_metrics_rates_and_counts():
    m = lj.judge_metrics(["win", "win", "tie", "loss"], unparseable=3)
    assert (m["win_rate"], m["tie_rate"], m["loss_rate"]) == (0.5, 0.25, 0.25)
    assert (m["wins"], m["ties"], m["losses"], m["unparseable_verdicts"]) == (2, 1, 1, 3)
    assert (m["win_rate_ci_low"], m["win_rate_ci_high"]) == lj.wilson_interval(2, 4)


def test_prompt_file_placeholders(tmp_path):
    assert all(p in lj.load_judge_prompt(None) for p in lj.PLACEHOLDERS)  # the shipped prompt
    bad = tmp_path / "p.txt"
    bad.write_text("Compare {answer_a} and {answer_b}")
    with pytest.raises(ConfigError, match=r"lacks \{question\}"):
        lj.load_judge_prompt(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        lj.load_judge_prompt(str(tmp_path / "missing.txt"))
    filled = lj.fill_prompt(TEMPLATE, "q?", "one", "two")
    assert filled == "Q:q?\nA:one\nB:two\n{not a placeholder}"


def test_endpoint_url_forms():
    assert lj.endpoint_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert lj.endpoint_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert lj.endpoint_url("http://h:1/x/v1/chat/completions") == "http://h:1/x/v1/chat/completions"


def paris_judge(prompt: str) -> str:
    """A judge that prefers the answer naming Paris, ties when both or neither do."""
    a, b = re.search(r"A:(.*)\nB:(.*)\n", prompt).groups()
    return "[[tie]]" if ("Paris" in a) == ("Paris" in b) else ("[[A]]" if "Paris" in a else "[[B]]")


def test_both_orders_cancel_a_position_biased_judge():
    comparisons = [{"model": "m", "row": 0, "question": "capital?", "candidate": "Paris", "other": "London"},
                   {"model": "m", "row": 1, "question": "capital?", "candidate": "Rome", "other": "Paris"}]
    fair = list(lj.judge_comparisons(comparisons, TEMPLATE, lambda ps: [paris_judge(p) for p in ps], chunk=1))
    assert [j["outcome"] for j in fair] == ["win", "loss"]
    assert [(j["verdict_candidate_first"], j["verdict_candidate_second"]) for j in fair] == [("A", "B"), ("B", "A")]
    biased = list(lj.judge_comparisons(comparisons, TEMPLATE, lambda ps: ["[[A]]" for _ in ps], chunk=2))
    assert [j["outcome"] for j in biased] == ["tie", "tie"]


# ---- the endpoint client against local servers ----


class Server:
    """An OpenAI-compatible chat endpoint on 127.0.0.1; `plan(n)` says what the n-th request (0-based) gets."""

    def __init__(self, plan):
        self.requests, self.plan = [], plan
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 -- http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, content = server.plan(len(server.requests) - 1, body["messages"][0]["content"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                  if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(plan):
        servers.append(Server(plan))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _ask(url, **kw):
    settings = dict(model="judge-1", api_key=None, max_tokens=8, timeout_s=5, max_retries=3, backoff_s=0.5)
    settings.update(kw)
    return lj.chat_completion(lj.endpoint_url(url), "Q:q\nA:Paris\nB:Rome\n", **settings)


def test_endpoint_answers(serve, monkeypatch):
    server = serve(lambda n, prompt: (200, paris_judge(prompt)))
    monkeypatch.setenv("JUDGE_KEY", "secret")
    ask = lj.endpoint_judge(Judge(endpoint=server.url, endpoint_model="judge-1", api_key_env="JUDGE_KEY"))
    assert ask(["Q:q\nA:Paris\nB:Rome\n", "Q:q\nA:Rome\nB:Paris\n"]) == ["[[A]]", "[[B]]"]
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "judge-1" and first["body"]["temperature"] == 0
    assert first["body"]["max_tokens"] == 16  # Judge's default max_new_tokens


def test_endpoint_retries_with_backoff_then_answers(serve):
    server = serve(lambda n, prompt: (500, "busy") if n < 2 else (200, "[[B]]"))
    waits = []
    assert _ask(server.url, sleep=waits.append) == "[[B]]"
    assert len(server.requests) == 3 and waits == [0.5, 1.0]


def test_endpoint_that_keeps_failing_names_itself(serve):
    server = serve(lambda n, prompt: (500, "down"))
    waits = []
    with pytest.raises(ConfigError) as err:
        _ask(server.url, max_retries=2, sleep=waits.append)
    assert server.url + "/v1/chat/completions" in err.value.what and "3 tries" in err.value.what
    assert "HTTP 500" in err.value.why and "partial" in err.value.fix
    assert len(server.requests) == 3 and waits == [0.5, 1.0]


def test_endpoint_client_errors_are_not_retried(serve):
    server = serve(lambda n, prompt: (401, "bad key"))
    with pytest.raises(ConfigError, match="refused the request: HTTP 401"):
        _ask(server.url, sleep=lambda s: None)
    assert len(server.requests) == 1


def test_endpoint_that_refuses_connections():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.* did not answer after 2 tries"):
        _ask(f"http://127.0.0.1:{port}", max_retries=1, sleep=waits.append)
    assert waits == [0.5]


# ---- the task, with answers fixed in advance (generation itself is tested in test_generate.py) ----

ROWS = [{"messages": [{"role": "user", "content": f"capital of France? ({i})"}], "system": None, "tools": None,
         "reference": "Paris", "source": f"f.jsonl:{i + 1}"} for i in range(4)]
MODELS = [{"label": "base", "path": "base-model"}, {"label": "tuned", "path": "tuned-model"}]
ANSWERS = {"base-model": ["London", "Paris", "Rome", "Berlin"], "tuned-model": ["Paris", "Paris", "Paris", "Rome"]}


@pytest.fixture
def fixed_answers(monkeypatch, tmp_path):
    from core import generate

    def fake(rows, model_source, settings, **kw):
        return [{"prediction": a, "new_tokens": 1, "hit_max_new_tokens": a == "Berlin"} for a in ANSWERS[model_source]]

    monkeypatch.setattr(generate, "generate_answers", fake)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEMPLATE)
    return str(prompt)


def test_evaluate_against_the_reference(serve, fixed_answers):
    server = serve(lambda n, prompt: (200, paris_judge(prompt)))
    judge = Judge(endpoint=server.url, prompt_file=fixed_answers)
    entries, judged, examples = lj.evaluate(ROWS, MODELS, judge, None)
    # base vs "Paris": loss, tie, loss, loss; tuned: tie, tie, tie, loss
    assert entries["base"]["metrics"]["loss_rate"] == 0.75 and entries["base"]["metrics"]["tie_rate"] == 0.25
    assert entries["tuned"]["metrics"]["tie_rate"] == 0.75 and entries["tuned"]["metrics"]["loss_rate"] == 0.25
    assert entries["base"]["truncated"] == 1 and entries["tuned"]["compared_with"] == "reference"
    assert len(judged) == 8 and len(server.requests) == 16  # both orders
    assert examples[0]["base"] == "London" and examples[0]["judge_outcomes"] == {"base": "loss", "tuned": "tie"}


def test_evaluate_against_the_base_and_keep_partial_results(serve, fixed_answers):
    server = serve(lambda n, prompt: (200, paris_judge(prompt)) if n < 4 else (500, "gone"))
    judge = Judge(endpoint=server.url, prompt_file=fixed_answers, compare="base", max_retries=0)
    kept = {}
    with pytest.raises(ConfigError, match="did not answer"):
        lj.evaluate(ROWS, MODELS, judge, None, on_partial=lambda *args: kept.update(zip(
            ("entries", "judged", "examples", "error"), args)))
    # two comparisons (4 requests) judged before the endpoint failed: tuned Paris vs base London, Paris vs Paris
    assert [j["outcome"] for j in kept["judged"]] == ["win", "tie"]
    assert kept["entries"]["tuned"]["n"] == 2 and kept["entries"]["tuned"]["metrics"]["win_rate"] == 0.5
    assert kept["entries"]["base"]["metrics"] == {} and kept["entries"]["tuned"]["compared_with"] == "base"
    assert "did not answer" in kept["error"]


# ---- a small local judge on CPU, through Ray Data ----


@pytest.mark.slow
def test_local_judge_model(tiny_model_dir):
    import numpy as np
    import ray

    from core.generate import GeneratorActor

    comparisons = [{"model": "m", "row": i, "question": "capital of France?", "candidate": c, "other": "Paris"}
                   for i, c in enumerate(["Paris", "London"])]
    template = lj.load_judge_prompt(None)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ask = lj.model_judge(str(tiny_model_dir), 8, workers=1, use_gpu=False)
        judged = list(lj.judge_comparisons(comparisons, template, ask, chunk=2))
    finally:
        ray.shutdown()
    prompts = [lj.fill_prompt(template, c["question"], *pair) for c in comparisons
               for pair in ((c["candidate"], c["other"]), (c["other"], c["candidate"]))]
    direct = GeneratorActor(str(tiny_model_dir), {"max_new_tokens": 8})(
        {"index": np.arange(4), "messages": np.array([json.dumps([{"role": "user", "content": p}]) for p in prompts]),
         "system": np.array([""] * 4)})
    replies = [r for j in judged for r in (j["reply_candidate_first"], j["reply_candidate_second"])]
    assert replies == list(direct["prediction"])
    for j in judged:
        v1, v2 = lj.parse_verdict(j["reply_candidate_first"]), lj.parse_verdict(j["reply_candidate_second"])
        assert (j["verdict_candidate_first"], j["verdict_candidate_second"]) == (v1, v2)
        assert j["outcome"] == lj.combine_orders(v1, v2)
