"""QUIC transport (RFC 9000) on aioquic: one connection per peer, one stream per lane.

Each side opens a unidirectional stream per lane (``control``, ``data``, ``bulk``) the first
time it sends on it, so a large tensor on ``bulk`` or ``data`` never holds back a heartbeat on
``control`` (spec T11); within a stream, frames keep their order. Frames are those of
``transports/framing.py``, one decoder per incoming stream.

Security (spec S3): TLS 1.3 inside QUIC (RFC 9001) with mutual authentication. The server
asks for a client certificate through aioquic's ``_request_client_certificate`` switch (no
public setting exists as of aioquic 1.x; the dependency is bounded to <2 and the conformance
suite's authentication cases fail if it stops working). aioquic checks the server's chain
against the cluster CA; each side then checks the peer's certificate with
``LinkSecurity.verify_peer`` and a link is handed on only when that passes. With
``security=None`` (``--insecure``) an ephemeral self-signed certificate is used and nothing
is checked. No session tickets: no resumption, no 0-RTT, so no replayable early data.

This module is the asyncio shell; aioquic's ``QuicConnection`` is the sans-IO core.
Registered as the ``quic`` entry point of ``mesh.transports``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import ssl
from collections import deque
from typing import Any, ClassVar

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    QuicConnection,
    stream_is_client_initiated,
    stream_is_unidirectional,
)
from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh.errors import (
    AuthenticationError,
    ConfigError,
    FrameError,
    PeerTimeout,
    TransportError,
)
from mesh.netif import Address, check_port
from mesh.security import TLS_SERVER_NAME, LinkSecurity, PeerIdentity
from mesh.wire import Message
from transports.base import (
    LANES,
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

ALPN = "mesh/1"
SEND_BUFFER_BYTES = 4 << 20  # a send returns once at most this much of its lane is unacknowledged
FLOW_WINDOW_BYTES = 64 << 20  # QUIC connection and stream flow-control windows (RFC 9000 §4)
# 1350 bytes fits every common path MTU (Ethernet, Wi-Fi, most VPNs); aioquic does no path
# MTU discovery, and its default (1200, RFC 9000's minimum) costs ~10 % of throughput.
MAX_DATAGRAM_BYTES = 1350
ERROR_AUTH = 0x4D01  # application close codes (RFC 9000 §20.2)
ERROR_FRAME = 0x4D02
ERROR_OVERFLOW = 0x4D03
_CRYPTO_ERRORS = range(0x100, 0x200)  # RFC 9001 §4.8: TLS alerts map to 0x100 + alert


def _configuration(security: LinkSecurity | None, *, is_client: bool, idle_timeout_s: float) -> QuicConfiguration:
    config = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], idle_timeout=idle_timeout_s,
                               max_data=FLOW_WINDOW_BYTES, max_stream_data=FLOW_WINDOW_BYTES,
                               server_name=TLS_SERVER_NAME, max_datagram_size=MAX_DATAGRAM_BYTES)
    if security is None:  # --insecure: an ephemeral certificate, nothing verified
        ephemeral = LinkSecurity(ed25519.Ed25519PrivateKey.generate(), os.urandom(32),
                                 now=datetime.datetime.now(datetime.UTC))
        config.certificate, config.private_key = ephemeral.certificate, ephemeral.identity
        config.verify_mode = ssl.CERT_NONE
    else:
        config.certificate, config.private_key = security.certificate, security.identity
        config.cadata = security.ca_pem
        config.verify_mode = ssl.CERT_REQUIRED if is_client else ssl.CERT_NONE  # server: checked by verify_peer
    return config


class _Protocol(QuicConnectionProtocol):
    """aioquic's asyncio protocol, feeding stream data and connection events to a ``QuicLink``."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, request_client_cert: bool = False,
                 on_handshake: Any = None, on_rejected: Any = None) -> None:
        super().__init__(quic, stream_handler)
        self.on_rejected = on_rejected
        self.link: QuicLink | None = None
        self.terminated: events.ConnectionTerminated | None = None
        self.on_handshake = on_handshake
        self._early_data: list[tuple[int, bytes]] = []  # stream data that came before attach()
        if request_client_cert:
            initialize = quic._initialize

            def initialize_asking_for_a_certificate(peer_cid: bytes) -> None:
                initialize(peer_cid)
                quic.tls._request_client_certificate = True

            quic._initialize = initialize_asking_for_a_certificate  # type: ignore[method-assign]

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if self.link is not None:  # acknowledgements free send buffer: wake waiting senders
            self.link._progress.set()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        if self.link is not None:
            self.link._progress.set()

    def peer_certificate(self) -> Any:
        return getattr(self._quic.tls, "_peer_certificate", None)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if self.link is not None:
                try:
                    self.link._received(event.stream_id, event.data)
                except Exception as exc:  # a bug here must close this link, not vanish in asyncio
                    logger.exception("quic link %s: failed to take stream data", self.link.peer)
                    self.link._fail_frame(f"internal error: {exc!r}")
            else:  # data before the link was handed on (only after the handshake): keep it
                self._early_data.append((event.stream_id, event.data))
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            if self.link is not None:
                self.link._terminated(event)
            elif self.on_rejected is not None and event.error_code in _CRYPTO_ERRORS:
                # spec S4: a client that refused our certificate (another cluster) is logged here
                paths = self._quic._network_paths
                peer = _format(paths[0].addr) if paths else "?"
                self.on_rejected(peer, f"TLS handshake failed ({event.reason_phrase or hex(event.error_code)}); "
                                       "it may hold another cluster key (check --cluster-key)")
        elif isinstance(event, events.HandshakeCompleted) and self.on_handshake is not None:
            self.on_handshake(self)

    def attach(self, link: QuicLink) -> None:
        self.link = link
        early, self._early_data = self._early_data, []
        for stream_id, data in early:
            link._received(stream_id, data)
        if self.terminated is not None:
            link._terminated(self.terminated)

    def unacked_bytes(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def kick(self) -> None:
        self.transmit()


class QuicLink(LinkState):
    """One QUIC connection to a peer; see ``Connection`` for the contract."""

    def __init__(self, protocol: _Protocol, *, peer: str, identity: PeerIdentity | None, is_client: bool,
                 max_frame_bytes: int, max_inbox_bytes: int, close_timeout_s: float,
                 udp: asyncio.DatagramTransport | None = None) -> None:
        self._protocol = protocol
        self._peer = peer
        self._peer_identity = identity
        self._is_client = is_client
        self._udp = udp  # a client's own socket, closed with the link
        self._max_frame_bytes = max_frame_bytes
        self._max_inbox_bytes = max_inbox_bytes
        self._close_timeout_s = close_timeout_s
        self._encoder = FrameEncoder(max_frame_bytes=max_frame_bytes)
        self._decoders: dict[int, FrameDecoder] = {}
        self._inbox: deque[tuple[Message, int]] = deque()
        self._inbox_bytes = 0
        self._arrived = asyncio.Event()
        self._progress = asyncio.Event()
        self._lanes: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed_reason: str | None = None
        self._frame_error: str | None = None
        self._frames_sent = self._frames_received = self._bytes_sent = self._bytes_received = 0
        self.on_closed: Any = None
        protocol.attach(self)

    # -- events from the protocol ------------------------------------------------------
    def _received(self, stream_id: int, data: bytes) -> None:
        self._progress.set()
        if self._closed_reason is not None or not data:
            return
        if not stream_is_unidirectional(stream_id) or stream_is_client_initiated(stream_id) == self._is_client:
            self._fail_frame(f"data on stream {stream_id}, which the peer may not open")
            return
        self._bytes_received += len(data)
        decoder = self._decoders.get(stream_id)
        if decoder is None:
            if len(self._decoders) >= len(LANES):  # one stream per lane: more is a peer misbehaving
                self._fail_frame(f"the peer opened more than {len(LANES)} streams")
                return
            decoder = self._decoders[stream_id] = FrameDecoder(max_frame_bytes=self._max_frame_bytes)
        try:
            messages = decoder.feed(data)
        except FrameError as exc:  # spec T4: a malformed frame closes this link only
            self._fail_frame(str(exc))
            return
        for msg in messages:
            size = len(msg.tensor.data) if msg.tensor is not None else 0
            self._inbox.append((msg, size + 64))
            self._inbox_bytes += size + 64
        buffered = self._inbox_bytes + sum(d.buffered_bytes for d in self._decoders.values())
        if buffered > self._max_inbox_bytes:  # spec T12: a peer may not make us hold more than this
            self._close_now(f"the peer sent {buffered} bytes that were not read (limit {self._max_inbox_bytes})",
                            ERROR_OVERFLOW)
        if messages:
            self._arrived.set()

    def _terminated(self, event: events.ConnectionTerminated) -> None:
        reason = event.reason_phrase or f"error code {event.error_code:#x}"
        if self._closed_reason is None:
            self._closed_reason = f"closed by peer ({reason})" if event.error_code in (0, ERROR_FRAME) \
                else f"reset: {reason}"
        self._arrived.set()
        self._progress.set()
        self._release()

    def _fail_frame(self, detail: str) -> None:
        self._frame_error = detail
        self._close_now(f"malformed frame: {detail}", ERROR_FRAME)

    def _close_now(self, reason: str, error_code: int = 0) -> None:
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        self._protocol.close(error_code=error_code, reason_phrase=reason[:100])
        self._arrived.set()
        self._progress.set()
        self._release()

    def _release(self) -> None:
        if self.on_closed is not None:
            self.on_closed(self)
            self.on_closed = None

    def _raise_if_closed(self) -> None:
        if self._frame_error is not None:
            raise FrameError(f"malformed frame from {self._peer}: {self._frame_error}")
        if self._closed_reason is not None:
            raise TransportError(f"connection to {self._peer} is closed ({self._closed_reason})")

    # -- Connection --------------------------------------------------------------------
    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        check_lane(lane)
        self._raise_if_closed()
        parts = self._encoder.encode_parts(msg)  # a bad local message leaves the link open
        size = sum(len(p) for p in parts)
        lock = self._locks.setdefault(lane, asyncio.Lock())
        written = False
        try:
            async with asyncio.timeout(timeout_s):
                async with lock:  # spec T6: one whole frame at a time per stream
                    self._raise_if_closed()
                    quic = self._protocol._quic
                    stream_id = self._lanes.get(lane)
                    if stream_id is None:
                        stream_id = self._lanes[lane] = quic.get_next_available_stream_id(is_unidirectional=True)
                    for part in parts:
                        quic.send_stream_data(stream_id, bytes(part))
                    written = True
                    self._frames_sent += 1
                    self._bytes_sent += size
                    self._protocol.kick()
                    while self._protocol.unacked_bytes(stream_id) > SEND_BUFFER_BYTES:
                        self._raise_if_closed()
                        self._progress.clear()
                        await self._progress.wait()
        except TimeoutError:
            if written:  # part of the frame may be out: the stream is unusable
                self._close_now(f"send of {size} bytes timed out", ERROR_FRAME)
            raise PeerTimeout(f"send of {msg.type!r} ({size} bytes) to {self._peer} did not finish "
                              f"within {timeout_s}s") from None

    async def recv(self, *, timeout_s: float | None = None) -> Message:
        try:
            async with asyncio.timeout(timeout_s):
                while not self._inbox:
                    self._raise_if_closed()
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise PeerTimeout(f"no message from {self._peer} within {timeout_s}s") from None
        msg, size = self._inbox.popleft()
        self._inbox_bytes -= size
        self._frames_received += 1
        return msg

    async def close(self) -> None:
        self._close_now("closed locally")
        try:
            async with asyncio.timeout(self._close_timeout_s):
                await self._protocol.wait_closed()
        except TimeoutError:
            pass
        if self._udp is not None:
            self._udp.close()


class QuicListener(ListenerState["QuicLink"]):
    """A QUIC server; see ``Listener`` for the contract."""

    def __init__(self, transport: QuicTransport, host: str, on_connection: ConnectionHandler) -> None:
        super().__init__(host, close_timeout_s=transport.close_timeout_s)
        self._transport = transport
        self._on_connection = on_connection
        self._server: QuicServer | None = None
        self._rejects = RejectLog(logger)

    async def start(self, port: int) -> None:
        t = self._transport
        config = _configuration(t.security, is_client=False, idle_timeout_s=t.idle_timeout_s)

        def protocol(quic: QuicConnection, stream_handler: Any = None) -> _Protocol:
            return _Protocol(quic, stream_handler, request_client_cert=t.security is not None,
                             on_handshake=self._handshake_done, on_rejected=self._rejects.rejected)

        try:
            # retry=True: a stateless Retry proves the client's address before any handshake
            # state is kept (RFC 9000 §8.1), so spoofed Initial packets cost us nothing
            self._server = await serve(self._host, port, configuration=config, create_protocol=protocol, retry=True)
        except OSError as exc:
            raise TransportError(f"cannot listen on {self._host}:{port}: {exc}") from exc
        self._port = self._server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]

    def _handshake_done(self, protocol: _Protocol) -> None:
        peer = _format(protocol._quic._network_paths[0].addr) if protocol._quic._network_paths else "?"
        identity = None
        t = self._transport
        if t.security is not None:
            try:
                identity = t.security.verify_peer(protocol.peer_certificate())
            except AuthenticationError as exc:  # spec S4: log, drop this link, keep serving
                self._rejects.rejected(peer, str(exc))
                protocol.close(error_code=ERROR_AUTH, reason_phrase="authentication failed")
                return
        if self._closing:
            protocol.close()
            return
        link = QuicLink(protocol, peer=peer, identity=identity, is_client=False, max_frame_bytes=t.max_frame_bytes,
                        max_inbox_bytes=t.max_inbox_bytes, close_timeout_s=t.close_timeout_s)
        self._links.add(link)
        link.on_closed = self._links.discard
        self._spawn(self._serve(link), f"quic link {peer}")

    async def _serve(self, link: QuicLink) -> None:
        await serve_connection(self._on_connection, link, where=f"quic listener {self._host}:{self._port}",
                               logger=logger)

    def _drop_link(self, link: QuicLink) -> None:
        link._close_now("listener closed")

    async def _finish_close(self, links: list[QuicLink]) -> None:
        await super()._finish_close(links)
        if self._server is not None:  # last: every link shares the server's UDP socket
            self._server.close()


def _format(addr: Any) -> str:
    return str(Address(str(addr[0]).removeprefix("::ffff:"), int(addr[1])))


class QuicTransport(Transport):
    """Framed messages over QUIC with one stream per lane (spec T11), TLS 1.3 with mutual
    authentication when given a ``LinkSecurity`` (spec S3).

    ``max_inbox_bytes`` bounds what a peer can make us buffer unread before the link is
    closed (default: the frame limit + 64 MiB; spec T12); ``idle_timeout_s`` is QUIC's idle
    timeout (a silent peer's link closes after it).
    """

    name = "quic"
    secure = True
    independent_lanes: ClassVar[bool] = True

    def __init__(self, *, security: LinkSecurity | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_inbox_bytes: int | None = None, close_timeout_s: float = 2.0,
                 idle_timeout_s: float = 30.0) -> None:
        FrameEncoder(max_frame_bytes=max_frame_bytes)  # validates the bound
        if not close_timeout_s > 0 or not idle_timeout_s > 0:
            raise ConfigError(f"close_timeout_s and idle_timeout_s must be > 0, got {close_timeout_s}, {idle_timeout_s}")
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        self.max_inbox_bytes = max_inbox_bytes if max_inbox_bytes is not None else max_frame_bytes + (64 << 20)
        if self.max_inbox_bytes < max_frame_bytes:
            raise ConfigError(f"max_inbox_bytes ({self.max_inbox_bytes}) must be >= max_frame_bytes ({max_frame_bytes})")
        self.close_timeout_s = close_timeout_s
        self.idle_timeout_s = idle_timeout_s

    async def listen(self, host: str, port: int, on_connection: ConnectionHandler) -> QuicListener:
        check_port(port)
        listener = QuicListener(self, host, on_connection)
        await listener.start(port)
        return listener

    async def connect(self, host: str, port: int, *, timeout_s: float) -> QuicLink:
        check_port(port)
        address = f"{host}:{port}"
        loop = asyncio.get_running_loop()
        config = _configuration(self.security, is_client=True, idle_timeout_s=self.idle_timeout_s)
        udp: asyncio.DatagramTransport | None = None
        try:
            async with asyncio.timeout(timeout_s):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                family, _, _, _, addr = infos[0]
                quic = QuicConnection(configuration=config)
                local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
                udp, protocol = await loop.create_datagram_endpoint(lambda: _Protocol(quic), local_addr=local)
                protocol.connect(addr)
                await protocol.wait_connected()
        except TimeoutError:
            if udp is not None:
                udp.close()
            raise PeerTimeout(f"QUIC connect to {address} did not finish within {timeout_s}s") from None
        except (ConnectionError, OSError) as exc:
            if udp is not None:
                udp.close()
            terminated = protocol.terminated if udp is not None else None
            if terminated is not None and terminated.error_code in _CRYPTO_ERRORS:
                raise AuthenticationError(f"TLS handshake with {address} failed: {terminated.reason_phrase}") from None
            raise TransportError(f"QUIC connect to {address} failed: {terminated.reason_phrase if terminated else exc}") \
                from None
        identity = None
        if self.security is not None:
            try:
                identity = self.security.verify_peer(protocol.peer_certificate())
            except AuthenticationError:
                protocol.close(error_code=ERROR_AUTH, reason_phrase="authentication failed")
                udp.close()
                raise
        return QuicLink(protocol, peer=address, identity=identity, is_client=True,
                        max_frame_bytes=self.max_frame_bytes, max_inbox_bytes=self.max_inbox_bytes,
                        close_timeout_s=self.close_timeout_s, udp=udp)
