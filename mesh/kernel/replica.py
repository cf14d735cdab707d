"""The replica: HLC, causal delivery and the CRDT state put together, plus compaction and
the anti-entropy protocol (sans-IO).

A ``Replica`` issues events (``emit``), takes events from peers (``receive``), and answers a
peer's digest with what the peer lacks (``answer_sync``): the events of its tail after the
peer's version vector, or, when it has compacted away events the peer still needs, its whole
state (a state-based CRDT merge) followed by the tail. Answers are cut into pages of bounded
size. ``AntiEntropy`` decides when to send digests and retries unanswered ones with
exponential backoff. Neither knows sockets, files or the wall clock: ``now_ms`` and a
``random.Random`` are passed in. Spec: specs/kernel.md (K1-K3, K5-K7, K10).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from mesh.errors import KernelError
from mesh.kernel.causal import CausalBuffer
from mesh.kernel.crdt import ClusterState
from mesh.kernel.events import Event, EventId, VersionVector
from mesh.kernel.hlc import HybridClock

DEFAULT_PAGE_BYTES = 256 * 1024
RECENT_EVENTS = 100  # applied events kept for GET /v1/cluster (the dashboard)
MAX_STATE_BYTES = 64 << 20  # a reassembled state larger than this is refused


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncPage:
    """One page of an answer to a digest: a chunk of the sender's encoded state
    (``state_chunk`` ``i`` of ``state_chunks``) or a run of events; ``last`` ends the answer."""

    nonce: int
    events: tuple[Event, ...] = ()
    state_chunk: bytes | None = None
    chunk_index: int = 0
    state_chunks: int = 0
    last: bool = False

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"n": self.nonce, "e": [e.to_wire() for e in self.events], "last": self.last}
        if self.state_chunk is not None:
            body.update(s=self.state_chunk, si=self.chunk_index, sn=self.state_chunks)
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> SyncPage:
        nonce, events, last = body.get("n"), body.get("e"), body.get("last")
        if not isinstance(nonce, int) or isinstance(nonce, bool) or not isinstance(events, list) or not isinstance(last, bool):
            raise KernelError("malformed sync page: needs int n, list e, bool last")
        chunk = body.get("s")
        index, count = body.get("si", 0), body.get("sn", 0)
        if chunk is not None and (not isinstance(chunk, bytes) or not isinstance(index, int)
                                  or not isinstance(count, int) or not 0 <= index < count <= 4096):
            raise KernelError("malformed sync page: bad state chunk")
        return cls(nonce=nonce, events=tuple(Event.from_wire(e) for e in events), state_chunk=chunk,
                   chunk_index=index if chunk is not None else 0, state_chunks=count if chunk is not None else 0,
                   last=last)


def check_payload(event: Event) -> tuple[str, Any, list[tuple[str, int]]]:
    """(key, value, replaces) of a state-op event. Raises KernelError unless the payload is
    ``{"key": str, "value": any, "replaces": [[origin, seq], ...]}`` with every replaced dot in
    the event's causal past (so causal delivery makes it applicable)."""
    payload = event.payload
    key, value, replaces = payload.get("key"), payload.get("value"), payload.get("replaces", [])
    if not isinstance(key, str) or not key or not isinstance(replaces, list):
        raise KernelError(f"event {event.id} has a malformed payload")
    dots = []
    for d in replaces:
        if not (isinstance(d, list) and len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], int)
                and not isinstance(d[1], bool) and 1 <= d[1] <= event.deps.get(d[0])):
            raise KernelError(f"event {event.id} replaces {d!r}, which is not in its causal past")
        dots.append((d[0], d[1]))
    return key, value, dots


class Replica:
    """One node's copy of the cluster state and the events behind it.

    ``state`` is the fold of every applied event; ``tail`` holds the events applied since the
    last snapshot, in delivery order (a causal order); ``snapshot_vv`` is what the snapshot
    covers. Events at or below ``snapshot_vv`` can no longer be sent one by one: a peer that
    lacks some of them gets the whole state (spec K5, K7).
    """

    def __init__(self, node_id: str, *, clock: HybridClock | None = None, state: ClusterState | None = None,
                 page_bytes: int = DEFAULT_PAGE_BYTES, compact_after: int = 2000) -> None:
        if not node_id:
            raise KernelError("a replica needs a node id")
        self.node_id = node_id
        self.clock = clock or HybridClock()
        self.state = state or ClusterState()
        self.buffer = CausalBuffer()
        self.buffer.skip_to(self.state.context)
        self.tail: list[Event] = []
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)  # for people (the dashboard), kept across compactions
        self.snapshot_vv = self.state.context
        self.page_bytes = page_bytes
        self.compact_after = compact_after
        self.applied = 0
        self.snapshots = 0  # bumped by every compaction: the shell persists the state then
        self._assembling: dict[tuple[str, int], list[bytes | None]] = {}

    # -- issuing and applying ------------------------------------------------------------
    def emit(self, type: str, key: str, value: Any, *, now_ms: int, version: int = 1) -> Event:
        """Issue an event writing ``value`` under ``key`` (None removes the key), apply it, and
        return it for logging and broadcast. It replaces every entry under ``key`` seen here."""
        seq = self.state.context.get(self.node_id) + 1
        event = Event(
            id=EventId(origin=self.node_id, seq=seq),
            hlc=self.clock.now(now_ms),
            deps=self.state.context,
            type=type,
            version=version,
            payload={"key": key, "value": value, "replaces": [list(d) for d in self.state.observed(key)]},
        )
        applied = self.buffer.offer(event)
        for e in applied:
            self._apply(e)
        return event

    def receive(self, event: Event, *, now_ms: int) -> list[Event]:
        """Take an event from a peer; return the events that became applied (possibly none:
        a duplicate, or one waiting for its dependencies).

        Raises ClockDriftError when the event's HLC is too far ahead (spec K4): the caller
        logs and drops it; anti-entropy asks for it again later. Raises KernelError for a
        payload ``check_payload`` refuses (spec K2), before the clock or the buffer see it.
        """
        if self.state.context.covers(event.id.origin, event.id.seq):
            return []  # spec K3: a duplicate changes nothing (the clock need not see it)
        check_payload(event)
        self.clock.observe(event.hlc, now_ms)
        applied = self.buffer.offer(event)
        for e in applied:
            self._apply(e)
        return applied

    def _apply(self, event: Event) -> None:
        # Checked once, where the event came in: ``receive`` (a peer) and ``restore`` (the
        # log) run check_payload before the buffer or the clock see it, and ``emit`` builds a
        # valid payload; so it is only unpacked here.
        payload = event.payload
        dots = [(d[0], d[1]) for d in payload.get("replaces", [])]
        self.state.apply(dot=(event.id.origin, event.id.seq), hlc=event.hlc, key=payload["key"],
                         value=payload.get("value"), replaces=dots)
        self.tail.append(event)
        self.recent.append(event)
        self.applied += 1

    def restore(self, events: Iterable[Event]) -> int:
        """Re-apply events read back from the local log (already in a causal order); the clock
        is advanced past every restored timestamp. Returns how many were new. Raises
        KernelError for an event whose payload ``check_payload`` refuses."""
        count = 0
        for event in events:
            if self.state.context.covers(event.id.origin, event.id.seq):
                continue
            check_payload(event)
            if self.clock.last < event.hlc:
                self.clock.last = event.hlc
            for e in self.buffer.offer(event):
                self._apply(e)
                count += 1
        return count

    # -- compaction --------------------------------------------------------------------
    def needs_compaction(self) -> bool:
        return len(self.tail) >= self.compact_after

    def compact(self) -> ClusterState:
        """Forget the tail: the current state becomes the snapshot (persist it first)."""
        self.snapshot_vv = self.state.context
        self.tail = []
        self.snapshots += 1
        return self.state

    # -- anti-entropy ------------------------------------------------------------------
    def digest(self) -> VersionVector:
        return self.state.context

    def missing(self) -> VersionVector:
        return self.buffer.missing()

    def answer_sync(self, peer_vv: VersionVector, nonce: int) -> list[SyncPage]:
        """Pages with what a peer holding ``peer_vv`` lacks (spec K7): the state when the peer
        is behind our snapshot, then the tail events it has not seen; each page's encoding is
        bounded by ``page_bytes`` (a single event larger than that goes alone)."""
        if not peer_vv.dominates(self.snapshot_vv):
            # The peer lacks events we only hold inside the state: send the state (it covers
            # the whole tail too), cut into chunks.
            blob = cbor2.dumps(self.state.to_wire())
            chunks = [blob[i:i + self.page_bytes] for i in range(0, len(blob), self.page_bytes)] or [b""]
            return [SyncPage(nonce=nonce, state_chunk=c, chunk_index=i, state_chunks=len(chunks),
                             last=i == len(chunks) - 1) for i, c in enumerate(chunks)]
        pages: list[SyncPage] = []
        run: list[Event] = []
        size = 0
        for event in self.tail:
            if peer_vv.covers(event.id.origin, event.id.seq):
                continue
            esize = event.encoded_size()
            if run and size + esize > self.page_bytes:
                pages.append(SyncPage(nonce=nonce, events=tuple(run)))
                run, size = [], 0
            run.append(event)
            size += esize
        pages.append(SyncPage(nonce=nonce, events=tuple(run), last=True))
        return pages

    def take_page(self, peer: str, page: SyncPage, *, now_ms: int) -> list[Event]:
        """Apply one page from ``peer``; returns events newly applied. A state arrives in
        chunks and is merged when the last chunk is in (spec K1: merge == fold of the union)."""
        applied: list[Event] = []
        if page.state_chunk is not None:
            slot = (peer, page.nonce)
            parts = self._assembling.setdefault(slot, [None] * page.state_chunks)
            if len(parts) != page.state_chunks:
                raise KernelError("state chunk count changed within one answer")
            parts[page.chunk_index] = page.state_chunk
            if sum(len(p) for p in parts if p is not None) > MAX_STATE_BYTES:
                del self._assembling[slot]
                raise KernelError(f"a peer's state exceeds {MAX_STATE_BYTES} bytes")
            if all(p is not None for p in parts):
                del self._assembling[slot]
                blob = b"".join(p for p in parts if p is not None)
                try:
                    other = ClusterState.from_wire(cbor2.loads(blob))
                except (cbor2.CBORDecodeError, ValueError) as exc:
                    raise KernelError(f"a peer's state does not decode: {exc}") from exc
                applied.extend(self.merge_state(other))
        for event in page.events:
            applied.extend(self.receive(event, now_ms=now_ms))
        if page.last:
            self._assembling = {k: v for k, v in self._assembling.items() if k[0] != peer}
        return applied

    def merge_state(self, other: ClusterState) -> list[Event]:
        """Join a peer's state into ours. Events we held one by one and the peer's state now
        covers can no longer be told apart, so this also compacts (the merged state is the new
        snapshot). Returns buffered events that became deliverable."""
        self.state = self.state.merge(other)
        self.compact()
        applied: list[Event] = []
        for event in self.buffer.skip_to(self.state.context):
            self._apply(event)
            applied.append(event)
        return applied


@dataclass
class _Outstanding:
    nonce: int
    deadline_ms: int
    backoff_ms: int


@dataclass
class AntiEntropy:
    """When to send digests: to every peer every ``interval_ms``; an unanswered digest is
    re-sent after a backoff that doubles (with jitter) up to ``max_backoff_ms`` (spec K7)."""

    interval_ms: int = 1000
    first_backoff_ms: int = 500
    max_backoff_ms: int = 8000
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _outstanding: dict[str, _Outstanding] = field(default_factory=dict)
    _next_round_ms: dict[str, int] = field(default_factory=dict)
    _nonce: int = 0

    def due(self, peers: Iterable[str], now_ms: int) -> list[tuple[str, int]]:
        """(peer, nonce) pairs to send our digest to now."""
        out: list[tuple[str, int]] = []
        live = set(peers)
        for gone in [p for p in self._outstanding if p not in live]:
            del self._outstanding[gone]
        for peer in sorted(live):
            pending = self._outstanding.get(peer)
            if pending is not None:
                if now_ms >= pending.deadline_ms:  # unanswered: retry with backoff
                    backoff = min(self.max_backoff_ms, pending.backoff_ms * 2)
                    pending.deadline_ms = now_ms + backoff // 2 + self.rng.randrange(backoff // 2 + 1)
                    pending.backoff_ms = backoff
                    out.append((peer, pending.nonce))
                continue
            if now_ms >= self._next_round_ms.get(peer, 0):
                out.append((peer, self._start(peer, now_ms)))
        return out

    def sync_now(self, peer: str, now_ms: int) -> int:
        """Start a round with ``peer`` at once (e.g. it just connected); returns the nonce."""
        return self._start(peer, now_ms)

    def _start(self, peer: str, now_ms: int) -> int:
        self._nonce += 1
        self._outstanding[peer] = _Outstanding(self._nonce, now_ms + self.first_backoff_ms, self.first_backoff_ms)
        self._next_round_ms[peer] = now_ms + self.interval_ms
        return self._nonce

    def answered(self, peer: str, nonce: int, now_ms: int) -> None:
        """The last page of the answer to ``nonce`` arrived."""
        pending = self._outstanding.get(peer)
        if pending is not None and pending.nonce == nonce:
            del self._outstanding[peer]
            self._next_round_ms[peer] = now_ms + self.interval_ms
