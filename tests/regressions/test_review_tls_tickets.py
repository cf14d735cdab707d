"""Regression (review): the TLS listener still issues TLS 1.3 session tickets (spec S3/S6).

``LinkSecurity.ssl_context(server_side=True)`` sets ``ssl.OP_NO_TICKET`` "so there is no
resumption", but in TLS 1.3 OpenSSL treats OP_NO_TICKET as "use *stateful* tickets": the
server still sends NewSessionTicket messages (``num_tickets`` stays 2) and caches the session
in the context. Resumption fails today only by accident, because a brand-new SSLContext is
built for every connection (which also costs ~0.6 ms of event-loop time per pre-auth TCP
connect: load_cert_chain + load_verify_locations). The moment the context is cached -- the
obvious fix for that cost -- clients could resume without presenting their certificate
again. The spec says links have "no session resumption". Fix: ``ctx.num_tickets = 0`` on
the server context (and keep OP_NO_TICKET), then build each context once per LinkSecurity.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh.security import LinkSecurity
from mesh.wire import Message
from transports.tcp import TcpTransport


def _tls_client(port: int, security: LinkSecurity) -> bool:
    ctx = security.ssl_context(server_side=False)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            tls.recv(64)  # reading lets the client take in any NewSessionTicket
            session = tls.session
            return session is not None and session.has_ticket


@pytest.mark.spec("S3", "S6")
async def test_the_listener_issues_no_session_tickets(tmp_path: Path) -> None:
    cluster = os.urandom(32)
    server = LinkSecurity(ed25519.Ed25519PrivateKey.generate(), cluster, tmp_path / "s")
    client = LinkSecurity(ed25519.Ed25519PrivateKey.generate(), cluster, tmp_path / "c")

    async def handler(conn: object) -> None:
        await conn.send(Message(type="hi"), timeout_s=5)  # type: ignore[attr-defined]

    listener = await TcpTransport(security=server).listen("127.0.0.1", 0, handler)
    async with listener:
        got_ticket = await asyncio.to_thread(_tls_client, listener.port, client)
    assert not got_ticket, "the server sent a TLS 1.3 session ticket (resumption is enabled)"
