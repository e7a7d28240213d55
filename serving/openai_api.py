"""The OpenAI HTTP shape the openai client expects: request bodies, the error object, completions and chunks.

Pure data and functions (no Ray, no torch) so each rule has a direct test. Errors follow OpenAI's shape:
{"error": {"message", "type", "param", "code"}} with 400 for a malformed body or a prompt too long, 404 for an
unknown model.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_TOKENS = 256


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = ""


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the client's other fields (logprobs, user, ...) are not refused
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class APIError(Exception):
    """An error the endpoint answers with, in OpenAI's shape; never raised past the handler."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one line a user reads: `messages: Field required; temperature: ...`."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            at = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON (character {at}{': ' + reason if reason else ''})")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request body is not valid"


def unknown_model(name: str, served: list[str]) -> APIError:
    return APIError(404, f"The model {name!r} does not exist; this server serves: {', '.join(served)}",
                    param="model", code="model_not_found")


def completion_budget(prompt_tokens: int, requested: int | None, context: int, *, param: str = "messages") -> int:
    """max new tokens for a prompt: what was asked (default DEFAULT_MAX_TOKENS, capped by what fits when not asked);
    APIError 400 with the limits when the prompt, or prompt + max_tokens, exceeds the model's context."""
    if prompt_tokens >= context or (requested is not None and prompt_tokens + requested > context):
        asked = prompt_tokens + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{asked} tokens ({prompt_tokens} in the prompt, {requested or 0} for the completion). "
                            "Please reduce the length of the prompt or of max_tokens.",
                       param=param, code="context_length_exceeded")
    return requested if requested is not None else min(DEFAULT_MAX_TOKENS, context - prompt_tokens)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text up to the earliest stop string, whether one was found); the stop string itself is not returned."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def safe_prefix_length(text: str, stops: list[str]) -> int:
    """How much of a growing text can be streamed now: all but a tail that may be the start of a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str     # "stop" (end token or stop string) | "length" (max_tokens)
    tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    return token_usage(prompt_tokens, sum(c.tokens for c in choices))


def chat_completion(model: str, prompt_tokens: int, choices: list[Choice]) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None} for c in choices],
            "usage": usage(prompt_tokens, choices)}


def text_completion(model: str, prompt_tokens: int, choices: list[Choice]) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for c in choices],
            "usage": usage(prompt_tokens, choices)}


def chat_chunk(id_: str, model: str, index: int, *, role: bool = False, content: str | None = None,
               finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": content} if content else {})
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        chunk["choices"], chunk["usage"] = [], usage_
    return chunk


def completion_chunk(id_: str, model: str, index: int, *, text: str = "", finish_reason: str | None = None,
                     usage_: dict | None = None) -> dict:
    chunk = {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        chunk["choices"], chunk["usage"] = [], usage_
    return chunk


def sse(data: dict | str) -> str:
    """One server-sent event; the stream ends with sse("[DONE]")."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def models_list(names: list[str], owned_by: dict[str, str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": owned_by.get(n, "raydpo")}
                                       for n in names]}
