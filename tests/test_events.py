"""The event envelope and version vectors: wire round trips and strict validation."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import KernelError
from mesh.kernel.events import (
    MAX_ORIGIN_LEN,
    MAX_PAYLOAD_DEPTH,
    MAX_SEQ,
    MAX_TYPE_LEN,
    MAX_VV_ENTRIES,
    Event,
    EventId,
    VersionVector,
)
from mesh.kernel.hlc import MAX_COUNTER, MAX_PHYSICAL_MS, Timestamp

VV = VersionVector

# -- version vectors -------------------------------------------------------------------------


def test_version_vector_basics() -> None:
    a = VV({"b": 2, "a": 3, "z": 0})
    assert a.items() == [("a", 3), ("b", 2)]
    assert a.get("a") == 3 and a.get("nobody") == 0 and len(a) == 2 and list(a) == ["a", "b"]
    assert a.covers("a", 3) and not a.covers("a", 4) and a.covers("c", 0)
    b = VV({"a": 1, "c": 5})
    assert a.merge(b) == b.merge(a) == VV({"a": 3, "b": 2, "c": 5})
    assert a.merge(b).dominates(a) and a.merge(b).dominates(b)
    assert not a.dominates(b) and not b.dominates(a) and a.dominates(a) and a.dominates(VV())
    assert a.advanced("c", 1) == VV({"a": 3, "b": 2, "c": 1})
    assert a.advanced("a", 0) == VV({"b": 2})
    assert a == VV({"a": 3, "b": 2}) and hash(a) == hash(VV({"b": 2, "a": 3}))
    assert a != b and a != {"a": 3, "b": 2}
    assert a.to_wire() == {"a": 3, "b": 2} and list(a.to_wire()) == ["a", "b"]
    assert VV.from_wire(cbor2.loads(cbor2.dumps(a.to_wire()))) == a
    assert VV() == VV({}) == VV.from_wire({}) and not VV()
    assert "a" in repr(a)


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        [["a", 1]],
        {"a": 0},
        {"a": -1},
        {"a": True},
        {"a": 1.0},
        {"a": "1"},
        {"a": 2**200},
        {"a": MAX_SEQ + 1},
        {1: 1},
        {"": 1},
        {"x" * (MAX_ORIGIN_LEN + 1): 1},
        {f"n{i}": 1 for i in range(MAX_VV_ENTRIES + 1)},
    ],
    ids=lambda w: repr(w)[:40],
)
def test_version_vector_from_wire_rejects(wire: Any) -> None:
    with pytest.raises(KernelError):
        VV.from_wire(wire)


def test_version_vector_constructor_rejects() -> None:
    bad_entries: list[Any] = [{"a": -1}, {"a": True}, {2: 1}, {"a": 2**64}]
    for bad in bad_entries:
        with pytest.raises(KernelError):
            VV(bad)
    with pytest.raises(KernelError):
        VV([("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(KernelError):
        VV({"a": 1}).advanced("b", -1)
    with pytest.raises(KernelError):
        VV({"a": 1}).advanced("", 1)
    full = VV({f"n{i}": 1 for i in range(MAX_VV_ENTRIES)})
    assert VV.from_wire(full.to_wire()) == full
    with pytest.raises(KernelError):
        full.advanced("one-more", 1)
    with pytest.raises(KernelError):
        full.merge(VV({"one-more": 1}))


# -- events ----------------------------------------------------------------------------------

origins = st.text(min_size=1, max_size=MAX_ORIGIN_LEN)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
cbor_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    origin = draw(origins)
    seq = draw(st.integers(min_value=1, max_value=MAX_SEQ))
    deps = draw(st.dictionaries(origins, st.integers(min_value=1, max_value=MAX_SEQ), max_size=5))
    deps[origin] = seq - 1
    return Event(
        id=EventId(origin=origin, seq=seq),
        hlc=Timestamp(draw(st.integers(0, MAX_PHYSICAL_MS)), draw(st.integers(0, MAX_COUNTER))),
        deps=VV(deps),
        type=draw(st.text(alphabet=st.characters(categories=["L", "N", "P"]), min_size=1, max_size=MAX_TYPE_LEN)),
        version=draw(st.integers(min_value=1, max_value=5)),
        payload=draw(st.dictionaries(st.text(max_size=8), cbor_values, max_size=5)),
    )


@settings(max_examples=200, deadline=None)
@given(events())
def test_event_wire_round_trip(event: Event) -> None:
    assert Event.from_wire(event.to_wire()) == event
    encoded = cbor2.dumps(event.to_wire(), canonical=True)
    assert Event.from_wire(cbor2.loads(encoded)) == event
    assert event.encoded_size() == len(encoded)
    assert Event.from_wire(cbor2.loads(cbor2.dumps(event.to_wire()))) == event


def good_wire() -> dict[str, Any]:
    return {
        "origin": "node-a",
        "seq": 3,
        "hlc": [1_700_000_000_000, 2],
        "deps": {"node-a": 2, "node-b": 7},
        "type": "member.join",
        "version": 1,
        "payload": {"name": "a", "memory_bytes": 1 << 30, "tags": ["gpu", 1.5, None, b"\x00", True], "x": {}},
    }


def test_good_wire_parses() -> None:
    event = Event.from_wire(good_wire())
    assert event.id == EventId(origin="node-a", seq=3) and str(event.id) == "node-a:3"
    assert event.hlc == Timestamp(1_700_000_000_000, 2)
    assert event.deps == VV({"node-a": 2, "node-b": 7})
    assert event.to_wire() == good_wire()
    first = Event.from_wire(good_wire() | {"seq": 1, "deps": {"node-b": 1}})
    assert first.deps.get("node-a") == 0


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


class Opaque:
    pass


MALFORMED: list[tuple[str, Any]] = [
    ("not a map", ["node-a", 3]),
    ("none", None),
    ("missing key", {k: v for k, v in good_wire().items() if k != "deps"}),
    ("unknown key", good_wire() | {"extra": 1}),
    ("non-str key", good_wire() | {1: 1}),
    ("origin empty", good_wire() | {"origin": "", "deps": {"": 2}}),
    ("origin too long", good_wire() | {"origin": "o" * (MAX_ORIGIN_LEN + 1), "deps": {"o" * (MAX_ORIGIN_LEN + 1): 2}}),
    ("origin int", good_wire() | {"origin": 7}),
    ("origin bytes", good_wire() | {"origin": b"node-a"}),
    ("seq zero", good_wire() | {"seq": 0, "deps": {}}),
    ("seq negative", good_wire() | {"seq": -1, "deps": {}}),
    ("seq bool", good_wire() | {"seq": True, "deps": {}}),
    ("seq float", good_wire() | {"seq": 3.0}),
    ("seq string", good_wire() | {"seq": "3"}),
    ("seq huge", good_wire() | {"seq": 2**200, "deps": {}}),
    ("seq past max", good_wire() | {"seq": MAX_SEQ + 1, "deps": {"node-a": MAX_SEQ}}),
    ("deps origin too small", good_wire() | {"deps": {"node-a": 1}}),
    ("deps origin too large", good_wire() | {"deps": {"node-a": 3}}),
    ("deps origin absent", good_wire() | {"deps": {"node-b": 7}}),
    ("deps not a map", good_wire() | {"deps": [["node-a", 2]]}),
    ("deps zero entry", good_wire() | {"deps": {"node-a": 2, "node-b": 0}}),
    ("deps negative", good_wire() | {"deps": {"node-a": 2, "node-b": -4}}),
    ("deps bool", good_wire() | {"deps": {"node-a": 2, "node-b": True}}),
    ("deps float", good_wire() | {"deps": {"node-a": 2, "node-b": 1.0}}),
    ("deps huge", good_wire() | {"deps": {"node-a": 2, "node-b": 2**200}}),
    ("deps non-str key", good_wire() | {"deps": {"node-a": 2, 5: 1}}),
    ("deps too many", good_wire() | {"deps": {"node-a": 2} | {f"n{i}": 1 for i in range(MAX_VV_ENTRIES)}}),
    ("hlc absurd", good_wire() | {"hlc": [2**200, 0]}),
    ("hlc negative", good_wire() | {"hlc": [-1, 0]}),
    ("hlc counter", good_wire() | {"hlc": [1, MAX_COUNTER + 1]}),
    ("hlc short", good_wire() | {"hlc": [1]}),
    ("hlc string", good_wire() | {"hlc": "1.2"}),
    ("hlc bools", good_wire() | {"hlc": [True, False]}),
    ("hlc map", good_wire() | {"hlc": {"physical_ms": 1, "counter": 2}}),
    ("type empty", good_wire() | {"type": ""}),
    ("type long", good_wire() | {"type": "t" * (MAX_TYPE_LEN + 1)}),
    ("type int", good_wire() | {"type": 5}),
    ("type none", good_wire() | {"type": None}),
    ("type control chars", good_wire() | {"type": "member\njoin"}),
    ("version zero", good_wire() | {"version": 0}),
    ("version bool", good_wire() | {"version": True}),
    ("version float", good_wire() | {"version": 1.0}),
    ("version huge", good_wire() | {"version": 2**200}),
    ("payload list", good_wire() | {"payload": [1, 2]}),
    ("payload none", good_wire() | {"payload": None}),
    ("payload non-str key", good_wire() | {"payload": {1: "x"}}),
    ("payload nested non-str key", good_wire() | {"payload": {"a": [{b"k": 1}]}}),
    ("payload set", good_wire() | {"payload": {"a": {1, 2}}}),
    ("payload tuple", good_wire() | {"payload": {"a": (1, 2)}}),
    ("payload object", good_wire() | {"payload": {"a": [Opaque()]}}),
    ("payload nan", good_wire() | {"payload": {"a": math.nan}}),
    ("payload inf", good_wire() | {"payload": {"a": [math.inf]}}),
    ("payload bignum", good_wire() | {"payload": {"a": 2**64}}),
    ("payload too deep", good_wire() | {"payload": {"a": deep(MAX_PAYLOAD_DEPTH)}}),
    ("payload very deep", good_wire() | {"payload": {"a": deep(100_000)}}),
]


@pytest.mark.parametrize(("why", "wire"), MALFORMED, ids=[why for why, _ in MALFORMED])
def test_malformed_events_are_rejected(why: str, wire: Any) -> None:
    with pytest.raises(KernelError):
        Event.from_wire(wire)


def test_payload_depth_limit_is_inclusive() -> None:
    ok = good_wire() | {"payload": {"a": deep(MAX_PAYLOAD_DEPTH - 1)}}
    assert Event.from_wire(ok).payload == ok["payload"]


@pytest.mark.spec("K4")
def test_events_with_absurd_timestamps_are_refused_on_the_wire() -> None:
    for hlc in ([2**200, 0], [-1, 0], ["x", 0], [True, 0], [1.5, 0], [0, 2**200], [MAX_PHYSICAL_MS + 1, 0]):
        with pytest.raises(KernelError):
            Event.from_wire(good_wire() | {"hlc": hlc})
        # and through CBOR, where 2**200 travels as a bignum
        with pytest.raises(KernelError):
            Event.from_wire(cbor2.loads(cbor2.dumps(good_wire() | {"hlc": hlc})))


def test_constructor_rejects_wrong_field_types() -> None:
    event = Event.from_wire(good_wire())
    fields: dict[str, Any] = {
        "id": event.id, "hlc": event.hlc, "deps": event.deps, "type": event.type,
        "version": event.version, "payload": event.payload,
    }
    for name, bad in [("id", ("node-a", 3)), ("hlc", [1, 2]), ("deps", {"node-a": 2}), ("payload", [])]:
        with pytest.raises(KernelError):
            Event(**(fields | {name: bad}))
    with pytest.raises(KernelError):
        EventId(origin="a", seq=0)
