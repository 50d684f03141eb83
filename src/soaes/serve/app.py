"""The OpenAI-compatible HTTP layer of `soaes serve` (FastAPI): chat and text completions, streamed (SSE) or not,
`/v1/models`, `/health` and Prometheus `/metrics`. Bad requests get an OpenAI-style JSON error with a 4xx status."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from soaes_core import encode_chat_prompt
from soaes_specdec.sampling import SamplingParams

from .engine import Event, QueueFullError, RequestHandle, ServeEngine

# ----------------------------------------------------------------------------------------------- schemas


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Schema):
    type: str
    text: str | None = None


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class _GenerationRequest(_Schema):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int]


# ----------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first validation error (JSON syntax or a field), and the field it names."""
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # union members repeat the field with their type name; keep the field path
    loc = [p for p in loc if not p.startswith(("list[", "str", "int", "function-")) or p.isdigit()]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


# ----------------------------------------------------------------------------------------------- the app


def sampling_of(req: _GenerationRequest) -> SamplingParams:
    """OpenAI's defaults: temperature 1 (0 is greedy), top_p 1."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if temperature == 0.0:
        return SamplingParams(do_sample=False, top_p=top_p)
    return SamplingParams(do_sample=True, temperature=temperature, top_p=top_p)


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            p.text or "" for p in m.content if p.type == "text")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def create_app(engine: ServeEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_name`; with `api_key`, /v1 routes need `Bearer <key>`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="soaes serve", lifespan=lifespan)
    metrics = engine.metrics
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        metrics.count_request(request.url.path, "error")
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
                        ).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "soaes"}]}

    def check_model(req: _GenerationRequest) -> None:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here (this server serves {model_name!r})",
                           param="model", code="model_not_found")

    def budget(prompt_ids: list[int], max_tokens: int | None) -> int:
        """max_tokens checked against the context window (default: the rest of it)."""
        window = engine.context_window
        if len(prompt_ids) >= window:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the context window is {window} tokens "
                                "(prompt + at least one new token)", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            return window - len(prompt_ids)
        if len(prompt_ids) + max_tokens > window:
            raise APIError(400, f"max_tokens ({max_tokens}) + the prompt ({len(prompt_ids)} tokens) exceeds the "
                                f"context window of {window} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def submit(req: _GenerationRequest, prompt_ids: list[int], max_tokens: int | None) -> RequestHandle:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return engine.submit(prompt_ids, budget(prompt_ids, max_tokens), sampling_of(req), req.seed, stop)
        except QueueFullError as err:
            raise APIError(429, str(err), type_="rate_limit_exceeded", code="queue_full") from None

    async def run(request: Request, endpoint: str, req: _GenerationRequest, prompt_ids: list[int],
                  max_tokens: int | None, chunk: Any, final: Any) -> Any:
        try:
            handle = submit(req, prompt_ids, max_tokens)
        except APIError as err:
            metrics.count_request(endpoint, "rejected" if err.status == 429 else "error")
            raise
        rid = f"{'chatcmpl' if endpoint.endswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(endpoint, handle, rid, created, chunk, usage),
                                     media_type="text/event-stream")
        parts: list[str] = []
        while True:
            try:
                event = await asyncio.wait_for(handle.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(handle)
                    metrics.count_request(endpoint, "cancelled")
                    return PlainTextResponse("", status_code=499)
                continue
            parts.append(event.text)
            if event.finished:
                break
        finish(endpoint, handle, event)
        return final(rid, created, "".join(parts), event.finish_reason, usage_of(handle))

    def usage_of(handle: RequestHandle) -> dict[str, int]:
        n = len(handle.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": handle.completion_tokens,
                "total_tokens": n + handle.completion_tokens}

    def finish(endpoint: str, handle: RequestHandle, event: Event) -> None:
        if event.error is not None:
            metrics.count_request(endpoint, "error")
            raise APIError(503 if "shutting down" in event.error else 500, event.error, type_="server_error")
        metrics.count_request(endpoint, "ok")
        first = None if handle.first_token_at is None else handle.first_token_at - handle.created
        metrics.observe_request(len(handle.prompt_ids), handle.completion_tokens,
                                time.perf_counter() - handle.created, first)

    async def stream(endpoint: str, handle: RequestHandle, rid: str, created: int, chunk: Any,
                     include_usage: bool) -> AsyncIterator[str]:
        done = False
        try:
            yield _sse(chunk(rid, created, None, None, first=True))
            while True:
                event = await handle.events.get()
                if event.error is not None:
                    metrics.count_request(endpoint, "error")
                    done = True
                    yield _sse({"error": {"message": event.error, "type": "server_error", "param": None,
                                          "code": None}})
                    return
                if event.text:
                    yield _sse(chunk(rid, created, event.text, None))
                if event.finished:
                    done = True
                    finish(endpoint, handle, event)
                    yield _sse(chunk(rid, created, None, event.finish_reason))
                    if include_usage:
                        body = chunk(rid, created, None, None)
                        body["choices"], body["usage"] = [], usage_of(handle)
                        yield _sse(body)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not done:  # the client went away mid-stream
                engine.cancel(handle)
                metrics.count_request(endpoint, "cancelled")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_model(req)
        try:
            prompt_ids = encode_chat_prompt(tokenizer, _chat_messages(req.messages))
        except Exception as err:  # SoaesError, or whatever the tokenizer's jinja template raises
            raise APIError(400, f"messages: the chat template refused them ({type(err).__name__}: {err})",
                           param="messages") from None

        def chunk(rid: str, created: int, text: str | None, reason: str | None, first: bool = False) -> dict:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def final(rid: str, created: int, text: str, reason: str | None, usage: dict[str, int]) -> dict:
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": reason}], "usage": usage}

        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await run(request, "/v1/chat/completions", req, prompt_ids, max_tokens, chunk, final)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
        else:
            prompt_ids = [int(i) for i in prompt]
            vocab = engine.session.target.vocab_size
            if any(not 0 <= i < vocab for i in prompt_ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if not prompt_ids:
            raise APIError(400, "prompt: empty (give at least one token)", param="prompt")

        def chunk(rid: str, created: int, text: str | None, reason: str | None, first: bool = False) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

        def final(rid: str, created: int, text: str, reason: str | None, usage: dict[str, int]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                    "usage": usage}

        return await run(request, "/v1/completions", req, prompt_ids, req.max_tokens, chunk, final)

    return app


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
