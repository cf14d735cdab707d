"""The conformance cases about hostile or mismatched peers: authentication (spec S3, S4)
and malformed bytes (T4). Part of the suite in ``mesh/testing/transport_conformance.py``,
which re-exports these tests; run them through it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from pathlib import Path

import cbor2
import pytest

from mesh import PROTOCOL_MAJOR
from mesh.errors import (
    FrameError,
    PeerTimeout,
    TransportError,
)
from mesh.security import CLUSTER_KEY_BYTES
from mesh.testing.transport_harness import (  # the harness, shared by these tests
    PROMPT_S,
    T,
    TransportFactory,
    _Harness,
    _harness,
    _msg,
    _wait_for,
)
from transports.base import Connection

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]


# --------------------------------------------------------------------------- authentication


def _need_secure(factory: TransportFactory) -> None:
    if not factory.secure:
        pytest.skip("authentication cases run in the secure run only")


@pytest.mark.spec("S3")
async def test_peer_identity_names_the_other_node(transport_factory: TransportFactory,
                                                  tmp_path: Path) -> None:
    """Secure: each end's peer_identity is the other's node id. Plaintext: None on both."""
    async with _harness(transport_factory, tmp_path) as h:
        client, server = await h.pair()
        if h.server_security is None or h.client_security is None:
            assert client.peer_identity is None and server.peer_identity is None
            return
        assert client.peer_identity is not None and server.peer_identity is not None
        assert client.peer_identity.node_id == h.server_security.node_id
        assert server.peer_identity.node_id == h.client_security.node_id


async def _wait_for_rejection_log(caplog: pytest.LogCaptureFixture, since: int) -> None:
    """Spec S4: the listener logs "rejected a link from ..." at WARNING or above."""
    await _wait_for(lambda: any(r.levelno >= logging.WARNING
                                and "rejected a link from" in r.getMessage()
                                for r in caplog.records[since:]),
                    T, 'the listener did not log "rejected a link from ..."')


async def _assert_serves_legitimate_client(h: _Harness) -> None:
    client, server = await h.pair()
    await client.send(_msg("legit"), timeout_s=T)
    assert (await server.recv(timeout_s=T)).type == "legit"
    await server.send(_msg("welcome"), timeout_s=T)
    assert (await client.recv(timeout_s=T)).type == "welcome"


@pytest.mark.spec("S4", "T4")
async def test_other_cluster_is_rejected_and_listener_keeps_serving(
        transport_factory: TransportFactory, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A node holding another cluster key cannot connect; the listener logs it, never hands
    it to the handler, and keeps serving nodes of its cluster."""
    _need_secure(transport_factory)
    with caplog.at_level(logging.WARNING):
        async with _harness(transport_factory, tmp_path) as h:
            await h.listen()
            intruder = h.transport(h.security("intruder", os.urandom(CLUSTER_KEY_BYTES)))
            since = len(caplog.records)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(TransportError) as info:
                await h.connect(intruder)
            assert loop.time() - start < T + PROMPT_S
            assert not isinstance(info.value, PeerTimeout), f"expected a refusal, got {info.value!r}"
            await _wait_for_rejection_log(caplog, since)
            assert h.accepted.empty(), "the handler got a link from another cluster"
            await _assert_serves_legitimate_client(h)


@pytest.mark.spec("S4", "T4")
async def test_plaintext_client_to_secure_listener_is_rejected(
        transport_factory: TransportFactory, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A plaintext client (security=None) to a secure listener gets no working link: connect
    fails, or its first exchange does; the handler never sees it; the listener keeps serving."""
    _need_secure(transport_factory)
    with caplog.at_level(logging.WARNING):
        async with _harness(transport_factory, tmp_path) as h:
            await h.listen()
            plain = h.transport(None)
            since = len(caplog.records)
            try:
                conn = await h.connect(plain)
            except TransportError:
                pass
            else:  # e.g. TCP: the socket opens; the TLS listener drops it at the first bytes
                with pytest.raises(TransportError):
                    await conn.send(_msg("hello"), timeout_s=T)
                    await conn.recv(timeout_s=T)
            await _wait_for_rejection_log(caplog, since)
            assert h.accepted.empty(), "the handler got a plaintext link on a secure listener"
            await _assert_serves_legitimate_client(h)


@pytest.mark.spec("S3")
async def test_secure_client_to_plaintext_listener_fails(transport_factory: TransportFactory,
                                                         tmp_path: Path) -> None:
    """A secure client never accepts a plaintext listener: connect fails in bounded time."""
    _need_secure(transport_factory)

    async def echo(conn: Connection) -> None:
        while True:
            await conn.send(await conn.recv(timeout_s=60), timeout_s=T)

    async with _harness(transport_factory, tmp_path) as h:
        plain_listener = await h.listen(echo, transport=h.transport(None))
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TransportError):
            await h.connect(listener=plain_listener)
        assert loop.time() - start < T + PROMPT_S


# --------------------------------------------------------------------------- malformed (T4)

_BAD_ENVELOPE = cbor2.dumps({"v": [PROTOCOL_MAJOR, 0], "t": "x", "b": {}})


def _with_crc(frame: bytes) -> bytes:
    """``frame`` with its CRC-32 trailer (spec T3), so only what the case names is wrong."""
    return frame + zlib.crc32(frame).to_bytes(4, "big")


_GOOD = _with_crc(b"MS\x02\x00\x00\x00" + len(_BAD_ENVELOPE).to_bytes(4, "big") + bytes(8) + _BAD_ENVELOPE)
GARBAGE = {
    "bad-magic": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # a well-formed header announcing a frame far over any maximum (spec T5)
    "oversize": b"MS\x02\x01\x06\x01" + (1).to_bytes(4, "big") + (2**40).to_bytes(8, "big")
                + (2**32 - 1).to_bytes(4, "big"),
    "trailing-garbage-in-envelope": _with_crc(
        b"MS\x02\x00\x00\x00" + (len(_BAD_ENVELOPE) + 1).to_bytes(4, "big") + bytes(8)
        + _BAD_ENVELOPE + b"\xff"),
    # a good frame with one bit of its envelope flipped: its CRC-32 no longer matches (spec T15)
    "bad-checksum": _GOOD[:20] + bytes([_GOOD[20] ^ 0x04]) + _GOOD[21:],
    # a frame of a node from before the CRC trailer (wire version 1)
    "wire-version-1": b"MS\x01\x00\x00\x00" + len(_BAD_ENVELOPE).to_bytes(4, "big") + bytes(8) + _BAD_ENVELOPE,
}


@pytest.mark.spec("T4", "T5", "T15")
@pytest.mark.parametrize("garbage", sorted(GARBAGE))
async def test_malformed_bytes_close_only_that_connection(transport_factory: TransportFactory,
                                                          tmp_path: Path, garbage: str) -> None:
    """Raw malformed bytes (after any handshake) make the handler's recv raise FrameError and
    close that connection only: an open link and new ones keep working."""
    if transport_factory.open_raw is None:
        pytest.skip(f"no raw byte stream into {transport_factory.name} to send garbage on")
    errors: list[TransportError] = []
    failed = asyncio.Event()

    async def echo(conn: Connection) -> None:
        try:
            while True:
                await conn.send(await conn.recv(timeout_s=60), timeout_s=T)
        except TransportError as exc:
            errors.append(exc)
            failed.set()
            raise

    async with _harness(transport_factory, tmp_path) as h:
        listener = await h.listen(echo)
        before = await h.connect()
        raw = await transport_factory.open_raw(h.client, transport_factory.host, listener.port,
                                               h.client_security)
        try:
            await raw.write(GARBAGE[garbage])
            await raw.wait_closed(T)
        finally:
            await raw.close()
        await asyncio.wait_for(failed.wait(), T)
        assert isinstance(errors[0], FrameError), f"expected FrameError, got {errors[0]!r}"
        for conn in (before, await h.connect()):
            await conn.send(_msg("ping"), timeout_s=T)
            assert (await conn.recv(timeout_s=T)).type == "ping"
