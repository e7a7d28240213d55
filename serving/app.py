"""The Ray Serve application: an OpenAI-compatible FastAPI ingress and one model deployment per base.

    OpenAIIngress (FastAPI: /v1/chat/completions, /v1/completions, /v1/models, /health, the chat page at /)
      -> ModelServer per base group (transformers engine, @serve.batch, autoscaling between the user's bounds)

The ingress holds only tokenizers: it applies the chat template, checks the prompt against the model's context and
answers every bad request in OpenAI's error shape before anything reaches a model, so a bad request never costs a
replica. `build_app(args)` is the application builder both `raydpo serve` and a RayService's serveConfigV2
(import_path serving.app:build_app) call.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from serving import openai_api as api
from serving.sources import Adapter, ModelGroup

CHAT_PAGE = Path(__file__).with_name("chat.html")
DEFAULTS = {"replicas": None, "min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8,
            "max_batch_size": 16, "batch_wait_timeout_s": 0.02, "threads": None, "device": "cpu",
            "num_cpus": 1.0, "num_gpus": 0.0}

app = FastAPI(title="raydpo", docs_url=None, redoc_url=None)


@app.exception_handler(RequestValidationError)
async def _malformed(request: Request, err: RequestValidationError):
    return JSONResponse(api.APIError(400, api.validation_message(err.errors())).body(), status_code=400)


@app.exception_handler(api.APIError)
async def _api_error(request: Request, err: api.APIError):
    return JSONResponse(err.body(), status_code=err.status)


def deployment_options(args: dict) -> dict:
    """Replica count or autoscaling bounds for a model deployment, from the user's flags."""
    cpu = {"num_cpus": args["num_cpus"], **({"num_gpus": args["num_gpus"]} if args["num_gpus"] else {})}
    ongoing = max(4 * args["max_batch_size"], 64)  # Serve's default (5) would cap a replica's batch at 5
    if args["replicas"]:
        return {"num_replicas": int(args["replicas"]), "max_ongoing_requests": ongoing, "ray_actor_options": cpu}
    lo, hi = int(args["min_replicas"]), int(args["max_replicas"])
    if not 0 < lo <= hi:
        from core.errors import ConfigError

        raise ConfigError(f"replica bounds {lo}..{hi} are not 1 <= min <= max", fix="set --min-replicas <= "
                          "--max-replicas, both >= 1")
    if lo == hi:
        return {"num_replicas": lo, "max_ongoing_requests": ongoing, "ray_actor_options": cpu}
    return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi,
                                   "target_ongoing_requests": args["target_ongoing_requests"]},
            "max_ongoing_requests": ongoing, "ray_actor_options": cpu}


def group_to_dict(group: ModelGroup) -> dict:
    return {"name": group.name, "source": group.source, "adapters": [asdict(a) for a in group.adapters]}


def group_from_dict(data: dict) -> ModelGroup:
    return ModelGroup(data["name"], data["source"], tuple(Adapter(**a) for a in data["adapters"]))


@serve.deployment
class ModelServer:
    """One base model (and its adapters) on a replica; requests' rows are batched into shared generate() calls."""

    def __init__(self, group: dict, device: str, threads: int | None, max_batch_size: int,
                 batch_wait_timeout_s: float):
        from core.devices import usable_cores, use_threads
        from serving.engine import TransformersEngine

        use_threads(threads or usable_cores())
        self.engine = TransformersEngine(group_from_dict(group), device)
        self._run.set_max_batch_size(max_batch_size)
        self._run.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _run(self, rows: list) -> list:
        return await asyncio.to_thread(self.engine.generate, rows)

    def _rows(self, job: dict, sinks: list | None = None) -> list:
        from serving.engine import Row

        rows = []
        for p, ids in enumerate(job["prompts"]):
            for j in range(job["n"]):
                index = p * job["n"] + j
                rows.append(Row(prompt_ids=ids, max_new_tokens=job["max_new_tokens"], adapter=job["adapter"],
                                temperature=job["temperature"], top_p=job["top_p"], seed=job["seed"],
                                stops=job["stops"], index=index, sink=sinks[index] if sinks else None,
                                request=job["id"]))
        return rows

    async def generate(self, job: dict) -> list[dict]:
        return [asdict(_raised(c)) for c in await asyncio.gather(*(self._run(row) for row in self._rows(job)))]

    async def stream(self, job: dict):
        """Yields {"index", "delta"} as text is generated, then {"index", "finish_reason", "tokens"} per row."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        count = len(job["prompts"]) * job["n"]
        sinks = [(lambda text, i=i: loop.call_soon_threadsafe(queue.put_nowait, ("delta", i, text)))
                 for i in range(count)]
        for i, row in enumerate(self._rows(job, sinks)):
            # the done callback runs after the batch's thread returned: every delta is already queued before it
            asyncio.ensure_future(self._run(row)).add_done_callback(
                lambda task, i=i: queue.put_nowait(("done", i, task)))
        pending = count
        while pending:
            kind, index, payload = await queue.get()
            if kind == "delta":
                yield {"index": index, "delta": payload}
            else:
                pending -= 1
                choice = _raised(payload.result())
                yield {"index": index, "finish_reason": choice.finish_reason, "tokens": choice.tokens}


def _raised(answer):
    """The engine answers a row whose generate() failed with the exception: raise it for this request only."""
    if isinstance(answer, Exception):
        raise answer
    return answer


def message_text(content) -> str:
    """A message's content as text: a string, or the text parts of a content list."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, groups: list[dict], servers: list):
        from core.models import load_config, load_tokenizer

        self.groups = [group_from_dict(g) for g in groups]
        self.servers = servers
        self.tokenizers = [load_tokenizer(g.source) for g in self.groups]
        self.contexts = [int(getattr(load_config(g.source), "max_position_embeddings", 0) or 2048)
                         for g in self.groups]
        self.routes = {}  # model name -> (group index, adapter)
        for gi, group in enumerate(self.groups):
            self.routes[group.name] = (gi, "__base__")
            self.routes.update({a.name: (gi, a.name) for a in group.adapters})

    def _route(self, model: str) -> tuple[int, str]:
        if model not in self.routes:
            raise api.unknown_model(model, list(self.routes))
        return self.routes[model]

    def _job(self, body: api.SamplingFields, gi: int, adapter: str, prompts: list[list[int]], param: str) -> dict:
        if any(not ids for ids in prompts):
            raise api.APIError(400, "a prompt is empty (no tokens)", param=param)
        budget = min(api.completion_budget(len(ids), body.token_budget(), self.contexts[gi], param=param)
                     for ids in prompts)
        return {"id": api.new_id("job"), "prompts": prompts, "n": body.n, "max_new_tokens": budget,
                "adapter": adapter, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                "stops": body.stop_list()}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page(self):
        return HTMLResponse(CHAT_PAGE.read_text())

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "models": list(self.routes)}

    @app.get("/v1/models")
    async def models(self):
        owners = {name: ("raydpo" if adapter == "__base__" else f"lora:{self.groups[gi].name}")
                  for name, (gi, adapter) in self.routes.items()}
        return api.models_list(list(self.routes), owners)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: api.ChatCompletionRequest):
        from core.generate import prompt_text

        gi, adapter = self._route(body.model)
        tokenizer = self.tokenizers[gi]
        messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
        try:
            text = prompt_text(tokenizer, messages, None)
        except Exception as err:  # a template that refuses the turns (e.g. roles out of order) is the client's
            raise api.APIError(400, f"the model's chat template refused the messages: {err}", param="messages")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        job = self._job(body, gi, adapter, [ids], "messages")
        if body.stream:
            return self._sse(self._chat_events(body, gi, job, len(ids)))
        choices = await self._generate(gi, job)
        return api.chat_completion(body.model, len(ids), choices)

    @app.post("/v1/completions")
    async def completions(self, body: api.CompletionRequest):
        gi, adapter = self._route(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise api.APIError(400, "prompt is empty", param="prompt")
        ids = [self.tokenizers[gi](p, add_special_tokens=False)["input_ids"] for p in prompts]
        job = self._job(body, gi, adapter, ids, "prompt")
        prompt_tokens = sum(len(i) for i in ids)
        if body.stream:
            return self._sse(self._completion_events(body, gi, job, prompt_tokens))
        return api.text_completion(body.model, prompt_tokens, await self._generate(gi, job))

    async def _generate(self, gi: int, job: dict) -> list[api.Choice]:
        try:
            return [api.Choice(**c) for c in await self.servers[gi].generate.remote(job)]
        except Exception as err:
            raise api.APIError(500, f"generation failed: {type(err).__name__}: {err}", type_="server_error")

    def _sse(self, events) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(self, gi: int, job: dict):
        try:
            async for event in self.servers[gi].options(stream=True).stream.remote(job):
                yield event
        except Exception as err:  # the status line is sent already: the error travels as an event
            yield {"error": api.APIError(500, f"generation failed: {err}", type_="server_error").body()["error"]}

    async def _chat_events(self, body, gi: int, job: dict, prompt_tokens: int):
        id_, tokens = api.new_id("chatcmpl"), 0
        for i in range(body.n):
            yield api.sse(api.chat_chunk(id_, body.model, i, role=True))
        async for event in self._stream(gi, job):
            if "error" in event:
                yield api.sse(event)
            elif "delta" in event:
                yield api.sse(api.chat_chunk(id_, body.model, event["index"], content=event["delta"]))
            else:
                tokens += event["tokens"]
                yield api.sse(api.chat_chunk(id_, body.model, event["index"], finish_reason=event["finish_reason"]))
        if (body.stream_options or {}).get("include_usage"):
            yield api.sse(api.chat_chunk(id_, body.model, 0, usage_=api.token_usage(prompt_tokens, tokens)))
        yield api.sse("[DONE]")

    async def _completion_events(self, body, gi: int, job: dict, prompt_tokens: int):
        id_, tokens = api.new_id("cmpl"), 0
        async for event in self._stream(gi, job):
            if "error" in event:
                yield api.sse(event)
            elif "delta" in event:
                yield api.sse(api.completion_chunk(id_, body.model, event["index"], text=event["delta"]))
            else:
                tokens += event["tokens"]
                yield api.sse(api.completion_chunk(id_, body.model, event["index"],
                                                   finish_reason=event["finish_reason"]))
        if (body.stream_options or {}).get("include_usage"):
            yield api.sse(api.completion_chunk(id_, body.model, 0, usage_=api.token_usage(prompt_tokens, tokens)))
        yield api.sse("[DONE]")


def build_app(args: dict):
    """The Serve application for `args` ({"models": [...]} plus DEFAULTS' keys): ingress + one ModelServer per base.
    Also the RayService's import_path target (serving.app:build_app), which Serve calls with serveConfigV2's args."""
    from serving.sources import plan_groups

    args = DEFAULTS | dict(args)
    groups = plan_groups(list(args["models"]))
    options = deployment_options(args)
    servers = [ModelServer.options(name=f"model-{i}-{_slug(g.name)}", **options).bind(
        group_to_dict(g), args["device"], args["threads"], args["max_batch_size"], args["batch_wait_timeout_s"])
        for i, g in enumerate(groups)]
    return OpenAIIngress.bind([group_to_dict(g) for g in groups], servers)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
