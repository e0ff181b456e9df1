"""The FastAPI app of `parspec serve`: OpenAI's endpoints, /health, /version, /metrics; every
error an OpenAI-style JSON body. `run_server` builds the engine from the CLI's arguments
(a bad model or --speculative-config fails there, before any port is opened) and runs uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import parspec
from parspec.engine.async_engine import AsyncLLMEngine
from parspec.server import DEFAULT_MAX_REQUEST_BODY
from parspec.server.metrics import ServerMetrics
from parspec.server.protocol import APIError
from parspec.server.serving import ChatEndpoint, CompletionEndpoint, OpenAIServing

log = logging.getLogger("parspec.serve")

DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many limits, so the client sees the 413


async def read_json_body(request: Request, limit: int):
    """The decoded JSON body; 413 past ``limit`` bytes (never held in memory), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_large = True
        if too_large:
            chunks = []
            if size > DRAIN_FACTOR * limit:
                break
        else:
            chunks.append(chunk)
    if too_large:
        raise APIError(413, f"the request body is {max(size, int(declared or 0))} bytes, more than the "
                            f"server's limit of {limit} (--max-request-body)")
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def build_app(engine: AsyncLLMEngine, served_model_names: list[str], metrics: ServerMetrics,
              max_request_body: int = DEFAULT_MAX_REQUEST_BODY) -> FastAPI:
    """The app over an AsyncLLMEngine that it starts and stops with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="parspec", version=parspec.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    serving = OpenAIServing(engine, served_model_names)
    completions, chat = CompletionEndpoint(serving), ChatEndpoint(serving)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    async def respond(endpoint, request: Request):
        body = await read_json_body(request, max_request_body)
        result = await endpoint.handle(request, body)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        return await respond(completions, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        return await respond(chat, request)

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "parspec",
                 "root": engine.engine.cfg.model, "parent": None, "max_model_len": serving.max_model_len}
                for name in served_model_names]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if not engine.is_running:
            raise APIError(503, engine.error or "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": parspec.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    app.state.engine = engine
    app.state.metrics = metrics
    return app


def build_server_app(engine_config, speculative_config=None, served_model_names: list[str] | None = None,
                     max_queue_len: int = 1024, max_request_body: int = DEFAULT_MAX_REQUEST_BODY) -> FastAPI:
    """Load the model and wrap it in the app; ConfigError / LoadError on a bad model or config."""
    from parspec.engine.llm_engine import LLMEngine

    llm = LLMEngine(engine_config, speculative_config)
    if llm.device.type == "cuda":  # kernels compiled and graphs captured before the first request
        what = "kernels, CUDA graphs" + (", step cost per depth" if llm.depth_policy is not None else "")
        print(f"parspec serve: warm-up ({what}) took {llm.warm_up():.1f} s", file=sys.stderr, flush=True)
    names = list(served_model_names or [engine_config.model])
    k = llm.spec_config.num_speculative_tokens if llm.spec_config else 0
    metrics = ServerMetrics(names[0], llm.max_model_len, k)
    engine = AsyncLLMEngine(llm, max_queue_len=max_queue_len, metrics=metrics)
    return build_app(engine, names, metrics, max_request_body)


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    # The engine loop's own messages (a failed step, ...) in uvicorn's format, at its level.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logging.getLogger("parspec").addHandler(handler)
    logging.getLogger("parspec").setLevel(log_level.upper() if log_level != "trace" else "DEBUG")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
