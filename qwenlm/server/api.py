"""The FastAPI app: OpenAI-compatible routes, API key, errors in OpenAI's shape, metrics, web chat.

`create_app(engine, tokenizer, model_name, ...)` builds the app around a running AsyncEngine;
`serve(args)` loads a checkpoint and runs it under uvicorn (the `qwenlm serve` command).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenlm.config import GenerationConfig
from qwenlm.server import handlers
from qwenlm.server.metrics import CONTENT_TYPE, ServerMetrics
from qwenlm.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, now, validation_error
from qwenlm.server.serving import ServerState

log = logging.getLogger("qwenlm.server")
STATIC_DIR = Path(__file__).with_name("static")
API_KEY_ENV = "QWENLM_API_KEY"
OPEN_PATHS = {"/health"}


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _key_of(authorization: str) -> str | None:
    """The key in "Bearer KEY", or the password in "Basic base64(user:KEY)" (what a browser sends)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


class ApiKeyMiddleware:
    """Every route but /health needs the key; compared in constant time. Plain ASGI (no response wrapping),
    so streamed responses and disconnects pass straight through."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            given = _key_of(headers.get(b"authorization", b"").decode("latin-1"))
            if given is None or not hmac.compare_digest(given.encode(), self.key):
                err = ApiError(401, "Invalid or missing API key: send 'Authorization: Bearer KEY'.",
                               type="authentication_error", code="invalid_api_key")
                response = error_response(err, headers={"WWW-Authenticate": 'Basic realm="qwenlm"'})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class DisconnectAbortingResponse(StreamingResponse):
    """A streaming response that stops its body as soon as the client disconnects, and always closes the
    body generator, so the generator's `finally` aborts the engine request and frees its KV blocks."""

    async def __call__(self, scope, receive, send):
        async def watch_disconnect(scope_to_cancel):
            while (await receive())["type"] != "http.disconnect":
                pass
            scope_to_cancel.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect, tg.cancel_scope)
                with contextlib.suppress(OSError):
                    await self.stream_response(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _until_disconnect(request: Request, coro):
    """Run a non-stream handler; if the client goes away first, cancel it (which aborts its engine run)."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    return task.result()


def create_app(engine, tokenizer, model_name: str, api_key: str | None = None,
               generation_config: GenerationConfig | None = None, max_model_len: int | None = None,
               max_pending: int = 512, max_body_bytes: int = 4 << 20) -> FastAPI:
    """The API and web chat around `engine` (an AsyncEngine: generate / abort / stats).

    max_model_len: prompt + reply tokens per request (default: the engine's `max_model_len`, else 8192).
    max_pending: engine requests admitted at once (running + queued); beyond it requests get 429.
    """
    core = getattr(engine, "engine", engine)  # AsyncEngine wraps an LLMEngine
    if max_model_len is None:
        max_model_len = getattr(core, "max_model_len", None) or 8192
    blocks = getattr(core, "blocks", None)
    kv_capacity = blocks.num_blocks * blocks.block_size if blocks is not None else None
    state = ServerState(engine=engine, tokenizer=tokenizer, model_name=model_name,
                        generation_config=generation_config or GenerationConfig(), max_model_len=max_model_len,
                        max_pending=max_pending, kv_capacity=kv_capacity, metrics=ServerMetrics(engine, model_name))
    app = FastAPI(title="qwenlm", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwenlm = state
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def on_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    async def read_json(request: Request, model):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"request body is not valid UTF-8: {e}") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:  # JSON escapes can smuggle in lone surrogates ("\ud800"), which are not text
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"request body holds invalid Unicode: {e.reason}") from None
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
        return req

    async def respond(request: Request, req, full, stream):
        if req.stream:
            return DisconnectAbortingResponse(stream(state, req), media_type="text/event-stream",
                                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _until_disconnect(request, full(state, req)))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": now(), "owned_by": "qwenlm", "root": model_name,
                "parent": None, "max_model_len": max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_name:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request, ChatCompletionRequest)
        return await respond(request, req, handlers.chat_full, handlers.chat_stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_json(request, CompletionRequest)
        return await respond(request, req, handlers.completion_full, handlers.completion_stream)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(args) -> int:
    """`qwenlm serve`: args.model, args.device, args.dtype, args.quantize, args.kv_cache_dtype, args.host,
    args.port, args.api_key."""
    import uvicorn

    from qwenlm.api import load
    from qwenlm.engine import AsyncEngine, EngineConfig

    llm = load(args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", "auto"),
               quantize=getattr(args, "quantize", None),
               engine_config=EngineConfig(kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto")))
    engine = AsyncEngine(llm.engine)
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    # a local folder is served under its name ("Qwen-7B-Chat"), a hub model under the name it was asked by
    model_name = Path(args.model).name if Path(args.model).is_dir() else args.model
    app = create_app(engine, llm.tokenizer, model_name=model_name, api_key=api_key,
                     generation_config=llm.generation_config)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0
