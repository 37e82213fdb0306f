"""`phi3 serve`: the OpenAI API (chat completions, completions, models) over the continuous-batching
engine, plus /health, /metrics (Prometheus), the OpenAPI schema and a chat page at /.

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx
status (5xx only for a bug), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Phi3Error
from ..generate import Delta, SamplingParams
from .engine import Engine, QueueFull, Request
from .metrics import Metrics

PAGE = Path(__file__).with_name("static") / "index.html"
API_KEY_ENV = "PHI3_API_KEY"
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed accepts


# ---- request bodies (OpenAI's, strictly typed: "1" is not a number) --------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = Field(None, max_length=4)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = Field(None, description="not supported")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: None = Field(None, description="not supported")


# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status)


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|dict|list)$|[\[\]\-,]")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    # pydantic names the member of a union it tried ("str", "list[TextPart]", ...): not a field
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _UNION_MEMBER.search(str(p))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if param is None:
        return f"invalid request body: {msg}", None
    return f"invalid value for '{param}': {msg}", param


# ---- ASGI middleware: body size limit, API key ------------------------------------------------------
class BodyLimit:
    """Reject bodies over `limit` bytes with 413 before the app sees them (Content-Length or counted)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        await JSONResponse(error_body(f"request body is larger than {self.limit} bytes", code="body_too_large"),
                           status_code=413)({"type": "http"}, None, send)


class RequireAPIKey:
    """`Authorization: Bearer <key>` on /v1/* and /metrics; the page, /health and the schema stay open."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                body = error_body("missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- the app --------------------------------------------------------------------------------------
def create_app(lm, engine: Engine, model_id: str, api_key: str | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = 1 << 20,
               metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or engine.metrics or Metrics()
    metrics.watch(engine)
    app = FastAPI(title="phi3 serve", version="0.1.0", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a continuous-batching engine.")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.middleware("http")
    async def _count(request: HTTPRequest, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(route.path if route else "other", str(response.status_code)).inc()
        return response

    # ---- helpers ----------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")

    def sampling(body: _Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        context = engine.context
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens but the context is {context} tokens",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        room = context - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is more than the {room} tokens left in the "
                                f"context ({context} tokens, the prompt uses {prompt_len})",
                           param="max_tokens", code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop_strings=stop).validate()
        except Phi3Error as e:
            raise APIError(400, str(e)) from None

    def submit(prompts: list[list[int]], params: SamplingParams, continuation: bool):
        """Queue one request per prompt; events arrive as (index, Delta | Exception) on one asyncio queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        reqs = []
        for i, ids in enumerate(prompts):
            def on_event(event, i=i):
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))
            reqs.append(Request(ids, params, on_event, continuation))
        try:
            for r in reqs:
                engine.submit(r)
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        return reqs, queue

    def delta(event) -> Delta:
        if isinstance(event, Exception):
            raise APIError(500, f"generation failed: {type(event).__name__}: {event}", type="server_error")
        return event

    async def events(reqs, queue):
        """Yield (index, Delta) until every request has finished; raise on an engine failure."""
        open_ = len(reqs)
        while open_:
            i, event = await queue.get()
            d = delta(event)
            open_ -= bool(d.finish_reason)
            yield i, d

    def usage(prompts, reqs) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(r.output_ids) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in reqs)}}

    async def collect(request: HTTPRequest, reqs, queue) -> tuple[list[str], list[str]]:
        texts, reasons = [[] for _ in reqs], [None] * len(reqs)
        try:
            while None in reasons:
                try:
                    i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # nobody to answer: free the slots
                        break
                    continue
                d = delta(event)
                texts[i].append(d.text)
                reasons[i] = d.finish_reason or reasons[i]
        finally:
            for r in reqs:
                r.cancel()
        return ["".join(t) for t in texts], reasons

    def sse(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def streaming(reqs, queue, chunks) -> StreamingResponse:
        async def body():
            try:
                async for part in chunks:
                    yield part
            except APIError as e:
                yield sse(error_body(e.message, e.type, e.param, e.code))
            yield "data: [DONE]\n\n"

        class _Stream(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:  # finished, or the client went away: free the slots now
                    for r in reqs:
                        r.cancel()

        return _Stream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        try:
            prompt = lm.chat_prompt(messages)
        except Exception as e:  # the template refused the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        params = sampling(body, len(prompt), body.max_completion_tokens or body.max_tokens)
        reqs, queue = submit([prompt], params, continuation=False)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            texts, reasons = await collect(request, reqs, queue)
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                                 "logprobs": None, "finish_reason": reasons[0]}],
                    "usage": usage([prompt], reqs)}

        def chunk(delta: dict, finish=None) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def chunks():
            yield chunk({"role": "assistant", "content": ""})
            async for _, d in events(reqs, queue):
                if d.text:
                    yield chunk({"content": d.text})
                if d.finish_reason:
                    yield chunk({}, d.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                           "choices": [], "usage": usage([prompt], reqs)})

        return streaming(reqs, queue, chunks())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_model(body.model)
        texts_in = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = [lm.encode(t) for t in texts_in]
        if any(not p for p in prompts):
            raise APIError(400, "a prompt is empty: it needs at least one token", param="prompt")
        longest = max(prompts, key=len)
        params = sampling(body, len(longest), body.max_tokens)
        reqs, queue = submit(prompts, params, continuation=True)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            texts, reasons = await collect(request, reqs, queue)
            choices = [{"index": i, "text": (texts_in[i] if body.echo else "") + t, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
            return {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": choices, "usage": usage(prompts, reqs)}

        def chunk(i: int, text: str, finish=None) -> str:
            return sse({"id": cid, "object": "text_completion", "created": now, "model": model_id,
                        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]})

        async def chunks():
            if body.echo:
                for i, t in enumerate(texts_in):
                    yield chunk(i, t)
            async for i, d in events(reqs, queue):
                if d.text or d.finish_reason:
                    yield chunk(i, d.text, d.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_id,
                           "choices": [], "usage": usage(prompts, reqs)})

        return streaming(reqs, queue, chunks())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "phi3"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "phi3"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    if api_key:
        app.add_middleware(RequireAPIKey, key=api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def model_name(source: str) -> str:
    """The id clients pass as `model`: the file or directory name without a .gguf suffix."""
    name = Path(source).name
    return name[:-5] if name.endswith(".gguf") else name


def build(lm, slots: int = 8, slot_len: int = 2048, max_queue: int = 64, api_key: str | None = None,
          cors_origins: list[str] | None = None, model_id: str | None = None, max_body_bytes: int = 1 << 20):
    """An app and its started engine."""
    metrics = Metrics()
    engine = Engine(lm, slots=slots, slot_len=slot_len, max_queue=max_queue, metrics=metrics).start()
    app = create_app(lm, engine, model_id or model_name(lm.source), api_key=api_key,
                     cors_origins=cors_origins, max_body_bytes=max_body_bytes, metrics=metrics)
    return app, engine


def serve(lm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, slots: int = 8,
          slot_len: int = 2048, max_queue: int = 64, cors_origins: list[str] | None = None,
          model_id: str | None = None, log_level: str = "warning") -> int:
    """Run the server until interrupted (`phi3 serve`)."""
    import sys

    import uvicorn

    app, engine = build(lm, slots=slots, slot_len=slot_len, max_queue=max_queue, api_key=api_key,
                        cors_origins=cors_origins, model_id=model_id)
    name = model_id or model_name(lm.source)
    print(f"phi3 serve: {name} on http://{host}:{port}  ({slots} slots of {engine.context} tokens, "
          f"API key {'required' if api_key else 'off'})", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
    return 0
