"""The OpenAI-compatible HTTP API of a node: ``create_app(engine, status)`` returns a FastAPI app.

Depends only on the ``Engine`` and ``ClusterStatus`` protocols (mesh/runtime/engine.py), never on
the runtime, transports or backends, so it is tested against ``mesh.testing.FakeEngine`` and
``FakeStatus``. Spec: specs/api.md (A1-A19).

Status codes (spec A1, A2): bad input is always 4xx with OpenAI's error JSON -- malformed
JSON, wrong types and out-of-range values 400 (OpenAI answers 400, not FastAPI's 422), a bad
API key 401, an unknown model or URL 404, a wrong method 405, an oversized body 413. Internal
failures -- the engine raising ``MeshError``, the cluster not ready, or an unexpected
exception (logged with its traceback here, never sent) -- are 503 with ``type:
"server_error"``: the node cannot serve right now and a client may retry (the openai SDK
retries 503), and "never a 500" keeps the contract simple to test. Once an SSE stream has
started the status is already sent, so a failure becomes a final ``data: {"error": ...}``
event followed by ``data: [DONE]`` (spec A3).

``GET /`` is the dashboard (spec A18): one self-contained HTML file shipped in the package
(``mesh/api/dashboard/index.html``) that polls ``/v1/cluster`` and chats through
``/v1/chat/completions``. The page holds no data, so it needs no API key; its own requests
send the key the user types in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from mesh.api.anthropic import count_tokens, messages
from mesh.api.asgi import ApiKeyCheck, ErrorBoundary, error_response, server_error
from mesh.api.chat import ToolSupport, chat_completions
from mesh.api.completions import completions
from mesh.api.generation import engine_failure, model_not_found
from mesh.api.openai_schema import format_param
from mesh.errors import ApiError, MeshError
from mesh.runtime.engine import ClusterStatus, Engine

RETRY_AFTER_S = "1"  # seconds a client should wait before retrying a 503

log = logging.getLogger("mesh.api.app")


# -- errors ---------------------------------------------------------------------------------


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        error = ApiError(
            f"Unknown request URL: {request.method} {request.url.path}. "
            "Please check the URL for typos.",
            status=404,
            code="unknown_url",
        )
    elif exc.status_code == 405:
        error = ApiError(
            f"Method {request.method} is not allowed for {request.url.path}.",
            status=405,
            code="method_not_allowed",
        )
    else:
        error = ApiError(str(exc.detail), status=exc.status_code)
    return error_response(error, dict(exc.headers or {}))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    # spec A9: a 503 is a state that passes (loading, re-placing after a failure): say when
    # to try again (RFC 9110, 10.2.3), which OpenAI clients honour
    if exc.retry_after_s is not None:  # spec A19: a busy node says when to come back
        return error_response(exc, headers={"Retry-After": str(exc.retry_after_s)})
    return error_response(exc, headers={"Retry-After": RETRY_AFTER_S} if exc.status == 503 else None)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = format_param(tuple(first.get("loc", ())))
    return error_response(ApiError(f"Invalid value for '{param}': {first['msg']}.", param=param))


@cache
def dashboard_html() -> str:
    """The dashboard page (spec A18), read once from the installed package."""
    return (files("mesh.api") / "dashboard" / "index.html").read_text(encoding="utf-8")


# -- the app --------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    status: ClusterStatus,
    *,
    api_key: str | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The node's OpenAI-compatible API: requests run on ``engine``; ``status`` reports
    ``/health``, ``/v1/cluster`` and ``/metrics``.

    ``api_key``: when set, every path but ``/health`` and the dashboard page ``/`` needs
    ``Authorization: Bearer <api_key>`` (spec A12, A18). ``clock``: seconds since the epoch,
    for ``created`` fields. Routes: POST /v1/chat/completions, POST /v1/completions,
    POST /v1/messages and /v1/messages/count_tokens (Anthropic's API), GET /v1/models,
    GET /v1/models/{model}, GET /v1/cluster, GET /metrics, GET /health, GET / (dashboard).
    """
    app = FastAPI(
        title="mesh",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers={
            StarletteHTTPException: _http_exception,
            RequestValidationError: _validation_error,
            ApiError: _api_error,
        },
    )
    started_at = int(clock())

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": started_at, "owned_by": "mesh"}


    @app.get("/")
    async def dashboard() -> Response:
        # spec A18: the page only; its data comes from the authenticated API
        return HTMLResponse(dashboard_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/metrics")
    async def metrics() -> Response:
        # spec A17: Prometheus text format, from the status when the node keeps metrics
        text = status.metrics_text()
        if text is None:
            raise ApiError("This node keeps no metrics.", status=404, code="not_found")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> Response:
        # spec A9: 200 only when the model is placed and loaded across the cluster.
        ready, reason = status.health()
        if ready:
            return JSONResponse({"status": "ok"})
        body = server_error(f"Not ready: {reason}").to_json()
        return JSONResponse({"status": "unavailable", "reason": reason, **body}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        if model != engine.model_id:
            raise model_not_found(engine, model)
        return JSONResponse(model_card())

    @app.get("/v1/cluster")
    async def cluster() -> Response:
        try:
            return JSONResponse(status.cluster_info())
        except MeshError as e:
            raise engine_failure(e) from None

    tools = ToolSupport(engine)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_completions(request, engine, status, tools, clock)

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await completions(request, engine, status, clock)

    @app.post("/v1/messages")
    async def anthropic_messages(request: Request) -> Response:
        return await messages(request, engine, status, tools)

    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(request: Request) -> Response:
        return await count_tokens(request, engine, tools)

    if api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(ErrorBoundary)  # added last = outermost of ours
    return app
