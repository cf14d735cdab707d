"""The harness of the transport conformance suite (``mesh/testing/transport_conformance.py``):
``TransportFactory``, raw byte-stream openers for malformed-input cases, a connected-pair
harness, and small helpers. It holds no tests; every wait in it is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh.errors import (
    ConfigError,
    TransportError,
)
from mesh.security import CLUSTER_KEY_BYTES, LinkSecurity
from mesh.wire import Message, WireTensor
from transports.base import Connection, ConnectionHandler, Listener, Transport
from transports.framing import DEFAULT_MAX_FRAME_BYTES

HOST = "127.0.0.1"
T = 10.0  # bound on a wait that should succeed quickly (TLS handshakes on a busy 2-core CI)
PROMPT_S = 5.0  # "promptly": well below every timeout the waiting call was given
MIB = 1024 * 1024


# --------------------------------------------------------------------------- factory


class RawLink(Protocol):
    """A byte stream to a listener that skips the transport's framing (malformed-frame tests)."""

    async def write(self, data: bytes) -> None:
        """Write ``data`` as it is."""

    async def wait_closed(self, timeout_s: float) -> None:
        """Return once the listener closed the stream; raise TimeoutError after ``timeout_s``."""

    async def close(self) -> None:
        """Close our end."""


RawOpener = Callable[[Transport, str, int, LinkSecurity | None], Awaitable[RawLink]]


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportFactory:
    """How the suite builds the transport under test: ``factory(security) -> Transport``.

    ``secure``: this run gives every transport a ``LinkSecurity`` (else ``None``).
    ``independent_lanes``: the transport promises lanes never wait for each other (T11).
    ``max_message_bytes``: the largest frame the transport accepts (default: the codec's).
    ``open_raw``: opens a raw byte stream to a listener, or None when there is no such way.
    """

    name: str
    make: Callable[[LinkSecurity | None], Transport]
    secure: bool
    independent_lanes: bool = False
    max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES
    open_raw: RawOpener | None = None
    host: str = HOST

    def __call__(self, security: LinkSecurity | None) -> Transport:
        return self.make(security)

    @property
    def id(self) -> str:
        """A test id such as ``tcp-secure``."""
        return f"{self.name}-{'secure' if self.secure else 'insecure'}"

    @classmethod
    def for_class(cls, transport_cls: type[Transport], *, secure: bool,
                  make: Callable[[LinkSecurity | None], Transport] | None = None,
                  **overrides: Any) -> TransportFactory:
        """A factory for ``transport_cls`` built as ``transport_cls(security=...)``, reading
        ``name`` and ``independent_lanes`` (default False) from the class."""
        from transports.memory import MemoryTransport
        from transports.tcp import TcpTransport

        name = str(getattr(transport_cls, "name", transport_cls.__name__))
        opener: RawOpener | None = None
        if issubclass(transport_cls, MemoryTransport):
            opener = _open_raw_memory
        elif issubclass(transport_cls, TcpTransport) or name in ("tcp", "tbip"):
            opener = _open_raw_tcp
        values: dict[str, Any] = {
            "name": name,
            "make": make if make is not None else (lambda security: transport_cls(security=security)),  # type: ignore[call-arg]
            "secure": secure,
            "independent_lanes": bool(getattr(transport_cls, "independent_lanes", False)),
            "open_raw": opener,
        }
        values.update(overrides)
        return cls(**values)


class _TcpRaw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def wait_closed(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            try:
                while await self._reader.read(65536):
                    pass
            except (ConnectionError, OSError):
                pass  # a reset is a close too

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(T):
                await self._writer.wait_closed()


async def _open_raw_tcp(transport: Transport, host: str, port: int,
                        security: LinkSecurity | None) -> RawLink:
    """A TCP stream, inside TLS with a valid certificate when ``security`` is given."""
    ssl_context = security.ssl_context(server_side=False) if security is not None else None
    async with asyncio.timeout(T):
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
    return _TcpRaw(reader, writer)


class _MemoryRaw:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def write(self, data: bytes) -> None:
        await self._conn.send_raw(data, timeout_s=T)  # type: ignore[attr-defined]

    async def wait_closed(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            with contextlib.suppress(TransportError):
                while True:
                    await self._conn.recv()

    async def close(self) -> None:
        await self._conn.close()


async def _open_raw_memory(transport: Transport, host: str, port: int,
                           security: LinkSecurity | None) -> RawLink:
    return _MemoryRaw(await transport.connect(host, port, timeout_s=T))


# --------------------------------------------------------------------------- harness


class _Harness:
    """One listening transport and its clients for one test; closes everything at the end."""

    def __init__(self, factory: TransportFactory, tmp_path: Path) -> None:
        self.factory = factory
        self.tmp_path = tmp_path
        self.cluster_key = os.urandom(CLUSTER_KEY_BYTES)
        if factory.secure:
            self.server_security: LinkSecurity | None = self.security("server")
            self.client_security: LinkSecurity | None = self.security("client")
        else:
            self.server_security = self.client_security = None
        self.server = self.transport(self.server_security)
        self.client = self.transport(self.client_security)
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.listener: Listener | None = None
        self._listeners: list[Listener] = []
        self._connections: list[Connection] = []

    def security(self, name: str, cluster_key: bytes | None = None) -> LinkSecurity:
        """A fresh node identity in this cluster (or in the one of ``cluster_key``)."""
        return LinkSecurity(ed25519.Ed25519PrivateKey.generate(),
                            self.cluster_key if cluster_key is None else cluster_key,
                            self.tmp_path / f"tls-{name}")

    def transport(self, security: LinkSecurity | None) -> Transport:
        """The transport under test; skips what it declares it cannot do."""
        transport = _build(self.factory, security)
        if security is not None and not type(transport).secure:
            pytest.skip(f"{self.factory.name} does not authenticate links (secure = False)")
        return transport

    async def _keep(self, conn: Connection) -> None:
        self.accepted.put_nowait(conn)  # returning leaves the connection open

    async def listen(self, handler: ConnectionHandler | None = None,
                     transport: Transport | None = None) -> Listener:
        """Listen on a free port of ``HOST``; by default accepted links go to ``accepted``."""
        listener = await (transport or self.server).listen(
            self.factory.host, 0, handler if handler is not None else self._keep)
        self._listeners.append(listener)
        if self.listener is None:
            self.listener = listener
        return listener

    async def connect(self, transport: Transport | None = None,
                      listener: Listener | None = None) -> Connection:
        target = listener or self.listener
        assert target is not None, "listen() first"
        conn = await (transport or self.client).connect(self.factory.host, target.port,
                                                         timeout_s=T)
        self._connections.append(conn)
        return conn

    async def pair(self) -> tuple[Connection, Connection]:
        """(client end, accepted server end) of a new link to the default listener."""
        if self.listener is None:
            await self.listen()
        client = await self.connect()
        server = await asyncio.wait_for(self.accepted.get(), T)
        self._connections.append(server)
        return client, server

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        while not self.accepted.empty():
            self._connections.append(self.accepted.get_nowait())
        for conn in self._connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), T)
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), T)


def _build(factory: TransportFactory, security: LinkSecurity | None) -> Transport:
    try:
        return factory(security)
    except ConfigError as exc:
        if security is None:
            pytest.skip(f"{factory.name} does not allow security=None: {exc}")
        raise


@contextlib.asynccontextmanager
async def _harness(factory: TransportFactory, tmp_path: Path) -> AsyncIterator[_Harness]:
    async with _Harness(factory, tmp_path) as harness:
        yield harness


def _msg(type_: str = "m", *, data: bytes | None = None, **body: Any) -> Message:
    tensor = None if data is None else WireTensor(dtype="u8", shape=(len(data),), data=data)
    return Message(type=type_, body=body, tensor=tensor)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _pseudo_random(n: int, seed: bytes = b"mesh transport conformance") -> bytes:
    """``n`` deterministic pseudo-random bytes (SHAKE-128 of a fixed seed): random-looking, so
    a misplaced chunk changes the hash, and the same in every run."""
    return hashlib.shake_128(seed).digest(n)


async def _recv_until_error(conn: Connection, timeout_s: float) -> tuple[list[Message], TransportError]:
    got: list[Message] = []
    while True:
        try:
            got.append(await conn.recv(timeout_s=timeout_s))
        except TransportError as exc:
            return got, exc


async def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until true (a state change we cannot await directly)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


# --------------------------------------------------------------------------- shared by the transport tests

ECHO_TIMEOUT_S = 5.0  # an echo handler gives up on a silent peer after this


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` the OS just handed out and nothing listens on: an address that
    refuses connections, or one to listen on (another process may take it in between)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def echo(conn: Connection, *, timeout_s: float = ECHO_TIMEOUT_S) -> None:
    """A connection handler that sends every message back as it came, until ``recv`` raises
    (the peer closed, or sent nothing for ``timeout_s`` seconds: ``TransportError``)."""
    while True:
        msg = await conn.recv(timeout_s=timeout_s)
        await conn.send(msg, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def serving(transport: Transport, handler: ConnectionHandler = echo, host: str = HOST) -> AsyncIterator[int]:
    """Listen on ``host`` (a port the OS picks) with ``handler`` (default: ``echo``) for the
    body of the ``async with``, which gets the port; the listener is closed on the way out."""
    listener = await transport.listen(host, 0, handler)
    try:
        yield listener.port
    finally:
        await listener.close()
