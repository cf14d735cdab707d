"""Regression (review): one ``reject`` frame from any linked member stops the receiving node.

``Links.serve`` treats a ``reject`` on an *established* link exactly like the K9 answer a
newcomer gets during its hello: it calls ``on_fatal`` (the node stops with IdentityCollision),
without checking that the reject names this node's id or even names an id at all. K9 says
only the *newcomer* of two processes sharing an id refuses to start, and N10 says a malformed
message closes that link only. Here a node that has long been a member gets ``{"t": "reject",
"b": {}}`` (no id, no address) from a peer whose hello was accepted, and shuts itself down.
Any authenticated member (or a buggy one) can stop every other node with one frame.
Fault: mesh/node/links.py ``serve`` (``if msg.type == "reject": self._rejected(...)``) and
``_rejected`` (no check that ``msg.body["id"] == self.me().member_id``).
"""

from __future__ import annotations

import asyncio

import pytest

from mesh.errors import MeshError
from mesh.kernel.records import MemberInfo
from mesh.node.links import Links
from mesh.security import PeerIdentity
from mesh.testing.scripted import ScriptedConnection
from mesh.wire import Message
from transports.tcp import TcpTransport


@pytest.mark.spec("N10", "K9")
async def test_a_malformed_reject_on_an_established_link_does_not_stop_the_node() -> None:
    me = MemberInfo(member_id="a" * 32, address="127.0.0.1:1", api_address="127.0.0.1:2", backend="torch",
                    memory_bytes=1, incarnation="i")
    peer = MemberInfo(member_id="b" * 32, address="127.0.0.1:3", api_address="127.0.0.1:4", backend="torch",
                      memory_bytes=1, incarnation="j")
    fatal: list[MeshError] = []

    async def on_up(info: MemberInfo) -> None:
        return None

    async def on_message(sender: str, msg: Message) -> None:
        return None

    links = Links(TcpTransport(), me=lambda: me, model_id="m", started_ms=0, on_message=on_message,
                  on_up=on_up, on_down=lambda m: None, on_fatal=fatal.append, dead_after_s=5, send_timeout_s=5)
    hello = Message(type="hello", body={"member": peer.to_wire(), "model": "m", "started_ms": 0})
    # the link is up (hello accepted), then the peer sends a reject that names no id at all
    conn = ScriptedConnection([hello, Message(type="ping", body={"t": 1}), Message(type="reject", body={})],
                              identity=PeerIdentity(node_id="b" * 32, public_key=b"\0" * 32))
    await asyncio.wait_for(links.accept(conn), 5)
    assert not fatal, f"one reject frame from a linked member stopped this node: {fatal[0]}"
