"""The OpenAI-compatible endpoint on loopback, through the openai client: one Ray Serve app (the tiny model and two
LoRA runs on it) started once for the module. Also the chat page in headless Chromium."""
from __future__ import annotations

import socket

import httpx
import openai
import pytest

from tests.serving.runs import build_lora_run

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir, tmp_path_factory):
    import ray
    from ray import serve

    from serving.app import build_app

    runs = tmp_path_factory.mktemp("runs")
    a = build_lora_run(runs / "run-a", tiny_model_dir, seed=1)
    b = build_lora_run(runs / "run-b", tiny_model_dir, seed=2)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": [str(a), str(b)], "max_batch_size": 8}), name="raydpo", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60)


def answer(client, model, **kwargs):
    kwargs = {"messages": HELLO, "max_tokens": 12, "temperature": 0} | kwargs
    return client.chat.completions.create(model=model, **kwargs)


def test_models_lists_the_base_and_each_run(client, tiny_model_dir):
    models = {m.id: m.owned_by for m in client.models.list()}
    base = tiny_model_dir.name  # the LoRA runs' recipes name the tiny folder as their base
    assert models == {base: "raydpo", "run-a": f"lora:{base}", "run-b": f"lora:{base}"}


def test_chat_answers_with_usage_and_the_length_limit(client):
    response = answer(client, "run-a", max_tokens=7)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 7
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


def test_lora_runs_chosen_by_name_answer_unlike_the_base_and_each_other(client):
    base = [m.id for m in client.models.list() if m.owned_by == "raydpo"][0]
    answers = {name: answer(client, name).choices[0].message.content for name in (base, "run-a", "run-b")}
    assert len(set(answers.values())) == 3, answers
    assert answer(client, "run-a").choices[0].message.content == answers["run-a"]  # greedy: the same again


def test_streaming_sends_the_same_text_in_pieces_and_usage(client):
    whole = answer(client, "run-b").choices[0].message.content
    stream = answer(client, "run-b", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_stream_ends_with_done_event(endpoint, client):
    base = [m.id for m in client.models.list() if m.owned_by == "raydpo"][0]
    with httpx.stream("POST", f"{endpoint}/v1/chat/completions", timeout=60,
                      json={"model": base, "messages": HELLO, "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_completions_n_seed_and_stop(client):
    base = [m.id for m in client.models.list() if m.owned_by == "raydpo"][0]
    sampled = client.completions.create(model=base, prompt="The quick", max_tokens=8, n=2, temperature=1.0, seed=7)
    again = client.completions.create(model=base, prompt="The quick", max_tokens=8, n=2, temperature=1.0, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # a seed repeats the samples
    assert sampled.choices[0].text != sampled.choices[1].text  # n draws differ
    full = client.completions.create(model=base, prompt="The quick", max_tokens=10, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model=base, prompt="The quick", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_errors_come_in_openai_shape_and_leave_the_replica_serving(endpoint, client):
    with pytest.raises(openai.NotFoundError) as err:
        answer(client, "no-such-run")
    assert err.value.body["code"] == "model_not_found" and "run-a" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        answer(client, "run-a", messages=[{"role": "user", "content": "hello " * 600}])
    assert "maximum context length is 512 tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        answer(client, "run-a", max_tokens=100000)
    assert "100000 for the completion" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        answer(client, "run-a", temperature=5)
    assert "temperature" in err.value.body["message"]
    malformed = httpx.post(f"{endpoint}/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{endpoint}/v1/chat/completions", json={"model": "run-a"})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="run-a", prompt="", max_tokens=4)
    assert err.value.body["param"] == "prompt"
    assert httpx.get(f"{endpoint}/health").json()["status"] == "ok"
    assert answer(client, "run-a").choices[0].message.content  # still answering


def test_chat_page_streams_an_answer_in_chromium(endpoint, tmp_path):
    from tests.serving.browser import chat_once

    page = chat_once(f"{endpoint}/?model=run-a", "hello", screenshot=tmp_path / "chat.png")
    assert page["state"] == "done" and page["user"] == "hello"
    assert "run-a" in page["models"] and page["answer"] and page["chunks"] > 1
    assert (tmp_path / "chat.png").stat().st_size > 1000
