"""Tests of LAN discovery (mesh/node/discovery.py) against specs/discovery.md.

Nothing here sends to any address but 127.0.0.1: the core is fed bytes directly, the
helpers get fake sockets, and the services are given unicast 127.0.0.1 targets and an
empty interface table (so they join no group)."""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, hmac
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mesh
from mesh import PROTOCOL_MAJOR
from mesh.errors import FrameError
from mesh.netif import IfAddress, Interface
from mesh.node.discovery import (
    MAGIC,
    MAX_DATAGRAM_BYTES,
    Announcement,
    AnnouncementError,
    Discovery,
    DiscoveryService,
    decode,
    default_targets,
    encode,
    join_group,
    resolve_address,
    send_datagram,
)
from mesh.security import discovery_key

pytestmark = pytest.mark.timeout(30)

SETTINGS = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KEY = discovery_key(b"\x01" * 32)
OTHER_KEY = discovery_key(b"\x02" * 32)
A, B, C = "0a" * 16, "0b" * 16, "0c" * 16
ALLOC_BOUND = 16 * 1024  # bytes a decode may allocate at peak, whatever the datagram claims


def ann(**fields: Any) -> Announcement:
    base: dict[str, Any] = {"node_id": B, "address": "0.0.0.0:7600", "api_address": "0.0.0.0:8000",
                            "protocol_major": PROTOCOL_MAJOR, "incarnation": "inc-1", "sent_ms": 1000}
    return Announcement(**{**base, **fields})


def sign(raw_cbor: bytes, key: bytes = KEY) -> bytes:
    """A datagram with a valid tag around any body, so fuzzing reaches the CBOR checks."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(MAGIC + raw_cbor)
    return MAGIC + raw_cbor + h.finalize()


def fields_of(a: Announcement) -> dict[str, Any]:
    return {k: getattr(a, k) for k in ("node_id", "address", "api_address", "protocol_major",
                                       "incarnation", "sent_ms")}


def decodes_or_frame_error(data: bytes) -> Announcement | None:
    """Decode, checking the only outcomes are an Announcement or our FrameError."""
    tracemalloc.start()
    try:
        return decode(data, KEY)
    except AnnouncementError as exc:
        assert isinstance(exc, FrameError)
        assert exc.reason in {"size", "magic", "tag", "cbor", "fields", "protocol"}
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < ALLOC_BOUND, f"decode allocated {peak} bytes"


# -- strategies -----------------------------------------------------------------------

hosts = st.sampled_from(["0.0.0.0", "::", "*", "", "127.0.0.1", "[fe80::1%en0]", "node-1.local", "10.1.2.3"])
addresses = st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(1, 65535))
announcements = st.builds(
    Announcement, node_id=st.binary(min_size=16, max_size=16).map(bytes.hex), address=addresses,
    api_address=addresses | st.just(""), protocol_major=st.just(PROTOCOL_MAJOR),
    incarnation=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=64),
    sent_ms=st.integers(0, (1 << 63) - 1))
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64) + 1, (1 << 64) - 1) | st.text(max_size=40)
    | st.binary(max_size=40) | st.floats(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
field_maps = st.fixed_dictionaries({}, optional={
    "node_id": st.binary(min_size=16, max_size=16).map(bytes.hex) | cbor_values,
    "address": addresses | cbor_values, "api_address": addresses | cbor_values,
    "protocol_major": st.sampled_from([PROTOCOL_MAJOR, PROTOCOL_MAJOR + 1, True]) | cbor_values,
    "incarnation": st.text(max_size=70) | cbor_values, "sent_ms": st.integers() | cbor_values,
    "extra": cbor_values})


# -- D1: layout and round trip ----------------------------------------------------------

@pytest.mark.spec("D1")
@SETTINGS
@given(announcements)
def test_round_trip(a: Announcement) -> None:
    data = encode(a, KEY)
    assert len(data) <= MAX_DATAGRAM_BYTES
    assert decode(data, KEY) == a


@pytest.mark.spec("D1")
def test_layout() -> None:
    a = ann()
    data = encode(a, KEY)
    assert data[:4] == b"MSD1"
    assert data == sign(data[4:-32])
    assert cbor2.loads(data[4:-32]) == fields_of(a)
    biggest = ann(address="x" * 294 + ":65535", api_address="y" * 294 + ":65535", incarnation="z" * 64,
                  sent_ms=(1 << 63) - 1)
    assert len(encode(biggest, KEY)) <= MAX_DATAGRAM_BYTES


# -- D2: decoding any bytes ---------------------------------------------------------------

@pytest.mark.spec("D2")
@SETTINGS
@given(st.binary(max_size=MAX_DATAGRAM_BYTES + 100))
def test_fuzz_random_bytes(data: bytes) -> None:
    decodes_or_frame_error(data)
    decodes_or_frame_error(MAGIC + data)


@pytest.mark.spec("D2")
@SETTINGS
@given(st.binary(max_size=MAX_DATAGRAM_BYTES))
def test_fuzz_signed_random_bodies(body: bytes) -> None:
    decodes_or_frame_error(sign(body))


@pytest.mark.spec("D2")
@SETTINGS
@given(field_maps)
def test_fuzz_signed_field_maps(body: dict[str, Any]) -> None:
    raw = cbor2.dumps(body)
    if len(raw) + 36 <= MAX_DATAGRAM_BYTES:
        decodes_or_frame_error(sign(raw))


@pytest.mark.spec("D2", "D3")
@SETTINGS
@given(announcements, st.data())
def test_fuzz_bit_flips_truncation_and_trailing_garbage(a: Announcement, data: st.DataObject) -> None:
    frame = encode(a, KEY)
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    flipped = bytearray(frame)
    flipped[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(frame) - 1))
    garbage = data.draw(st.binary(min_size=1, max_size=64))
    for bad in (bytes(flipped), frame[:cut], frame + garbage):
        assert decodes_or_frame_error(bad) is None


@pytest.mark.spec("D2")
def test_every_prefix_rejected_and_trailing_bytes_inside_the_map() -> None:
    frame = encode(ann(), KEY)
    for cut in range(len(frame)):
        with pytest.raises(AnnouncementError):
            decode(frame[:cut], KEY)
    with pytest.raises(AnnouncementError) as info:
        decode(sign(frame[4:-32] + b"\x00"), KEY)
    assert info.value.reason == "cbor"


HOSTILE = {
    "map of 2^63 pairs": b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff" + b"\x00" * 64,
    "array of 2^32 items": b"\x9a\xff\xff\xff\xff" + b"\x00" * 1000,
    "bytes of 2^40": b"\x5b\x00\x00\x01\x00\x00\x00\x00\x00" + b"a" * 100,
    "text of 1 MiB": b"\xa1\x61a\x7a\x00\x10\x00\x00" + b"a" * 1000,
    "nesting 1000 deep": b"\x81" * 1000 + b"\x00",
    "indefinite map": b"\xbf\x61a\x00\xff",
    "indefinite bytes": b"\x5f\x41a\xff",
    "tag 0 (datetime)": b"\xc0\x60",
    "tag 2 (bignum)": b"\xc2\x41\x01",
    "tag 55799 (self-describe)": b"\xd9\xd9\xf7\xa0",
    "tag 99": b"\xd8\x63\x00",
    "undefined": b"\xf7",
    "simple value 16": b"\xf0",
    "reserved additional info": b"\x1c",
    "duplicate keys": b"\xa2\x61a\x00\x61a\x01",
    "non-text key": b"\xa1\x01\x00",
    "bad utf-8": b"\x62\xff\xfe",
    "two items": b"\xa0\xa0",
    "empty": b"",
}


@pytest.mark.spec("D2")
@pytest.mark.parametrize("raw", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_cbor_rejected_without_allocation(raw: bytes) -> None:
    assert decodes_or_frame_error(sign(raw)) is None
    with pytest.raises(AnnouncementError) as info:
        decode(sign(raw), KEY)
    assert info.value.reason in {"cbor", "size"}


@pytest.mark.spec("D2")
@pytest.mark.parametrize("change", [
    {"node_id": "0A" * 16}, {"node_id": "0a" * 15}, {"node_id": 5}, {"address": "no-port"},
    {"address": "host:0"}, {"address": "host:99999"}, {"address": "host:7\u00b2"}, {"address": "a b:1"},
    {"api_address": "x"}, {"incarnation": ""}, {"incarnation": "\n"}, {"incarnation": "i" * 65},
    {"sent_ms": -1}, {"sent_ms": True}, {"sent_ms": 1.5}, {"protocol_major": "1"}, {"node_id": None},
])
def test_wrong_fields_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(AnnouncementError) as info:
        decode(sign(cbor2.dumps({**fields_of(ann()), **change})), KEY)
    assert info.value.reason == "fields"
    body = fields_of(ann())
    del body["incarnation"]
    with pytest.raises(AnnouncementError, match="lacks"):
        decode(sign(cbor2.dumps(body)), KEY)


# -- D3, D4: cluster and protocol scoping ----------------------------------------------------

@pytest.mark.spec("D3")
def test_other_cluster_rejected_before_cbor(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AnnouncementError) as info:
        decode(encode(ann(), OTHER_KEY), KEY)
    assert info.value.reason == "tag"

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("CBOR decoded before the tag was checked")

    monkeypatch.setattr(cbor2, "loads", explode)
    for bad in (sign(b"\xff" * 40, OTHER_KEY), encode(ann(), OTHER_KEY), MAGIC + b"\x00" * 40):
        with pytest.raises(AnnouncementError) as info:
            decode(bad, KEY)
        assert info.value.reason == "tag"


@pytest.mark.spec("D4")
def test_protocol_major_only(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AnnouncementError) as info:
        decode(encode(ann(protocol_major=PROTOCOL_MAJOR + 1), KEY), KEY)
    assert info.value.reason == "protocol"
    # A later major may change the fields: still "protocol", not "fields".
    with pytest.raises(AnnouncementError) as info:
        decode(sign(cbor2.dumps({"protocol_major": PROTOCOL_MAJOR + 1, "other": []})), KEY)
    assert info.value.reason == "protocol"
    before = encode(ann(), KEY)
    monkeypatch.setattr(mesh, "__version__", "99.9.9")
    monkeypatch.setattr(mesh, "PROTOCOL_MINOR", 42)
    assert encode(ann(), KEY) == before
    newer = sign(cbor2.dumps({**fields_of(ann()), "package_version": "99.9.9", "protocol_minor": 42}))
    assert decode(newer, KEY) == ann()


# -- D5-D9: the core ----------------------------------------------------------------------

def core(node_id: str = A, **kw: Any) -> Discovery:
    return Discovery(node_id, KEY, interval_s=2.0, expire_after_s=10.0, **kw)


@pytest.mark.spec("D5")
@SETTINGS
@given(st.binary(max_size=MAX_DATAGRAM_BYTES + 10) | field_maps.map(lambda m: sign(cbor2.dumps(m))))
def test_receive_never_raises(data: bytes) -> None:
    d = core()
    d.receive(data, ("192.0.2.1", 7601), 1.0)
    stats = d.stats
    assert stats["received"] == 1
    assert stats["accepted"] + sum(stats["rejected_by_reason"].values()) == 1


@pytest.mark.spec("D5")
def test_own_and_foreign_ignored_and_counted() -> None:
    d = core()
    own = d.make(address="0.0.0.0:7600", api_address="", incarnation="x", now_s=0.0)
    assert d.receive(own, ("192.0.2.1", 7601), 0.0) is None
    assert d.receive(encode(ann(), OTHER_KEY), ("192.0.2.2", 7601), 0.0) is None
    assert d.receive(b"junk", ("192.0.2.2", 7601), 0.0) is None
    assert d.receive(encode(ann(), KEY), ("192.0.2.2", 7601), 0.0) == ann()
    assert d.stats == {"received": 4, "accepted": 1,
                       "rejected_by_reason": {"own": 1, "tag": 1, "size": 1}}
    assert d.peers(0.0) == {B: (ann(), "192.0.2.2:7600")}


@pytest.mark.spec("D6")
@pytest.mark.parametrize(("address", "source", "resolved"), [
    ("0.0.0.0:7600", "192.0.2.5", "192.0.2.5:7600"),
    ("*:7600", "192.0.2.5", "192.0.2.5:7600"),
    (":7600", "192.0.2.5", "192.0.2.5:7600"),
    ("[::]:7600", "fe80::1%en0", "[fe80::1%en0]:7600"),
    ("198.51.100.7:7600", "192.0.2.5", "198.51.100.7:7600"),
])
def test_wildcard_resolved_to_source(address: str, source: str, resolved: str) -> None:
    assert resolve_address(address, source) == resolved
    d = core()
    d.receive(encode(ann(address=address), KEY), (source, 7601), 0.0)
    assert d.peers(0.0)[B][1] == resolved
    assert [(e.kind, e.address) for e in d.take_events()] == [("new", resolved)]


@pytest.mark.spec("D7")
def test_events_reported_once() -> None:
    d = core()
    src = ("192.0.2.5", 7601)
    for i in range(5):
        d.receive(encode(ann(sent_ms=1000 + i), KEY), src, i * 1.0)
    assert [(e.kind, e.node_id, e.address) for e in d.take_events()] == [("new", B, "192.0.2.5:7600")]
    d.receive(encode(ann(sent_ms=2000, address="0.0.0.0:7700"), KEY), src, 5.0)
    d.receive(encode(ann(sent_ms=2001, address="0.0.0.0:7700"), KEY), src, 6.0)
    assert [(e.kind, e.address) for e in d.take_events()] == [("address", "192.0.2.5:7700")]
    d.receive(encode(ann(sent_ms=3000, incarnation="inc-2", address="0.0.0.0:7700"), KEY), src, 7.0)
    assert [e.kind for e in d.take_events()] == ["restarted"]


@pytest.mark.spec("D7")
def test_several_sources_do_not_flap() -> None:
    d = core()
    wired, wifi = ("192.0.2.5", 7601), ("198.51.100.5", 7601)
    for i in range(20):  # each round heard first through one interface, then the other
        d.receive(encode(ann(sent_ms=1000 + i), KEY), wired if i % 3 else wifi, i * 2.0)
    events = d.take_events()
    assert [e.kind for e in events] == ["new"]
    first = events[0].address
    # The one in use goes silent; after expire_after_s the other takes over, reported once.
    other = wired if first.startswith("198.51.100.5") else wifi
    for i in range(20, 30):
        d.receive(encode(ann(sent_ms=1000 + i), KEY), other, i * 2.0)
    assert [(e.kind, e.address) for e in d.take_events()] == [("address", f"{other[0]}:7600")]


@pytest.mark.spec("D8")
def test_expiry() -> None:
    d = core()
    d.receive(encode(ann(), KEY), ("192.0.2.5", 7601), 100.0)
    assert B in d.peers(110.0)
    assert d.peers(110.1) == {}
    assert [e.kind for e in d.take_events()] == ["new", "expired"]
    d.receive(encode(ann(sent_ms=5000), KEY), ("192.0.2.5", 7601), 200.0)
    assert [e.kind for e in d.take_events()] == ["new"]
    assert B in d.peers(200.0)


@pytest.mark.spec("D9")
def test_replay_ignored() -> None:
    d = core()
    src = ("192.0.2.5", 7601)
    latest = encode(ann(sent_ms=5000), KEY)
    assert d.receive(latest, src, 0.0) is not None
    assert d.receive(latest, ("203.0.113.9", 7601), 1.0) is None  # the same datagram again
    assert d.receive(encode(ann(sent_ms=4999), KEY), src, 1.0) is None
    # An old incarnation replayed while the peer is live is not a restart ...
    assert d.receive(encode(ann(sent_ms=100, incarnation="inc-0"), KEY), src, 1.0) is None
    assert d.stats["rejected_by_reason"] == {"replay": 3}
    # ... a later one is.
    assert d.receive(encode(ann(sent_ms=6000, incarnation="inc-2"), KEY), src, 2.0) is not None
    assert [e.kind for e in d.take_events()] == ["new", "restarted"]
    # Replays never keep a silent peer alive.
    assert d.receive(encode(ann(sent_ms=6000, incarnation="inc-2"), KEY), src, 11.0) is None
    assert d.peers(12.1) == {}
    # Once it has expired, a new incarnation is accepted even if its clock went back.
    assert d.receive(encode(ann(sent_ms=10, incarnation="inc-3"), KEY), src, 13.0) is not None


@pytest.mark.spec("D9")
def test_own_sent_ms_strictly_increases() -> None:
    d = core(C)
    sent = [decode(d.make(address="0.0.0.0:1", api_address="", incarnation="i", now_s=5.0, sent_ms=ms),
                   KEY).sent_ms for ms in (1000, 1000, 999, 2000)]
    assert sent == [1000, 1001, 1002, 2000]


@pytest.mark.spec("D10")
def test_schedule_with_jitter() -> None:
    d = core(rng=random.Random(7))
    assert d.announcement_due(0.0)
    gaps, now = [], 0.0
    for _ in range(50):
        d.make(address="0.0.0.0:1", api_address="", incarnation="i", now_s=now)
        assert not d.announcement_due(now + 0.8 * 2.0 - 1e-9)
        gaps.append(d.next_due_s - now)
        now = d.next_due_s
        assert d.announcement_due(now)
    assert all(1.6 <= g <= 2.4 for g in gaps)
    assert len({round(g, 6) for g in gaps}) > 40
    plain = core()
    plain.make(address="0.0.0.0:1", api_address="", incarnation="i", now_s=3.0)
    assert plain.next_due_s == 5.0


# -- D11-D13: targets, joins and sends with fake sockets -----------------------------------

class FakeSocket:
    def __init__(self, fail: Callable[[str, Any], OSError | None] = lambda op, arg: None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail

    def setsockopt(self, level: int, optname: int, value: bytes, /) -> None:
        self.calls.append(("setsockopt", (level, optname, value)))
        if (exc := self.fail("setsockopt", value)) is not None:
            raise exc

    def sendto(self, data: bytes, address: tuple[str, int], /) -> int:
        self.calls.append(("sendto", address))
        if (exc := self.fail("sendto", address)) is not None:
            raise exc
        return len(data)


TABLE = [
    Interface(name="lo", kind="loopback", addresses=(IfAddress(address="127.0.0.1", prefix_len=8),)),
    Interface(name="eth0", kind="ethernet", addresses=(IfAddress(address="192.0.2.10", prefix_len=24),
                                                       IfAddress(address="fe80::1", prefix_len=64))),
    Interface(name="thunderbolt0", kind="thunderbolt", addresses=(IfAddress(address="169.254.3.4", prefix_len=16),)),
    Interface(name="wg0", kind="virtual", multicast=False, addresses=(IfAddress(address="10.9.0.1", prefix_len=24),)),
    Interface(name="eth1", kind="ethernet", up=False, addresses=(IfAddress(address="198.51.100.1", prefix_len=24),)),
    Interface(name="ppp0", kind="other", addresses=(IfAddress(address="203.0.113.1", prefix_len=32),)),
]


@pytest.mark.spec("D11")
def test_default_targets() -> None:
    assert default_targets(TABLE, "239.255.77.77", 7601) == [
        ("239.255.77.77", 7601, "192.0.2.10"), ("192.0.2.255", 7601, None),
        ("239.255.77.77", 7601, "169.254.3.4"), ("169.254.255.255", 7601, None),
        ("239.255.77.77", 7601, "203.0.113.1"),
    ]


@pytest.mark.spec("D11", "D13")
def test_send_sets_multicast_interface_and_survives_errors() -> None:
    sock = FakeSocket()
    assert send_datagram(sock, b"x", ("239.255.77.77", 7601, "192.0.2.10"))
    assert sock.calls == [("setsockopt", (socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("192.0.2.10"))),
                          ("sendto", ("239.255.77.77", 7601))]
    sock = FakeSocket()
    assert send_datagram(sock, b"x", ("192.0.2.255", 7601, None))
    assert sock.calls == [("sendto", ("192.0.2.255", 7601))]
    for code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOBUFS, errno.EPERM):
        failing = FakeSocket(lambda op, arg, code=code: OSError(code, "no") if op == "sendto" else None)
        assert not send_datagram(failing, b"x", ("239.255.77.77", 7601, "192.0.2.10"))


@pytest.mark.spec("D12")
def test_join_group() -> None:
    sock = FakeSocket()
    assert join_group(sock, "239.255.77.77", "192.0.2.10")
    assert sock.calls == [("setsockopt", (socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                          socket.inet_aton("239.255.77.77") + socket.inet_aton("192.0.2.10")))]
    assert join_group(FakeSocket(lambda op, arg: OSError(errno.EADDRINUSE, "already")), "239.255.77.77", "192.0.2.10")
    assert not join_group(FakeSocket(lambda op, arg: OSError(errno.ENODEV, "no device")), "239.255.77.77", "192.0.2.10")


@pytest.mark.spec("D12")
async def test_failed_join_retried_at_next_refresh() -> None:
    failures = [OSError(errno.ENODEV, "not yet")]  # the first join on 192.0.2.10 fails
    sock = FakeSocket(lambda op, arg: failures.pop() if failures and arg.endswith(socket.inet_aton("192.0.2.10"))
                      else None)
    svc = DiscoveryService(core(), port=0, on_peer=lambda n, a: None, announcement=dict,
                           interfaces=lambda: TABLE)
    svc._sock = sock  # type: ignore[assignment]  # the join bookkeeping without a real socket
    await svc._refresh()
    assert svc.joined == {"169.254.3.4", "203.0.113.1"}
    await svc._refresh()
    assert svc.joined == {"192.0.2.10", "169.254.3.4", "203.0.113.1"}
    joins = [c for c in sock.calls if c[1][1] == socket.IP_ADD_MEMBERSHIP]
    assert len(joins) == 4  # nothing joined twice
    svc._sock = None


# -- D10, D11, D13, D14: two real services on 127.0.0.1 -------------------------------------

async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class Node:
    """One DiscoveryService on 127.0.0.1 that sends only to ``peers`` (unicast 127.0.0.1)."""

    def __init__(self, node_id: str, link_port: int, *, interface_reads: list[int] | None = None,
                 **kw: Any) -> None:
        self.peers: list[Node] = []
        self.found: list[tuple[str, str]] = []
        self.core = Discovery(node_id, KEY, interval_s=0.05, expire_after_s=1.0)
        reads = interface_reads if interface_reads is not None else []

        def interfaces() -> list[Interface]:
            reads.append(1)
            return []  # no group joins in tests

        self.service = DiscoveryService(
            self.core, port=0, bind_host="127.0.0.1", rng=random.Random(node_id),
            targets=lambda: [("127.0.0.1", p.service.port, None) for p in self.peers if p.service.port],
            interfaces=interfaces, on_peer=kw.pop("on_peer", self.on_peer), timeout_s=2.0,
            announcement=kw.pop("announcement", lambda: {"address": f"0.0.0.0:{link_port}",
                                                         "api_address": "", "incarnation": node_id[:8]}),
            **kw)

    async def on_peer(self, node_id: str, address: str) -> None:
        self.found.append((node_id, address))


@pytest.fixture
async def pair() -> Any:
    a, b = Node(A, 9001), Node(B, 9002)
    a.peers, b.peers = [b], [a]
    yield a, b
    for n in (a, b):
        await n.service.close()


@pytest.mark.spec("D10", "D14")
async def test_two_services_find_each_other_and_keep_announcing(pair: tuple[Node, Node]) -> None:
    a, b = pair
    async with asyncio.timeout(2.0):
        await a.service.start()
        await b.service.start()
    await wait_until(lambda: bool(a.found and b.found))
    assert a.found == [(B, "127.0.0.1:9002")]
    assert b.found == [(A, "127.0.0.1:9001")]
    heard = b.core.stats["accepted"]
    await wait_until(lambda: b.core.stats["accepted"] >= heard + 10 and a.service.rounds >= 15)
    assert a.found == [(B, "127.0.0.1:9002")] and b.found == [(A, "127.0.0.1:9001")]  # reported once
    assert set(a.core.peers(asyncio.get_running_loop().time())) == {B}
    assert b.core.stats["rejected_by_reason"].get("replay", 0) == 0


@pytest.mark.spec("D13")
async def test_send_errors_do_not_stop_later_announcements(pair: tuple[Node, Node],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    real_sendto = socket.socket.sendto
    failures = {"left": 3}

    def flaky_sendto(self: socket.socket, data: bytes, address: Any) -> int:
        if address[1] == b.service.port and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return real_sendto(self, data, address)

    monkeypatch.setattr(socket.socket, "sendto", flaky_sendto)
    await a.service.start()
    await b.service.start()
    await wait_until(lambda: b.core.stats["accepted"] >= 5)
    target = ("127.0.0.1", b.service.port)
    assert a.service.send_errors == {target: 3}
    assert a.service.sent[target] >= 5
    assert b.found == [(A, "127.0.0.1:9001")]


@pytest.mark.spec("D11")
async def test_interface_table_reread_every_n_rounds() -> None:
    reads: list[int] = []
    n = Node(A, 9001, interface_reads=reads, refresh_every=3)
    await n.service.start()
    try:
        await wait_until(lambda: n.service.rounds >= 10)
        assert len(reads) in (n.service.rounds // 3, n.service.rounds // 3 + 1)
        assert len(reads) >= 4
    finally:
        await n.service.close()


@pytest.mark.spec("D14")
async def test_failure_surfaces_and_callback_errors_do_not_stop_discovery() -> None:
    calls = {"n": 0}

    def broken_announcement() -> dict[str, str]:
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("node state unreadable")
        return {"address": "0.0.0.0:9001", "api_address": "", "incarnation": "x"}

    bad = Node(A, 9001, announcement=broken_announcement)
    await bad.service.start()
    await wait_until(lambda: bad.service.failed is not None)
    assert isinstance(bad.service.failed, RuntimeError)
    with pytest.raises(RuntimeError, match="unreadable"):
        async with asyncio.timeout(3.0):
            await bad.service.close()

    def raising_on_peer(node_id: str, address: str) -> None:
        raise ConnectionError("dial failed")

    a, b = Node(A, 9001, on_peer=raising_on_peer), Node(B, 9002)
    a.peers, b.peers = [b], [a]
    await a.service.start()
    await b.service.start()
    try:
        await wait_until(lambda: B in a.core.peers(asyncio.get_running_loop().time()))
        heard = a.core.stats["accepted"]
        await wait_until(lambda: a.core.stats["accepted"] >= heard + 5)
        assert a.service.failed is None
    finally:
        for n in (a, b):
            async with asyncio.timeout(3.0):
                await n.service.close()
    await a.service.close()  # closing twice is harmless
