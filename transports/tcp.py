"""TCP transport: asyncio streams around the sans-IO codec of ``transports/framing.py``.

A thin shell: read bytes, feed the decoder, queue what it returns; encode, write, drain.
It knows nothing of what messages mean. Registered as the ``tcp`` entry point of
``mesh.transports``. Spec: specs/transport.md T4, T6, T7, T8.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from mesh.errors import (
    AuthenticationError,
    ConfigError,
    FrameError,
    PeerTimeout,
    TransportError,
)
from mesh.security import LinkSecurity, PeerIdentity
from mesh.wire import Message
from transports.base import (
    Connection,
    ConnectionHandler,
    LinkStats,
    Listener,
    Transport,
    check_lane,
)
from transports.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameEncoder

logger = logging.getLogger(__name__)

STREAM_LIMIT_BYTES = 1024 * 1024  # asyncio reader buffer; larger reads suit tensor traffic
READ_CHUNK_BYTES = 1024 * 1024
WRITE_CHUNK_BYTES = 1024 * 1024
WRITE_HIGH_WATER_BYTES = 4 * 1024 * 1024  # drain() lets this much queue in user space
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


async def _secure(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, security: LinkSecurity, *,
                  server_side: bool, timeout_s: float, peer: str) -> PeerIdentity:
    """Run a TLS 1.3 handshake with mutual authentication on an open stream (spec S3).

    Raises AuthenticationError (the peer is not of this cluster, or its certificate does not
    hold an Ed25519 node key) or PeerTimeout; the caller closes the stream.
    """
    import ssl

    try:
        async with asyncio.timeout(timeout_s):
            await writer.start_tls(security.ssl_context(server_side=server_side),
                                   server_hostname=None, ssl_handshake_timeout=timeout_s)
    except TimeoutError:
        raise PeerTimeout(f"TLS handshake with {peer} did not finish within {timeout_s}s") from None
    except ssl.SSLError as exc:
        raise AuthenticationError(f"TLS handshake with {peer} failed: {exc.reason or exc}") from None
    except (ConnectionError, OSError) as exc:
        raise AuthenticationError(f"TLS handshake with {peer} failed: the peer closed the link "
                                  f"({exc.__class__.__name__}); it may not hold this cluster's key") from None
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return security.verify_peer(der)


def _format_peer(peername: Any, fallback: str) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return fallback


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    # spec T8: small control frames must not wait for Nagle's algorithm.
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. macOS gives EINVAL once the peer has gone; recv reports it
            logger.debug("could not set TCP_NODELAY: %s", exc)


class TcpConnection(Connection):
    """A framed TCP link. Built by ``TcpTransport``; see ``Connection`` for the contract."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 peer: str, max_frame_bytes: int, close_timeout_s: float,
                 on_closed: Callable[[TcpConnection], None] | None = None,
                 peer_identity: PeerIdentity | None = None) -> None:
        self._peer_identity = peer_identity
        self._reader = reader
        self._writer = writer
        self._peer = _format_peer(writer.get_extra_info("peername"), peer)
        self._encoder = FrameEncoder(max_frame_bytes=max_frame_bytes)
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self._inbox: deque[Message] = deque()
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._close_timeout_s = close_timeout_s
        self._on_closed = on_closed
        self._closed_reason: str | None = None
        self._closed_locally = False
        self._frames_sent = self._frames_received = self._bytes_sent = self._bytes_received = 0
        _set_nodelay(writer)
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def peer_identity(self) -> PeerIdentity | None:
        return self._peer_identity

    @property
    def stats(self) -> LinkStats:
        return LinkStats(frames_sent=self._frames_sent, frames_received=self._frames_received,
                         bytes_sent=self._bytes_sent, bytes_received=self._bytes_received)

    @property
    def tcp_nodelay(self) -> bool:
        """Whether TCP_NODELAY is set on the socket (spec T8)."""
        sock = self._writer.get_extra_info("socket")
        return sock is not None and bool(
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        check_lane(lane)  # one byte stream: every lane shares its order (spec T11)
        self._raise_if_closed()
        parts = self._encoder.encode_parts(msg)  # a bad local message leaves the link open
        size = sum(len(p) for p in parts)
        transport = self._writer.transport
        if (size <= WRITE_CHUNK_BYTES and not self._send_lock.locked()
                and transport.get_write_buffer_size() + size <= WRITE_HIGH_WATER_BYTES):
            # Fast path: nothing queued ahead and room below the high-water mark, so the
            # frame is handed over whole (spec T6) with no wait that could need a timeout.
            self._writer.writelines(parts)
            self._frames_sent += 1
            self._bytes_sent += size
            return
        written = False
        try:
            async with asyncio.timeout(timeout_s):
                async with self._send_lock:  # spec T6: one whole frame at a time
                    self._raise_if_closed()
                    if size <= WRITE_CHUNK_BYTES:
                        self._writer.writelines(parts)
                        written = True
                    else:
                        # asyncio (3.11) copies unsent bytes into one growing buffer and shifts
                        # it after every send: hand it a chunk at a time so it stays small.
                        for part in parts:
                            view = memoryview(part)
                            for offset in range(0, len(view), WRITE_CHUNK_BYTES):
                                self._writer.write(view[offset:offset + WRITE_CHUNK_BYTES])
                                written = True
                                await self._writer.drain()
                    self._frames_sent += 1
                    self._bytes_sent += size
                    await self._writer.drain()
        except TimeoutError:
            if written:  # the peer may have part of the frame: the link is unusable
                self._close_now(f"send of {size} bytes timed out", abort=True)
            raise PeerTimeout(
                f"send of {msg.type!r} ({size} bytes) to {self._peer} did not finish within "
                f"{timeout_s}s"
            ) from None
        except (ConnectionError, OSError) as exc:
            self._close_now(f"send failed: {exc}")
            raise TransportError(f"send to {self._peer} failed: {exc!r}") from exc

    async def recv(self, *, timeout_s: float | None = None) -> Message:
        if self._closed_locally:
            self._raise_if_closed()
        if self._inbox:  # messages that arrived before a peer close or a bad frame go first
            self._frames_received += 1
            return self._inbox.popleft()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._recv_lock:
                    while not self._inbox:
                        await self._read_some()
                    self._frames_received += 1
                    return self._inbox.popleft()
        except TimeoutError:
            raise PeerTimeout(f"no message from {self._peer} within {timeout_s}s") from None

    async def _read_some(self) -> None:
        self._raise_if_closed()
        try:
            data = await self._reader.read(READ_CHUNK_BYTES)
        except (ConnectionError, OSError) as exc:
            self._close_now(f"reset: {exc!r}")
            raise TransportError(f"connection to {self._peer} was reset: {exc!r}") from exc
        if not data:  # EOF: the peer closed, or we closed and fed EOF ourselves (spec T7)
            if self._closed_reason is None:
                partial = self._decoder.buffered_bytes
                detail = f" in the middle of a frame ({partial} bytes)" if partial else ""
                self._close_now(f"closed by peer{detail}")
            self._raise_if_closed()
        self._bytes_received += len(data)
        try:
            messages = self._decoder.feed(data)
        except FrameError as exc:  # spec T4: a malformed frame closes this link only
            self._close_now(f"malformed frame: {exc}")
            raise FrameError(f"malformed frame from {self._peer}: {exc}") from exc
        self._inbox.extend(messages)

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise TransportError(f"connection to {self._peer} is closed ({self._closed_reason})")
        if self._decoder.error is not None:
            self._close_now(f"malformed frame: {self._decoder.error}")
            raise FrameError(f"malformed frame from {self._peer}: {self._decoder.error}")

    def _close_now(self, reason: str, *, abort: bool = False, local: bool = False) -> None:
        """Close without waiting: mark closed, start the socket close, wake pending recv."""
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        self._closed_locally = local
        if abort:  # drop unsent bytes rather than wait for a peer that is not reading
            self._writer.transport.abort()
        else:
            self._writer.close()
        self._reader.feed_eof()  # a recv blocked in read() returns now, not at connection_lost
        if self._on_closed is not None:
            self._on_closed(self)

    async def close(self) -> None:
        self._close_now("closed locally", local=True)
        # Several tasks may close one connection; wait_closed() awaits one shared future, so
        # wait through a shield: our timeout must never cancel another closer's wait.
        closing = asyncio.ensure_future(self._writer.wait_closed())
        closing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(closing), self._close_timeout_s)
        except TimeoutError:  # unsent data and a peer not reading: drop it
            self._writer.transport.abort()
        except (ConnectionError, OSError):
            pass  # the link failed while closing; it is closed either way


class TcpListener(Listener):
    """A TCP server; see ``Listener`` for the contract."""

    def __init__(self, host: str, on_connection: ConnectionHandler, *, max_frame_bytes: int,
                 close_timeout_s: float, security: LinkSecurity | None = None,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> None:
        self._security = security
        self._handshake_timeout_s = handshake_timeout_s
        self._host = host
        self._port = 0
        self._on_connection = on_connection
        self._max_frame_bytes = max_frame_bytes
        self._close_timeout_s = close_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[TcpConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    async def start(self, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, port, limit=STREAM_LIMIT_BYTES)
        except OSError as exc:
            raise TransportError(f"cannot listen on {self._host}:{port}: {exc}") from exc
        self._port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:  # tracked from the start: close() waits for (or cancels) handshakes too
            self._tasks.add(task)
        identity = None
        if self._security is not None:
            peer = _format_peer(writer.get_extra_info("peername"), "?")
            try:
                identity = await _secure(reader, writer, self._security, server_side=True,
                                         timeout_s=self._handshake_timeout_s, peer=peer)
            except TransportError as exc:  # spec S4: log, drop this link, keep serving
                logger.warning("rejected a link from %s: %s", peer, exc)
                writer.transport.abort()
                self._tasks.discard(task)  # type: ignore[arg-type]
                return
            if self._closing:  # the listener closed during the handshake: hand nothing on
                writer.transport.abort()
                self._tasks.discard(task)  # type: ignore[arg-type]
                return
        conn = TcpConnection(reader, writer, peer="?", max_frame_bytes=self._max_frame_bytes,
                             close_timeout_s=self._close_timeout_s,
                             on_closed=self._connections.discard, peer_identity=identity)
        self._connections.add(conn)
        try:
            await self._on_connection(conn)
        except TransportError as exc:
            logger.warning("tcp listener %s:%s: connection from %s failed: %s",
                           self._host, self._port, conn.peer, exc)
            await conn.close()
        except Exception:
            logger.exception("tcp listener %s:%s: handler for %s raised",
                             self._host, self._port, conn.peer)
            await conn.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for conn in connections:
            conn._close_now("listener closed", local=True)
        # Handlers see their recv fail and end; those that do not are cancelled.
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._close_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self._close_timeout_s)
        await asyncio.gather(*(conn.close() for conn in connections))  # bounded once, not per peer
        if self._server is not None:
            try:
                async with asyncio.timeout(self._close_timeout_s):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.warning("tcp listener %s:%s did not close within %ss",
                               self._host, self._port, self._close_timeout_s)


class TcpTransport(Transport):
    """Framed messages over TCP (spec T3-T8), inside TLS 1.3 with mutual authentication
    when given a ``LinkSecurity`` (spec S3); plaintext when ``security`` is None.

    ``max_frame_bytes`` bounds every frame sent or received (spec T5);
    ``close_timeout_s`` bounds each wait while closing a connection or listener;
    ``handshake_timeout_s`` bounds the TLS handshake.
    """

    name = "tcp"
    secure = True

    def __init__(self, *, security: LinkSecurity | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, close_timeout_s: float = 2.0,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> None:
        FrameEncoder(max_frame_bytes=max_frame_bytes)  # validates the bound
        if not close_timeout_s > 0 or not handshake_timeout_s > 0:
            raise ConfigError(f"close_timeout_s and handshake_timeout_s must be > 0, got "
                              f"{close_timeout_s}, {handshake_timeout_s}")
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        self.close_timeout_s = close_timeout_s
        self.handshake_timeout_s = handshake_timeout_s

    async def listen(self, host: str, port: int,
                     on_connection: ConnectionHandler) -> TcpListener:
        _check_port(port)
        listener = TcpListener(host, on_connection, max_frame_bytes=self.max_frame_bytes,
                               close_timeout_s=self.close_timeout_s, security=self.security,
                               handshake_timeout_s=self.handshake_timeout_s)
        await listener.start(port)
        return listener

    async def connect(self, host: str, port: int, *, timeout_s: float) -> TcpConnection:
        _check_port(port)
        address = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port,
                                                               limit=STREAM_LIMIT_BYTES)
        except TimeoutError:
            raise PeerTimeout(f"connect to {address} did not finish within {timeout_s}s") from None
        except OSError as exc:
            raise TransportError(f"connect to {address} failed: {exc}") from exc
        identity = None
        if self.security is not None:
            try:
                identity = await _secure(reader, writer, self.security, server_side=False,
                                         timeout_s=min(timeout_s, self.handshake_timeout_s), peer=address)
            except TransportError:
                writer.transport.abort()
                raise
        return TcpConnection(reader, writer, peer=address, max_frame_bytes=self.max_frame_bytes,
                             close_timeout_s=self.close_timeout_s, peer_identity=identity)


def _check_port(port: int) -> None:
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port {port!r} invalid; valid: an integer 0..65535")
