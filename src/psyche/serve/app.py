"""The HTTP side of ``psyche serve``: OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` over an :class:`~psyche.serve.engine.Engine`.

Every refusal is in OpenAI's error shape (:class:`~psyche.serve.protocol.APIError`):
malformed JSON, unknown or broken parameters and prompts longer than the context get 400,
an unknown model 404, a full queue 429 with ``Retry-After``, no model loaded yet (a
followed run with no checkpoint) 503, and the :class:`~psyche.httplimits.Guard` in front
refuses oversized, slow or too frequent requests the same way. Nothing a request holds
reaches the model unchecked, and a failure inside the model fails that request only.

Responses say which checkpoint answered: ``system_fingerprint`` is ``psyche-step-N``, and
a ``psyche`` object carries the step, the run and the checkpoint. Every response allows
any origin (CORS), so the dashboard's "Try it" box can stream from another host.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from psyche.httplimits import Guard, Limits, Refusal
from psyche.serve.engine import (
    DEFAULT_CHAT_STOP,
    InferenceEngine,
    Failed,
    Finished,
    NoModel,
    PromptTooLong,
    QueueFull,
    Sampling,
    ServedModel,
    Started,
    Text,
    Ticket,
)
from psyche.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_request, usage

BODY_CAP = 1 << 20
"""Bytes a completion request may carry: far more than any context this serves holds."""
DEFAULT_COMPLETION_TOKENS = 16
"""``max_tokens`` of a text completion that does not say (OpenAI's default)."""


def model_card(served: ServedModel) -> dict[str, Any]:
    """The served model as ``/v1/models`` lists it."""
    return {"id": served.name, "object": "model", "created": int(served.loaded_at), "owned_by": "psyche",
            "psyche": _about(served)}


def _about(served: ServedModel) -> dict[str, Any]:
    return {"step": served.step, "run_id": served.run_id, "checkpoint": served.checkpoint,
            "context": served.context}


def _fingerprint(served: ServedModel) -> str:
    return f"psyche-step-{served.step}" if served.step is not None else "psyche"


def openai_refusal(refusal: Refusal) -> dict[str, Any]:
    """A :class:`Guard` refusal in OpenAI's error shape."""
    kind = "rate_limit_exceeded" if refusal.status == 429 else "invalid_request_error"
    return {"error": {"message": refusal.message, "type": kind, "param": None, "code": refusal.error}}


@dataclass
class _Completion:
    """One request's completions in flight: its tickets (one per prompt and choice)."""

    served: ServedModel
    tickets: list[Ticket]
    prompt_texts: list[str]
    n: int
    """Choices per prompt: tickets ``k*n`` to ``k*n + n - 1`` complete prompt ``k``."""
    started: dict[int, Started] = field(default_factory=dict)

    def cancel(self) -> None:
        for t in self.tickets:
            t.cancel()

    async def merged(self) -> AsyncIterator[tuple[int, Started | Text | Finished | Failed]]:
        """Every ticket's events as ``(choice index, event)``, as they come."""
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, t: Ticket) -> None:
            async for ev in t.events():
                await events.put((i, ev))

        tasks = [asyncio.create_task(pump(i, t)) for i, t in enumerate(self.tickets)]
        try:
            left = len(tasks)
            while left:
                i, ev = await events.get()
                if isinstance(ev, Started):
                    self.started[i] = ev
                if isinstance(ev, (Finished, Failed)):
                    left -= 1
                yield i, ev
        finally:
            for task in tasks:
                task.cancel()

    def answered_by(self) -> ServedModel:
        """The model that answered (the first choice's; a swap between choices is rare)."""
        first = self.started.get(0)
        return first.model if first is not None else self.served


def create_app(engine: InferenceEngine, *, limits: Limits | None = None,
               background: Callable[[], Coroutine[Any, Any, None]] | None = None) -> Guard:
    """The ASGI app serving ``engine``: FastAPI behind CORS and a :class:`Guard`.
    ``background`` (e.g. a :class:`~psyche.serve.follow.Follower`'s ``run``) runs while it serves."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        task = asyncio.create_task(background()) if background is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="psyche serve", summary="A run's model over the OpenAI API", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def serving(requested: str | None) -> ServedModel:
        served = engine.served
        if served is None:
            raise APIError(503, "no checkpoint is loaded yet: the followed run has published none; retry later",
                           type="server_error", code="model_not_loaded", headers={"Retry-After": "5"})
        if requested is not None and requested != served.name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{served.name}`",
                           param="model", code="model_not_found")
        return served

    def submit(served: ServedModel, prompts: list[str], req: CompletionRequest | ChatRequest, max_tokens: int | None,
               stop: list[str], param: str) -> _Completion:
        tickets: list[Ticket] = []
        texts: list[str] = []
        bias = req.biases(served.vocab_size)
        try:
            for p in prompts:
                ids = served.encode(p)
                wanted = max_tokens if max_tokens is not None else max(served.context - len(ids), 0)
                for j in range(req.n):
                    seed = None if req.seed is None else req.seed + len(tickets)
                    sampling = Sampling(max_tokens=wanted, temperature=req.temperature, top_p=req.top_p,
                                        stop=tuple(stop), seed=seed, logit_bias=bias)
                    tickets.append(engine.submit(p, sampling, ids=ids))
                    texts.append(p)
        except PromptTooLong as exc:
            for t in tickets:
                t.cancel()
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        except QueueFull as exc:
            for t in tickets:
                t.cancel()
            raise APIError(429, f"the server is busy: {exc}", type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NoModel as exc:
            raise APIError(503, str(exc), type="server_error", code="model_not_loaded",
                           headers={"Retry-After": "5"}) from None
        return _Completion(served, tickets, texts, req.n)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Whether a model is loaded, which, and how the batching goes."""
        served = engine.served
        return {"ok": served is not None, "model": served.name if served else None,
                "step": served.step if served else None, **engine.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The model served (none while a followed run has no checkpoint), with its step and run."""
        served = engine.served
        return {"object": "list", "data": [model_card(served)] if served is not None else []}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        """One model, if it is the one served."""
        return model_card(serving(model))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        """Complete text (OpenAI's legacy completions)."""
        req = parse_request(CompletionRequest, await request.body())
        served = serving(req.model)
        max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
        job = submit(served, req.prompts(), req, max_tokens, req.stops(), "prompt")
        echo = req.echo
        if req.stream:
            def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
                return {"choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

            return _stream(job, "cmpl", "text_completion", req, chunk,
                           opening=(lambda i: job.prompt_texts[i]) if echo else None)
        texts, reasons, prompt_tokens, completion_tokens = await _collect(job)
        by = job.answered_by()
        choices = [{"index": i, "text": (job.prompt_texts[i] if echo else "") + texts[i], "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(len(texts))]
        return JSONResponse({"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
                             "model": by.name, "system_fingerprint": _fingerprint(by), "choices": choices,
                             "usage": usage(prompt_tokens, completion_tokens), "psyche": _about(by)})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        """Answer a chat (with the tokenizer's chat template, or the documented default)."""
        req = parse_request(ChatRequest, await request.body())
        served = serving(req.model)
        prompt = served.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        stop = req.stops() if req.stop is not None else ([] if served.has_own_chat_template else list(DEFAULT_CHAT_STOP))
        job = submit(served, [prompt], req, req.wanted_tokens(), stop, "messages")
        if req.stream:
            def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
                delta = {"content": text} if text or finish is None else {}
                return {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            def opening(i: int) -> dict[str, Any]:
                return {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]}

            return _stream(job, "chatcmpl", "chat.completion.chunk", req, chunk, opening_chunk=opening)
        texts, reasons, prompt_tokens, completion_tokens = await _collect(job)
        by = job.answered_by()
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(len(texts))]
        return JSONResponse({"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                             "model": by.name, "system_fingerprint": _fingerprint(by), "choices": choices,
                             "usage": usage(prompt_tokens, completion_tokens), "psyche": _about(by)})

    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], expose_headers=["Retry-After"])
    caps = {"POST /v1/completions": BODY_CAP, "POST /v1/chat/completions": BODY_CAP}
    return Guard(app, limits=limits or Limits(), body_caps=caps, render=openai_refusal)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def _collect(job: _Completion) -> tuple[list[str], list[str], int, int]:
    """Wait for every choice; their texts, finish reasons, and the token usage."""
    n = len(job.tickets)
    texts = [""] * n
    reasons = ["stop"] * n
    prompt_tokens = 0
    completion_tokens = 0
    try:
        async for i, ev in job.merged():
            if isinstance(ev, Started) and i % job.n == 0:  # n choices of one prompt read it once
                prompt_tokens += ev.prompt_tokens
            elif isinstance(ev, Text):
                texts[i] += ev.text
            elif isinstance(ev, Finished):
                reasons[i] = ev.reason
                completion_tokens += ev.completion_tokens
            elif isinstance(ev, Failed):
                raise APIError(500, ev.message, type="server_error", code="generation_failed")
    finally:
        job.cancel()  # a client gone, or a choice failed: the others stop too
    return texts, reasons, prompt_tokens, completion_tokens


def _stream(job: _Completion, prefix: str, obj: str, req: CompletionRequest | ChatRequest,
            chunk: Callable[[int, str, str | None], dict[str, Any]],
            opening: Callable[[int], str] | None = None,
            opening_chunk: Callable[[int], dict[str, Any]] | None = None) -> StreamingResponse:
    """The completion as server-sent events: one chunk per piece of text, a last chunk per
    choice with its finish reason, the usage if asked, then ``[DONE]``."""
    cid, created = _id(prefix), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(body: dict[str, Any], by: ServedModel) -> bytes:
        body = {"id": cid, "object": obj, "created": created, "model": by.name,
                "system_fingerprint": _fingerprint(by), **body, "psyche": _about(by)}
        if include_usage:
            body.setdefault("usage", None)
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        try:
            async for i, ev in job.merged():
                by = job.started[i].model if i in job.started else job.served
                if isinstance(ev, Started):
                    if i % job.n == 0:
                        prompt_tokens += ev.prompt_tokens
                    if opening_chunk is not None:
                        yield event(opening_chunk(i), by)
                    if opening is not None:
                        yield event(chunk(i, opening(i), None), by)
                elif isinstance(ev, Text):
                    yield event(chunk(i, ev.text, None), by)
                elif isinstance(ev, Finished):
                    completion_tokens += ev.completion_tokens
                    yield event(chunk(i, "", ev.reason), by)
                elif isinstance(ev, Failed):
                    # Headers are sent: the failure goes in the stream, in OpenAI's error shape.
                    err = APIError(500, ev.message, type="server_error", code="generation_failed")
                    yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
                    return
            if include_usage:
                yield event({"choices": [], "usage": usage(prompt_tokens, completion_tokens)}, job.answered_by())
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
