"""Tests of the TCP transport and connect_with_backoff against specs/transport.md.

All traffic goes to 127.0.0.1 on ports the OS picks. No sleeps as synchronisation: tests
wait on events or results, each wait bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import struct
import sys
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points

import cbor2
import pytest
import torch

from mesh import PROTOCOL_MAJOR
from mesh.errors import ConfigError, FrameError, PeerTimeout, TransportError
from mesh.testing.transport_harness import echo, free_port, serving
from mesh.wire import Message, WireTensor
from transports.base import Backoff, Connection, connect_with_backoff
from transports.framing import WIRE_VERSION, FrameEncoder
from transports.tcp import TcpConnection, TcpTransport

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
T = 5.0  # bound on waits that should succeed quickly

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def to_wire(t: torch.Tensor, dtype: str) -> WireTensor:
    flat = t.contiguous().reshape(-1)
    if dtype == "bf16":  # numpy has no bf16: move the raw 16-bit patterns
        data = flat.view(torch.int16).numpy().tobytes()
    else:
        data = flat.numpy().tobytes()
    return WireTensor(dtype=dtype, shape=tuple(t.shape), data=data)


def from_wire(w: WireTensor) -> torch.Tensor:
    if w.dtype == "bf16":
        flat = torch.frombuffer(bytearray(w.data), dtype=torch.int16).view(torch.bfloat16)
    else:
        flat = torch.frombuffer(bytearray(w.data), dtype=TORCH_DTYPES[w.dtype])
    return flat.reshape(w.shape)


@pytest.mark.spec("T1", "T3")
async def test_control_and_tensors_round_trip_over_tcp() -> None:
    assert sys.byteorder == "little"
    transport = TcpTransport()
    gen = torch.Generator().manual_seed(0)
    async with serving(transport, echo) as port:
        async with await transport.connect(HOST, port, timeout_s=T) as conn:
            hello = Message(type="hello", body={"node": "a", "caps": [1, 2.5, None, b"\x00"]})
            await conn.send(hello, timeout_s=T)
            assert await conn.recv(timeout_s=T) == hello
            for dtype, torch_dtype in TORCH_DTYPES.items():
                t = torch.randn(3, 5, 7, generator=gen).to(torch_dtype)
                msg = Message(type="forward", body={"dtype": dtype}, tensor=to_wire(t, dtype))
                await conn.send(msg, timeout_s=T)
                back = await conn.recv(timeout_s=T)
                assert back == msg
                assert back.tensor is not None
                assert torch.equal(from_wire(back.tensor), t)
            stats = conn.stats
            assert stats.frames_sent == stats.frames_received == 4
            assert stats.bytes_sent == stats.bytes_received > 3 * 5 * 7 * (4 + 2 + 2)


@pytest.mark.spec("T4")
async def test_garbage_peer_is_closed_and_listener_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []
    failed = asyncio.Event()

    async def handler(conn: Connection) -> None:
        try:
            await echo(conn)
        except TransportError as exc:
            errors.append(exc)
            failed.set()
            raise

    transport = TcpTransport()
    with caplog.at_level(logging.WARNING, logger="transports.tcp"):
        async with serving(transport, handler) as port:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), T) == b""  # closed on us
            writer.close()
            await asyncio.wait_for(failed.wait(), T)
            assert isinstance(errors[0], FrameError)
            assert "bad magic" in str(errors[0])

            async with await transport.connect(HOST, port, timeout_s=T) as conn:
                await conn.send(Message(type="ping", body={"n": 1}), timeout_s=T)
                assert (await conn.recv(timeout_s=T)).body == {"n": 1}
    assert "bad magic" in caplog.text


@pytest.mark.spec("T4")
async def test_handler_error_is_logged_and_closes_only_its_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    async def handler(conn: Connection) -> None:
        msg = await conn.recv(timeout_s=T)
        if msg.type == "boom":
            raise RuntimeError("handler bug")
        await echo(conn)

    transport = TcpTransport()
    with caplog.at_level(logging.ERROR, logger="transports.tcp"):
        async with serving(transport, handler) as port:
            async with await transport.connect(HOST, port, timeout_s=T) as bad:
                await bad.send(Message(type="boom"), timeout_s=T)
                with pytest.raises(TransportError):
                    await bad.recv(timeout_s=T)
            async with await transport.connect(HOST, port, timeout_s=T) as good:
                await good.send(Message(type="hi"), timeout_s=T)
                await good.send(Message(type="again"), timeout_s=T)
                assert (await good.recv(timeout_s=T)).type == "again"
    assert "handler bug" in caplog.text


@pytest.mark.spec("T10", "T4")
async def test_protocol_major_mismatch_closes_connection() -> None:
    errors: list[BaseException] = []
    failed = asyncio.Event()

    async def handler(conn: Connection) -> None:
        try:
            await conn.recv(timeout_s=T)
        except TransportError as exc:
            errors.append(exc)
            failed.set()

    envelope = cbor2.dumps({"v": [PROTOCOL_MAJOR + 1, 0], "t": "hello", "b": {}})
    body = (b"MS" + bytes([WIRE_VERSION, 0, 0, 0]) + len(envelope).to_bytes(4, "big") + bytes(8)
            + envelope)
    raw = body + zlib.crc32(body).to_bytes(4, "big")  # a well-formed frame but for its major
    async with serving(TcpTransport(), handler) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(raw)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), T) == b""
        writer.close()
        await asyncio.wait_for(failed.wait(), T)
    assert isinstance(errors[0], FrameError)
    assert f"protocol {PROTOCOL_MAJOR + 1}.0" in str(errors[0])


@pytest.mark.spec("T7")
async def test_recv_after_peer_close_delivers_then_raises_promptly() -> None:
    async def handler(conn: Connection) -> None:
        await conn.send(Message(type="one"), timeout_s=T)
        await conn.send(Message(type="two"), timeout_s=T)
        await conn.close()

    transport = TcpTransport()
    async with serving(transport, handler) as port:
        conn = await transport.connect(HOST, port, timeout_s=T)
        assert (await conn.recv(timeout_s=T)).type == "one"
        assert (await conn.recv(timeout_s=T)).type == "two"
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TransportError, match="closed by peer") as info:
            await conn.recv(timeout_s=T)
        assert not isinstance(info.value, PeerTimeout)
        assert loop.time() - start < T / 2
        assert conn.closed
        with pytest.raises(TransportError, match="closed"):
            await conn.recv(timeout_s=T)
        with pytest.raises(TransportError, match="closed"):
            await conn.send(Message(type="late"), timeout_s=T)
        await conn.close()


@pytest.mark.spec("T7")
async def test_recv_timeout_raises_peer_timeout_and_link_survives() -> None:
    transport = TcpTransport()
    async with serving(transport, echo) as port:
        async with await transport.connect(HOST, port, timeout_s=T) as conn:
            with pytest.raises(PeerTimeout, match="within 0.05s"):
                await conn.recv(timeout_s=0.05)
            assert not conn.closed
            await conn.send(Message(type="still-there"), timeout_s=T)
            assert (await conn.recv(timeout_s=T)).type == "still-there"


@pytest.mark.spec("T7")
async def test_local_close_fails_pending_recv() -> None:
    transport = TcpTransport()
    async with serving(transport, echo) as port:
        conn = await transport.connect(HOST, port, timeout_s=T)
        pending = asyncio.create_task(conn.recv(timeout_s=T))
        await conn.close()
        with pytest.raises(TransportError, match="closed locally") as info:
            await asyncio.wait_for(pending, T)
        assert not isinstance(info.value, PeerTimeout)


@pytest.mark.spec("T7")
async def test_listener_close_closes_accepted_connections() -> None:
    accepted = asyncio.Event()
    ended = asyncio.Event()

    async def handler(conn: Connection) -> None:
        accepted.set()
        try:
            await conn.recv(timeout_s=T)
        finally:
            ended.set()

    transport = TcpTransport()
    listener = await transport.listen(HOST, 0, handler)
    conn = await transport.connect(HOST, listener.port, timeout_s=T)
    await asyncio.wait_for(accepted.wait(), T)
    await listener.close()
    assert ended.is_set()
    with pytest.raises(TransportError):
        await conn.recv(timeout_s=T)
    with pytest.raises(TransportError):
        await transport.connect(HOST, listener.port, timeout_s=T)
    await conn.close()


@pytest.mark.spec("T6")
async def test_concurrent_sends_never_interleave() -> None:
    senders, per_sender = 32, 4
    received: list[Message] = []
    done = asyncio.Event()

    async def collect(conn: Connection) -> None:
        while len(received) < senders * per_sender:
            received.append(await conn.recv(timeout_s=T))
        done.set()

    async def send_some(conn: Connection, sender: int) -> None:
        rng = random.Random(sender)
        for i in range(per_sender):
            data = rng.randbytes(rng.randrange(1, 256 * 1024))
            msg = Message(type="chunk",
                          body={"sender": sender, "i": i, "sha": hashlib.sha256(data).digest()},
                          tensor=WireTensor(dtype="u8", shape=(len(data),), data=data))
            await conn.send(msg, timeout_s=T)

    transport = TcpTransport()
    async with serving(transport, collect) as port:
        async with await transport.connect(HOST, port, timeout_s=T) as conn:
            async with asyncio.TaskGroup() as group:
                for sender in range(senders):
                    group.create_task(send_some(conn, sender))
            await asyncio.wait_for(done.wait(), T * 2)
    assert len(received) == senders * per_sender
    for msg in received:
        assert msg.tensor is not None
        assert hashlib.sha256(msg.tensor.data).digest() == msg.body["sha"]
    for sender in range(senders):  # each sender's frames arrive in its own order
        assert [m.body["i"] for m in received if m.body["sender"] == sender] == list(
            range(per_sender))


@pytest.mark.spec("T5")
async def test_max_frame_size_over_tcp() -> None:
    errors: list[BaseException] = []
    failed = asyncio.Event()

    async def handler(conn: Connection) -> None:
        try:
            await echo(conn)
        except FrameError as exc:
            errors.append(exc)
            failed.set()

    small = TcpTransport(max_frame_bytes=4096)
    async with serving(small, handler) as port:
        async with await small.connect(HOST, port, timeout_s=T) as conn:
            big = Message(type="big", tensor=WireTensor(dtype="u8", shape=(10_000,),
                                                        data=bytes(10_000)))
            with pytest.raises(FrameError, match="exceeds the maximum 4096"):
                await conn.send(big, timeout_s=T)  # refused locally; the link stays open
            await conn.send(Message(type="small"), timeout_s=T)
            assert (await conn.recv(timeout_s=T)).type == "small"
        async with await TcpTransport().connect(HOST, port, timeout_s=T) as conn:
            await conn.send(big, timeout_s=T)
            with pytest.raises(TransportError):
                await conn.recv(timeout_s=T)
        await asyncio.wait_for(failed.wait(), T)
    assert "exceeds the maximum 4096" in str(errors[0])


@pytest.mark.spec("T7")
async def test_send_timeout_raises_peer_timeout_and_closes() -> None:
    release = asyncio.Event()

    async def not_reading(conn: Connection) -> None:
        await asyncio.wait_for(release.wait(), T)

    transport = TcpTransport()
    async with serving(transport, not_reading) as port:
        conn = await transport.connect(HOST, port, timeout_s=T)
        huge = Message(type="huge", tensor=WireTensor(dtype="u8", shape=(64 * 2**20,),
                                                      data=bytes(64 * 2**20)))
        with pytest.raises(PeerTimeout, match="did not finish within 0.2s"):
            await conn.send(huge, timeout_s=0.2)
        assert conn.closed
        release.set()
        await conn.close()


@pytest.mark.spec("T8")
async def test_tcp_nodelay_on_both_ends() -> None:
    server_side: list[TcpConnection] = []
    accepted = asyncio.Event()

    async def handler(conn: Connection) -> None:
        assert isinstance(conn, TcpConnection)
        server_side.append(conn)
        accepted.set()

    transport = TcpTransport()
    async with serving(transport, handler) as port:
        async with await transport.connect(HOST, port, timeout_s=T) as conn:
            await asyncio.wait_for(accepted.wait(), T)
            assert conn.tcp_nodelay
            assert server_side[0].tcp_nodelay
            assert conn.peer == f"{HOST}:{port}"
            assert server_side[0].peer.startswith(f"{HOST}:")


@pytest.mark.spec("T7")
async def test_connect_refused_raises_transport_error() -> None:
    port = free_port()
    with pytest.raises(TransportError, match=f"{HOST}:{port}") as info:
        await TcpTransport().connect(HOST, port, timeout_s=T)
    assert not isinstance(info.value, PeerTimeout)
    with pytest.raises(ConfigError):
        await TcpTransport().connect(HOST, 70000, timeout_s=T)


@pytest.mark.spec("T9")
async def test_connect_with_backoff_succeeds_when_server_starts_late() -> None:
    port = free_port()
    first_failure = asyncio.Event()

    class Watching(TcpTransport):
        async def connect(self, host: str, port: int, *, timeout_s: float) -> TcpConnection:
            try:
                return await super().connect(host, port, timeout_s=timeout_s)
            except TransportError:
                first_failure.set()
                raise

    transport = Watching()
    task = asyncio.create_task(connect_with_backoff(
        transport, HOST, port, attempt_timeout_s=1.0, initial_delay_s=0.02, max_delay_s=0.1,
        deadline_s=T * 2, rng=random.Random(7)))
    await asyncio.wait_for(first_failure.wait(), T)
    async with serving_on(transport, port) as _:
        conn = await asyncio.wait_for(task, T * 2)
        async with conn:
            await conn.send(Message(type="late"), timeout_s=T)
            assert (await conn.recv(timeout_s=T)).type == "late"


@asynccontextmanager
async def serving_on(transport: TcpTransport, port: int) -> AsyncIterator[int]:
    listener = await transport.listen(HOST, port, echo)
    try:
        yield listener.port
    finally:
        await listener.close()


@pytest.mark.spec("T9")
async def test_connect_with_backoff_gives_up_at_deadline() -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TransportError) as info:
        await connect_with_backoff(TcpTransport(), HOST, port, attempt_timeout_s=0.2,
                                   initial_delay_s=0.01, max_delay_s=0.05, deadline_s=0.4,
                                   rng=random.Random(1))
    elapsed = loop.time() - start
    assert 0.4 <= elapsed < 0.4 + 1.0
    text = str(info.value)
    assert f"{HOST}:{port}" in text and "attempts" in text and "last error" in text
    assert isinstance(info.value.__cause__, TransportError)


@pytest.mark.spec("T9")
def test_backoff_schedule_grows_with_jitter_and_is_seeded() -> None:
    def delays(seed: int) -> list[float]:
        backoff = Backoff(initial_delay_s=0.1, max_delay_s=1.0, rng=random.Random(seed))
        return [backoff.next_delay_s() for _ in range(8)]

    got = delays(3)
    assert got == delays(3)
    for delay, base in zip(got, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0], strict=True):
        assert base / 2 <= delay <= base
    with pytest.raises(ConfigError):
        Backoff(initial_delay_s=0, max_delay_s=1, rng=random.Random(0))


def test_registered_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="mesh.transports") if ep.name == "tcp"]
    assert ep.load() is TcpTransport
    assert TcpTransport.name == "tcp"


def test_encoder_and_transport_share_default_max() -> None:
    assert TcpTransport().max_frame_bytes == FrameEncoder().max_frame_bytes


@pytest.mark.spec("T7")
async def test_connect_timeout_raises_peer_timeout() -> None:
    async with serving(TcpTransport(), echo) as port:
        with pytest.raises(PeerTimeout, match=f"connect to {HOST}:{port}"):
            await TcpTransport().connect(HOST, port, timeout_s=0)


@pytest.mark.spec("T7")
async def test_reset_by_peer_fails_recv_with_transport_error() -> None:
    errors: list[BaseException] = []
    failed = asyncio.Event()
    accepted = asyncio.Event()

    async def handler(conn: Connection) -> None:
        accepted.set()
        try:
            await conn.recv(timeout_s=T)
        except TransportError as exc:
            errors.append(exc)
            failed.set()

    async with serving(TcpTransport(), handler) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        await asyncio.wait_for(accepted.wait(), T)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # close with linger 0: the peer sees a reset
        await asyncio.wait_for(failed.wait(), T)
    assert not isinstance(errors[0], PeerTimeout)


async def test_listen_on_a_busy_port_raises_transport_error() -> None:
    async with serving(TcpTransport(), echo) as port:
        with pytest.raises(TransportError, match=f"cannot listen on {HOST}:{port}"):
            await TcpTransport().listen(HOST, port, echo)
