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

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from mesh.api.asgi import (
    ApiKeyCheck,
    ClientDisconnected,
    ErrorBoundary,
    EventStream,
    error_response,
    server_error,
    unless_disconnected,
)
from mesh.api.openai_schema import (
    ChatCompletionRequest,
    check_supported,
    format_param,
    validation_error_to_api_error,
)
from mesh.api.textstream import TextStream
from mesh.errors import ApiError, MeshError, RequestFailed
from mesh.runtime.engine import ClusterStatus, Engine, SamplingParams

RETRY_AFTER_S = "1"  # seconds a client should wait before retrying a 503

log = logging.getLogger("mesh.api.app")

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CHARS_PER_TOKEN = 64  # a token is never longer than this many characters in practice


# -- errors ---------------------------------------------------------------------------------


def _engine_failure(error: MeshError) -> ApiError:
    """The API error for a MeshError from the engine: its own if it is an ApiError, else 503."""
    if isinstance(error, ApiError):
        return error
    code = "request_failed" if isinstance(error, RequestFailed) else "service_unavailable"
    return server_error(f"The cluster could not serve this request: {error}", code=code)


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


# -- request handling helpers ---------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # json.loads accepts NaN/Infinity; JSON not


async def _read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; ApiError 400 (malformed, not an object) or 413 (too big)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(
                f"Request body exceeds {MAX_BODY_BYTES} bytes.",
                status=413,
                code="request_too_large",
            )
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(Content-Type: application/json).",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(
            f"The request body must be a JSON object, not {type(body).__name__}.",
            code="invalid_json",
        )
    return body


class _Generation:
    """One request's token stream turned into text pieces, usage and a finish reason.

    Owns the engine's iterator and closes it in ``aclose`` (spec A7). ``finish_reason``:
    "stop" on EOS or a stop string, "length" at ``max_tokens`` (spec A8).
    """

    def __init__(
        self, engine: Engine, prompt_ids: list[int], params: SamplingParams, stop: list[str]
    ) -> None:
        self._text = TextStream(engine.tokenizer, stop=stop, prompt_tail_ids=prompt_ids)
        self._eos = frozenset() if params.ignore_eos else engine.eos_token_ids
        self._max_tokens = params.max_tokens
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._first: int | None = None
        self._started = False
        self._tokens = engine.generate(prompt_ids, params)

    async def _next_token(self) -> int | None:
        try:
            return await anext(self._tokens)
        except StopAsyncIteration:
            return None

    async def start(self) -> None:
        """Wait for the first token, so failures before it can still get a 503."""
        self._first = await self._next_token()
        self._started = True

    async def pieces(self) -> AsyncGenerator[str, None]:
        """Text pieces to send, possibly empty; sets ``finish_reason`` before the last."""
        if not self._started:
            await self.start()
        token = self._first
        while True:
            if token is None:  # the engine ended without EOS
                self.finish_reason = (
                    "length" if self.completion_tokens >= self._max_tokens else "stop"
                )
                yield self._text.finish()
                return
            self.completion_tokens += 1
            if token in self._eos:
                self.finish_reason = "stop"
                yield self._text.finish()
                return
            piece = self._text.push(token)
            if self._text.stopped:  # spec A5: emit text before the stop string, then cancel
                self.finish_reason = "stop"
                yield piece
                return
            if self.completion_tokens >= self._max_tokens:
                self.finish_reason = "length"
                yield piece + self._text.finish()
                return
            yield piece
            token = await self._next_token()

    async def aclose(self) -> None:
        aclose: Callable[[], Awaitable[None]] | None = getattr(self._tokens, "aclose", None)
        if aclose is not None:
            await aclose()

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _sse(data: dict[str, Any] | str) -> bytes:
    text = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {text}\n\n".encode()


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
    for ``created`` fields. Routes: POST /v1/chat/completions, GET /v1/models,
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

    def model_not_found(model: str) -> ApiError:
        return ApiError(
            f"The model '{model}' does not exist; this node serves '{engine.model_id}'.",
            status=404,
            param="model",
            code="model_not_found",
        )

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
            raise model_not_found(model)
        return JSONResponse(model_card())

    @app.get("/v1/cluster")
    async def cluster() -> Response:
        try:
            return JSONResponse(status.cluster_info())
        except MeshError as e:
            raise _engine_failure(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_json_object(request)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error_to_api_error(e) from None
        check_supported(req)
        if req.model != engine.model_id:
            raise model_not_found(req.model)
        admit, reason = status.admits()  # spec A9: a plan that is loading holds the request instead
        if not admit:
            raise server_error(f"The cluster is not ready: {reason}")
        chars = sum(len(m.content) for m in req.messages)
        if chars > engine.context_length * MAX_CHARS_PER_TOKEN:
            # No tokenizer yields fewer tokens than this bound allows: reject before paying
            # for tokenizing a huge body.
            raise ApiError(
                f"The messages hold {chars} characters, far beyond the model's context window of "
                f"{engine.context_length} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            # Tokenizing runs off the event loop so heartbeats and other requests go on.
            prompt_ids = await asyncio.to_thread(engine.encode_chat, [m.to_template() for m in req.messages])
        except MeshError as e:
            raise _engine_failure(e) from None
        params = SamplingParams(
            max_tokens=_max_tokens(req, len(prompt_ids), engine.context_length),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            ignore_eos=bool(req.ignore_eos),
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(clock())
        try:
            generation = _Generation(engine, prompt_ids, params, req.stop_strings)
        except MeshError as e:
            raise _engine_failure(e) from None
        log.info(
            "%s: %d prompt tokens, max_tokens %d, stream %s",
            completion_id,
            len(prompt_ids),
            params.max_tokens,
            bool(req.stream),
        )
        handed_over = False
        try:
            await unless_disconnected(request.receive, generation.start())
            if req.stream:
                events = _stream_events(
                    generation,
                    completion_id,
                    created,
                    engine.model_id,
                    include_usage=req.include_usage,
                )
                handed_over = True  # the event stream closes the generation now
                return EventStream(events, on_close=generation.aclose)
            text = await unless_disconnected(request.receive, _collect(generation))
        except MeshError as e:
            raise _engine_failure(e) from None
        except ClientDisconnected:
            log.info("%s: client disconnected; generation cancelled", completion_id)
            return Response(status_code=499)
        finally:
            if not handed_over:
                await generation.aclose()
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": engine.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": generation.finish_reason,
                    }
                ],
                "usage": generation.usage,
                "system_fingerprint": None,
            }
        )

    if api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(ErrorBoundary)  # added last = outermost of ours
    return app


def _max_tokens(req: ChatCompletionRequest, prompt_tokens: int, context_length: int) -> int:
    """Spec A11: prompt + max_tokens must fit the context; the default is what is left."""
    requested = req.requested_max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if prompt_tokens >= context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens, leaving no room for a completion. "
            "Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is None:
        return context_length - prompt_tokens
    if prompt_tokens + requested > context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the messages, "
            f"{requested} in the completion). Please reduce the length of the messages or "
            "completion.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


async def _collect(generation: _Generation) -> str:
    return "".join([piece async for piece in generation.pieces()])


async def _stream_events(
    generation: _Generation,
    completion_id: str,
    created: int,
    model: str,
    *,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """SSE events of one streamed completion (spec A3, A4); closes the generation."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        event: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            event["usage"] = None
        return _sse(event)

    pieces = generation.pieces()
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in pieces:
            if piece:
                yield chunk({"content": piece})
        yield chunk({}, generation.finish_reason)
        if include_usage:
            yield _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": generation.usage,
                }
            )
    except MeshError as e:
        log.warning("%s: failed mid-stream: %s", completion_id, e)
        yield _sse(_engine_failure(e).to_json())
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("%s: unexpected error mid-stream (incident %s)", completion_id, incident)
        yield _sse(
            server_error(
                f"Internal error in the mesh node (incident {incident}); see the node's log.",
                code="internal_error",
            ).to_json()
        )
    finally:
        await pieces.aclose()
        await generation.aclose()
    yield _sse("[DONE]")
