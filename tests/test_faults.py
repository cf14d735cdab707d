"""Tests of the fault-injection wrapper (transports/faults.py) and of the accounting of
``python -m mesh faults`` (mesh/tools/faults/, with fake outcomes) against specs/faults.md.

The transport tests wrap the real TCP transport on 127.0.0.1 with OS-chosen ports. Seeds are fixed.
No sleeps as synchronisation: tests wait on results, each wait bounded; "nothing arrives" is
checked with a short recv timeout that must raise PeerTimeout.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError, FrameError, PeerTimeout, TransportError
from mesh.tools.faults import harness, run
from mesh.tools.faults.harness import (
    MAX_TOKENS,
    Context,
    Outcome,
    ScenarioResult,
    Tally,
    run_scenario,
)
from mesh.tools.faults.run import format_row
from mesh.wire import Message, WireTensor
from transports.base import Connection
from transports.faults import (
    MAX_QUEUED_BYTES,
    FaultPlan,
    FaultyConnection,
    FaultyTransport,
)
from transports.framing import FrameDecoder, FrameEncoder
from transports.tcp import TcpTransport

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
T = 5.0  # bound on waits that should succeed
QUIET_S = 0.3  # how long a recv watches for a message that must not arrive


def faulty(label: str, seed: int, plan: FaultPlan | None = None,
           **tcp: Any) -> FaultyTransport:
    return FaultyTransport(TcpTransport(**tcp), label=label, rng=random.Random(seed),
                           plan=plan if plan is not None else FaultPlan())


def numbered(i: int, pad: bytes = b"") -> Message:
    return Message(type="n", body={"i": i, "pad": pad})


@asynccontextmanager
async def linked(ta: FaultyTransport, tb: FaultyTransport
                 ) -> AsyncIterator[tuple[FaultyConnection, FaultyConnection]]:
    """A link from ta (connecting) to tb (accepting); yields (a_end, b_end)."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)  # returning leaves the connection open

    listener = await tb.listen(HOST, 0, handler)
    ends: list[FaultyConnection] = []
    try:
        ends.append(await ta.connect(HOST, listener.port, timeout_s=T))
        b = await asyncio.wait_for(accepted.get(), T)
        assert isinstance(b, FaultyConnection)
        ends.append(b)
        yield ends[0], ends[1]
    finally:
        for end in ends:
            await end.close()
        await listener.close()


async def ids_until_end(conn: Connection) -> list[int]:
    """Receive numbered messages until one of type "end"; return their ids in order."""
    got: list[int] = []
    while (msg := await conn.recv(timeout_s=T)).type != "end":
        got.append(msg.body["i"])
    return got


async def ids_until_closed(conn: Connection) -> list[int]:
    got: list[int] = []
    while True:
        try:
            msg = await conn.recv(timeout_s=T)
        except PeerTimeout:
            raise
        except TransportError:
            return got
        got.append(msg.body["i"])


async def assert_link_down(call: Awaitable[Any]) -> None:
    """``call`` fails with TransportError because the link went down, not by timing out."""
    with pytest.raises(TransportError) as info:
        await asyncio.wait_for(call, T)
    assert not isinstance(info.value, PeerTimeout), info.value


async def assert_nothing_arrives(conn: Connection) -> None:
    with pytest.raises(PeerTimeout):
        await conn.recv(timeout_s=QUIET_S)
    assert not conn.closed


@pytest.mark.spec("F1")
@pytest.mark.parametrize(("field", "value"), [
    ("loss", -0.1), ("loss", 1.5), ("loss", float("nan")), ("loss", "0.5"), ("loss", True),
    ("duplicate", 2.0), ("reorder", -1.0), ("corrupt", 1.01),
    ("delay_s", -0.5), ("delay_s", float("inf")), ("jitter_s", -1e-9),
    ("bandwidth_bytes_per_s", 0), ("bandwidth_bytes_per_s", -100.0),
    ("partition", frozenset({("A",)})), ("partition", [("A", "B")]),
    ("partition", frozenset({("A", "")})),
    ("reset_after_messages", 0), ("reset_after_messages", 2.0),
    ("reset_after_messages", True),
])
def test_bad_plan_values_raise_config_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"FaultPlan\.{field} .*valid: "):
        FaultPlan(**{field: value})


@pytest.mark.spec("F1")
def test_good_plan_values_are_accepted() -> None:
    plan = FaultPlan(loss=1, delay_s=0, jitter_s=0.5, duplicate=0.0, reorder=1.0, corrupt=0.25,
                     bandwidth_bytes_per_s=10, partition={("A", "B")},  # type: ignore[arg-type]
                     reset_after_messages=1)
    assert plan.partition == frozenset({("A", "B")})
    with pytest.raises(ConfigError, match="label"):
        FaultyTransport(TcpTransport(), label="", rng=random.Random(0))
    with pytest.raises(ConfigError, match="FaultPlan"):
        faulty("A", 0).set_plan({"loss": 0.5})  # type: ignore[arg-type]


@pytest.mark.spec("F12")
async def test_labels_are_swapped_and_reserved_types_refused() -> None:
    ta, tb = faulty("A", 1), faulty("B", 2)
    assert ta.name == "faults" and ta.secure == TcpTransport.secure
    async with linked(ta, tb) as (a, b):
        assert (a.local_label, a.peer_label) == ("A", "B")
        assert (b.local_label, b.peer_label) == ("B", "A")
        assert a.peer.startswith(HOST) and a.peer_identity is None
        with pytest.raises(FrameError, match="reserved"):
            await a.send(Message(type="faults.label", body={"label": "Z"}), timeout_s=T)
        await a.send(numbered(1), timeout_s=T)  # the link stayed open
        assert (await b.recv(timeout_s=T)).body["i"] == 1
        assert a.stats.frames_sent >= 2 and b.stats.frames_received >= 2


@pytest.mark.spec("F12")
async def test_peer_that_does_not_introduce_itself_is_dropped() -> None:
    tb = faulty("B", 2)
    handled: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        await handled.put(conn)

    async with await tb.listen(HOST, 0, handler) as listener:
        async with await TcpTransport().connect(HOST, listener.port, timeout_s=T) as raw:
            await raw.send(Message(type="hello"), timeout_s=T)
            await assert_link_down(raw.recv(timeout_s=T))
        assert handled.empty()
        ta = faulty("A", 1)  # the listener keeps serving wrapped peers
        async with await ta.connect(HOST, listener.port, timeout_s=T) as a:
            assert a.peer_label == "B"
            served = await asyncio.wait_for(handled.get(), T)
            await served.close()

    async def silent(conn: Connection) -> None:
        return None  # a plain TCP peer that never answers the label

    async with await TcpTransport().listen(HOST, 0, silent) as plain:
        with pytest.raises(PeerTimeout):
            await faulty("A", 1).connect(HOST, plain.port, timeout_s=QUIET_S)


@pytest.mark.spec("F3", "F11")
async def test_total_loss_delivers_nothing_until_the_plan_changes() -> None:
    ta, tb = faulty("A", 1, FaultPlan(loss=1.0)), faulty("B", 2)
    async with linked(ta, tb) as (a, b):
        for i in range(5):
            await a.send(numbered(i), timeout_s=T)
        await assert_nothing_arrives(b)
        ta.set_plan(FaultPlan())  # spec F11: applies to the open link
        await a.send(numbered(5), timeout_s=T)
        assert (await b.recv(timeout_s=T)).body["i"] == 5
        ta.set_plan(FaultPlan(loss=1.0))
        async with linked(ta, tb) as (a2, b2):  # and to later links
            await a2.send(numbered(6), timeout_s=T)
            await assert_nothing_arrives(b2)


async def lossy_run(seed: int) -> list[int]:
    ta, tb = faulty("A", seed, FaultPlan(loss=0.5)), faulty("B", 99)
    async with linked(ta, tb) as (a, b):
        for i in range(40):
            await a.send(numbered(i), timeout_s=T)
        ta.set_plan(FaultPlan())
        await a.send(Message(type="end"), timeout_s=T)
        return await ids_until_end(b)


@pytest.mark.spec("F2", "F3")
async def test_half_loss_drops_the_same_subset_for_the_same_seed() -> None:
    first, second, other = await lossy_run(7), await lossy_run(7), await lossy_run(8)
    assert first == second
    assert 0 < len(first) < 40
    assert first == sorted(first)
    assert other != first


@pytest.mark.spec("F5")
async def test_duplicate_one_delivers_every_message_twice() -> None:
    ta, tb = faulty("A", 1, FaultPlan(duplicate=1.0)), faulty("B", 2)
    async with linked(ta, tb) as (a, b):
        for i in range(5):
            await a.send(numbered(i), timeout_s=T)
        ta.set_plan(FaultPlan())
        await a.send(Message(type="end"), timeout_s=T)
        assert await ids_until_end(b) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.spec("F6", "F13")
async def test_reorder_changes_the_order_but_not_the_multiset() -> None:
    ta, tb = faulty("A", 5, FaultPlan(reorder=0.5)), faulty("B", 2)
    async with linked(ta, tb) as (a, b):
        for i in range(30):
            await a.send(numbered(i), timeout_s=T)
        await a.close()  # delivers what is queued or held, then closes
        got = await ids_until_closed(b)
        assert sorted(got) == list(range(30))
        assert got != list(range(30))
        await asyncio.gather(a.close(), a.close())  # idempotent
        assert a.closed


@pytest.mark.spec("F4")
async def test_delay_and_jitter_are_lower_bounds() -> None:
    delay_s = 0.2
    ta, tb = faulty("A", 1, FaultPlan(delay_s=delay_s, jitter_s=0.1)), faulty("B", 2)
    loop = asyncio.get_running_loop()
    async with linked(ta, tb) as (a, b):
        sent_at: dict[int, float] = {}
        for i in range(5):
            sent_at[i] = loop.time()
            await a.send(numbered(i), timeout_s=T)
        for _ in range(5):
            msg = await b.recv(timeout_s=T)
            assert loop.time() - sent_at[msg.body["i"]] >= delay_s


@pytest.mark.spec("F4")
async def test_a_fixed_delay_keeps_the_order_across_lanes() -> None:
    ta, tb = faulty("A", 1, FaultPlan(delay_s=0.05)), faulty("B", 2)
    async with linked(ta, tb) as (a, b):
        for i in range(20):
            await a.send(numbered(i), timeout_s=T, lane=("control", "data", "bulk")[i % 3])
        await a.send(Message(type="end"), timeout_s=T)
        assert await ids_until_end(b) == list(range(20))


def one_bit_flips_that_decode(frame: bytes) -> list[Message]:
    out = []
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        decoder = FrameDecoder()
        try:
            msgs = decoder.feed(flipped)
            decoder.end_of_stream()
        except FrameError:
            continue
        out += msgs
    return out


@pytest.mark.spec("F7", "F11", "T15")
async def test_a_corrupted_frame_closes_its_connection_and_nothing_altered_arrives() -> None:
    """With ``corrupt=1.0`` every frame has one bit flipped: its CRC-32 catches it, so each
    connection's recv raises FrameError and that connection closes; no message, altered or
    not, is delivered; the listener then serves a clean connection."""
    ta, tb = faulty("A", 3, FaultPlan(corrupt=1.0)), faulty("B", 4)
    outcomes: asyncio.Queue[tuple[object, bool]] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        try:
            while True:
                msg = await conn.recv(timeout_s=T)
                await outcomes.put((msg, conn.closed))
        except FrameError as exc:
            await outcomes.put((exc, conn.closed))
            raise

    note = Message(type="note", body={"text": "the quick brown fox", "n": 123456789})
    hidden = Message(type="hidden", body={"seq": 7}, tensor=WireTensor(
        dtype="f32", shape=(4, 16), data=random.Random(5).randbytes(256)))
    for original in (note, hidden):  # what the wrapper may flip never decodes at all
        assert one_bit_flips_that_decode(FrameEncoder().encode(original)) == []
    async with await tb.listen(HOST, 0, handler) as listener:
        errors = []
        for i in range(10):
            async with await ta.connect(HOST, listener.port, timeout_s=T) as a:
                await a.send((note, hidden)[i % 2], timeout_s=T)
                got, closed = await asyncio.wait_for(outcomes.get(), T)
            assert isinstance(got, FrameError), f"a corrupted frame was delivered as {got!r}"
            assert closed  # a corrupted frame closes that connection
            errors.append(str(got))
        assert any("frame checksum mismatch" in e for e in errors), errors
        assert outcomes.empty()
        ta.set_plan(FaultPlan())  # the listener still serves a fresh connection
        async with await ta.connect(HOST, listener.port, timeout_s=T) as a:
            for original in (note, hidden):
                await a.send(original, timeout_s=T)
                got, _ = await asyncio.wait_for(outcomes.get(), T)
                assert got == original


@pytest.mark.spec("F8")
async def test_bandwidth_cap_makes_n_bytes_take_n_over_bandwidth_seconds() -> None:
    bandwidth = 100_000.0
    ta, tb = faulty("A", 1, FaultPlan(bandwidth_bytes_per_s=bandwidth)), faulty("B", 2)
    messages = [Message(type="blob", body={"i": i},
                        tensor=WireTensor(dtype="u8", shape=(10_000,), data=bytes(10_000)))
                for i in range(5)]
    total_bytes = sum(len(FrameEncoder().encode(m)) for m in messages)
    loop = asyncio.get_running_loop()
    async with linked(ta, tb) as (a, b):
        start = loop.time()
        for msg in messages:
            await a.send(msg, timeout_s=T)
        got = [await b.recv(timeout_s=T) for _ in messages]
        assert loop.time() - start >= total_bytes / bandwidth
        assert got == messages


@pytest.mark.spec("F8")
async def test_send_slower_than_its_timeout_raises_peer_timeout_and_sends_nothing() -> None:
    ta, tb = faulty("A", 1, FaultPlan(bandwidth_bytes_per_s=1000.0)), faulty("B", 2)
    big = Message(type="blob", tensor=WireTensor(dtype="u8", shape=(10_000,), data=bytes(10_000)))
    async with linked(ta, tb) as (a, b):
        with pytest.raises(PeerTimeout):
            await a.send(big, timeout_s=0.2)
        ta.set_plan(FaultPlan())
        await a.send(numbered(1), timeout_s=T)
        assert (await b.recv(timeout_s=T)).body["i"] == 1  # not the big one


@pytest.mark.spec("F9", "F11")
async def test_one_way_partition_then_heal_on_the_open_link() -> None:
    cut = FaultPlan(partition=frozenset({("A", "B")}))
    ta, tb = faulty("A", 1, cut), faulty("B", 2, cut)
    async with linked(ta, tb) as (a, b):
        await a.send(numbered(1), timeout_s=T)
        await assert_nothing_arrives(b)
        await b.send(numbered(2), timeout_s=T)  # B -> A still arrives
        assert (await a.recv(timeout_s=T)).body["i"] == 2
        ta.set_plan(FaultPlan())
        tb.set_plan(FaultPlan())
        await a.send(numbered(3), timeout_s=T)
        assert (await b.recv(timeout_s=T)).body["i"] == 3


@pytest.mark.spec("F9")
async def test_two_way_partition_cuts_both_directions_until_healed() -> None:
    cut = FaultPlan(partition=frozenset({("A", "B"), ("B", "A")}))
    ta, tb = faulty("A", 1, cut), faulty("B", 2, cut)
    async with linked(ta, tb) as (a, b):
        await a.send(numbered(1), timeout_s=T)
        await b.send(numbered(2), timeout_s=T)
        await assert_nothing_arrives(b)
        await assert_nothing_arrives(a)
        ta.set_plan(FaultPlan())
        tb.set_plan(FaultPlan())
        await a.send(numbered(3), timeout_s=T)
        await b.send(numbered(4), timeout_s=T)
        assert (await b.recv(timeout_s=T)).body["i"] == 3
        assert (await a.recv(timeout_s=T)).body["i"] == 4


@pytest.mark.spec("F10")
async def test_reset_after_messages_fails_both_ends() -> None:
    plan = FaultPlan(reset_after_messages=3)
    ta, tb = faulty("A", 1, plan), faulty("B", 2, plan)
    async with linked(ta, tb) as (a, b):
        a_pending = asyncio.create_task(a.recv(timeout_s=T))
        for i in range(3):
            await a.send(numbered(i), timeout_s=T)
        assert [(await b.recv(timeout_s=T)).body["i"] for _ in range(3)] == [0, 1, 2]
        await assert_link_down(b.recv(timeout_s=T))
        await assert_link_down(a_pending)
        await assert_link_down(a.send(numbered(3), timeout_s=T))
        await assert_link_down(b.send(numbered(4), timeout_s=T))
        assert a.closed and b.closed


@pytest.mark.spec("F10")
async def test_reset_all_fails_pending_recv_at_both_ends() -> None:
    ta, tb = faulty("A", 1), faulty("B", 2)
    async with linked(ta, tb) as (a, b):
        a_pending = asyncio.create_task(a.recv(timeout_s=T))
        b_pending = asyncio.create_task(b.recv(timeout_s=T))
        await ta.reset_all()
        await assert_link_down(a_pending)
        await assert_link_down(b_pending)
        await assert_link_down(a.send(numbered(1), timeout_s=T))
        await assert_link_down(b.send(numbered(2), timeout_s=T))


@pytest.mark.spec("F13")
async def test_a_delivery_error_reaches_the_next_callers() -> None:
    ta, tb = faulty("A", 1, max_frame_bytes=4096), faulty("B", 2)
    big = Message(type="blob", tensor=WireTensor(dtype="u8", shape=(10_000,), data=bytes(10_000)))
    async with linked(ta, tb) as (a, b):
        await a.send(big, timeout_s=T)  # queued; the inner transport refuses it later
        with pytest.raises(FrameError, match="exceeds the maximum"):
            await a.recv(timeout_s=T)
        with pytest.raises(FrameError, match="exceeds the maximum"):
            await a.send(numbered(1), timeout_s=T)
        assert a.closed
        await assert_link_down(b.recv(timeout_s=T))
        await asyncio.gather(a.close(), a.close())
        await a.close()


@pytest.mark.spec("F14")
async def test_a_full_queue_pushes_back_until_it_drains() -> None:
    ta, tb = faulty("A", 1, FaultPlan(delay_s=0.5)), faulty("B", 2)
    half = MAX_QUEUED_BYTES // 2 + 1

    def big(i: int) -> Message:
        return Message(type="blob", body={"i": i},
                       tensor=WireTensor(dtype="u8", shape=(half,), data=bytes(half)))

    async with linked(ta, tb) as (a, b):
        await a.send(big(0), timeout_s=T)  # one message always fits the empty queue
        with pytest.raises(PeerTimeout):
            await a.send(big(1), timeout_s=0.1)  # no room while big(0) waits out its delay
        assert (await b.recv(timeout_s=T)).body["i"] == 0
        await a.send(big(2), timeout_s=T)  # room again once delivered
        assert (await b.recv(timeout_s=T)).body["i"] == 2


@pytest.mark.spec("F14")
async def test_every_send_yields_to_the_event_loop() -> None:
    ta, tb = faulty("A", 1, FaultPlan(loss=1.0)), faulty("B", 2)
    ran = asyncio.Event()

    async def other_task() -> None:
        ran.set()

    async with linked(ta, tb) as (a, _):
        task = asyncio.create_task(other_task())
        await a.send(numbered(1), timeout_s=T)  # dropped, yet the loop got a turn
        assert ran.is_set()
        await task


# --- the accounting of ``python -m mesh faults`` (mesh/tools/faults/): fake outcomes, no cluster ---

REFERENCE = "Red, orange and yellow are colours of the rainbow."


def accounting_context(tmp_path: Path) -> Context:
    ctx = Context(tmp_path)
    ctx.reference[("p", MAX_TOKENS)] = REFERENCE
    return ctx


def streamed(text: str = REFERENCE, *, started: float = 0.0, stamps: list[float] | None = None,
             kind: str = "completed", **fields: Any) -> Outcome:
    return Outcome(kind=kind, text=text, started=started,
                   stamps=stamps if stamps is not None else [started + 0.1 * (i + 1) for i in range(5)], **fields)


@pytest.mark.spec("F17")
def test_a_crashed_scenario_keeps_its_tally_counts_one_lost_and_fails(tmp_path: Path) -> None:
    def body(ctx: Context, tally: Tally) -> None:
        tally.add(streamed(), "p")
        tally.add(streamed(), "p")
        raise RuntimeError("the cluster never became ready")

    r = run_scenario(accounting_context(tmp_path), "crashes", body)
    assert (r.sent, r.completed, r.lost, r.crashed, r.passed) == (2, 2, 1, True, False)
    assert any("never became ready" in note for note in r.notes)
    assert "CRASHED" in format_row(r)


@pytest.mark.spec("F17")
def test_abandoned_clients_are_counted_apart_and_their_text_must_be_a_prefix(tmp_path: Path) -> None:
    tally = Tally(accounting_context(tmp_path), "leave")
    tally.add(streamed(REFERENCE[:9], kind="abandoned"), "p")
    r = tally.finish(0.0)
    assert (r.sent, r.abandoned, r.completed, r.mismatches, r.passed) == (1, 1, 0, 0, True)

    tally = Tally(accounting_context(tmp_path), "leave")
    tally.add(streamed("Blue, green", kind="abandoned"), "p")
    r = tally.finish(0.0)
    assert (r.abandoned, r.completed, r.mismatches, r.passed) == (1, 0, 1, False)
    assert any("not a prefix" in note for note in r.notes)


@pytest.mark.spec("F17")
def test_a_request_with_no_reference_text_is_a_mismatch(tmp_path: Path) -> None:
    tally = Tally(accounting_context(tmp_path), "unreferenced")
    tally.add(streamed("anything"), "a prompt the reference run did not send")
    tally.add(streamed(REFERENCE), "p", max_tokens=12)  # the right prompt at another length
    r = tally.finish(0.0)
    assert (r.completed, r.mismatches, r.passed) == (2, 2, False)
    assert sum("no reference" in note for note in r.notes) == 2


@pytest.mark.spec("F17")
def test_the_single_node_reference_covers_every_request_the_scenarios_send() -> None:
    from mesh.tools.faults.scenarios import LONG_PROMPT

    covered = set(harness.REFERENCE_REQUESTS)
    assert (LONG_PROMPT, 12) in covered
    assert {(p, n) for p in harness.PROMPTS for n in (MAX_TOKENS, 12)} <= covered


@pytest.mark.spec("F17")
def test_every_attempt_is_counted_and_retried_503s_are_refusals(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [Outcome(kind="failed_clean", error="HTTP 503: no plan yet (loading layers)"),
               Outcome(kind="failed_clean", error="HTTP 503: no plan yet (linking)"),
               streamed(started=1e9)]
    calls: list[float] = []

    def fake_stream_chat(url: str, prompt: str, **kwargs: Any) -> Outcome:
        calls.append(harness.time.monotonic())
        return answers[len(calls) - 1]

    monkeypatch.setattr(harness, "stream_chat", fake_stream_chat)
    monkeypatch.setattr(harness.time, "sleep", lambda _s: None)
    out = harness.request("http://127.0.0.1:1", "p")
    assert (out.kind, out.attempts, out.refused) == ("completed", 3, 2)
    assert out.started <= calls[0] and out.refusal == "HTTP 503: no plan yet (loading layers)"

    tally = Tally(accounting_context(tmp_path), "retries")
    tally.add(out, "p")
    tally.add(streamed(), "p")
    r = tally.finish(0.0)
    assert (r.sent, r.attempts, r.refused, r.completed, r.failed_clean, r.passed) == (2, 4, 2, 2, 0, True)
    assert "2 attempt(s) refused" in r.notes[0]

    # a 503 naming a placement failure is final: one attempt, a clean failure, no refusal
    answers[:] = [Outcome(kind="failed_clean", error="HTTP 503: placement failed: the model does not fit")]
    calls.clear()
    out = harness.request("http://127.0.0.1:1", "p")
    assert (out.kind, out.attempts, out.refused) == ("failed_clean", 1, 0)


@pytest.mark.spec("F17")
def test_time_to_first_token_after_the_fault(tmp_path: Path) -> None:
    tally = Tally(accounting_context(tmp_path), "ttft")
    tally.add(streamed(started=1.0, stamps=[2.0, 2.1]), "p")  # finished before the fault: no sample
    tally.mark_fault(at=10.0)
    tally.mark_fault(at=11.0)  # the earliest mark counts
    # hit: sent before the fault; its wait is from the fault to its next token
    tally.add(streamed(started=5.0, stamps=[6.0, 7.0, 8.0, 12.5, 13.0]), "p", hit=True)
    # sent after the fault (first attempt at 11.0, 503s in between): first attempt -> first token
    tally.add(streamed(started=11.0, stamps=[14.0, 14.1], attempts=3, refused=2), "p")
    tally.add(Outcome(kind="failed_clean", error="HTTP 500: boom", started=12.0), "p")  # no token: no sample
    r = tally.finish(0.0, expect_failed_clean=1)
    assert (r.ttft_after_fault_s_p50, r.ttft_after_fault_s_max) == (pytest.approx(2.75), pytest.approx(3.0))
    assert (r.recovery_s_p50, r.recovery_s_max) == (pytest.approx(4.5), pytest.approx(4.5))
    assert r.passed


@pytest.mark.spec("F18")
def test_a_recovery_target_is_met_missed_or_absent(tmp_path: Path) -> None:
    def row(gap_s: float, target_s: float | None, *, hit: bool = True) -> ScenarioResult:
        tally = Tally(accounting_context(tmp_path), "target", recovery_target_s=target_s)
        tally.mark_fault(at=0.45)
        tally.add(streamed(started=0.0, stamps=[0.1, 0.2, 0.3, 0.4, 0.4 + gap_s]), "p", hit=hit)
        return tally.finish(0.0)

    met = row(1.0, 5.0)
    assert (met.target_met, met.recovery_target_s, met.passed) == (True, 5.0, True)
    missed = row(7.0, 5.0)
    assert (missed.target_met, missed.passed) == (False, False)
    assert "recovery target missed" in missed.notes[-1] and "MISS" in format_row(missed)
    no_target = row(7.0, None)
    assert (no_target.target_met, no_target.passed) == (None, True)
    unmeasured = row(1.0, 5.0, hit=False)  # the only stream was not hit: nothing measured
    assert (unmeasured.target_met, unmeasured.passed) == (None, False)


@pytest.mark.spec("F18", "FO7")
def test_scenarios_declare_their_targets_and_expected_clean_failures() -> None:
    from mesh.tools.faults.scenarios import PAUSE_S, SCENARIOS

    kills = {"kill-middle-stage", "kill-first-stage", "kill-http-node", "restart-with-data-dir",
             "32-streams-during-kill", "kill-middle-long-prompt", "kill-middle-long-prompt-no-replica"}
    pauses = {"sigstop-past-deadline", "partition-two-way", "partition-one-way"}
    for name, s in SCENARIOS.items():
        expected = (harness.STAGE_KILL_TARGET_S if name in kills
                    else PAUSE_S + harness.DEAD_AFTER_S if name in pauses else None)
        assert s.recovery_target_s == expected, name
    assert harness.STAGE_KILL_TARGET_S == 5.0
    # the skewed node must refuse, whatever it did (FO7): its expectation is fixed, not taken from the outcome
    assert SCENARIOS["clock-24h-ahead"].expect_failed_clean == 1


@pytest.mark.spec("F16")
def test_out_appends_one_json_line_per_run_and_json_prints_the_same_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import mesh.tools.benchutil

    rows = [ScenarioResult(name="kill-middle-stage", sent=4, attempts=5, refused=1, completed=4,
                           recovery_s_p50=1.4, recovery_s_max=1.4, ttft_after_fault_s_p50=0.3,
                           ttft_after_fault_s_max=1.2, recovery_target_s=5.0, target_met=True, passed=True)]
    monkeypatch.setattr(run, "run_suite", lambda names, **kwargs: rows)
    monkeypatch.setattr(mesh.tools.benchutil, "machine_profile", lambda: {"cores": 2, "dirty": True})
    out = tmp_path / "results" / "faults.jsonl"
    assert run.run_faults_command(quick=True, as_json=True, only=None, model="m", out=out) == 0
    printed = json.loads(capsys.readouterr().out)
    rows[0].passed = False
    assert run.run_faults_command(quick=False, as_json=False, only=None, model="m", out=out) == 1
    table = capsys.readouterr().out
    assert all(column in table for column in ("att", "ref", "aband", "ttft", "target", "<=5.0 ok"))

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    for record, quick in zip(lines, (True, False), strict=True):
        assert record["suite"] == "mesh-faults" and record["schema"] == 2 and record["quick"] is quick
        assert record["machine"] == {"cores": 2, "dirty": True} and record["timestamp"]
        assert set(record["scenarios"][0]) == {
            "name", "sent", "attempts", "refused", "completed", "abandoned", "failed_clean", "lost", "mismatches",
            "recovery_s_p50", "recovery_s_max", "ttft_after_fault_s_p50", "ttft_after_fault_s_max",
            "recovery_target_s", "longest_gap_s", "target_met", "crashed", "notes", "passed", "seconds"}
    assert {k: v for k, v in printed.items() if k != "date"} == lines[0]
