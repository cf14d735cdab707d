"""Causal delivery (spec K2) and idempotence (spec K3) of ``CausalBuffer``."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mesh.errors import KernelError
from mesh.kernel.causal import CausalBuffer
from mesh.kernel.events import Event, EventId, VersionVector
from mesh.kernel.hlc import HybridClock, Timestamp

VV = VersionVector
Id = tuple[str, int]


class Sim:
    """Nodes that emit events whose deps are everything they know (a closed causal past),
    and that learn from each other by syncing."""

    def __init__(self, names: Iterable[str]) -> None:
        self.known: dict[str, dict[str, int]] = {n: {} for n in names}
        self.clocks = {n: HybridClock() for n in self.known}
        self.events: list[Event] = []
        self.t = 1_000

    def emit(self, node: str, *, ms: int = 1) -> Event:
        self.t += ms
        known = self.known[node]
        seq = known.get(node, 0) + 1
        event = Event(id=EventId(origin=node, seq=seq), hlc=self.clocks[node].now(self.t), deps=VV(known),
                      type="test.op", version=1, payload={"n": len(self.events)})
        known[node] = seq
        self.events.append(event)
        return event

    def sync(self, dst: str, src: str) -> None:
        for origin, seq in self.known[src].items():
            self.known[dst][origin] = max(self.known[dst].get(origin, 0), seq)
        self.clocks[dst].observe(self.clocks[src].last, self.t)


def chain() -> list[Event]:
    """12 events across A, B, C with cross dependencies, plus D1 depending on nothing."""
    sim = Sim("ABCD")
    sim.emit("A"), sim.emit("A")
    sim.sync("B", "A")
    sim.emit("B"), sim.emit("C"), sim.emit("B")
    sim.sync("C", "B")
    sim.emit("C"), sim.emit("A")
    sim.sync("A", "C")
    sim.emit("A"), sim.emit("B")
    sim.sync("C", "A")
    sim.emit("C"), sim.emit("C")
    sim.sync("B", "C")
    sim.emit("B")
    sim.emit("D", ms=0)
    assert len(sim.events) == 13
    return sim.events


def ident(event: Event) -> Id:
    return (event.id.origin, event.id.seq)


def assert_causal(delivered: Sequence[Event]) -> None:
    """Each event comes after its predecessor in its origin and after its whole causal past."""
    seen: dict[str, int] = {}
    for event in delivered:
        assert event.id.seq == seen.get(event.id.origin, 0) + 1, f"{event.id} out of origin order"
        assert all(seen.get(o, 0) >= s for o, s in event.deps.items()), f"{event.id} before its deps"
        seen[event.id.origin] = event.id.seq


def expected_missing(events: Sequence[Event], offered: set[Id], delivered: set[Id]) -> VersionVector:
    """Independent statement of missing(): for each origin, the highest seq not yet offered that
    some waiting event has in its (closed) causal past."""
    waiting = [e for e in events if ident(e) in offered and ident(e) not in delivered]
    gaps: dict[str, int] = {}
    for e in events:
        o, s = ident(e)
        if ident(e) not in offered and any(w.deps.get(o) >= s for w in waiting):
            gaps[o] = max(gaps.get(o, 0), s)
    return VV(gaps)


def feed(buffer: CausalBuffer, events: Sequence[Event], stream: Sequence[Event],
         offered: set[Id], out: list[Event]) -> None:
    """Offer ``stream`` one by one, checking missing() and buffered() after each offer."""
    for event in stream:
        got = buffer.offer(event)
        offered.add(ident(event))
        out.extend(got)
        done = {ident(e) for e in out}
        assert buffer.buffered() == len(offered - done)
        assert buffer.missing() == expected_missing(events, offered, done)


@pytest.mark.spec("K2", "K3")
def test_chain_in_1000_permutations_with_duplicates() -> None:
    events = chain()
    rng = random.Random(20240611)
    for _ in range(1000):
        order = events[:]
        rng.shuffle(order)
        held = set(rng.sample(range(len(order)), rng.randint(0, 3)))
        first = [e for i, e in enumerate(order) if i not in held]
        later = [order[i] for i in sorted(held)]
        for part in (first, later):  # duplicates anywhere, including before the original
            for _ in range(rng.randint(0, 6)):
                part.insert(rng.randrange(len(part) + 1), rng.choice(events))
        buffer, offered, out = CausalBuffer(), set[Id](), list[Event]()
        feed(buffer, events, first, offered, out)
        # With some events held back, missing() names exactly what to ask for ...
        if not later:
            assert buffer.buffered() == 0 and buffer.missing() == VV()
        ask = buffer.missing()
        wanted = [e for e in events if ident(e) not in offered and e.id.seq <= ask.get(e.id.origin)]
        for e in wanted:
            out.extend(buffer.offer(e))
            offered.add(ident(e))
        # ... and once those arrive, nothing waits any more.
        assert buffer.buffered() == 0 and buffer.missing() == VV()
        feed(buffer, events, later, offered, out)
        assert_causal(out)
        assert sorted(map(ident, out)) == sorted(map(ident, events))  # each exactly once
        assert buffer.delivered == VV({"A": 4, "B": 4, "C": 4, "D": 1})
        assert buffer.buffered() == 0 and buffer.missing() == VV()
        for e in events:  # spec K3: late duplicates do nothing
            assert buffer.offer(e) == []


@st.composite
def dags(draw: st.DrawFn) -> list[Event]:
    names = "ABCDE"[: draw(st.integers(min_value=1, max_value=5))]
    sim = Sim(names)
    sim.emit(draw(st.sampled_from(names)))
    for _ in range(draw(st.integers(min_value=0, max_value=30))):
        if draw(st.booleans()):
            sim.emit(draw(st.sampled_from(names)), ms=draw(st.integers(0, 3)))
        else:
            sim.sync(draw(st.sampled_from(names)), draw(st.sampled_from(names)))
    return sim.events


@pytest.mark.spec("K2", "K3")
@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_random_dags_in_random_orders(events: list[Event], data: st.DataObject) -> None:
    stream = data.draw(st.permutations(events))
    dups = data.draw(st.lists(st.tuples(st.integers(0, len(stream)), st.sampled_from(events)), max_size=8))
    stream = list(stream)
    for pos, e in dups:
        stream.insert(min(pos, len(stream)), e)
    buffer, out = CausalBuffer(), list[Event]()
    feed(buffer, events, stream, set(), out)
    assert_causal(out)
    assert sorted(map(ident, out)) == sorted(map(ident, events))
    assert buffer.buffered() == 0 and buffer.missing() == VV()
    replay = CausalBuffer()
    assert [e for x in stream for e in replay.offer(x)] == out  # deterministic


def ev(origin: str, seq: int, deps: dict[str, int] | None = None, ms: int = 0) -> Event:
    full = dict(deps or {})
    full[origin] = seq - 1
    return Event(id=EventId(origin=origin, seq=seq), hlc=Timestamp(ms, 0), deps=VV(full),
                 type="t", version=1, payload={})


@pytest.mark.spec("K2")
def test_ties_are_delivered_by_hlc_then_origin_then_seq() -> None:
    buffer = CausalBuffer()
    b1, c1, d1 = ev("B", 1, {"A": 1}, ms=30), ev("C", 1, {"A": 1}, ms=20), ev("D", 1, {"A": 1}, ms=20)
    for e in (b1, d1, c1):
        assert buffer.offer(e) == []
    assert buffer.missing() == VV({"A": 1})
    a1 = ev("A", 1, ms=50)
    assert buffer.offer(a1) == [a1, c1, d1, b1]


@pytest.mark.spec("K2")
def test_missing_skips_what_is_already_waiting() -> None:
    buffer = CausalBuffer()
    for seq in range(3, 50):
        buffer.offer(ev("A", seq))
    buffer.offer(ev("B", 2, {"A": 60}))
    # A:1 and A:2 are missing below the waiting run; A:50..60 are needed by B:2; B:1 by B:2.
    assert buffer.missing() == VV({"A": 60, "B": 1})
    for seq in range(50, 61):
        buffer.offer(ev("A", seq))
    assert buffer.missing() == VV({"A": 2, "B": 1})
    assert buffer.offer(ev("A", 2)) == []
    assert buffer.missing() == VV({"A": 1, "B": 1})
    assert len(buffer.offer(ev("A", 1))) == 60
    assert buffer.missing() == VV({"B": 1}) and buffer.buffered() == 1
    assert [e.id for e in buffer.offer(ev("B", 1))] == [EventId(origin="B", seq=1), EventId(origin="B", seq=2)]


@pytest.mark.spec("K2", "K3")
def test_skip_to() -> None:
    buffer = CausalBuffer()
    a = [ev("A", s) for s in range(1, 7)]
    b2 = ev("B", 2, {"A": 5})
    for e in (a[1], a[2], a[4], a[5], b2):
        assert buffer.offer(e) == []
    assert buffer.buffered() == 5
    # A snapshot covering A:3 and B:1 was merged: A:2, A:3 are dropped, A:4 is still missing.
    assert buffer.skip_to(VV({"A": 3, "B": 1})) == []
    assert buffer.delivered == VV({"A": 3, "B": 1}) and buffer.buffered() == 3
    assert buffer.missing() == VV({"A": 4})
    assert buffer.skip_to(VV({"A": 2})) == []  # behind: nothing changes
    assert buffer.delivered == VV({"A": 3, "B": 1})
    # A snapshot covering A:4 unblocks A:5, A:6 and then B:2.
    assert buffer.skip_to(VV({"A": 4})) == [a[4], a[5], b2]
    assert buffer.buffered() == 0 and buffer.missing() == VV()
    assert buffer.offer(a[0]) == [] and buffer.offer(a[3]) == []  # covered: duplicates (K3)
    # Skipping past waiting events drops them even if they never became deliverable.
    assert buffer.offer(ev("C", 3, {"A": 6})) == []
    assert buffer.skip_to(VV({"C": 5})) == [] and buffer.buffered() == 0
    assert buffer.delivered == VV({"A": 6, "B": 2, "C": 5})
    with pytest.raises(KernelError):
        buffer.skip_to({"A": 9})  # type: ignore[arg-type]


@pytest.mark.spec("K2")
def test_buffer_full() -> None:
    buffer = CausalBuffer(max_buffered=3)
    for seq in (2, 3, 4):
        buffer.offer(ev("A", seq))
    assert buffer.offer(ev("A", 3)) == []  # a duplicate is fine even when full
    with pytest.raises(KernelError, match="full"):
        buffer.offer(ev("A", 5))
    assert buffer.buffered() == 3 and buffer.missing() == VV({"A": 1})
    # A deliverable event needs no room, and delivering frees room.
    assert len(buffer.offer(ev("A", 1))) == 4
    assert buffer.offer(ev("A", 5)) == [ev("A", 5)]
    with pytest.raises(KernelError):
        CausalBuffer(max_buffered=0)
    with pytest.raises(KernelError):
        buffer.offer(ev("A", 6).to_wire())  # type: ignore[arg-type]


@pytest.mark.spec("K3")
def test_first_of_two_conflicting_copies_wins() -> None:
    buffer = CausalBuffer()
    first, second = ev("A", 2, ms=1), ev("A", 2, ms=2)
    assert buffer.offer(first) == [] and buffer.offer(second) == []
    assert buffer.offer(ev("A", 1)) == [ev("A", 1), first]


UNIVERSE = chain()


class BufferMachine(RuleBasedStateMachine):
    """CausalBuffer against a model: delivered = the fixpoint of "deliver anything offered
    whose predecessor and deps are delivered", starting from the skip_to floor."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = CausalBuffer()
        self.offered: set[Id] = set()
        self.floor: dict[str, int] = {}
        self.model: dict[str, int] = {}

    def settle(self) -> set[Id]:
        """Apply the floor, then deliver to a fixpoint; return what was delivered."""
        for o, s in self.floor.items():
            self.model[o] = max(self.model.get(o, 0), s)
        newly: set[Id] = set()
        progress = True
        while progress:
            progress = False
            for e in UNIVERSE:
                o, s = ident(e)
                if (o, s) in self.offered and s == self.model.get(o, 0) + 1 and \
                        all(self.model.get(d, 0) >= n for d, n in e.deps.items()):
                    self.model[o] = s
                    newly.add((o, s))
                    progress = True
        return newly

    @rule(i=st.integers(0, len(UNIVERSE) - 1))
    def offer(self, i: int) -> None:
        self.offered.add(ident(UNIVERSE[i]))
        got = self.buffer.offer(UNIVERSE[i])
        assert {ident(e) for e in got} == self.settle() and len(got) == len(set(map(ident, got)))

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), c=st.integers(0, 4))
    def skip(self, a: int, b: int, c: int) -> None:
        vv = VV({"A": a, "B": b, "C": c})
        for o, s in vv.items():
            self.floor[o] = max(self.floor.get(o, 0), s)
        got = self.buffer.skip_to(vv)
        assert {ident(e) for e in got} == self.settle()

    @invariant()
    def agrees(self) -> None:
        assert self.buffer.delivered == VV(self.model)
        waiting = {(o, s) for o, s in self.offered if s > self.model.get(o, 0)}
        assert self.buffer.buffered() == len(waiting)
        if not waiting:
            assert self.buffer.missing() == VV()


BufferMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestBufferMachine = pytest.mark.spec("K2", "K3")(BufferMachine.TestCase)
