"""In-process reference transport for unit tests: links are byte pipes inside one event loop.

Not registered as an entry point. A process-global table maps ``"host:port"`` to listeners;
``listen(host, 0)`` allocates a fake free port and ``connect`` joins two ``MemoryConnection``
ends. Every message goes through the real sans-IO codec (``FrameEncoder.encode_parts`` at the
sender, one ``FrameDecoder`` per lane at the receiver), so size limits, malformed frames and
copies behave as on a socket. Each lane of each direction is its own ordered byte pipe
holding at most ``max_buffered_bytes`` of sent-but-unread bytes: a sender to a peer that does
not read waits (backpressure), a full ``bulk`` lane never blocks ``control`` (spec T11, T12).

With a ``LinkSecurity`` on both ends, authentication is modelled without crypto: each side
checks the other's certificate with its own ``verify_peer`` (spec S3 of specs/security.md);
a peer of another cluster, or a plaintext peer of a secure one, is refused with
``AuthenticationError`` and the listener logs it and keeps serving.
It knows nothing of what messages mean. Spec: specs/transport.md T4-T7, T11-T13.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from mesh.errors import (
    AuthenticationError,
    ConfigError,
    FrameError,
    PeerTimeout,
    TransportError,
)
from mesh.netif import check_port
from mesh.security import LinkSecurity, PeerIdentity
from mesh.wire import Message
from transports.base import (
    LANES,
    ConnectionHandler,
    LinkState,
    ListenerState,
    Transport,
    check_lane,
    serve_connection,
)
from transports.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameEncoder

logger = logging.getLogger(__name__)

DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024  # bytes taken from each lane per read round, like a socket read
_FIRST_FAKE_PORT = 49152  # fake ports come from the IANA dynamic range, then wrap

_listeners: dict[str, MemoryListener] = {}
_port_counter = itertools.count()


def _next_port() -> int:
    return _FIRST_FAKE_PORT + next(_port_counter) % (65536 - _FIRST_FAKE_PORT)


def _lookup(address: str) -> MemoryListener | None:
    """The live listener at ``address`` on the running loop; stale entries are dropped."""
    listener = _listeners.get(address)
    if listener is not None and listener._loop is not asyncio.get_running_loop():
        del _listeners[address]  # left open by a finished loop: nobody accepts on it any more
        return None
    return listener


class _Pipe:
    """One lane in one direction: bytes written and not yet read, at most ``capacity``.

    The writer waits on ``space``; the reader is woken through ``on_data``.
    """

    __slots__ = ("buffered", "capacity", "chunks", "decoder", "on_data", "space")

    def __init__(self, *, capacity: int, max_frame_bytes: int, on_data: asyncio.Event) -> None:
        self.capacity = capacity
        self.chunks: deque[memoryview] = deque()
        self.buffered = 0
        self.decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self.space = asyncio.Event()
        self.on_data = on_data

    def push(self, chunk: memoryview) -> None:
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        self.on_data.set()

    def take(self, limit: int) -> list[memoryview]:
        """Remove and return up to ``limit`` bytes, oldest first."""
        taken: list[memoryview] = []
        left = limit
        while self.chunks and left > 0:
            chunk = self.chunks.popleft()
            if len(chunk) > left:
                self.chunks.appendleft(chunk[left:])
                chunk = chunk[:left]
            taken.append(chunk)
            left -= len(chunk)
        self.buffered -= limit - left
        if taken:
            self.space.set()
        return taken

    def discard(self) -> None:
        self.chunks.clear()
        self.buffered = 0
        self.space.set()  # a writer waiting for room wakes and finds the link gone


class MemoryConnection(LinkState):
    """One end of an in-process link. Built by ``MemoryTransport``; see ``Connection``.

    ``reset()`` breaks both ends at once, like a TCP reset, for tests.
    """

    def __init__(self, *, peer: str, max_frame_bytes: int, max_buffered_bytes: int,
                 peer_identity: PeerIdentity | None = None,
                 on_closed: Callable[[MemoryConnection], None] | None = None) -> None:
        self._peer = peer
        self._peer_identity = peer_identity
        self._encoder = FrameEncoder(max_frame_bytes=max_frame_bytes)
        self._readable = asyncio.Event()
        # spec T11: one pipe (and one decoder) per lane; the byte bound is per lane
        self._inbound = {lane: _Pipe(capacity=max_buffered_bytes, max_frame_bytes=max_frame_bytes,
                                     on_data=self._readable) for lane in LANES}
        self._other: MemoryConnection | None = None
        self._ready: deque[Message] = deque()
        self._send_locks = {lane: asyncio.Lock() for lane in LANES}
        self._recv_lock = asyncio.Lock()
        self._on_closed = on_closed
        self._closed_reason: str | None = None
        self._drain_before_raising = False  # closed by the peer: what arrived is read first
        self._frames_sent = self._frames_received = self._bytes_sent = self._bytes_received = 0

    @staticmethod
    def _join(a: MemoryConnection, b: MemoryConnection) -> None:
        a._other, b._other = b, a

    def buffered_bytes(self, lane: str) -> int:
        """Bytes sent to this end on ``lane`` and not yet read (at most ``max_buffered_bytes``)."""
        check_lane(lane)
        return self._inbound[lane].buffered

    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        check_lane(lane)
        self._raise_if_cannot_send()
        parts = self._encoder.encode_parts(msg)  # a bad local message leaves the link open
        size = sum(len(p) for p in parts)
        await self._write(parts, size=size, lane=lane, timeout_s=timeout_s,
                          what=f"send of {msg.type!r} ({size} bytes)")
        self._frames_sent += 1

    async def send_raw(self, data: bytes, *, lane: str = "control", timeout_s: float = 5.0) -> None:
        """Write ``data`` on ``lane`` as it is, bypassing the encoder (tests of malformed frames)."""
        check_lane(lane)
        self._raise_if_cannot_send()
        await self._write([data], size=len(data), lane=lane, timeout_s=timeout_s,
                          what=f"raw write of {len(data)} bytes")

    async def _write(self, parts: list[bytes], *, size: int, lane: str, timeout_s: float,
                     what: str) -> None:
        pushed = 0
        try:
            async with asyncio.timeout(timeout_s):
                async with self._send_locks[lane]:  # spec T6: a frame goes out whole on its lane
                    for part in parts:
                        view = memoryview(part)
                        while len(view):
                            self._raise_if_cannot_send()
                            if self._other is None:
                                raise TransportError("memory connection was never joined")
                            pipe = self._other._inbound[lane]
                            room = pipe.capacity - pipe.buffered
                            if room <= 0:  # spec T12: wait for the reader, bounded by timeout_s
                                pipe.space.clear()
                                await pipe.space.wait()
                                continue
                            pipe.push(view[:room])
                            pushed += min(room, len(view))
                            view = view[room:]
        except TimeoutError:
            if pushed:  # the peer holds part of the frame: the lane's stream is unusable
                self._reset(f"{what} timed out")
            raise PeerTimeout(f"{what} to {self._peer} did not finish within "
                              f"{timeout_s}s") from None
        except BaseException:
            if 0 < pushed < size and self._closed_reason is None:  # cancelled mid-frame
                self._reset(f"{what} was interrupted mid-frame")
            raise
        finally:
            self._bytes_sent += pushed

    async def recv(self, *, timeout_s: float | None = None) -> Message:
        try:
            async with asyncio.timeout(timeout_s):
                async with self._recv_lock:
                    while True:
                        if self._closed_reason is not None and not self._drain_before_raising:
                            raise self._closed_error()
                        if self._ready:
                            self._frames_received += 1
                            return self._ready.popleft()
                        self._raise_if_decoder_failed()
                        if self._read_round():
                            if not self._ready:  # a partial frame: let others run, as a
                                await asyncio.sleep(0)  # socket read returns per chunk
                            continue
                        if self._closed_reason is not None:  # closed by peer, all read
                            self._finish_peer_close()
                            raise self._closed_error()
                        self._readable.clear()
                        await self._readable.wait()
        except TimeoutError:
            raise PeerTimeout(f"no message from {self._peer} within {timeout_s}s") from None

    def _read_round(self) -> bool:
        """Take up to ``READ_CHUNK_BYTES`` from each lane and decode it; True if bytes moved."""
        moved = False
        for pipe in self._inbound.values():
            if pipe.decoder.error is not None:
                continue
            for chunk in pipe.take(READ_CHUNK_BYTES):
                moved = True
                self._bytes_received += len(chunk)
                try:
                    self._ready.extend(pipe.decoder.feed(chunk))
                except FrameError:
                    pass
                if pipe.decoder.error is not None:  # recv raises it after the messages before
                    pipe.discard()
                    break
        return moved

    def _raise_if_decoder_failed(self) -> None:
        for pipe in self._inbound.values():
            if pipe.decoder.error is not None:  # spec T4: a malformed frame closes this link
                error = pipe.decoder.error
                self._close_now(f"malformed frame: {error}")
                raise FrameError(f"malformed frame from {self._peer}: {error}")

    def _finish_peer_close(self) -> None:
        self._drain_before_raising = False
        partial = sum(p.decoder.buffered_bytes for p in self._inbound.values())
        if partial:
            self._closed_reason = f"closed by peer in the middle of a frame ({partial} bytes)"

    def _closed_error(self) -> TransportError:
        return TransportError(f"connection to {self._peer} is closed "
                              f"({self._closed_reason})")

    def _raise_if_cannot_send(self) -> None:
        if self._closed_reason is not None:
            raise self._closed_error()

    def _close_now(self, reason: str) -> None:
        """Close this end now and tell the other one; bytes sent to us and unread are lost."""
        first = self._closed_reason is None
        if first:
            self._closed_reason = reason
        self._drain_before_raising = False  # later recv calls fail at once
        for pipe in self._inbound.values():
            pipe.discard()
        self._wake_all()
        other = self._other
        if first and other is not None and other._closed_reason is None:
            # spec T7: the peer reads what we sent before closing, then fails
            other._closed_reason = "closed by peer"
            other._drain_before_raising = True
            other._wake_all()
            other._notify_closed()
        self._notify_closed()

    def _reset(self, reason: str) -> None:
        """Break both ends abruptly: unread bytes are dropped, every wait fails (spec T13)."""
        for end, why in ((self, reason), (self._other, f"reset by peer: {reason}")):
            if end is None:
                continue
            if end._closed_reason is None or end._drain_before_raising:
                end._closed_reason = why
            end._drain_before_raising = False
            end._ready.clear()
            for pipe in end._inbound.values():
                pipe.discard()
            end._wake_all()
            end._notify_closed()

    def reset(self) -> None:
        """Abruptly reset both ends of this link (for tests): pending and later ``send`` and
        ``recv`` calls on either end raise ``TransportError`` at once."""
        self._reset("reset")

    def _wake_all(self) -> None:
        self._readable.set()
        if self._other is not None:  # our writers wait for room in the other end's pipes
            for pipe in self._other._inbound.values():
                pipe.space.set()
        for pipe in self._inbound.values():
            pipe.space.set()

    def _notify_closed(self) -> None:
        callback, self._on_closed = self._on_closed, None
        if callback is not None:
            callback(self)

    async def close(self) -> None:
        self._close_now("closed locally")
        await asyncio.sleep(0)  # a checkpoint, as every real close has one


class MemoryListener(ListenerState["MemoryConnection"]):
    """An in-process listener; see ``Listener`` for the contract."""

    def __init__(self, transport: MemoryTransport, host: str, port: int,
                 on_connection: ConnectionHandler) -> None:
        super().__init__(host, port, close_timeout_s=transport.close_timeout_s)
        self._transport = transport
        self._address = f"{host}:{port}"
        self._on_connection = on_connection
        self._loop = asyncio.get_running_loop()  # a listener left by a finished loop is stale

    def _accept(self, client: MemoryTransport, client_address: str) -> MemoryConnection:
        """Authenticate a connecting transport and return its end of a new link.

        Raises AuthenticationError (logged here as a rejected link; the listener keeps serving).
        """
        server_sec, client_sec = self._transport.security, client.security
        try:
            client_identity, server_identity = _authenticate(server_sec, client_sec)
        except AuthenticationError as exc:  # spec S4: log, drop this link, keep serving
            logger.warning("rejected a link from %s: %s", client_address, exc)
            raise AuthenticationError(f"connect to {self._address} failed: {exc}") from None
        server_end = MemoryConnection(
            peer=client_address, max_frame_bytes=self._transport.max_frame_bytes,
            max_buffered_bytes=self._transport.max_buffered_bytes,
            peer_identity=client_identity, on_closed=self._links.discard)
        client_end = MemoryConnection(
            peer=self._address, max_frame_bytes=client.max_frame_bytes,
            max_buffered_bytes=client.max_buffered_bytes, peer_identity=server_identity)
        MemoryConnection._join(server_end, client_end)
        self._links.add(server_end)
        self._spawn(self._serve(server_end), f"memory link {client_address}")
        return client_end

    async def _serve(self, conn: MemoryConnection) -> None:
        await serve_connection(self._on_connection, conn, where=f"memory listener {self._address}", logger=logger)

    def _stop_accepting(self) -> None:
        if _listeners.get(self._address) is self:
            del _listeners[self._address]

    def _drop_link(self, link: MemoryConnection) -> None:
        link._close_now("listener closed")

    async def _finish_close(self, links: list[MemoryConnection]) -> None:
        await asyncio.sleep(0)  # a checkpoint, as every real close has one


def _authenticate(server: LinkSecurity | None, client: LinkSecurity | None
                  ) -> tuple[PeerIdentity | None, PeerIdentity | None]:
    """Model the mutual-auth handshake: each side checks the other's certificate with its own
    ``verify_peer``. Returns (client identity, server identity); None on a plaintext link.

    Raises AuthenticationError when exactly one side is secure or a check fails.
    """
    if server is None and client is None:
        return None, None
    if server is None:
        raise AuthenticationError("the peer asked for an authenticated link; this listener is "
                                  "plaintext (--insecure)")
    if client is None:
        raise AuthenticationError("the peer presented no certificate; this listener accepts "
                                  "authenticated links only")
    server_identity = client.verify_peer(server.certificate)  # TLS 1.3: server proves first
    client_identity = server.verify_peer(client.certificate)
    return client_identity, server_identity


class MemoryTransport(Transport):
    """Links inside one process and event loop, for tests (see the module docstring).

    ``max_frame_bytes`` bounds every frame (spec T5); ``max_buffered_bytes`` bounds the
    unread bytes of each lane toward this end (spec T12); ``close_timeout_s`` bounds the
    wait for handler tasks when a listener closes.
    """

    name = "memory"
    secure = True
    independent_lanes: ClassVar[bool] = True

    def __init__(self, *, security: LinkSecurity | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
                 close_timeout_s: float = 2.0) -> None:
        try:
            FrameEncoder(max_frame_bytes=max_frame_bytes)
        except ValueError as exc:
            raise ConfigError(f"max_frame_bytes {max_frame_bytes}: {exc}") from None
        if not isinstance(max_buffered_bytes, int) or max_buffered_bytes < 1:
            raise ConfigError(f"max_buffered_bytes must be an integer >= 1, got {max_buffered_bytes!r}")
        if not close_timeout_s > 0:
            raise ConfigError(f"close_timeout_s must be > 0, got {close_timeout_s}")
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.close_timeout_s = close_timeout_s

    async def listen(self, host: str, port: int, on_connection: ConnectionHandler) -> MemoryListener:
        check_port(port)
        if port == 0:
            for _ in range(65536 - _FIRST_FAKE_PORT):
                port = _next_port()
                if _lookup(f"{host}:{port}") is None:
                    break
            else:
                raise TransportError(f"cannot listen on {host}:0: no free memory port")
        elif _lookup(f"{host}:{port}") is not None:
            raise TransportError(f"cannot listen on {host}:{port}: address already in use")
        listener = MemoryListener(self, host, port, on_connection)
        _listeners[f"{host}:{port}"] = listener
        return listener

    async def connect(self, host: str, port: int, *, timeout_s: float) -> MemoryConnection:
        check_port(port)
        address = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.sleep(0)  # the handshake's round trip; a timeout of 0 fires here
                listener = _lookup(address)
                if listener is None:
                    raise TransportError(f"connect to {address} failed: connection refused "
                                         "(no memory listener there)")
                return listener._accept(self, f"{host}:{_next_port()}")
        except TimeoutError:
            raise PeerTimeout(f"connect to {address} did not finish within {timeout_s}s") from None


__all__ = ["DEFAULT_MAX_BUFFERED_BYTES", "MemoryConnection", "MemoryListener", "MemoryTransport"]
