"""Runs the transport conformance suite (mesh/testing/transport_conformance.py) over the
in-process ``memory`` transport and every transport registered under ``mesh.transports``,
each secure and plaintext (spec T14), plus tests of what only the memory transport has
(``reset()``, its per-lane byte bound, its fake ports).

A registered transport whose module fails to import is listed as skipped with its error.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh import registry
from mesh.errors import (
    AuthenticationError,
    ConfigError,
    PeerTimeout,
    PluginError,
    TransportError,
)
from mesh.security import CLUSTER_KEY_BYTES, LinkSecurity
from mesh.testing.transport_conformance import *  # noqa: F403  (the suite's tests, fixture, pytestmark)
from mesh.testing.transport_conformance import TransportFactory
from mesh.wire import Message, WireTensor
from transports.base import Connection, Listener, Transport
from transports.memory import MemoryConnection, MemoryTransport

HOST = "127.0.0.1"
T = 5.0


def _factory_params() -> list[Any]:
    """memory + every registered transport, secure and insecure; failed loads are skipped."""
    params: list[Any] = []
    classes: list[tuple[str, type | None, str]] = [("memory", MemoryTransport, "")]
    for name in registry.names("transport"):
        try:
            classes.append((name, registry.load("transport", name, expected=Transport), ""))
        except PluginError as exc:
            classes.append((name, None, str(exc)))
    for name, cls, error in classes:
        if cls is None:
            params.append(pytest.param(None, id=name, marks=pytest.mark.skip(
                reason=f"transport {name!r} is registered but failed to load: {error}")))
            continue
        for secure in (True, False):
            factory = TransportFactory.for_class(cls, secure=secure)
            params.append(pytest.param(factory, id=factory.id))
    return params


FACTORY_PARAMS = _factory_params()


@pytest.fixture(params=FACTORY_PARAMS)
def transport_factory(request: pytest.FixtureRequest) -> TransportFactory:
    factory = request.param
    assert isinstance(factory, TransportFactory)
    return factory


@pytest.mark.spec("T14")
async def test_suite_covers_memory_and_every_registered_transport() -> None:
    ids = {p.id for p in FACTORY_PARAMS}
    names = {i.rsplit("-", 1)[0] if i.endswith(("-secure", "-insecure")) else i for i in ids}
    assert names == {"memory", *registry.names("transport")}
    assert "memory" not in registry.names("transport")  # a test tool, not a plugin
    for name in registry.names("transport"):
        try:
            registry.load("transport", name, expected=Transport)
        except PluginError:
            continue
        assert {f"{name}-secure", f"{name}-insecure"} <= ids


# --------------------------------------------------------------------------- memory only


def _security(tmp_path: Path, name: str, cluster_key: bytes) -> LinkSecurity:
    return LinkSecurity(ed25519.Ed25519PrivateKey.generate(), cluster_key, tmp_path / name)


async def _pair(server: MemoryTransport, client: MemoryTransport
                ) -> tuple[MemoryConnection, MemoryConnection, Listener]:
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def keep(conn: Connection) -> None:
        accepted.put_nowait(conn)

    listener = await server.listen(HOST, 0, keep)
    conn = await client.connect(HOST, listener.port, timeout_s=T)
    other = await asyncio.wait_for(accepted.get(), T)
    assert isinstance(other, MemoryConnection)
    return conn, other, listener


async def _ignore(conn: Connection) -> None:
    return None


def _blob(n: int) -> Message:
    return Message(type="blob", tensor=WireTensor(dtype="u8", shape=(n,), data=bytes(n)))


@pytest.mark.spec("T13")
async def test_memory_reset_fails_both_ends_at_once() -> None:
    transport = MemoryTransport(max_buffered_bytes=1024)
    client, server, listener = await _pair(transport, transport)
    pending_recv = asyncio.create_task(server.recv(timeout_s=60))
    pending_send = asyncio.create_task(client.send(_blob(4096), timeout_s=60, lane="bulk"))
    await asyncio.sleep(0)
    assert not pending_send.done()  # blocked: 4 KiB through a 1 KiB lane nobody reads
    client.reset()
    for task in (pending_recv, pending_send):
        with pytest.raises(TransportError, match="reset") as info:
            await asyncio.wait_for(task, T)
        assert not isinstance(info.value, PeerTimeout)
    assert client.closed and server.closed
    for end in (client, server):
        with pytest.raises(TransportError, match="reset"):
            await end.recv(timeout_s=T)
        with pytest.raises(TransportError, match="reset"):
            await end.send(Message(type="late"), timeout_s=T)
    client.reset()  # idempotent
    await listener.close()


@pytest.mark.spec("T12", "T11")
async def test_memory_bound_is_per_lane_and_blocked_bulk_never_blocks_control() -> None:
    bound = 64 * 1024
    transport = MemoryTransport(max_buffered_bytes=bound)
    client, server, listener = await _pair(transport, transport)
    stuck = asyncio.create_task(client.send(_blob(4 * bound), timeout_s=60, lane="bulk"))
    await asyncio.sleep(0)
    assert not stuck.done()
    assert server.buffered_bytes("bulk") == bound  # never more than the bound
    for i in range(100):  # control and data still flow while bulk is full
        await client.send(Message(type="c", body={"i": i}), timeout_s=T, lane="control")
        await client.send(Message(type="d", body={"i": i}), timeout_s=T, lane="data")
    got = [await server.recv(timeout_s=T) for _ in range(201)]
    assert [m.body["i"] for m in got if m.type == "c"] == list(range(100))
    assert [m.body["i"] for m in got if m.type == "d"] == list(range(100))
    assert [m.type for m in got].count("blob") == 1
    await asyncio.wait_for(stuck, T)
    assert max(server.buffered_bytes(lane) for lane in ("control", "data", "bulk")) == 0
    with pytest.raises(ConfigError):
        server.buffered_bytes("express")
    await listener.close()


@pytest.mark.spec("T12", "T7")
async def test_memory_send_timeout_mid_frame_resets_the_link() -> None:
    transport = MemoryTransport(max_buffered_bytes=1024)
    client, server, listener = await _pair(transport, transport)
    await client.send(_blob(512), timeout_s=T, lane="bulk")  # fits: the link stays open
    with pytest.raises(PeerTimeout, match="within 0.05s"):
        await client.send(_blob(512), timeout_s=0.05, lane="bulk")  # half of it went out
    assert client.closed
    with pytest.raises(TransportError, match="reset by peer"):
        await server.recv(timeout_s=T)
    await listener.close()


@pytest.mark.spec("T12")
async def test_memory_send_timeout_before_any_byte_leaves_the_link_open() -> None:
    transport = MemoryTransport(max_buffered_bytes=1024)
    client, server, listener = await _pair(transport, transport)
    first = asyncio.create_task(client.send(_blob(4096), timeout_s=60, lane="bulk"))
    await asyncio.sleep(0)
    with pytest.raises(PeerTimeout):  # waits behind the first for the lane: nothing written
        await client.send(_blob(8), timeout_s=0.05, lane="bulk")
    assert not client.closed
    assert (await server.recv(timeout_s=T)).type == "blob"
    await asyncio.wait_for(first, T)
    await listener.close()


@pytest.mark.spec("T4")
async def test_memory_rejects_other_cluster_and_logs(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    key = os.urandom(CLUSTER_KEY_BYTES)
    server = MemoryTransport(security=_security(tmp_path, "server", key))
    intruder = MemoryTransport(security=_security(tmp_path, "intruder", os.urandom(CLUSTER_KEY_BYTES)))
    plain = MemoryTransport()
    friend = MemoryTransport(security=_security(tmp_path, "friend", key))
    with caplog.at_level(logging.WARNING, logger="transports.memory"):
        client, other, listener = await _pair(server, friend)
        for stranger, reason in ((intruder, "wrong cluster key"), (plain, "no certificate")):
            with pytest.raises(AuthenticationError, match=reason):
                await stranger.connect(HOST, listener.port, timeout_s=T)
        assert caplog.text.count("rejected a link from") == 2
        plain_listener = await plain.listen(HOST, 0, _ignore)
        with pytest.raises(AuthenticationError, match="plaintext"):
            await friend.connect(HOST, plain_listener.port, timeout_s=T)
        await client.send(Message(type="still"), timeout_s=T)
        assert (await other.recv(timeout_s=T)).type == "still"
        await listener.close()
        await plain_listener.close()


@pytest.mark.spec("T7")
async def test_memory_ports_refusals_and_connect_timeout() -> None:
    transport = MemoryTransport()
    ignore = _ignore
    listener = await transport.listen(HOST, 0, ignore)
    assert listener.port >= 49152 and listener.host == HOST
    with pytest.raises(TransportError, match="already in use"):
        await transport.listen(HOST, listener.port, ignore)
    with pytest.raises(PeerTimeout):
        await transport.connect(HOST, listener.port, timeout_s=0)
    with pytest.raises(ConfigError):
        await transport.connect(HOST, 70000, timeout_s=T)
    await listener.close()
    with pytest.raises(TransportError, match="refused") as info:
        await transport.connect(HOST, listener.port, timeout_s=T)
    assert not isinstance(info.value, PeerTimeout)
    again = await transport.listen(HOST, listener.port, ignore)  # the port is free again
    await again.close()
    with pytest.raises(ConfigError):
        MemoryTransport(max_buffered_bytes=0)
