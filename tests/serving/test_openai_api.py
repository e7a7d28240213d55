"""The HTTP shape's rules, worked by hand: token budgets and the context limit, stop strings, streamable prefixes,
request validation, the error object, completions and chunks."""
from __future__ import annotations

import json

import pydantic
import pytest

from serving import openai_api as api


def test_budget_defaults_to_what_fits_and_caps_at_the_default():
    assert api.completion_budget(10, None, 512) == api.DEFAULT_MAX_TOKENS  # 502 fit, 256 by default
    assert api.completion_budget(500, None, 512) == 12                   # only 12 fit
    assert api.completion_budget(10, 40, 512) == 40
    assert api.completion_budget(500, 12, 512) == 12                     # exactly the context: allowed


@pytest.mark.parametrize("prompt,asked,total", [(512, None, 512), (600, None, 600), (500, 13, 513)])
def test_budget_past_the_context_is_a_400_with_the_limits(prompt, asked, total):
    with pytest.raises(api.APIError) as err:
        api.completion_budget(prompt, asked, 512, param="prompt")
    e = err.value
    assert e.status == 400 and e.code == "context_length_exceeded" and e.param == "prompt"
    assert "maximum context length is 512 tokens" in e.message
    assert f"you requested {total} tokens ({prompt} in the prompt, {asked or 0} for the completion)" in e.message


def test_cut_at_stop_takes_the_earliest_stop_and_drops_it():
    assert api.cut_at_stop("one. two! three", [".", "!"]) == ("one", True)
    assert api.cut_at_stop("one two", ["three"]) == ("one two", False)
    assert api.cut_at_stop("abcXYdef", ["def", "XY"]) == ("abc", True)


def test_safe_prefix_holds_back_a_possible_stop_start():
    assert api.safe_prefix_length("hello wor", ["world"]) == 6       # "wor" may begin "world"
    assert api.safe_prefix_length("hello", ["world"]) == 5
    assert api.safe_prefix_length("ab\n", ["\n\n", "b\nX"]) == 1      # the longer match ("b\n") wins
    assert api.safe_prefix_length("text", []) == 4


def test_requests_validate_openai_fields():
    body = api.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stop="END", n=2,
                                     seed=3, max_completion_tokens=9, logprobs=False, user="u")
    assert body.stop_list() == ["END"] and body.token_budget() == 9 and body.n == 2 and body.seed == 3
    assert api.CompletionRequest(model="m", prompt=["a", "b"], max_tokens=4).token_budget() == 4
    for bad in ({"temperature": 2.5}, {"top_p": 0}, {"n": 0}, {"max_tokens": 0}, {"stop": ["a"] * 5},
                {"stop": [""]}, {"messages": []}):
        with pytest.raises(pydantic.ValidationError):
            api.ChatCompletionRequest(**({"model": "m", "messages": [{"role": "user", "content": "x"}]} | bad))


def test_validation_message_names_each_field():
    try:
        api.ChatCompletionRequest(model="m", temperature=9)
    except pydantic.ValidationError as err:
        message = api.validation_message(err.errors())
    assert "messages: Field required" in message and "temperature:" in message
    assert api.validation_message([]) == "the request body is not valid"
    bad_json = [{"type": "json_invalid", "loc": ("body", 29), "msg": "JSON decode error",
                 "ctx": {"error": "Expecting ',' delimiter"}}]
    assert api.validation_message(bad_json) == "the body is not valid JSON (character 29: Expecting ',' delimiter)"


def test_errors_in_openai_shape():
    err = api.unknown_model("x", ["a", "b"])
    assert err.status == 404
    assert err.body() == {"error": {"message": "The model 'x' does not exist; this server serves: a, b",
                                    "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_completion_bodies_count_usage_over_choices():
    choices = [api.Choice(0, "a", "stop", 3), api.Choice(1, "bb", "length", 5)]
    chat = api.chat_completion("m", 7, choices)
    assert chat["object"] == "chat.completion" and chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 8,
                                                                     "total_tokens": 15}
    assert [c["message"]["content"] for c in chat["choices"]] == ["a", "bb"]
    text = api.text_completion("m", 2, choices[:1])
    assert text["choices"][0]["text"] == "a" and text["usage"]["total_tokens"] == 5


def test_chunks_and_events():
    first = api.chat_chunk("id", "m", 0, role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert api.chat_chunk("id", "m", 1, content="x")["choices"][0] == {"index": 1, "delta": {"content": "x"},
                                                                       "finish_reason": None, "logprobs": None}
    last = api.chat_chunk("id", "m", 0, usage_=api.token_usage(2, 3))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
    assert api.sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(api.sse({"a": "é"})[len("data: "):]) == {"a": "é"}
