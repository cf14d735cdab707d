"""TCP transport: an asyncio protocol around the sans-IO codec of ``transports/framing.py``.

A thin shell: bytes arrive in ``data_received`` and go straight into the decoder; finished
messages wait in an inbox for ``recv``; ``send`` encodes and writes. It knows nothing of what
messages mean. A protocol (not asyncio streams) keeps a small message to one callback, one
decode and one wake-up, and lets a large tensor be gathered without an extra stream buffer.
With a ``LinkSecurity`` every connection first runs a TLS 1.3 handshake with mutual
authentication (``loop.start_tls``). Registered as the ``tcp`` entry point of
``mesh.transports``. Spec: specs/transport.md T4, T6, T7, T8, T12, T13; specs/security.md S3, S4.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
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
from mesh.netif import Address, check_port
from mesh.security import LinkSecurity, PeerIdentity
from mesh.wire import Message
from transports.base import (
    ConnectionHandler,
    LinkState,
    ListenerState,
    RejectLog,
    Transport,
    check_lane,
    serve_connection,
)
from transports.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameEncoder

logger = logging.getLogger(__name__)

WRITE_CHUNK_BYTES = 1024 * 1024
WRITE_HIGH_WATER_BYTES = 4 * 1024 * 1024  # send waits while more than this is queued in user space
INBOX_HIGH_WATER_BYTES = 8 * 1024 * 1024  # read ahead at most this much while no recv waits (T12)
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
# Connections still in their TLS handshake (unauthenticated): each holds ~300 KiB of TLS
# state; beyond these caps new ones are dropped at once, so a flood cannot exhaust memory.
MAX_HANDSHAKES = 128
MAX_HANDSHAKES_PER_HOST = 16


def _format_peer(peername: Any, fallback: str) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(Address(str(peername[0]), int(peername[1])))
    return fallback


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    # spec T8: small control frames must not wait for Nagle's algorithm.
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. macOS gives EINVAL once the peer has gone; recv reports it
            logger.debug("could not set TCP_NODELAY: %s", exc)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _LinkProtocol(asyncio.Protocol):
    """Hands transport callbacks to its ``TcpConnection``; reading stays paused until one is
    attached (a TLS handshake first takes the socket over)."""

    def __init__(self, on_made: Callable[[_LinkProtocol], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn: TcpConnection | None = None
        self.lost: Exception | None = None
        self.is_lost = False
        self.early: list[bytes] = []  # decrypted bytes that came with the end of a TLS handshake
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn._data_received(data)
        else:  # between a TLS handshake's end and the connection's attach (same tick or next)
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn._lost(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost, self.lost = True, exc
        if self.conn is not None:
            self.conn._lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._write_paused = True

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._write_paused = False
            self.conn._wake(self.conn._drain_waiters)


class TcpConnection(LinkState):
    """A framed TCP link. Built by ``TcpTransport``; see ``Connection`` for the contract."""

    def __init__(self, protocol: _LinkProtocol, *, peer: str, max_frame_bytes: int, close_timeout_s: float,
                 on_closed: Callable[[TcpConnection], None] | None = None,
                 peer_identity: PeerIdentity | None = None) -> None:
        assert protocol.transport is not None
        self._transport: asyncio.Transport = protocol.transport
        self._protocol = protocol
        self._peer = _format_peer(self._transport.get_extra_info("peername"), peer)
        self._peer_identity = peer_identity
        self._encoder = FrameEncoder(max_frame_bytes=max_frame_bytes)
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self._inbox: deque[tuple[Message, int]] = deque()
        self._inbox_bytes = 0
        self._reading_paused = True
        self._recv_waiters: list[asyncio.Future[None]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._send_lock = asyncio.Lock()
        self._close_timeout_s = close_timeout_s
        self._on_closed = on_closed
        self._closed_reason: str | None = None
        self._closed_locally = False
        self._frames_sent = self._frames_received = self._bytes_sent = self._bytes_received = 0
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        protocol.conn = self
        early, protocol.early = protocol.early, []
        for data in early:
            self._data_received(data)
        if protocol.is_lost:
            self._lost(protocol.lost)
        else:
            self._resume_reading()

    @property
    def tls_version(self) -> str | None:
        """The TLS version of this link ("TLSv1.3"), None when plaintext."""
        ssl_object = self._transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    @property
    def tcp_nodelay(self) -> bool:
        """Whether TCP_NODELAY is set on the socket (spec T8)."""
        sock = self._transport.get_extra_info("socket")
        return sock is not None and bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    # -- protocol callbacks ------------------------------------------------------------
    def _data_received(self, data: bytes) -> None:
        if self._closed_reason is not None:
            return
        self._bytes_received += len(data)
        try:
            messages = self._decoder.feed(data)
        except FrameError as exc:  # spec T4: a malformed frame closes this link only
            self._close_now(f"malformed frame: {exc}", abort=True)
            return
        for msg in messages:
            size = 64 + (len(msg.tensor.data) if msg.tensor is not None else 0)
            self._inbox.append((msg, size))
            self._inbox_bytes += size
        if self._decoder.error is not None:  # good messages came first; the error follows them
            self._close_now(f"malformed frame: {self._decoder.error}", abort=True)
        if (not self._reading_paused and not self._recv_waiters
                and self._inbox_bytes + self._decoder.buffered_bytes > INBOX_HIGH_WATER_BYTES):
            # spec T12: nobody is reading and enough is buffered; the peer's sends back up
            # into its socket until a recv wants more
            self._reading_paused = True
            self._transport.pause_reading()
        if messages:
            self._wake(self._recv_waiters)

    def _lost(self, exc: Exception | None) -> None:
        if self._closed_reason is None:
            partial = self._decoder.buffered_bytes
            if exc is not None:
                reason = f"reset: {exc!r}"
            else:
                reason = "closed by peer" + (f" in the middle of a frame ({partial} bytes)" if partial else "")
            self._closed_reason = reason
            if self._on_closed is not None:
                self._on_closed(self)
        self._wake(self._recv_waiters)
        self._wake(self._drain_waiters)

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._closed_reason is None:
            self._reading_paused = False
            self._transport.resume_reading()

    # -- Connection --------------------------------------------------------------------
    async def _wait(self, waiters: list[asyncio.Future[None]], deadline_s: float | None) -> None:
        """Wait for a wake-up on ``waiters`` until the loop time ``deadline_s`` (None: no
        limit); raises TimeoutError. A timer handle is cheaper than ``asyncio.timeout``."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        handle = loop.call_at(deadline_s, _expire, waiter) if deadline_s is not None else None
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            if waiter in waiters:
                waiters.remove(waiter)

    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        check_lane(lane)  # one byte stream: every lane shares its order (spec T11)
        self._raise_if_closed()
        self._raise_if_transport_closing()
        parts = self._encoder.encode_parts(msg)  # a bad local message leaves the link open
        size = sum(len(p) for p in parts)
        if (size <= WRITE_CHUNK_BYTES and not self._send_lock.locked() and not self._write_paused
                and self._transport.get_write_buffer_size() + size <= WRITE_HIGH_WATER_BYTES):
            # Fast path: nothing queued ahead and room below the high-water mark, so the
            # frame is handed over whole (spec T6) with no wait that could need a timeout.
            self._transport.writelines(parts)
            self._frames_sent += 1
            self._bytes_sent += size
            return
        deadline = asyncio.get_running_loop().time() + timeout_s
        written = False
        try:
            async with asyncio.timeout_at(deadline):
                async with self._send_lock:  # spec T6: one whole frame at a time
                    # asyncio (3.11) copies unsent bytes into one growing buffer and shifts it
                    # after every send: hand it a chunk at a time so it stays small.
                    for part in parts:
                        view = memoryview(part)
                        for offset in range(0, len(view), WRITE_CHUNK_BYTES):
                            while self._write_paused:
                                self._raise_if_closed()
                                await self._wait(self._drain_waiters, None)
                            self._raise_if_closed()
                            self._raise_if_transport_closing()
                            self._transport.write(view[offset:offset + WRITE_CHUNK_BYTES])
                            written = True
                    self._frames_sent += 1
                    self._bytes_sent += size
                    while self._write_paused:
                        self._raise_if_closed()
                        await self._wait(self._drain_waiters, None)
                    # A write that failed (the peer is gone) closes the transport at once but
                    # reports connection_lost only from the event loop: yield, so a caller that
                    # sends in a loop sees the close instead of spinning on a dead socket.
                    await asyncio.sleep(0)
        except TimeoutError:
            if written:  # the peer may have part of the frame: the link is unusable
                self._close_now(f"send of {size} bytes timed out", abort=True)
            raise PeerTimeout(
                f"send of {msg.type!r} ({size} bytes) to {self._peer} did not finish within {timeout_s}s"
            ) from None

    async def recv(self, *, timeout_s: float | None = None) -> Message:
        if self._closed_locally:
            self._raise_if_closed()
        if not self._inbox:
            deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
            while not self._inbox:
                self._raise_if_closed()
                self._resume_reading()  # a reader is waiting: take more from the socket
                try:
                    await self._wait(self._recv_waiters, deadline)
                except TimeoutError:
                    raise PeerTimeout(f"no message from {self._peer} within {timeout_s}s") from None
        msg, size = self._inbox.popleft()  # messages that arrived before a close go first
        self._inbox_bytes -= size
        self._frames_received += 1
        if self._reading_paused and self._inbox_bytes + self._decoder.buffered_bytes <= INBOX_HIGH_WATER_BYTES // 2:
            self._resume_reading()
        return msg

    def _raise_if_transport_closing(self) -> None:
        """asyncio closes a transport whose write failed before it calls connection_lost;
        sending on it would drop the bytes silently."""
        if self._transport.is_closing() and self._closed_reason is None:
            raise TransportError(f"connection to {self._peer} is closing")

    def _raise_if_closed(self) -> None:
        if self._decoder.error is not None and not self._inbox:
            raise FrameError(f"malformed frame from {self._peer}: {self._decoder.error}")
        if self._closed_reason is not None:
            raise TransportError(f"connection to {self._peer} is closed ({self._closed_reason})")

    def _close_now(self, reason: str, *, abort: bool = False, local: bool = False) -> None:
        """Close without waiting: mark closed, start the socket close, wake every waiter."""
        if self._closed_reason is not None:
            if local:
                self._closed_locally = True
            return
        self._closed_reason = reason
        self._closed_locally = local
        if abort:  # drop unsent bytes rather than wait for a peer that is not reading
            self._transport.abort()
        else:
            self._transport.close()
        self._wake(self._recv_waiters)
        self._wake(self._drain_waiters)
        if self._on_closed is not None:
            self._on_closed(self)

    async def close(self) -> None:
        self._close_now("closed locally", local=True)
        if self._protocol.is_lost:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout_s
        while not self._protocol.is_lost and loop.time() < deadline:
            try:  # connection_lost wakes the drain waiters
                await self._wait(self._drain_waiters, deadline)
            except TimeoutError:
                break
        if not self._protocol.is_lost:  # unsent data and a peer not reading: drop it
            self._transport.abort()


async def _secure(protocol: _LinkProtocol, security: LinkSecurity, *, server_side: bool, timeout_s: float,
                  peer: str) -> PeerIdentity:
    """Run a TLS 1.3 handshake with mutual authentication on a connected protocol (spec S3)
    and return the identity the peer proved; the protocol's transport becomes the TLS one.

    Raises AuthenticationError (the peer is not of this cluster, or its certificate does not
    hold an Ed25519 node key) or PeerTimeout; the caller aborts the socket.
    """
    loop = asyncio.get_running_loop()
    assert protocol.transport is not None
    try:
        async with asyncio.timeout(timeout_s):
            tls = await loop.start_tls(protocol.transport, protocol, security.ssl_context(server_side=server_side),
                                       server_side=server_side, server_hostname=None,
                                       ssl_handshake_timeout=timeout_s)
    except TimeoutError:
        raise PeerTimeout(f"TLS handshake with {peer} did not finish within {timeout_s}s") from None
    except ssl.SSLError as exc:
        raise AuthenticationError(f"TLS handshake with {peer} failed: {_explain_tls(exc, security)}") from None
    except (ConnectionError, OSError) as exc:
        raise AuthenticationError(
            f"TLS handshake with {peer} failed: the peer closed the link ({exc.__class__.__name__}); it may "
            f"hold another cluster key (this node's cluster is {security.cluster_fingerprint}; check "
            f"--cluster-key) or run with --insecure") from None
    if tls is None:
        raise AuthenticationError(f"TLS handshake with {peer} failed: the link closed")
    protocol.transport = tls
    tls.pause_reading()  # resumed when the TcpConnection is attached
    ssl_object = tls.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return security.verify_peer(der)


def _explain_tls(exc: ssl.SSLError, security: LinkSecurity) -> str:
    """A TLS failure in the words of its likely cause."""
    reason = exc.reason or str(exc)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE"):
        return f"{reason}: the peer speaks plaintext (started with --insecure?) or is not a mesh node"
    if reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                  "TLSV1_ALERT_DECRYPT_ERROR", "PEER_DID_NOT_RETURN_A_CERTIFICATE"):
        return (f"{reason}: its certificate is not from this cluster ({security.cluster_fingerprint}); "
                f"check --cluster-key on both nodes")
    return reason


class TcpListener(ListenerState[TcpConnection]):
    """A TCP server; see ``Listener`` for the contract."""

    def __init__(self, host: str, on_connection: ConnectionHandler, *, max_frame_bytes: int,
                 close_timeout_s: float, security: LinkSecurity | None = None,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> None:
        super().__init__(host, close_timeout_s=close_timeout_s)
        self._security = security
        self._handshake_timeout_s = handshake_timeout_s
        self._on_connection = on_connection
        self._max_frame_bytes = max_frame_bytes
        self._server: asyncio.Server | None = None
        self._handshakes: dict[str, int] = {}  # source host -> handshakes in flight
        self._rejects = RejectLog(logger)

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._protocol, self._host, port)
        except OSError as exc:
            raise TransportError(f"cannot listen on {self._host}:{port}: {exc}") from exc
        self._port = self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> _LinkProtocol:
        return _LinkProtocol(on_made=self._accepted)

    def _accepted(self, protocol: _LinkProtocol) -> None:
        self._spawn(self._serve(protocol), "tcp accept")

    async def _serve(self, protocol: _LinkProtocol) -> None:
        assert protocol.transport is not None
        if self._closing:
            protocol.transport.abort()
            return
        peer = _format_peer(protocol.transport.get_extra_info("peername"), "?")
        host = peer.rpartition(":")[0]
        identity = None
        if self._security is not None:
            if sum(self._handshakes.values()) >= MAX_HANDSHAKES or self._handshakes.get(host, 0) >= MAX_HANDSHAKES_PER_HOST:
                self._rejects.rejected(peer, "too many TLS handshakes in flight")
                protocol.transport.abort()
                return
            self._handshakes[host] = self._handshakes.get(host, 0) + 1
            try:
                identity = await _secure(protocol, self._security, server_side=True,
                                         timeout_s=self._handshake_timeout_s, peer=peer)
            except TransportError as exc:  # spec S4: log, drop this link, keep serving
                self._rejects.rejected(peer, str(exc))
                protocol.transport.abort()
                return
            finally:
                left = self._handshakes.pop(host) - 1
                if left:
                    self._handshakes[host] = left
            if self._closing:  # the listener closed during the handshake: hand nothing on
                protocol.transport.abort()
                return
        conn = TcpConnection(protocol, peer=peer, max_frame_bytes=self._max_frame_bytes,
                             close_timeout_s=self._close_timeout_s, on_closed=self._links.discard,
                             peer_identity=identity)
        if not conn.closed:
            self._links.add(conn)
        await serve_connection(self._on_connection, conn, where=f"tcp listener {self._host}:{self._port}",
                               logger=logger)

    def _stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def _drop_link(self, link: TcpConnection) -> None:
        link._close_now("listener closed", local=True)

    async def _finish_close(self, links: list[TcpConnection]) -> None:
        await super()._finish_close(links)
        if self._server is not None:
            try:
                async with asyncio.timeout(self._close_timeout_s):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.warning("tcp listener %s:%s did not close within %ss", self._host, self._port,
                               self._close_timeout_s)


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

    async def listen(self, host: str, port: int, on_connection: ConnectionHandler) -> TcpListener:
        check_port(port)
        listener = TcpListener(host, on_connection, max_frame_bytes=self.max_frame_bytes,
                               close_timeout_s=self.close_timeout_s, security=self.security,
                               handshake_timeout_s=self.handshake_timeout_s)
        await listener.start(port)
        return listener

    async def connect(self, host: str, port: int, *, timeout_s: float) -> TcpConnection:
        check_port(port)
        address = f"{host}:{port}"
        loop = asyncio.get_running_loop()
        protocol = _LinkProtocol()
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(lambda: protocol, host, port)
        except TimeoutError:
            raise PeerTimeout(f"connect to {address} did not finish within {timeout_s}s") from None
        except OSError as exc:
            raise TransportError(f"connect to {address} failed: {exc}") from exc
        identity = None
        if self.security is not None:
            try:
                identity = await _secure(protocol, self.security, server_side=False,
                                         timeout_s=min(timeout_s, self.handshake_timeout_s), peer=address)
            except TransportError:
                assert protocol.transport is not None
                protocol.transport.abort()
                raise
        return TcpConnection(protocol, peer=address, max_frame_bytes=self.max_frame_bytes,
                             close_timeout_s=self.close_timeout_s, peer_identity=identity)
