"""Fault injection around any transport, for the fault-injection test suite.

``FaultyTransport`` wraps an inner ``Transport``; each ``FaultyConnection`` applies the current
``FaultPlan`` to what it *sends*. Every decision comes from the injected seeded ``random.Random``
(seven draws per message, in send order); the loop clock only schedules, never decides.
On the inner link the connecting side first sends ``faults.label`` and the accepting side
answers with its own; a corrupted message travels as ``faults.corrupt`` (a u8 tensor of the
frame with one bit flipped) and is decoded by the receiver with ``FrameDecoder``.

It must not know what messages mean, nor the inner transport beyond ``Connection``.
Spec: specs/faults.md F1-F14; keeps specs/transport.md T4 and T7 through the wrapper.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeGuard

from mesh.errors import ConfigError, FrameError, PeerTimeout, TransportError
from mesh.security import PeerIdentity
from mesh.wire import Message, WireTensor
from transports import base
from transports.base import Connection, Transport
from transports.framing import FrameDecoder, FrameEncoder

logger = logging.getLogger(__name__)

LABEL_TYPE = "faults.label"
CORRUPT_TYPE = "faults.corrupt"
MAX_LABEL_CHARS = 256
MAX_QUEUED_BYTES = 16 << 20  # per link; send waits for room (one message always fits)
Direction = tuple[str, str]


def _label_ok(label: object) -> TypeGuard[str]:
    return isinstance(label, str) and 0 < len(label) <= MAX_LABEL_CHARS


def _seconds(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPlan:
    """What goes wrong on links, per message in its sending direction (spec F1).

    ``loss``, ``duplicate``, ``reorder``, ``corrupt``: probabilities 0..1 that a message is
    dropped, delivered twice, held back until after the next message on its link, or has one
    random bit of its encoded frame flipped. ``delay_s``: one-way delay, seconds >= 0, plus
    uniform ``jitter_s`` seconds. ``bandwidth_bytes_per_s``: None (unlimited) or > 0; a link
    sends one message after another, each taking encoded size / bandwidth seconds.
    ``partition``: cut directions ``(src_label, dst_label)``; two-way = both tuples.
    ``reset_after_messages``: None or >= 1 messages through a link (both directions, counted
    at each end) after which it is reset.
    """

    loss: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    bandwidth_bytes_per_s: float | None = None
    partition: frozenset[Direction] = field(default_factory=frozenset)
    reset_after_messages: int | None = None

    def __post_init__(self) -> None:
        bw, cut, reset = self.bandwidth_bytes_per_s, self.partition, self.reset_after_messages
        checks = {n: (_seconds(getattr(self, n)) and getattr(self, n) <= 1,
                      "a probability from 0 to 1")
                  for n in ("loss", "duplicate", "reorder", "corrupt")}
        checks |= {
            "delay_s": (_seconds(self.delay_s), "finite seconds >= 0"),
            "jitter_s": (_seconds(self.jitter_s), "finite seconds >= 0"),
            "bandwidth_bytes_per_s": (bw is None or (_seconds(bw) and bw > 0),
                                      "None (unlimited) or finite bytes per second > 0"),
            "partition": (isinstance(cut, (set, frozenset)) and all(
                isinstance(d, tuple) and len(d) == 2 and all(map(_label_ok, d)) for d in cut),
                "a frozenset of (src_label, dst_label) tuples of non-empty strings"),
            "reset_after_messages": (reset is None or (type(reset) is int and reset >= 1),
                                     "None or an integer >= 1"),
        }
        for name, (ok, valid) in checks.items():
            if not ok:
                raise ConfigError(f"FaultPlan.{name} is {getattr(self, name)!r}; valid: {valid}")
        object.__setattr__(self, "partition", frozenset(cut))


class _Item(NamedTuple):  # a queued message, due at loop time due_s; seq breaks ties
    due_s: float
    seq: int
    message: Message
    lane: str
    timeout_s: float
    size: int  # bytes it holds in the queue (its encoded size)


def _flip_bit(parts: list[bytes], bit: int) -> Message:
    frame = bytearray(b"".join(parts))
    frame[bit // 8] ^= 1 << (bit % 8)
    return Message(type=CORRUPT_TYPE,
                   tensor=WireTensor(dtype="u8", shape=(len(frame),), data=bytes(frame)))


def _peer_label(msg: Message, peer: str) -> str:
    label = msg.body.get("label")
    if msg.type != LABEL_TYPE or not _label_ok(label):
        raise TransportError(f"peer {peer} sent {msg.type!r} instead of a {LABEL_TYPE!r} with a "
                             f"label of 1..{MAX_LABEL_CHARS} characters; is it a FaultyTransport?")
    return label


class FaultyConnection(Connection):
    """A link whose sending direction follows its transport's ``FaultPlan`` (specs F2-F14).

    A delivery task, alive while the queue is not empty, forwards each queued message when due.
    """

    def __init__(self, inner: Connection, transport: FaultyTransport, *, peer_label: str) -> None:
        self._inner, self._transport = inner, transport
        self.local_label, self.peer_label = transport.label, peer_label
        self._encoder = FrameEncoder()
        self._queue: list[_Item] = []  # a heap by (due_s, seq)
        self._held: list[_Item] = []  # held back by reorder until the next message
        self._seq = self._through = 0  # _through: messages both ways, counted at this end
        self._link_free_at = 0.0  # loop time the link finishes serializing (bandwidth cap)
        self._wake, self._room = asyncio.Event(), asyncio.Event()
        self._queued_bytes = 0  # in the queue or being sent by the delivery task
        self._task: asyncio.Task[None] | None = None
        self._inbox: deque[Message] = deque()  # decoded from a corrupted frame
        self._frame_error: FrameError | None = None
        self._error: Exception | None = None  # from the delivery task
        self._closed_reason: str | None = None
        self._closing: asyncio.Task[None] | None = None
        transport._connections.add(self)  # for reset_all, until this link closes

    @property
    def peer(self) -> str:
        return self._inner.peer

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None or self._inner.closed

    @property
    def stats(self) -> base.LinkStats:
        """The inner link's counters (they include the label handshake and corrupt envelopes)."""
        return self._inner.stats

    @property
    def peer_identity(self) -> PeerIdentity | None:
        return self._inner.peer_identity

    def _raise_if_unusable(self) -> None:
        if (err := self._error) is not None:  # spec F13: a delivery error reaches every caller
            # Its class, except PeerTimeout: this caller's own wait did not time out.
            keep = isinstance(err, TransportError) and not isinstance(err, PeerTimeout)
            cls = type(err) if keep else TransportError
            raise cls(f"link to {self.peer} failed while delivering a message: {err}") from err
        if self._closed_reason is not None:
            raise TransportError(f"connection to {self.peer} is closed ({self._closed_reason})")

    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        """Apply the plan to ``msg`` and queue it, waiting only for room in the queue and
        for serialization time (F8); raises as ``Connection.send`` says. ``faults.*`` types
        are refused with FrameError."""
        base.check_lane(lane)
        self._raise_if_unusable()
        if self._inner.closed:  # e.g. the peer closed or reset it; recv reports how
            raise TransportError(f"connection to {self.peer} is closed")
        if isinstance(msg, Message) and msg.type.startswith("faults."):
            raise FrameError(f"message type {msg.type!r} is reserved for fault injection")
        parts = self._encoder.encode_parts(msg)
        size = sum(len(p) for p in parts)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # a send loop never starves the event loop
        self._raise_if_unusable()
        # spec F14: backpressure, like a socket buffer; one message always fits an empty queue
        if not await self._wait(loop.time() + timeout_s, lambda: not self._queued_bytes
                                or self._queued_bytes + size <= MAX_QUEUED_BYTES):
            raise PeerTimeout(f"send to {self.peer}: {self._queued_bytes} bytes still queued "
                              f"after {timeout_s}s")
        plan, rng = self._transport.plan, self._transport._rng
        # spec F2: always seven draws, so one fault's setting never shifts another's decisions
        u_loss, u_dup, u_reorder, u_corrupt, u_bit, u_jit, u_jit2 = (rng.random() for _ in range(7))
        copies = 2 if u_dup < plan.duplicate else 1
        sent_s = now = loop.time()
        if (bw := plan.bandwidth_bytes_per_s) is not None:  # spec F8: one after another
            sent_s = max(now, self._link_free_at) + size * copies / bw
            if sent_s - now > timeout_s:
                await self._wait(now + timeout_s)
                raise PeerTimeout(f"send of {msg.type!r} ({size} bytes) to {self.peer} needs "
                                  f"{sent_s - now:.3f}s at {bw} B/s, more than {timeout_s}s")
            self._link_free_at = sent_s
            await self._wait(sent_s)
        if (self.local_label, self.peer_label) in plan.partition or u_loss < plan.loss:
            return  # spec F3, F9: lost in the network, after serialization
        wire = _flip_bit(parts, int(u_bit * size * 8)) if u_corrupt < plan.corrupt else msg
        items = [self._item(sent_s + plan.delay_s + u * plan.jitter_s, wire, lane, timeout_s,
                            size) for u in (u_jit, u_jit2)[:copies]]
        if u_reorder < plan.reorder and not self._held:
            self._held = items  # spec F6: goes out right after the next message
            return
        latest_s = max(item.due_s for item in items)
        items += [self._item(max(h.due_s, latest_s), *h[2:]) for h in self._held]
        self._held = []
        self._enqueue(items)

    def _item(self, due_s: float, message: Message, lane: str, timeout_s: float,
              size: int) -> _Item:
        self._seq += 1
        return _Item(due_s, self._seq, message, lane, timeout_s, size)

    def _enqueue(self, items: list[_Item]) -> None:
        for item in items:
            heapq.heappush(self._queue, item)
            self._queued_bytes += item.size
        self._wake.set()
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._deliver(), name=f"faults-deliver {self.peer}")

    async def _wait(self, until_s: float, ready: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``ready()`` or loop time ``until_s``; raise TransportError as soon as the
        link closes. Returns ``ready()``."""
        loop = asyncio.get_running_loop()
        while not ready() and (left_s := until_s - loop.time()) > 0:
            self._room.clear()  # set by each delivery and by a close
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), left_s)
            self._raise_if_unusable()
        return ready()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if (wait_s := self._queue[0].due_s - loop.time()) > 0:
                    self._wake.clear()  # an earlier item (jitter) or close wakes us
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
                    continue
                item = heapq.heappop(self._queue)
                await self._inner.send(item.message, timeout_s=item.timeout_s, lane=item.lane)
                self._queued_bytes -= item.size
                self._room.set()
                await self._count_through()
        except Exception as exc:  # noqa: BLE001 -- spec F13: kept for the next caller
            logger.warning("faults: delivery to %s failed: %r", self.peer, exc)
            self._error = self._error or exc
            await self.reset(f"delivery failed: {exc}")

    async def _count_through(self) -> None:
        self._through += 1
        limit = self._transport.plan.reset_after_messages
        if limit is not None and self._through >= limit:  # spec F10
            await self.reset(f"reset by fault injection after {self._through} messages")

    async def recv(self, *, timeout_s: float | None = None) -> Message:
        """Return the next message; see ``Connection.recv``. A corrupted frame that does not
        decode raises FrameError and closes this link (spec F7)."""
        self._raise_if_unusable()
        if not self._inbox and self._frame_error is None:
            try:
                msg = await self._inner.recv(timeout_s=timeout_s)
            except TransportError as exc:
                if not isinstance(exc, PeerTimeout):  # our reset or delivery error says more
                    self._raise_if_unusable()
                raise
            if msg.type != CORRUPT_TYPE or msg.tensor is None:
                await self._count_through()
                return msg
            decoder = FrameDecoder()
            try:
                self._inbox.extend(decoder.feed(msg.tensor.data))
                decoder.end_of_stream()  # raises if the decoder failed or the frame is cut short
            except FrameError as exc:
                self._frame_error = exc
        if self._inbox:  # as a real transport: messages decoded before a bad frame come first
            msg = self._inbox.popleft()
            await self._count_through()
            return msg
        await self.reset(f"malformed frame: {self._frame_error}")
        raise FrameError(f"malformed frame from {self.peer}: {self._frame_error}")

    async def reset(self, reason: str = "reset by fault injection") -> None:
        """Close the link abruptly: queued messages are lost; pending and later ``recv`` and
        ``send`` here raise TransportError, and the peer sees the link close (spec F10)."""
        if self._closed_reason is None:
            self._closed_reason = reason
        self._queue, self._held, self._queued_bytes = [], [], 0
        self._room.set()
        if (task := self._task) is not None and task is not asyncio.current_task() \
                and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self._transport.close_timeout_s)
        self._transport._connections.discard(self)
        try:
            await asyncio.wait_for(self._inner.close(), self._transport.close_timeout_s)
        except (TimeoutError, TransportError, OSError) as exc:
            logger.debug("faults: closing the link to %s: %r", self.peer, exc)

    async def close(self) -> None:
        """Deliver what is queued (held messages last) for at most ``close_timeout_s``
        seconds, then close; idempotent and bounded (spec F13)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close())
        await asyncio.wait({self._closing}, timeout=3 * self._transport.close_timeout_s)

    async def _close(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "closed locally"
            held, self._held = self._held, []
            self._enqueue(held)
            if (task := self._task) is not None and not task.done():
                await asyncio.wait({task}, timeout=self._transport.close_timeout_s)
        await self.reset("closed locally; undelivered messages dropped")


class FaultyTransport(Transport):
    """Wraps ``inner`` so every link follows ``plan`` (specs F1-F14).

    ``label`` names this node in partitions; ``rng`` makes every random decision;
    ``handshake_timeout_s`` bounds the accepting side's label exchange and ``close_timeout_s``
    each wait while closing or resetting a link, in seconds.
    """

    name = "faults"

    def __init__(self, inner: Transport, *, label: str, rng: random.Random,
                 plan: FaultPlan = FaultPlan(), handshake_timeout_s: float = 10.0,
                 close_timeout_s: float = 2.0) -> None:
        if not _label_ok(label):
            raise ConfigError(f"label {label!r} invalid; valid: 1..{MAX_LABEL_CHARS} characters")
        if not all(_seconds(t) and t > 0 for t in (handshake_timeout_s, close_timeout_s)):
            raise ConfigError(f"handshake_timeout_s and close_timeout_s must be finite seconds "
                              f"> 0, got {handshake_timeout_s}, {close_timeout_s}")
        self.inner, self.label, self._rng = inner, label, rng
        # Transport.secure is a ClassVar; a wrapper is as secure as the transport it wraps.
        self.secure = inner.secure  # type: ignore[misc]
        self.handshake_timeout_s, self.close_timeout_s = handshake_timeout_s, close_timeout_s
        self.plan = FaultPlan()  # what every link follows now; change it with set_plan
        self.set_plan(plan)
        self._connections: set[FaultyConnection] = set()

    def set_plan(self, plan: FaultPlan) -> None:
        """Apply ``plan`` from the next message on, to open and future links (spec F11)."""
        if not isinstance(plan, FaultPlan):
            raise ConfigError(f"plan must be a FaultPlan, not a {type(plan).__name__}")
        self.plan = plan

    async def reset_all(self) -> None:
        """Reset every open link of this transport now (spec F10)."""
        await asyncio.gather(*(c.reset("reset_all by fault injection")
                               for c in list(self._connections)))

    async def listen(self, host: str, port: int, on_connection: base.ConnectionHandler
                     ) -> base.Listener:
        """Listen through ``inner``; a peer that does not send a ``faults.label`` first, within
        ``handshake_timeout_s`` seconds, has its link closed by the inner listener (F12)."""
        async def accept(inner: Connection) -> None:
            hello = await inner.recv(timeout_s=self.handshake_timeout_s)
            peer_label = _peer_label(hello, inner.peer)
            await inner.send(Message(type=LABEL_TYPE, body={"label": self.label}),
                             timeout_s=self.handshake_timeout_s)
            conn = FaultyConnection(inner, self, peer_label=peer_label)
            try:
                await on_connection(conn)
            except BaseException:
                await conn.reset("the connection handler raised")
                raise

        return await self.inner.listen(host, port, accept)

    async def connect(self, host: str, port: int, *, timeout_s: float) -> FaultyConnection:
        """Connect and swap labels, all within ``timeout_s`` seconds (spec F12)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        inner = await self.inner.connect(host, port, timeout_s=timeout_s)
        try:
            await inner.send(Message(type=LABEL_TYPE, body={"label": self.label}),
                             timeout_s=max(deadline - loop.time(), 1e-3))
            reply = await inner.recv(timeout_s=max(deadline - loop.time(), 1e-3))
            peer_label = _peer_label(reply, inner.peer)
        except BaseException:
            await inner.close()
            raise
        return FaultyConnection(inner, self, peer_label=peer_label)
