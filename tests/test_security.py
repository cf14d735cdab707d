"""Link security against specs/security.md: identities, cluster keys, TLS on real sockets
(127.0.0.1 only), replayed handshakes, identity claims in the hello, --insecure."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh.cli import main
from mesh.errors import AuthenticationError, ConfigError, TransportError
from mesh.kernel.records import MemberInfo
from mesh.node.links import Links
from mesh.security import (
    LinkSecurity,
    PeerIdentity,
    format_cluster_key,
    load_or_create_cluster_key,
    load_or_create_identity,
    node_id_for,
    parse_cluster_key,
)
from mesh.testing.scripted import ScriptedConnection
from mesh.wire import Message
from transports.base import Connection
from transports.tcp import TcpTransport

pytestmark = pytest.mark.timeout(60)
HOST = "127.0.0.1"


def _security(cluster_key: bytes, tmp_path: Path, name: str) -> LinkSecurity:
    return LinkSecurity(ed25519.Ed25519PrivateKey.generate(), cluster_key, tmp_path / name)


@pytest.mark.spec("S1")
def test_identity_and_cluster_key_persist_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "d"
    key = load_or_create_identity(data)
    assert node_id_for(key.public_key()) == node_id_for(load_or_create_identity(data).public_key())
    cluster = load_or_create_cluster_key(data)
    assert cluster == load_or_create_cluster_key(data) and len(cluster) == 32
    for name in ("identity.key", "cluster.key"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    assert LinkSecurity.for_data_dir(data).node_id == node_id_for(key.public_key())
    (data / "identity.key").write_text("garbage")
    with pytest.raises(ConfigError, match="identity.key"):
        load_or_create_identity(data)


@pytest.mark.spec("S2")
def test_cluster_key_text_form_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = os.urandom(32)
    text = format_cluster_key(raw)
    assert parse_cluster_key(text) == raw and text.startswith("mesh1-")
    for bad in ("", "mesh1-", "mesh1-abc", text[:-1], text + "A", "mesh2-" + text[6:], text.replace("-", "+", 2)):
        with pytest.raises(ConfigError, match="--cluster-key"):
            parse_cluster_key(bad)
    data = tmp_path / "node"
    assert main(["key", "--data-dir", str(data)]) == 0
    printed = capsys.readouterr().out.strip()
    assert parse_cluster_key(printed) == load_or_create_cluster_key(data)
    assert main(["key", "--data-dir", str(data)]) == 0 and capsys.readouterr().out.strip() == printed
    # a given key replaces the stored one
    assert load_or_create_cluster_key(data, text) == raw and load_or_create_cluster_key(data) == raw


async def _serve_tls(security: LinkSecurity | None) -> tuple[Any, asyncio.Queue[Connection]]:
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)
        await conn.send(Message(type="hi"), timeout_s=5)

    listener = await TcpTransport(security=security).listen(HOST, 0, handler)
    return listener, accepted


@pytest.mark.spec("S3")
async def test_tls_links_prove_each_node_identity(tmp_path: Path) -> None:
    cluster = os.urandom(32)
    server, client = _security(cluster, tmp_path, "s"), _security(cluster, tmp_path, "c")
    listener, accepted = await _serve_tls(server)
    async with listener:
        conn = await TcpTransport(security=client).connect(HOST, listener.port, timeout_s=5)
        async with conn:
            assert (await conn.recv(timeout_s=5)).type == "hi"
            other = await asyncio.wait_for(accepted.get(), 5)
            assert conn.peer_identity is not None and conn.peer_identity.node_id == server.node_id
            assert other.peer_identity is not None and other.peer_identity.node_id == client.node_id
            assert conn.tls_version == "TLSv1.3" and other.tls_version == "TLSv1.3"  # type: ignore[attr-defined]


@pytest.mark.spec("S4")
async def test_wrong_cluster_or_plaintext_is_rejected_and_listener_serves_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster = os.urandom(32)
    listener, accepted = await _serve_tls(_security(cluster, tmp_path, "s"))
    async with listener:
        with caplog.at_level(logging.WARNING):
            with pytest.raises(AuthenticationError):
                await TcpTransport(security=_security(os.urandom(32), tmp_path, "x")).connect(
                    HOST, listener.port, timeout_s=5)
            plain = await TcpTransport().connect(HOST, listener.port, timeout_s=5)
            await plain.send(Message(type="hello"), timeout_s=5)
            with pytest.raises(TransportError):
                await plain.recv(timeout_s=5)
            await plain.close()
        assert accepted.empty()
        good = await TcpTransport(security=_security(cluster, tmp_path, "c")).connect(HOST, listener.port, timeout_s=5)
        async with good:
            assert (await good.recv(timeout_s=5)).type == "hi"
    assert "rejected a link from" in caplog.text


@pytest.mark.spec("S4", "T9")
async def test_backoff_does_not_retry_a_peer_that_fails_authentication(tmp_path: Path) -> None:
    from transports.base import connect_with_backoff

    listener, _ = await _serve_tls(_security(os.urandom(32), tmp_path, "s"))
    async with listener:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(AuthenticationError, match="check --cluster-key"):
            await connect_with_backoff(TcpTransport(security=_security(os.urandom(32), tmp_path, "c")), HOST,
                                       listener.port, attempt_timeout_s=5, deadline_s=20)
        assert loop.time() - start < 5  # one attempt, not 20 s of retries


@pytest.mark.spec("S6")
async def test_a_replayed_handshake_yields_no_link(tmp_path: Path) -> None:
    """Record what a real client sends through a relay, then replay those bytes."""
    cluster = os.urandom(32)
    listener, accepted = await _serve_tls(_security(cluster, tmp_path, "s"))
    recorded = bytearray()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(HOST, listener.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    recorded.extend(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False), return_exceptions=True)

    relay_server = await asyncio.start_server(relay, HOST, 0)
    async with listener, relay_server:
        port = relay_server.sockets[0].getsockname()[1]
        conn = await TcpTransport(security=_security(cluster, tmp_path, "c")).connect(HOST, port, timeout_s=5)
        assert (await conn.recv(timeout_s=5)).type == "hi"
        await conn.send(Message(type="after"), timeout_s=5)
        await conn.close()
        first = await asyncio.wait_for(accepted.get(), 5)
        await first.close()
        assert len(recorded) > 500
        # Replay the client's bytes verbatim: the server's new random and key share make them useless.
        reader, writer = await asyncio.open_connection(HOST, listener.port)
        writer.write(bytes(recorded))
        await writer.drain()
        try:
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
        except (ConnectionError, OSError):
            pass
        writer.close()
        await asyncio.sleep(0)
        assert accepted.empty()


@pytest.mark.spec("S5")
async def test_a_hello_claiming_another_id_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    me = MemberInfo(member_id="a" * 32, address="127.0.0.1:1", api_address="127.0.0.1:2", backend="torch",
                    memory_bytes=1, incarnation="i")
    victim = MemberInfo(member_id="b" * 32, address="127.0.0.1:3", api_address="127.0.0.1:4", backend="torch",
                        memory_bytes=1, incarnation="j")
    ups: list[MemberInfo] = []

    async def on_up(info: MemberInfo) -> None:
        ups.append(info)

    async def on_message(sender: str, msg: Message) -> None:
        return None

    links = Links(TcpTransport(), me=lambda: me, model_id="m", started_ms=0, on_message=on_message,
                  on_up=on_up, on_down=lambda m: None, on_fatal=lambda e: None, dead_after_s=5, send_timeout_s=5)
    hello = Message(type="hello", body={"member": victim.to_wire(), "model": "m", "started_ms": 0})
    liar = ScriptedConnection([hello], identity=PeerIdentity(node_id="c" * 32, public_key=b"\0" * 32))
    with caplog.at_level(logging.WARNING):
        await links.accept(liar)
    assert liar.closed and not ups and "proved node id " + "c" * 32 in caplog.text
    honest = ScriptedConnection([hello], identity=PeerIdentity(node_id="b" * 32, public_key=b"\0" * 32))
    await asyncio.wait_for(links.accept(honest), 5)  # hello accepted, then the fake link ends
    assert [u.member_id for u in ups] == ["b" * 32]


@pytest.mark.spec("S6")
def test_insecure_warns_and_an_insecure_transport_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh import registry
    from mesh.node.config import NodeConfig
    from mesh.node.node import Node

    with caplog.at_level(logging.WARNING):
        node = Node(NodeConfig(data_dir=tmp_path / "a", insecure=True, discovery=False))
    assert node.security is None and "PLAINTEXT and UNAUTHENTICATED" in caplog.text
    node._data_dir_lock.close()

    class Plain(TcpTransport):
        secure = False

    real_load = registry.load
    monkeypatch.setattr(registry, "load", lambda kind, name, **kw: Plain if name == "plain" else real_load(kind, name, **kw))
    with pytest.raises(ConfigError, match="does not authenticate"):
        Node(NodeConfig(data_dir=tmp_path / "b", transport="plain", discovery=False))


def test_sockets_here_are_loopback_only() -> None:
    assert socket.gethostbyname(HOST) == "127.0.0.1"


@pytest.mark.spec("S4")
def test_reject_log_is_rate_limited_per_host(caplog: pytest.LogCaptureFixture) -> None:
    from transports.base import RejectLog

    log = RejectLog(logging.getLogger("test.rejects"), window_s=60.0)
    with caplog.at_level(logging.WARNING):
        for i in range(50):
            log.rejected(f"10.0.0.1:{1000 + i}", "wrong key")
        log.rejected("10.0.0.2:5", "wrong key")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "10.0.0.1:1000" in lines[0] and "10.0.0.2:5" in lines[1]
    log._seen["10.0.0.1"] = (log._seen["10.0.0.1"][0] - 61.0, log._seen["10.0.0.1"][1])
    with caplog.at_level(logging.WARNING):
        log.rejected("10.0.0.1:2000", "wrong key")
    assert "49 more from 10.0.0.1" in caplog.records[-1].getMessage()


@pytest.mark.spec("S4")
async def test_unauthenticated_handshakes_in_flight_are_capped(tmp_path: Path) -> None:
    from transports import tcp

    cluster = os.urandom(32)
    listener, accepted = await _serve_tls(_security(cluster, tmp_path, "s"))
    async with listener:
        idle = [await asyncio.open_connection(HOST, listener.port) for _ in range(tcp.MAX_HANDSHAKES_PER_HOST)]
        for _ in range(100):  # the listener has taken them all into their handshakes
            if sum(listener._handshakes.values()) == tcp.MAX_HANDSHAKES_PER_HOST:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(HOST, listener.port)
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # dropped at once, not after 10 s
        writer.close()
        for _, w in idle:
            w.close()
        for _ in range(200):
            if not listener._handshakes:
                break
            await asyncio.sleep(0.01)
        good = await TcpTransport(security=_security(cluster, tmp_path, "c")).connect(HOST, listener.port, timeout_s=5)
        async with good:
            assert (await good.recv(timeout_s=5)).type == "hi"
