"""The FastAPI application: routes translate HTTP to engine calls and back, nothing more.

`build_app(engine, settings)` wires an already-constructed engine into an app; the engine's loop is
started and stopped by the app's lifespan, so it runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..chat_template import compile_template
from ..engine.protocol import EngineError
from ..metrics import CONTENT_TYPE, ServerMetrics
from .errors import APIError, from_engine_error
from .generation import ClientDisconnected
from .middleware import GuardMiddleware
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                       TokenizeRequest)
from .serving_chat import chat_prompt_ids, create_chat_completion
from .protocol_responses import ResponsesRequest
from .request_log import RequestLog
from .response_store import ResponseStore
from .serving_common import ServingContext, parse_body, parse_json, validate_body
from .serving_completions import create_completion
from .serving_responses import create_response, delete, retrieve
from .stats_log import StatsLog
from .tools import parse_tools

log = logging.getLogger("nsa_serve.api")


@dataclass
class ServerSettings:
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model_name
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults (generation_config.json)
    model_root: str | None = None
    start_engine: bool = True  # False: the caller started it (and will shut it down)
    log_stats_interval_s: float = 10.0  # a line of engine statistics in the log (0: none)
    responses_store_size: int = 1024  # /v1/responses kept for retrieval and previous_response_id
    log_requests: bool = False  # a log line per request arriving and ending (prompts are users' data)
    # CORS for browser clients on other origins (vLLM's --allowed-origins ...). Empty: no CORS headers,
    # so a web page the user visits cannot read this server's answers (vLLM's default is "*").
    cors_origins: list[str] = field(default_factory=list)
    cors_methods: list[str] = field(default_factory=lambda: ["*"])
    cors_headers: list[str] = field(default_factory=lambda: ["*"])
    cors_credentials: bool = False
    max_log_len: int | None = None  # prompt characters and ids in those lines (None: all)
    # --chat-template's text (None: the model directory's chat_template.jinja, else the built-in
    # template), vLLM's --trust-request-chat-template (requests may bring their own) and
    # --chat-template-content-format (how a Jinja template gets a message's content)
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    chat_template_content_format: str = "auto"
    return_tokens_as_token_ids: bool = False  # vLLM's --return-tokens-as-token-ids (requests' default)
    force_include_usage: bool = False  # vLLM's --enable-force-include-usage
    fastapi_docs: bool = True  # /docs, /redoc and /openapi.json (vLLM's --disable-fastapi-docs turns them off)


def build_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    names = settings.served_model_names or [engine.model_name]
    metrics = ServerMetrics(names[0], engine.max_model_len, stats=engine.stats,
                            cache_info=engine.cache_info)
    ctx = ServingContext(engine=engine, metrics=metrics, served_model_names=names,
                         max_model_len=engine.max_model_len, model_root=settings.model_root,
                         defaults=dict(settings.defaults), retry_after_s=settings.retry_after_s,
                         request_log=RequestLog(engine.tokenizer, settings.max_log_len) if settings.log_requests
                         else None,
                         chat_template=compile_template(settings.chat_template) if settings.chat_template else None,
                         trust_request_chat_template=settings.trust_request_chat_template,
                         chat_template_content_format=settings.chat_template_content_format,
                         return_tokens_as_token_ids=settings.return_tokens_as_token_ids,
                         force_include_usage=settings.force_include_usage)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.start_engine:
            await engine.start()
        metrics.gc_pauses.install()
        stats_task = None
        if settings.log_stats_interval_s > 0:
            stats_task = asyncio.create_task(StatsLog(engine.stats).run(settings.log_stats_interval_s))
        try:
            yield
        finally:
            metrics.gc_pauses.remove()
            if stats_task is not None:
                stats_task.cancel()
            ctx.draining = True
            if settings.start_engine:
                await engine.shutdown(settings.shutdown_timeout_s)

    docs = settings.fastapi_docs
    app = FastAPI(title="nsa-serve", version=__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.ctx = ctx
    store = ResponseStore(settings.responses_store_size)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return await _api_error(request, from_engine_error(exc, ctx.retry_after_s))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; keeps the ASGI cycle complete

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return await _api_error(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return await _api_error(request, APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return await _api_error(request, APIError(500, f"internal server error: {type(exc).__name__}"))

    # -- generation --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create_chat_completion(ctx, await parse_body(request, ChatCompletionRequest), request)

    @app.post("/v1/responses")
    async def responses(request: Request):
        data = await parse_json(request)
        return await create_response(ctx, store, validate_body(ResponsesRequest, data), data, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return retrieve(store, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return delete(store, response_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create_completion(ctx, await parse_body(request, CompletionRequest), request)

    @app.post("/invocations")
    async def invocations(request: Request):
        # vLLM's SageMaker entry point: the body's shape says which API it is.
        data = await parse_json(request)
        if "messages" in data:
            return await create_chat_completion(ctx, validate_body(ChatCompletionRequest, data), request)
        if "input" in data:
            return await create_response(ctx, store, validate_body(ResponsesRequest, data), data, request)
        if "prompt" in data:
            return await create_completion(ctx, validate_body(CompletionRequest, data), request)
        raise APIError(400, "an /invocations body needs messages (chat), prompt (completions) or input (responses)")

    # -- models and tokens -------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=n, root=ctx.model_root, max_model_len=ctx.max_model_len)
                               for n in names]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        # OpenAI's models.retrieve; served names may hold "/" (org/name), hence the path converter.
        return ModelCard(id=ctx.check_model(model), root=ctx.model_root, max_model_len=ctx.max_model_len).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_body(request, TokenizeRequest)
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")

        def answer() -> JSONResponse:  # serialised here too: 2 MB of JSON for a 180k-token document
            if req.messages is not None:
                # The prompt a chat request with these messages, tools and template runs
                # (add_special_tokens=false: without the built-in template's BOS).
                ids = chat_prompt_ids(ctx, req, parse_tools(req.tools), req.add_special_tokens)
            else:
                ids = ctx.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens)
            return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
                                 "token_strs": [ctx.tokenizer.token_text(t) for t in ids]})

        return await ctx.off_loop(request, answer)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse_body(request, DetokenizeRequest)
        ctx.check_model(req.model)
        return {"prompt": ctx.tokenizer.decode(ctx.check_token_ids(req.tokens, "tokens"))}

    # -- operations --------------------------------------------------------------------------------
    @app.get("/version")
    async def version():
        return {"version": __version__}

    # SageMaker's health check (vLLM serves it too); one route a method, so that each has its own
    # operation id in /openapi.json.
    @app.get("/ping")
    @app.post("/ping")
    @app.get("/health")
    async def health():
        if not engine.is_alive:
            raise APIError(503, "the engine loop has stopped", code="engine_dead")
        return Response(status_code=200)

    @app.get("/ready")
    async def ready():
        if ctx.draining:
            raise APIError(503, "shutting down", code="shutting_down")
        if not engine.is_alive:
            raise APIError(503, "the engine loop has stopped", code="engine_dead")
        if not engine.is_ready:
            raise APIError(503, "warming up", code="not_ready")
        return {"status": "ready"}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        # vLLM's: benchmarks start cold without a restart. Running requests keep their pages.
        return {"pages_forgotten": await engine.reset_prefix_cache()}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(GuardMiddleware, metrics=metrics, api_key=settings.api_key,
                       max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # outermost: a preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=settings.cors_methods,
                           allow_headers=settings.cors_headers, allow_credentials=settings.cors_credentials)
    return app
