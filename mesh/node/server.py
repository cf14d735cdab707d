"""The node's process plumbing: the HTTP API server without uvicorn's signal capture, the
node's own SIGINT/SIGTERM handling (a graceful stop first, a second signal exits at once),
and waiting for the first of several events. Spec: specs/node.md N11.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.api.asgi import AsciiJSONResponse, server_error
from mesh.errors import MeshError

log = logging.getLogger(__name__)


class ApiServer(uvicorn.Server):
    """uvicorn without its own signal capture: the node handles SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class Starting:
    """ASGI app of a node whose API port is open before its model is ready (spec N4, A9): every
    HTTP request is answered 503 with ``/health``'s body (``status``, ``reason`` and the A1
    error JSON) and ``Retry-After: 1`` until ``app`` is set, then handed to ``app``."""

    def __init__(self, reason: str = "the node is starting") -> None:
        self.app: ASGIApp | None = None
        self.reason = reason

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        body = server_error(f"Not ready: {self.reason}").to_json()
        await AsciiJSONResponse({"status": "unavailable", "reason": self.reason, **body}, status_code=503,
                                headers={"Retry-After": "1"})(scope, receive, send)


def api_server(app: Any, host: str, port: int) -> ApiServer:
    return ApiServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=2))


async def serve_api(server: ApiServer, sock: socket.socket, where: str, stop: Callable[[], None]) -> None:
    """Serve HTTP on ``sock`` until ``server.should_exit``; then ``stop()`` the node (the API
    exits only when the node stops). Raises MeshError when it cannot serve."""
    try:
        await server.serve(sockets=[sock])
    except (OSError, SystemExit) as exc:
        raise MeshError(f"HTTP API cannot serve on {where}: {exc}") from exc
    if not server.started:
        raise MeshError(f"HTTP API failed to start on {where}")
    stop()


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` (a graceful stop lets the streams in flight finish, up to
    ``--drain-s``, spec N20); a second signal exits the process at once."""
    signalled = False

    def on_signal() -> None:
        nonlocal signalled
        if signalled:
            log.warning("second interrupt: exiting at once")
            os._exit(130)
        signalled = True
        log.info("stopping: running requests may finish, new ones are refused (press Ctrl-C again to exit at once)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal)


async def first_of(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
