"""The FastAPI app: OpenAI-compatible routes, API key, errors in OpenAI's shape, metrics, web chat.

`create_app(engine, tokenizer, model_name, ...)` builds the app around a running AsyncEngine;
`serve(args)` loads a checkpoint and runs it under uvicorn (the `qwenlm serve` command).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from starlette.middleware.cors import CORSMiddleware

from qwenlm.config import GenerationConfig
from qwenlm.sampling import ParamError
from qwenlm.server import handlers
from qwenlm.server.metrics import CONTENT_TYPE, ServerMetrics
from qwenlm.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, \
    TokenizeRequest, now, validation_error
from qwenlm.server.security import ApiKeyMiddleware, OriginHostMiddleware, error_response, hosts_to_allow, \
    is_loopback
from qwenlm.server.serving import MAX_REQUEST_SEQS, ServerState

log = logging.getLogger("qwenlm.server")
STATIC_DIR = Path(__file__).with_name("static")
API_KEY_ENV = "QWENLM_API_KEY"
MAX_BODY_BYTES = 4 << 20
MAX_JSON_DEPTH = 64  # arrays/objects inside each other; a request needs a handful (tool schemas a few more)


def json_depth_over(data, limit: int) -> bool:
    """True when JSON values nest deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def require_json_media(content_type: str | None) -> None:
    """415 unless the body is declared JSON (or undeclared, as some scripts send it): a form or text/plain
    body is what a hostile page can make a browser send cross-site without a CORS preflight."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type!r}", param="Content-Type",
                       code="unsupported_media_type")


def parse_json_body(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        data = None  # nested past the interpreter's limit: the depth check below names the limit
    if data is None or json_depth_over(data, MAX_JSON_DEPTH):
        raise ApiError(400, f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:  # JSON escapes can smuggle in lone surrogates ("\ud800"), which are not text
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"request body holds invalid Unicode: {e.reason}") from None
    return data


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
               max_pending: int = 512, max_body_bytes: int = MAX_BODY_BYTES, max_request_seqs: int = MAX_REQUEST_SEQS,
               allowed_origins: list[str] | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The API and web chat around `engine` (an AsyncEngine: make_request / stream / abort_nowait / stats).

    api_key: None serves without a key; an empty key is an error, never a silent "no key".
    max_model_len: prompt + reply tokens per request, capped to the engine's true `max_model_len`.
    max_pending: engine requests admitted at once (running + queued); beyond it requests get 429.
    max_request_seqs: sequences one request may create (prompts x n); beyond it a 400.
    allowed_origins: other sites whose pages may call the API (CORS; "*" for any); others get 403.
    allowed_hosts: Host header names accepted (None: any); see security.hosts_to_allow.
    """
    core = getattr(engine, "engine", engine)  # AsyncEngine wraps an LLMEngine
    engine_len = getattr(core, "max_model_len", None) or 8192
    max_model_len = min(max_model_len or engine_len, engine_len)
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; give a non-empty key, or None to serve without one")
    state = ServerState(engine=engine, tokenizer=tokenizer, model_name=model_name,
                        generation_config=generation_config or GenerationConfig(), max_model_len=max_model_len,
                        max_pending=max_pending, max_request_seqs=max_request_seqs,
                        metrics=ServerMetrics(engine, model_name))
    app = FastAPI(title="qwenlm", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwenlm = state
    app.state.end_requests = state.end_requests  # GracefulServer calls it when the grace period is over
    if api_key is not None:  # (the last added is the outermost)
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(OriginHostMiddleware, allowed_origins=allowed_origins, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(ParamError)
    async def on_param_error(request, exc: ParamError):  # the shared rules: a 400 naming the field
        return error_response(ApiError(400, str(exc), param=exc.field))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def on_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    async def read_json(request: Request, model):
        require_json_media(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        data = parse_json_body(b"".join(chunks))
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
        failure = getattr(engine, "failure", None)
        if failure is not None:  # load balancers and supervisors see it; the log says it once
            return JSONResponse({"status": "unhealthy", "error": failure}, status_code=503)
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

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return handlers.tokenize(state, await read_json(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return handlers.detokenize(state, await read_json(request, DetokenizeRequest))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return handlers.tokenizer_info(state)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(args) -> int:
    """`qwenlm serve`: args.model, args.device, args.dtype, args.quantize, args.adapter, args.kv_cache_dtype,
    args.tensor_parallel_size, args.host, args.port, args.api_key, args.allowed_origins, args.allowed_hosts,
    args.timeout_graceful_shutdown."""
    import uvicorn

    from qwenlm.engine import EngineConfig
    from qwenlm.engine.core import CheckpointFactory, CoreSpec, log_to_stderr
    from qwenlm.engine.core_client import EngineClient
    from qwenlm.hub import resolve_model
    from qwenlm.server.launch import GracefulServer
    from qwenlm.tokenizer import Tokenizer

    api_key = getattr(args, "api_key", None)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():  # before loading: never serve open by mistake
        raise ValueError(f"the API key (--api-key or {API_KEY_ENV}) is empty; give a key, or leave both unset "
                         "to serve without one")
    # The engine runs in a process of its own (engine/core.py, docs/serving.md); this process tokenizes and
    # speaks HTTP. Both read the same folder: resolved (downloaded) once, here.
    log_to_stderr("qwenlm")
    folder = resolve_model(args.model)
    tokenizer = Tokenizer.from_folder(folder)
    gen_file = folder / "generation_config.json"
    generation_config = GenerationConfig.from_file(gen_file) if gen_file.is_file() else GenerationConfig()
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp > 1:  # the split and the GPUs, from config.json: a bad size fails here, not after an engine process starts
        from qwenlm.engine.tp_engine import check_tp_fit
        from qwenlm.loading import default_device
        check_tp_fit(folder, tp, getattr(args, "device", None) or default_device())
    spec = CoreSpec(CheckpointFactory(str(folder), getattr(args, "device", None), getattr(args, "dtype", "auto"),
                                      getattr(args, "quantize", None), getattr(args, "adapter", None), tp),
                    EngineConfig(kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto")))
    engine = EngineClient(spec, tokenizer)
    # a local folder is served under its name ("Qwen-7B-Chat"), a hub model under the name it was asked by
    model_name = Path(args.model).name if Path(args.model).is_dir() else args.model
    app = create_app(engine, tokenizer, model_name=model_name, api_key=api_key, generation_config=generation_config,
                     allowed_origins=split_list(getattr(args, "allowed_origins", None)),
                     allowed_hosts=hosts_to_allow(args.host, split_list(getattr(args, "allowed_hosts", None))))
    if api_key is None and not is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                    args.host)
    server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"),
                            grace=getattr(args, "timeout_graceful_shutdown", 10.0), on_exit=engine.shutdown)
    try:
        server.run()
    finally:  # (also when the server never started; shutting down twice is a no-op)
        engine.shutdown()
    return 0


def split_list(value: str | None) -> list[str]:
    """"a,b, c" -> ["a", "b", "c"] (comma-separated option values)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]
