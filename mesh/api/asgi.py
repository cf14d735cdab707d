"""ASGI plumbing for the HTTP API: error boundary, API-key check, disconnect watching and an
SSE response that cancels work when the client leaves.

Knows ASGI and OpenAI's error JSON (``ApiError.to_json``), not engines, requests or models.
Spec: specs/api.md (A1 error shape, A2 internal failures are 503 without a traceback,
A7 disconnect cancels, A12 API key, A18 the dashboard page needs no key).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh.errors import ApiError

log = logging.getLogger("mesh.api.app")

# /health (spec A9) and the dashboard page / (spec A18, which holds no data) need no key
UNAUTHENTICATED_PATHS = frozenset({"/health", "/"})
T = TypeVar("T")


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that echoes client input (which may hold
    lone surrogates, valid JSON but not encodable as UTF-8) always renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return AsciiJSONResponse(error.to_json(), status_code=error.status, headers=headers)


def server_error(message: str, *, code: str = "service_unavailable") -> ApiError:
    return ApiError(message, status=503, type="server_error", code=code)


class ClientDisconnected(Exception):
    """The HTTP client went away while we were working for it."""


class ErrorBoundary:
    """ASGI middleware: an unexpected exception is logged with its traceback and answered
    503 with OpenAI's error JSON (spec A2), never a traceback; not re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception(
                "unhandled error in %s %s (incident %s)",
                scope.get("method"),
                scope.get("path"),
                incident,
            )
            if started:
                return  # headers are out; all we can do is end the response
            error = server_error(
                f"Internal error in the mesh node (incident {incident}); see the node's log.",
                code="internal_error",
            )
            await error_response(error)(scope, receive, send)


class ApiKeyCheck:
    """ASGI middleware: ``Authorization: Bearer <api_key>`` (or ``x-api-key: <api_key>``, the
    header Anthropic's clients send) on every path but /health and the dashboard page /
    (spec A12, A18); 401 ``invalid_api_key`` otherwise."""

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        header = headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        x_api_key = headers.get(b"x-api-key")
        if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        header = header or (x_api_key or b"")
        message = (
            "Incorrect API key provided."
            if header
            else "You didn't provide an API key. Send it in an Authorization header using "
            "Bearer auth (Authorization: Bearer YOUR_KEY)."
        )
        if scope["path"].startswith("/v1/messages"):  # Anthropic's API answers in Anthropic's error shape
            body = {"type": "error", "error": {"type": "authentication_error", "message": message}}
            await JSONResponse(body, status_code=401)(scope, receive, send)
            return
        error = ApiError(message, status=401, code="invalid_api_key")
        await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ClientDisconnected.

    Only call after the request body has been read: the disconnect watcher consumes
    ``receive``. Spec A7: cancelling ``work`` closes the engine's iterator.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        for task in (work_task, watch_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that watches for the client leaving.

    Unlike starlette's StreamingResponse it always listens for ``http.disconnect`` (whatever
    the ASGI spec version) and always ``aclose()``s the event generator, so the engine's
    iterator is closed promptly when the client goes away (spec A7).
    """

    def __init__(
        self, events: AsyncGenerator[bytes, None], *, on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            events,
            status_code=200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type="text/event-stream",
        )
        self._events = events
        # Closing a generator that never started skips its `finally`, so the engine's
        # iterator is closed here as well (idempotent).
        self._on_close = on_close

    async def _pump(self, send: Send) -> None:
        async for chunk in self._events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        results: tuple[BaseException | None, ...] = (None, None)
        try:
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
            except OSError as e:
                log.info("client went away before the stream started: %s", e)
                return
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(wait_disconnect(receive))
            try:
                await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watch):
                    task.cancel()
                results = tuple(await asyncio.gather(pump, watch, return_exceptions=True))
        finally:
            await self._events.aclose()
            await self._on_close()
        if isinstance(results[0], OSError):
            log.info("client went away mid-stream: %s", results[0])
        elif isinstance(results[0], Exception):
            raise results[0]
