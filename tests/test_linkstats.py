"""Link measurement against specs/linkstats.md (sans-IO meter, published values, and the
ping/pong/probe exchange over a real TCP link on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.kernel.crdt import ClusterState
from mesh.kernel.hlc import Timestamp
from mesh.kernel.records import ClusterView, MemberInfo, link_key
from mesh.node.links import Links
from mesh.node.linkstats import (
    PROBE_BYTES,
    PUBLISH_HOLD_S,
    PUBLISH_MAX_AGE_S,
    RTT_WINDOW,
    LinkMeter,
    percentile,
)
from mesh.wire import Message
from transports.tcp import TcpTransport

pytestmark = pytest.mark.timeout(60)


@pytest.mark.spec("L1")
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=300))
def test_percentile_is_nearest_rank(samples: list[float]) -> None:
    ordered = sorted(samples)
    assert percentile(samples, 50) == ordered[max(1, -(-len(ordered) // 2)) - 1]
    assert percentile(samples, 100) == ordered[-1] and percentile(samples, 0) == ordered[0]
    assert percentile(samples, 50) <= percentile(samples, 99)


@pytest.mark.spec("L1")
def test_meter_rtt_and_throughput() -> None:
    meter = LinkMeter("tcp")
    with pytest.raises(ConfigError):
        percentile([], 50)
    a = meter.ping_sent(10.0)
    b = meter.ping_sent(10.5)
    assert meter.pong_received(b, 10.502) == pytest.approx(0.002)
    assert meter.pong_received(b, 10.6) is None  # duplicate
    assert meter.pong_received(999, 10.6) is None and meter.pong_received("x", 10.6) is None  # unknown
    assert meter.pong_received(a, 10.004) == pytest.approx(0.004)
    assert meter.rtt_p50_s == pytest.approx(0.002) and meter.rtt_p99_s == pytest.approx(0.004)
    for i in range(200):  # unanswered pings are bounded
        meter.ping_sent(20.0 + i)
    assert len(meter._pings) == 64
    for i in range(RTT_WINDOW + 100):
        meter.pong_received(meter.ping_sent(100.0), 100.001)
    assert len(meter.rtts_s) == RTT_WINDOW
    assert not meter.probe_due(0.0, 30.0) and meter.probe_due(10.0, 30.0)  # the first waits 10 s
    seq = meter.probe_sent(PROBE_BYTES, 200.0)
    assert not meter.probe_due(210.0, 30.0) and meter.probe_due(230.0, 30.0)
    throughput = meter.probe_acked(seq, 200.011)
    assert throughput == pytest.approx(PROBE_BYTES / 0.010, rel=1e-3)  # minus the median RTT (1 ms)
    assert meter.probe_acked(seq, 200.02) is None
    slow = meter.probe_sent(PROBE_BYTES, 300.0)
    meter.probe_acked(slow, 301.0)  # a busy moment: the capacity stays the best recent probe
    assert meter.throughput_bytes_per_s == pytest.approx(PROBE_BYTES / 0.010, rel=1e-3)


@pytest.mark.spec("L2")
def test_publish_only_when_moved_or_stale() -> None:
    meter = LinkMeter("quic")
    assert meter.publish_due(0.0) is None  # nothing measured yet
    meter.pong_received(meter.ping_sent(0.0), 0.010)
    first = meter.publish_due(1.0)
    assert first is not None and first["transport"] == "quic" and first["samples"] == 1
    meter.pong_received(meter.ping_sent(1.0), 1.011)  # +10 %: not worth an event
    assert meter.publish_due(2.0) is None
    for _ in range(5):
        meter.pong_received(meter.ping_sent(2.0), 2.050)  # median moves 5x ...
    assert meter.publish_due(3.0) is None  # ... but has not held yet
    assert meter.publish_due(3.0 + PUBLISH_HOLD_S - 1) is None
    moved = meter.publish_due(3.0 + PUBLISH_HOLD_S)
    assert moved is not None and moved["rtt_p50_s"] == pytest.approx(0.050)
    assert meter.publish_due(4.0 + PUBLISH_HOLD_S) is None
    assert meter.publish_due(3.0 + PUBLISH_HOLD_S + PUBLISH_MAX_AGE_S) is not None


@pytest.mark.spec("L2", "P21")
def test_a_wobble_that_does_not_hold_is_never_published() -> None:
    """The median RTT moves 100x for 20 s, then comes back: nothing is published for it (the
    60 s republication carries the unmoved figures); a first throughput goes out at once."""
    meter = LinkMeter("tcp")

    def rtts(n: int, at: float, rtt_s: float) -> None:
        for _ in range(n):
            meter.pong_received(meter.ping_sent(at), at + rtt_s)

    rtts(50, 0.0, 0.001)
    rtts(4, 0.0, 0.3)  # a tail: p99 300 ms throughout
    assert meter.publish_due(10.0)["rtt_p50_s"] == pytest.approx(0.001)
    rtts(60, 12.0, 0.1)  # a busy moment: the median goes to 100 ms
    assert meter.publish_due(15.0) is None and meter.publish_due(15.0 + PUBLISH_HOLD_S - 1) is None
    rtts(130, 40.0, 0.001)  # back before it held
    assert meter.publish_due(41.0) is None
    again = meter.publish_due(10.0 + PUBLISH_MAX_AGE_S)
    assert again is not None and again["rtt_p50_s"] == pytest.approx(0.001) and again["rtt_p99_s"] == pytest.approx(0.3)
    meter.probe_acked(meter.probe_sent(PROBE_BYTES, 71.0), 71.1)
    assert meter.publish_due(71.2)["throughput_bytes_per_s"] is not None


@pytest.mark.spec("L2")
def test_cluster_view_lists_links_and_skips_malformed() -> None:
    state = ClusterState()
    values = {
        link_key("a", "b"): {"transport": "tcp", "rtt_p50_s": 0.001, "rtt_p99_s": 0.002,
                             "throughput_bytes_per_s": 1e9, "samples": 10},
        link_key("b", "a"): {"transport": "tcp", "rtt_p50_s": "fast"},
        link_key("c", "a"): [1, 2],
        "link/x": {"transport": "tcp"},
    }
    for seq, (key, value) in enumerate(sorted(values.items()), start=1):
        state.apply(dot=("n", seq), hlc=Timestamp(physical_ms=seq, counter=0), key=key, value=value, replaces=[])
    rows = ClusterView(state).links()
    assert rows == [{"from": "a", "to": "b", "transport": "tcp", "rtt_p50_s": 0.001, "rtt_p99_s": 0.002,
                     "throughput_bytes_per_s": 1e9, "samples": 10}]


@pytest.mark.spec("L1")
async def test_links_answer_pings_and_probes_over_tcp() -> None:
    def member(name: str) -> MemberInfo:
        return MemberInfo(member_id=name * 32, address="127.0.0.1:1", api_address="127.0.0.1:2", backend="torch",
                          memory_bytes=1, incarnation=name)

    async def ignore(*args: object) -> None:
        return None

    delivered: list[str] = []

    async def on_message(sender: str, msg: Message) -> None:
        delivered.append(msg.type)

    def links(name: str) -> Links:
        return Links(TcpTransport(), me=lambda: member(name), model_id="m", started_ms=0, on_message=on_message,
                     on_up=ignore, on_down=lambda m: None, on_fatal=lambda e: None, dead_after_s=10,
                     send_timeout_s=5)

    a, b = links("a"), links("b")
    listener = await b.transport.listen("127.0.0.1", 0, b.accept)
    async with listener:
        a.spawn(a.accept(await a.transport.connect("127.0.0.1", listener.port, timeout_s=5)), "link")
        for _ in range(200):
            if a.linked() and b.linked():
                break
            await asyncio.sleep(0.02)
        peer = "b" * 32
        for _ in range(3):
            await a.ping_all(timeout_s=2)
        await a.probe_all(interval_s=30, timeout_s=5)  # first sight of the link: no probe yet
        a.meters[peer]._first_seen_s = -100.0
        await a.probe_all(interval_s=30, timeout_s=5)
        for _ in range(300):
            meter = a.meters.get(peer)
            if meter is not None and len(meter.rtts_s) == 3 and meter.throughput_bytes_per_s:
                break
            await asyncio.sleep(0.02)
        meter = a.meters[peer]
        assert len(meter.rtts_s) == 3 and all(0 < r < 5 for r in meter.rtts_s)
        assert meter.throughput_bytes_per_s is not None and meter.throughput_bytes_per_s > 0
        assert meter.transport == "tcp" and not delivered  # measurement traffic stays inside Links
        await a.close()
        await b.close()
