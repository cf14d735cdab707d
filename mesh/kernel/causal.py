"""Causal delivery: hold events back until their causal past has been delivered.

Events reach a node in any order, more than once, and with gaps (spec K2, K3). A
``CausalBuffer`` takes every event that arrives (``offer``) and hands back, in a causal order,
the events that have become deliverable. An event ``e`` is deliverable when

- ``e.id.seq == delivered[e.id.origin] + 1`` (the next one of its origin), and
- ``delivered`` dominates ``e.deps`` (everything it depends on has been delivered).

A gap is never an error: the event waits in the buffer, and ``missing()`` says what to ask
peers for. A duplicate (already delivered, or already waiting) is dropped (spec K3). When
several events are deliverable at once they are delivered by ascending ``(hlc, origin, seq)``,
so the same sequence of offers always yields the same sequence of deliveries.

After a state snapshot that covers a version vector has been merged in, ``skip_to`` moves
``delivered`` forward without the individual events, drops what is now covered, and
delivers what that unblocked.

An event whose ``deps`` can never be satisfied (e.g. two events claiming to depend on each
other) waits until ``skip_to`` covers it; the ``max_buffered`` bound keeps that from growing
without limit.

Must not know: the CRDT, the clock, transports, IO. Implements specs K2 and K3.
"""

from __future__ import annotations

import heapq

from mesh.errors import KernelError
from mesh.kernel.events import Event, VersionVector
from mesh.kernel.hlc import Timestamp, check_int

DEFAULT_MAX_BUFFERED = 100_000

_SortKey = tuple[Timestamp, str, int]


def _key(event: Event) -> _SortKey:
    return (event.hlc, event.id.origin, event.id.seq)


class CausalBuffer:
    """Buffers events until deliverable; see the module docstring.

    ``delivered`` is the version vector of every event delivered (or skipped past with
    ``skip_to``); it only grows.

    Raises:
        KernelError: when ``max_buffered`` is not an int >= 1.
    """

    __slots__ = ("max_buffered", "_delivered", "_delivered_vv", "_waiting", "_count")

    def __init__(self, *, max_buffered: int = DEFAULT_MAX_BUFFERED) -> None:
        self.max_buffered = check_int("max_buffered", max_buffered, 1, 2**62)
        self._delivered: dict[str, int] = {}
        self._delivered_vv: VersionVector | None = VersionVector()
        # origin -> {seq: event} of buffered (not yet deliverable) events
        self._waiting: dict[str, dict[int, Event]] = {}
        self._count = 0

    def __repr__(self) -> str:
        return f"CausalBuffer(delivered={self.delivered!r}, buffered={self._count})"

    @property
    def delivered(self) -> VersionVector:
        """Every event delivered or skipped past: ``(o, s)`` with ``s <= delivered[o]``."""
        if self._delivered_vv is None:
            self._delivered_vv = VersionVector(self._delivered)
        return self._delivered_vv

    def buffered(self) -> int:
        """How many events are waiting."""
        return self._count

    def offer(self, event: Event) -> list[Event]:
        """Take one received (or locally created) event; return every event that became
        deliverable, in a causal order: possibly ``event`` itself, possibly none.

        Duplicates (already delivered or already waiting) return ``[]`` (spec K3); if a
        waiting event and its duplicate differ, the first one offered is kept.

        Raises:
            KernelError: when ``event`` is not an Event, or when it would have to wait while
                ``max_buffered`` events already wait (the buffer is unchanged).
        """
        if not isinstance(event, Event):
            raise KernelError(f"CausalBuffer.offer needs an Event, got {type(event).__name__}")
        origin, seq = event.id.origin, event.id.seq
        if seq <= self._delivered.get(origin, 0) or seq in self._waiting.get(origin, {}):
            return []  # spec K3: a duplicate has no effect
        if self._deliverable(event):
            return self._drain([(_key(event), event)])
        if self._count >= self.max_buffered:
            raise KernelError(
                f"causal buffer is full ({self._count} events wait for missing dependencies "
                f"{self.missing().to_wire()!r:.200}); cannot hold event {event.id}"
            )
        # spec K2: a gap is buffered, never rejected.
        self._waiting.setdefault(origin, {})[seq] = event
        self._count += 1
        return []

    def skip_to(self, vv: VersionVector) -> list[Event]:
        """Merge ``vv`` into ``delivered`` (a snapshot covering ``vv`` was applied), drop the
        waiting events it covers, and return the waiting events that became deliverable."""
        if not isinstance(vv, VersionVector):
            raise KernelError(f"skip_to needs a VersionVector, got {type(vv).__name__}")
        changed = False
        for origin, seq in vv.items():
            if seq > self._delivered.get(origin, 0):
                self._delivered[origin] = seq
                changed = True
        if not changed:
            return []
        self._delivered_vv = None
        for origin in list(self._waiting):
            floor = self._delivered.get(origin, 0)
            events = self._waiting[origin]
            for seq in [s for s in events if s <= floor]:
                del events[seq]
                self._count -= 1
            if not events:
                del self._waiting[origin]
        ready = [(_key(e), e) for e in self._heads() if self._deliverable(e)]
        for _, e in ready:
            self._remove(e)
        return self._drain(ready)

    def missing(self) -> VersionVector:
        """The smallest version vector ``m`` such that, once every event ``(o, s)`` with
        ``delivered[o] < s <= m[o]`` has been delivered, every waiting event is deliverable.

        ``m[o]`` is the highest seq of ``o`` that some waiting event needs (is in its causal
        past, or precedes it in its origin) and that is neither delivered nor waiting; origins
        with no such gap are absent. Empty when nothing is missing. Ask peers for the events
        in ``(delivered[o], m[o]]``.
        """
        needed: dict[str, int] = {}
        for origin, events in self._waiting.items():
            needed[origin] = max(needed.get(origin, 0), max(events))
            for event in events.values():
                for dep_origin, dep_seq in event.deps.items():
                    if dep_seq > needed.get(dep_origin, 0):
                        needed[dep_origin] = dep_seq
        gaps: dict[str, int] = {}
        for origin, top in needed.items():
            floor = self._delivered.get(origin, 0)
            waiting = self._waiting.get(origin, {})
            seq = top
            while seq > floor and seq in waiting:
                seq -= 1
            if seq > floor:
                gaps[origin] = seq
        return VersionVector(gaps)

    # -- internals -------------------------------------------------------------------------

    def _deliverable(self, event: Event) -> bool:
        delivered = self._delivered
        if event.id.seq != delivered.get(event.id.origin, 0) + 1:
            return False
        return all(delivered.get(o, 0) >= s for o, s in event.deps.items())

    def _heads(self) -> list[Event]:
        """The next waiting event of each origin, if it is waiting."""
        heads = []
        for origin, events in self._waiting.items():
            head = events.get(self._delivered.get(origin, 0) + 1)
            if head is not None:
                heads.append(head)
        return heads

    def _remove(self, event: Event) -> None:
        events = self._waiting[event.id.origin]
        del events[event.id.seq]
        self._count -= 1
        if not events:
            del self._waiting[event.id.origin]

    def _drain(self, ready: list[tuple[_SortKey, Event]]) -> list[Event]:
        """Deliver ``ready`` (deliverable, no longer waiting) and everything they unblock,
        smallest ``(hlc, origin, seq)`` first."""
        heapq.heapify(ready)
        out: list[Event] = []
        while ready:
            _, event = heapq.heappop(ready)
            self._delivered[event.id.origin] = event.id.seq  # spec K2: its past is delivered
            self._delivered_vv = None
            out.append(event)
            if not self._waiting:
                continue
            # Delivering (origin, seq) can unblock the origin's next event and any other
            # origin's head that depended on it; heads already in `ready` are not waiting.
            for head in self._heads():
                if self._deliverable(head):
                    self._remove(head)
                    heapq.heappush(ready, (_key(head), head))
        return out
