"""The interface every transport keeps: ``Transport``, ``Listener``, ``Connection``.

A transport moves ``mesh.wire.Message`` values between nodes; it knows nothing of events or
of what a tensor means. This module also holds ``connect_with_backoff`` and its sans-IO
delay schedule ``Backoff``. Implementations: ``transports/tcp.py``; third-party ones
register under the ``mesh.transports`` entry point. Spec: specs/transport.md T7, T9.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

from mesh.errors import AuthenticationError, ConfigError, TransportError
from mesh.security import PeerIdentity
from mesh.wire import Message

# Lanes of one link (spec T11). Messages on one lane arrive in the order sent; a transport
# with independent streams (QUIC) never lets a large message on one lane hold back another
# lane. "control": handshakes, heartbeats, kernel events; "data": request traffic
# (activations, tokens, cancels), in order per link; "bulk": large transfers such as KV caches.
LANES = ("control", "data", "bulk")


def check_lane(lane: str) -> None:
    """Raise ConfigError unless ``lane`` is one of ``LANES``."""
    if lane not in LANES:
        raise ConfigError(f"lane {lane!r} unknown; valid: {', '.join(LANES)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStats:
    """Counters of one connection since it opened: whole frames and raw bytes."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Connection(abc.ABC):
    """One link to a peer carrying framed messages in both directions.

    ``send`` calls from many tasks never interleave their frames (spec T6). Every wait has
    a timeout; a link closed or reset by either side fails ``recv`` with
    ``TransportError`` (spec T7).
    """

    @property
    @abc.abstractmethod
    def peer(self) -> str:
        """The remote address as ``"host:port"``."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once the link was closed, by us, by the peer, or after an error."""

    @property
    @abc.abstractmethod
    def stats(self) -> LinkStats:
        """A snapshot of this link's counters."""

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The node identity the peer proved during the handshake; None on an insecure link."""
        return None

    @abc.abstractmethod
    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        """Send one message on ``lane`` (one of ``LANES``) within ``timeout_s`` seconds.

        Raises:
            FrameError: the message cannot be framed (not CBOR-safe, too large); the link
                stays open.
            PeerTimeout: the frame did not go out in time; the link is closed if part of it
                may have.
            TransportError: the link is closed or failed.
            ConfigError: ``lane`` is not one of ``LANES``.
        """

    @abc.abstractmethod
    async def recv(self, *, timeout_s: float | None = None) -> Message:
        """Return the next message, waiting at most ``timeout_s`` seconds (None: no limit).

        Raises:
            PeerTimeout: nothing arrived in time; the link stays open.
            FrameError: the peer sent a malformed frame; the link is closed.
            TransportError: the link was closed or reset (messages that arrived before are
                returned first).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the link; idempotent, bounded in time. Pending ``recv`` calls fail."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class LinkState(Connection):
    """The state every framed connection keeps, and the properties it answers from it:
    the peer's address, why the link closed (None while open), the identity the peer proved,
    and frame and byte counters. Transports' connections set these in ``__init__``."""

    _peer: str
    _closed_reason: str | None
    _peer_identity: PeerIdentity | None
    _frames_sent: int
    _frames_received: int
    _bytes_sent: int
    _bytes_received: int

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


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Listener(abc.ABC):
    """A bound, accepting endpoint. Each accepted connection runs the handler in its own task.

    A handler that raises has its error logged and its connection closed; the listener keeps
    serving (spec T4). A handler that returns leaves its connection open (it may have handed
    it on). ``close`` stops accepting and closes every accepted connection.
    """

    @property
    @abc.abstractmethod
    def host(self) -> str:
        """The host the listener was asked to bind."""

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """The bound port (the real one when 0 was asked)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting, close accepted connections, end handler tasks; bounded in time."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


L = TypeVar("L", bound=Connection)


class ListenerState(Listener, Generic[L]):
    """The state every listener keeps and the skeleton of its ``close`` (spec T7).

    It answers ``host`` and ``port`` (``_port`` is set once bound), tracks the accepted
    links (``_links``; a link removes itself when it closes) and the handler tasks
    (``_spawn``), and closes in one order for every transport: mark closing (a handshake
    that ends later hands nothing on), stop accepting (``_stop_accepting``), close every
    accepted link at once (``_drop_link``), wait at most ``close_timeout_s`` for the handlers
    to end and then cancel them (``end_tasks``), then ``_finish_close``. ``close`` is
    idempotent.
    """

    def __init__(self, host: str, port: int = 0, *, close_timeout_s: float) -> None:
        self._host = host
        self._port = port
        self._close_timeout_s = close_timeout_s
        self._links: set[L] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a handler (or handshake) task that ``close`` waits for, or cancels."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)  # tracked from the start: close() ends handshakes too
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_accepting()
        links = list(self._links)
        for link in links:
            self._drop_link(link)
        await end_tasks(self._tasks, self._close_timeout_s)  # handlers see their recv fail and end
        await self._finish_close(links)

    def _stop_accepting(self) -> None:
        """Refuse new connections (close the server socket, leave a registry); the default
        does nothing."""

    @abc.abstractmethod
    def _drop_link(self, link: L) -> None:
        """Close an accepted link at once, without waiting (its handler's recv then fails)."""

    async def _finish_close(self, links: list[L]) -> None:
        """After the handlers ended: the default closes each link once more, all together,
        so the wait is bounded once and not per peer."""
        await asyncio.gather(*(link.close() for link in links))


class Transport(abc.ABC):
    """A way to reach peers: listen for connections, or connect to one.

    Subclasses set ``name`` (the entry-point name, e.g. ``"tcp"``) and ``secure`` (True when
    the transport authenticates and encrypts links given a ``LinkSecurity``). The registry
    builds a transport as ``cls(security=...)``: with a ``LinkSecurity`` every link must be
    mutually authenticated against the cluster CA and encrypted, and ``Connection.
    peer_identity`` must name the peer (spec S3); with None links are plaintext (``--insecure``).
    """

    name: ClassVar[str]
    secure: ClassVar[bool] = False
    # True when lanes are independent streams (a large message on one lane never holds back
    # another, spec T11); False when all lanes share one ordered byte stream (TCP).
    independent_lanes: ClassVar[bool] = False

    @abc.abstractmethod
    async def listen(self, host: str, port: int, on_connection: ConnectionHandler) -> Listener:
        """Bind ``host:port`` (port 0: any free port) and serve each connection.

        Raises:
            TransportError: the address cannot be bound.
        """

    @abc.abstractmethod
    async def connect(self, host: str, port: int, *, timeout_s: float) -> Connection:
        """Open a connection to ``host:port`` within ``timeout_s`` seconds.

        Raises:
            PeerTimeout: the connection did not open in time.
            TransportError: the peer refused or could not be reached.
        """


class RejectLog:
    """Logs rejected links (spec S4) at most once per ``window_s`` per source host, with the
    number of rejections since, so a peer retrying with the wrong key cannot flood the log.
    At most ``max_hosts`` hosts are remembered."""

    def __init__(self, logger: logging.Logger, *, window_s: float = 60.0, max_hosts: int = 1024) -> None:
        self._logger = logger
        self._window_s = window_s
        self._max_hosts = max_hosts
        self._seen: dict[str, tuple[float, int]] = {}

    def rejected(self, peer: str, reason: str) -> None:
        host = peer.rpartition(":")[0] or peer
        now = time.monotonic()
        last, suppressed = self._seen.get(host, (-self._window_s, 0))
        if now - last < self._window_s:
            self._seen[host] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more from {host} in the last {self._window_s:.0f} s)" if suppressed else ""
        self._logger.warning("rejected a link from %s: %s%s", peer, reason, more)
        if len(self._seen) >= self._max_hosts and host not in self._seen:
            self._seen.pop(next(iter(self._seen)))
        self._seen[host] = (now, 0)


async def serve_connection(handler: ConnectionHandler, conn: Connection, *, where: str,
                           logger: logging.Logger) -> None:
    """Run a listener's handler on one accepted connection (spec T4): a handler that raises
    has its error logged and that connection closed; the listener serves on."""
    try:
        await handler(conn)
    except TransportError as exc:
        logger.warning("%s: connection from %s failed: %s", where, conn.peer, exc)
        await conn.close()
    except Exception:
        logger.exception("%s: handler for %s raised", where, conn.peer)
        await conn.close()


async def end_tasks(tasks: set[asyncio.Task[Any]], timeout_s: float) -> None:
    """Wait at most ``timeout_s`` for a listener's handler tasks to end (their links were
    closed, so their recv fails), then cancel those left and wait for them as long again."""
    waiting = [t for t in tasks if t is not asyncio.current_task()]
    if not waiting:
        return
    _, pending = await asyncio.wait(waiting, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


class Backoff:
    """Sans-IO delay schedule: exponential growth from ``initial_delay_s`` up to
    ``max_delay_s``, each delay drawn uniformly in [d/2, d] ("equal jitter") so that many
    nodes restarting together do not retry in lockstep (spec T9).

    Source: M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015.
    """

    def __init__(self, *, initial_delay_s: float, max_delay_s: float,
                 rng: random.Random) -> None:
        if not initial_delay_s > 0 or not max_delay_s >= initial_delay_s:
            raise ConfigError(
                f"backoff needs 0 < initial_delay_s <= max_delay_s; got {initial_delay_s}, "
                f"{max_delay_s}"
            )
        self._next_s = initial_delay_s
        self._max_s = max_delay_s
        self._rng = rng

    def next_delay_s(self) -> float:
        """The next delay in seconds."""
        base = self._next_s
        self._next_s = min(self._max_s, base * 2)
        return self._rng.uniform(base / 2, base)


async def connect_with_backoff(
    transport: Transport,
    host: str,
    port: int,
    *,
    attempt_timeout_s: float,
    initial_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    deadline_s: float,
    rng: random.Random | None = None,
) -> Connection:
    """Connect to ``host:port``, retrying with backoff and jitter for ``deadline_s`` seconds.

    ``deadline_s`` is the total time budget counted from this call; each attempt waits at
    most ``attempt_timeout_s`` (and never past the deadline). ``rng`` seeds the jitter.

    Raises:
        TransportError: no attempt succeeded before the deadline; names the address, the
            number of attempts and the last error (spec T9).
        AuthenticationError: the peer answered but failed authentication (not retried).
        ConfigError: a timeout or delay is not positive.
    """
    if not attempt_timeout_s > 0 or not deadline_s > 0:
        raise ConfigError(
            f"attempt_timeout_s and deadline_s must be > 0; got {attempt_timeout_s}, {deadline_s}"
        )
    backoff = Backoff(initial_delay_s=initial_delay_s, max_delay_s=max_delay_s,
                      rng=rng if rng is not None else random.Random())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    attempts = 0
    last_error: TransportError | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        attempts += 1
        try:
            return await transport.connect(host, port,
                                           timeout_s=min(attempt_timeout_s, remaining))
        except AuthenticationError:
            raise  # the peer is there but not of this cluster: retrying at once cannot help
        except TransportError as exc:
            last_error = exc
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.sleep(min(backoff.next_delay_s(), remaining))
    raise TransportError(
        f"could not connect to {host}:{port} within {deadline_s}s ({attempts} attempts); "
        f"last error: {last_error if last_error is not None else 'none (no time to try)'}"
    ) from last_error
