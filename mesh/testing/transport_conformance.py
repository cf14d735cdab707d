"""Transport conformance suite: the behaviour every ``mesh.transports`` plugin must show.

One set of pytest tests, run against any ``Transport`` through a ``transport_factory``
fixture (a ``TransportFactory``: a callable ``(security: LinkSecurity | None) -> Transport``
plus metadata: name, secure or plaintext run, ``independent_lanes``, the largest message to
try, an optional raw byte-stream opener for malformed-frame tests). mesh's own
``tests/test_transport_conformance.py`` runs it over the in-process ``memory`` transport and
every transport registered under the ``mesh.transports`` entry points, each secure (a
``LinkSecurity`` from a fresh Ed25519 key and a shared random cluster key) and plaintext
(``security=None``) where the transport allows it. Spec: specs/transport.md T1, T4-T7,
T11-T14; specs/security.md S3, S4.

Running it on your own transport (a third-party plugin): star-import the suite into one of
your test modules (pytest collects tests from test modules only) and define the
``transport_factory`` fixture there or in your ``conftest.py``::

    import pytest
    from mesh.testing.transport_conformance import *  # noqa: F403  (the tests, pytestmark)
    from mesh.testing.transport_conformance import TransportFactory

    from my_plugin import MyTransport

    @pytest.fixture(params=[True, False], ids=["secure", "insecure"])
    def transport_factory(request: pytest.FixtureRequest) -> TransportFactory:
        return TransportFactory.for_class(MyTransport, secure=request.param)

The star import brings the ``test_*`` functions and ``pytestmark`` (a 120 s timeout per
test and the ``asyncio`` mark) into your module, so pytest collects them there; it needs
``pytest-asyncio`` and ``pytest-timeout``, and registering the ``spec`` marker
(``markers = ["spec(*ids): ..."]``) silences the unknown-marker warning. A transport that
declares ``independent_lanes: ClassVar[bool] = True`` also gets the independent-lanes test;
one whose constructor refuses ``security=None`` with ``ConfigError`` has its plaintext run
skipped; one whose ``secure`` is False has its secure run skipped. Give
``TransportFactory(make=...)`` to pass constructor options.

Every wait is bounded; no sleep is used as synchronisation (waits are on results, with
timeouts). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import cbor2
import psutil
import pytest

from mesh import PROTOCOL_MAJOR, PROTOCOL_MINOR
from mesh.errors import (
    ConfigError,
    FrameError,
    PeerTimeout,
    TransportError,
)
from mesh.testing.conformance_security import (  # the hostile-peer cases, re-exported
    test_malformed_bytes_close_only_that_connection,
    test_other_cluster_is_rejected_and_listener_keeps_serving,
    test_peer_identity_names_the_other_node,
    test_plaintext_client_to_secure_listener_is_rejected,
    test_secure_client_to_plaintext_listener_fails,
)
from mesh.testing.transport_harness import (  # the harness, shared by these tests
    MIB,
    PROMPT_S,
    RawLink,
    T,
    TransportFactory,
    _digest,
    _harness,
    _msg,
    _pseudo_random,
    _recv_until_error,
    _wait_for,
)
from mesh.wire import Message, WireTensor
from transports.base import LANES, Connection
from transports.framing import HEADER_BYTES, TRAILER_BYTES, FrameEncoder

__all__ = [
    "RawLink",
    "TransportFactory",
    "conformance_payload",
    "pytestmark",
    "test_bad_lane_raises_config_error",
    "test_close_is_idempotent_and_send_after_close_raises",
    "test_concurrent_streams_keep_per_task_order",
    "test_frame_over_the_limit_raises_frame_error_and_link_survives",
    "test_handler_error_closes_only_its_connection",
    "test_independent_lanes_control_overtakes_bulk",
    "test_interleaved_lanes_keep_order_per_lane",
    "test_listener_close_closes_accepted_connections",
    "test_local_close_fails_pending_recv_promptly",
    "test_malformed_bytes_close_only_that_connection",
    "test_message_sizes_round_trip_byte_exact",
    "test_one_lane_keeps_order",
    "test_other_cluster_is_rejected_and_listener_keeps_serving",
    "test_peer_close_delivers_queued_then_raises",
    "test_peer_identity_names_the_other_node",
    "test_plaintext_client_to_secure_listener_is_rejected",
    "test_recv_timeout_raises_peer_timeout_and_link_survives",
    "test_reset_fails_pending_send_and_recv",
    "test_secure_client_to_plaintext_listener_fails",
    "test_sender_to_non_reading_peer_fails_in_bounded_time",
]

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]



# --------------------------------------------------------------------------- ordering (T11)


@pytest.mark.spec("T11")
async def test_one_lane_keeps_order(transport_factory: TransportFactory, tmp_path: Path) -> None:
    """1000 messages on one lane arrive in the order sent."""
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()

        async def send_all() -> None:
            for i in range(1000):
                await client.send(_msg("seq", i=i), timeout_s=T, lane="data")

        async with asyncio.TaskGroup() as group:
            group.create_task(send_all())
            received = [(await server.recv(timeout_s=T)).body["i"] for _ in range(1000)]
        assert received == list(range(1000))
        assert client.stats.frames_sent >= 1000
        assert server.stats.frames_received >= 1000


@pytest.mark.spec("T11")
async def test_interleaved_lanes_keep_order_per_lane(transport_factory: TransportFactory,
                                                     tmp_path: Path) -> None:
    """Sends alternating between two lanes (bulk ones carrying tensors) keep order per lane."""
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        blob = _pseudo_random(32 * 1024)

        async def send_all() -> None:
            for i in range(300):
                await client.send(_msg("c", lane="control", i=i), timeout_s=T, lane="control")
                await client.send(_msg("b", data=blob, lane="bulk", i=i), timeout_s=T, lane="bulk")

        async with asyncio.TaskGroup() as group:
            group.create_task(send_all())
            got = [await server.recv(timeout_s=T) for _ in range(600)]
        for lane in ("control", "bulk"):
            assert [m.body["i"] for m in got if m.body["lane"] == lane] == list(range(300))
        assert all(m.tensor is not None and m.tensor.data == blob
                   for m in got if m.body["lane"] == "bulk")


# --------------------------------------------------------------------------- sizes (T1, T5)


class _Payloads:
    """Message payloads built once per module; the largest (~256 MiB) only when asked for."""

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}

    def get(self, n: int) -> bytes:
        if n not in self._cache:
            self._cache[n] = _pseudo_random(n)
        return self._cache[n]


@pytest.fixture(scope="module")
def conformance_payload() -> _Payloads:
    """Payloads shared by the size tests of one module (the biggest is built once)."""
    return _Payloads()


def _largest_tensor_bytes(max_frame_bytes: int) -> int:
    """The tensor size whose frame (1 dim, body {"sha": 32 bytes}, CRC trailer) is exactly
    the maximum."""
    envelope = cbor2.dumps({"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": "size",
                            "b": {"sha": bytes(32)}})
    return max_frame_bytes - HEADER_BYTES - 4 - len(envelope) - TRAILER_BYTES


SIZE_CASES = ["no-tensor", "1B-scalar", "1B", "64KiB", "16MiB", "max"]


@pytest.mark.spec("T1", "T5")
@pytest.mark.parametrize("size", SIZE_CASES)
async def test_message_sizes_round_trip_byte_exact(transport_factory: TransportFactory,
                                                   tmp_path: Path, size: str,
                                                   conformance_payload: _Payloads) -> None:
    """Messages from no tensor (a WireTensor has dims >= 1, so 0 bytes means none) through one
    byte to the largest frame the transport accepts arrive byte-exact (compared by SHA-256);
    all but the largest also travel back."""
    max_bytes = transport_factory.max_message_bytes
    if size == "no-tensor":
        msg = Message(type="size", body={"sha": _digest(b""), "empty": b""})
    elif size == "1B-scalar":
        msg = Message(type="size", body={"sha": _digest(b"\x07")},
                      tensor=WireTensor(dtype="u8", shape=(), data=b"\x07"))
    else:
        n = {"1B": 1, "64KiB": 64 * 1024, "16MiB": 16 * MIB,
             "max": _largest_tensor_bytes(max_bytes)}[size]
        data = conformance_payload.get(n)
        msg = Message(type="size", body={"sha": _digest(data)},
                      tensor=WireTensor(dtype="u8", shape=(n,), data=data))
    frame_bytes = sum(len(p) for p in FrameEncoder(max_frame_bytes=max_bytes).encode_parts(msg))
    if size == "max":
        assert frame_bytes == max_bytes
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        directions = [(client, server)] if size == "max" else [(client, server), (server, client)]
        for sender, receiver in directions:
            async with asyncio.TaskGroup() as group:  # big frames need a reader while sent
                group.create_task(sender.send(msg, timeout_s=60, lane="bulk"))
                got = await receiver.recv(timeout_s=60)
            data_back = got.tensor.data if got.tensor is not None else b""
            assert _digest(data_back) == msg.body["sha"]
            assert got.body == msg.body and got.type == msg.type
            assert (got.tensor is None) == (msg.tensor is None)
            if got.tensor is not None and msg.tensor is not None:
                assert (got.tensor.dtype, got.tensor.shape) == (msg.tensor.dtype, msg.tensor.shape)


@pytest.mark.spec("T5")
async def test_frame_over_the_limit_raises_frame_error_and_link_survives(
        transport_factory: TransportFactory, tmp_path: Path,
        conformance_payload: _Payloads) -> None:
    """A frame one envelope-pad over the maximum is refused at the sender with FrameError;
    the link stays open and usable."""
    max_bytes = transport_factory.max_message_bytes
    data = conformance_payload.get(_largest_tensor_bytes(max_bytes))
    too_big = Message(type="size", body={"sha": _digest(data), "pad": b"x"},
                      tensor=WireTensor(dtype="u8", shape=(len(data),), data=data))
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        with pytest.raises(FrameError, match="exceeds the maximum"):
            await client.send(too_big, timeout_s=T, lane="bulk")
        assert not client.closed
        await client.send(_msg("after"), timeout_s=T)
        assert (await server.recv(timeout_s=T)).type == "after"


# --------------------------------------------------------------------------- concurrency (T6)


@pytest.mark.spec("T6", "T11")
async def test_concurrent_streams_keep_per_task_order(transport_factory: TransportFactory,
                                                      tmp_path: Path) -> None:
    """8 tasks send 200 messages each on one connection at once (each task on one lane): all
    arrive intact, each task's messages in its order."""
    tasks, per_task = 8, 200
    blob = _pseudo_random(4096)
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()

        async def send_some(task: int) -> None:
            lane = LANES[task % len(LANES)]
            for i in range(per_task):
                data = blob[: 1 + (task * 977 + i * 131) % len(blob)]
                await client.send(_msg("chunk", data=data, task=task, i=i, sha=_digest(data)),
                                  timeout_s=T, lane=lane)

        async with asyncio.TaskGroup() as group:
            for task in range(tasks):
                group.create_task(send_some(task))
            received = [await server.recv(timeout_s=T) for _ in range(tasks * per_task)]
    for msg in received:
        assert msg.tensor is not None and _digest(msg.tensor.data) == msg.body["sha"]
    for task in range(tasks):
        assert [m.body["i"] for m in received if m.body["task"] == task] == list(range(per_task))


# --------------------------------------------------------------------------- lanes (T11)


@pytest.mark.spec("T11")
async def test_independent_lanes_control_overtakes_bulk(transport_factory: TransportFactory,
                                                        tmp_path: Path,
                                                        conformance_payload: _Payloads) -> None:
    """While a 64 MiB message is in flight on "bulk", a "control" message sent after it
    arrives first, within a bound that does not depend on the bulk size."""
    if not transport_factory.independent_lanes:
        pytest.skip(f"{transport_factory.name} does not declare independent_lanes: its lanes "
                    "share one ordered stream")
    data = conformance_payload.get(64 * MIB)
    bulk = Message(type="bulk", tensor=WireTensor(dtype="u8", shape=(len(data),), data=data))
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        loop = asyncio.get_running_loop()
        arrivals: list[tuple[str, float]] = []

        async def receive_two() -> None:
            for _ in range(2):
                msg = await server.recv(timeout_s=60)
                arrivals.append((msg.type, loop.time()))

        async with asyncio.TaskGroup() as group:
            group.create_task(receive_two())
            group.create_task(client.send(bulk, timeout_s=60, lane="bulk"))
            for _ in range(3):  # let the bulk send start writing (a yield, not a wait)
                await asyncio.sleep(0)
            assert not arrivals, "64 MiB arrived at once: nothing was in flight"
            sent_at = loop.time()
            await client.send(_msg("urgent"), timeout_s=T, lane="control")
        assert [kind for kind, _ in arrivals] == ["urgent", "bulk"]
        assert arrivals[0][1] - sent_at < PROMPT_S


@pytest.mark.spec("T11")
async def test_bad_lane_raises_config_error(transport_factory: TransportFactory,
                                            tmp_path: Path) -> None:
    """An unknown lane name raises ConfigError; the link stays usable."""
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        with pytest.raises(ConfigError, match="lane"):
            await client.send(_msg("x"), timeout_s=T, lane="express")
        assert not client.closed
        for lane in LANES:
            await client.send(_msg("ok", lane=lane), timeout_s=T, lane=lane)
        got = {(await server.recv(timeout_s=T)).body["lane"] for _ in LANES}
        assert got == set(LANES)


# --------------------------------------------------------------------------- close (T7)


@pytest.mark.spec("T7")
async def test_local_close_fails_pending_recv_promptly(transport_factory: TransportFactory,
                                                       tmp_path: Path) -> None:
    async with _harness(transport_factory, tmp_path) as h:
        client, _server = await h.pair()
        pending = asyncio.create_task(client.recv(timeout_s=60))
        await asyncio.sleep(0)  # let the recv start waiting
        loop = asyncio.get_running_loop()
        start = loop.time()
        await client.close()
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(pending, PROMPT_S)
        assert not isinstance(info.value, PeerTimeout)
        assert loop.time() - start < PROMPT_S
        assert client.closed


@pytest.mark.spec("T7")
async def test_peer_close_delivers_queued_then_raises(transport_factory: TransportFactory,
                                                      tmp_path: Path) -> None:
    """Messages sent before the peer closed are delivered, then recv raises TransportError
    promptly; later sends raise TransportError."""
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        for i in range(3):
            await server.send(_msg("queued", i=i), timeout_s=T, lane=LANES[i])
        # make sure they left the sender (a peer may drop unsent data on close)
        await server.send(_msg("last", i=3), timeout_s=T)
        got, error = await _recv_until_error_after(client, server)
        assert sorted(m.body["i"] for m in got) == [0, 1, 2, 3]
        assert not isinstance(error, PeerTimeout)
        with pytest.raises(TransportError):
            await client.send(_msg("late"), timeout_s=T)
        with pytest.raises(TransportError):
            await client.recv(timeout_s=T)


async def _recv_until_error_after(client: Connection, server: Connection
                                  ) -> tuple[list[Message], TransportError]:
    """Receive the first message, then close ``server`` and drain ``client`` to its error."""
    first = await client.recv(timeout_s=T)
    await server.close()
    loop = asyncio.get_running_loop()
    start = loop.time()
    got, error = await _recv_until_error(client, 60)
    assert loop.time() - start < PROMPT_S, "recv did not fail promptly after the peer closed"
    return [first, *got], error


@pytest.mark.spec("T7")
async def test_close_is_idempotent_and_send_after_close_raises(
        transport_factory: TransportFactory, tmp_path: Path) -> None:
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        await asyncio.wait_for(asyncio.gather(client.close(), client.close()), PROMPT_S)
        await asyncio.wait_for(client.close(), PROMPT_S)
        assert client.closed
        with pytest.raises(TransportError):
            await client.send(_msg("late"), timeout_s=T)
        with pytest.raises(TransportError):
            await client.recv(timeout_s=T)
        _, error = await _recv_until_error(server, 60)  # the peer learns of it too
        assert not isinstance(error, PeerTimeout)
        await server.close()
        await server.close()


@pytest.mark.spec("T7")
async def test_listener_close_closes_accepted_connections(transport_factory: TransportFactory,
                                                          tmp_path: Path) -> None:
    """Closing a listener fails its handlers' recv and the clients' recv, and refuses new
    connections; closing it again does nothing."""
    async with _harness(transport_factory, tmp_path) as h:
        handler_errors: list[BaseException] = []
        accepted = asyncio.Event()

        async def handler(conn: Connection) -> None:
            accepted.set()
            try:
                await conn.recv(timeout_s=60)
            except TransportError as exc:
                handler_errors.append(exc)

        listener = await h.listen(handler)
        client = await h.connect()
        await asyncio.wait_for(accepted.wait(), T)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(listener.close(), T)
        closed_s = loop.time() - start
        assert len(handler_errors) == 1 and not isinstance(handler_errors[0], PeerTimeout)
        _, error = await _recv_until_error(client, 60)
        assert not isinstance(error, PeerTimeout)
        failed_s = loop.time() - start
        assert failed_s < PROMPT_S, (f"the client's recv failed {failed_s:.1f}s after its "
                                     f"listener closed (close took {closed_s:.1f}s)")
        with pytest.raises(TransportError):  # refused, or (UDP) no answer within 2 s
            await h.client.connect(transport_factory.host, listener.port, timeout_s=2)
        await asyncio.wait_for(listener.close(), T)


@pytest.mark.spec("T4")
async def test_handler_error_closes_only_its_connection(transport_factory: TransportFactory,
                                                        tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A handler that raises has its error logged and its connection closed; the listener
    and its other connections keep serving."""
    async def handler(conn: Connection) -> None:
        while True:
            msg = await conn.recv(timeout_s=60)
            if msg.type == "boom":
                raise RuntimeError("conformance handler bug")
            await conn.send(msg, timeout_s=T)

    with caplog.at_level(logging.WARNING):
        async with _harness(transport_factory, tmp_path) as h:
            await h.listen(handler)
            good = await h.connect()
            bad = await h.connect()
            await bad.send(_msg("boom"), timeout_s=T)
            _, error = await _recv_until_error(bad, 60)
            assert not isinstance(error, PeerTimeout)
            for conn in (good, await h.connect()):
                await conn.send(_msg("hi"), timeout_s=T)
                assert (await conn.recv(timeout_s=T)).type == "hi"
    assert "conformance handler bug" in caplog.text


# --------------------------------------------------------------------------- backpressure (T12)


@pytest.mark.spec("T12", "T7")
async def test_sender_to_non_reading_peer_fails_in_bounded_time(
        transport_factory: TransportFactory, tmp_path: Path) -> None:
    """A peer that never reads: 1 MiB sends with timeout_s=2 eventually raise PeerTimeout
    (or TransportError) after less than 2 GiB, in bounded time, with bounded memory."""
    limit_bytes = 2 * 1024 * MIB
    data = _pseudo_random(MIB)
    msg = Message(type="flood", tensor=WireTensor(dtype="u8", shape=(MIB,), data=data))
    process = psutil.Process()
    async with _harness(transport_factory, tmp_path) as h:
        client, _server = await h.pair()  # the server end is never read
        rss_before = process.memory_info().rss
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        error: TransportError | None = None
        while sent < limit_bytes:
            send_start = loop.time()
            try:
                await client.send(msg, timeout_s=2, lane="bulk")
            except TransportError as exc:
                error = exc
                break
            sent += MIB
        assert error is not None, f"{sent} bytes went to a peer that never reads"
        if isinstance(error, PeerTimeout):  # it must be the send's own 2 s running out
            assert loop.time() - send_start >= 1.9
        assert loop.time() - start < 60
        growth = process.memory_info().rss - rss_before
        assert growth < 1024 * MIB, f"memory grew by {growth} bytes while flooding"


# --------------------------------------------------------------------------- reset (T13)


@pytest.mark.spec("T13", "T7")
async def test_reset_fails_pending_send_and_recv(transport_factory: TransportFactory,
                                                 tmp_path: Path) -> None:
    """The accepting side goes away mid-stream (its listener closes while one client waits in
    recv and another is flooding a peer that does not read): the pending recv and the
    flooding sends fail with TransportError in bounded time. A PeerTimeout counts only when
    it is the send's own timeout running out."""
    send_timeout_s = 4.0
    data = _pseudo_random(MIB)
    flood = Message(type="flood", tensor=WireTensor(dtype="u8", shape=(MIB,), data=data))
    async with _harness(transport_factory, tmp_path) as h:
        reader, _ = await h.pair()
        writer, _ = await h.pair()
        loop = asyncio.get_running_loop()
        sent = 0
        last_send_start = 0.0

        async def flood_until_error() -> TransportError:
            nonlocal sent, last_send_start
            while True:
                last_send_start = loop.time()
                try:
                    await writer.send(flood, timeout_s=send_timeout_s, lane="bulk")
                except TransportError as exc:
                    return exc
                sent += 1

        pending_recv = asyncio.create_task(reader.recv(timeout_s=60))
        flooding = asyncio.create_task(flood_until_error())
        await _wait_for(lambda: sent >= 1 or flooding.done(), T, "the flood never started")
        assert h.listener is not None
        start = loop.time()
        await asyncio.wait_for(h.listener.close(), T)
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(pending_recv, T)
        assert not isinstance(info.value, PeerTimeout)
        send_error = await asyncio.wait_for(flooding, send_timeout_s + T)
        if isinstance(send_error, PeerTimeout):
            assert loop.time() - last_send_start >= send_timeout_s * 0.95
        assert loop.time() - start < send_timeout_s + T
        with pytest.raises(TransportError):
            await writer.send(_msg("late"), timeout_s=T)


# --------------------------------------------------------------------------- recv timeout (T7)


@pytest.mark.spec("T7")
async def test_recv_timeout_raises_peer_timeout_and_link_survives(
        transport_factory: TransportFactory, tmp_path: Path) -> None:
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(PeerTimeout):
            await client.recv(timeout_s=0.1)
        assert 0.09 <= loop.time() - start < PROMPT_S
        assert not client.closed
        await server.send(_msg("still-there"), timeout_s=T)
        assert (await client.recv(timeout_s=T)).type == "still-there"
        await client.send(_msg("and-back"), timeout_s=T)
        assert (await server.recv(timeout_s=T)).type == "and-back"
