"""Regression: two tasks close one TCP connection while a large send is stuck (the peer does
not read). Both waited on the stream's single close-waiter future; the first closer's timeout
cancelled that shared future, so the second closer (a node's heartbeat task) got a
CancelledError nobody sent, and the node stopped silently."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mesh.wire import Message, WireTensor
from transports.tcp import TcpTransport


@pytest.mark.spec("T7")
async def test_second_closer_is_not_cancelled_by_the_first_closers_timeout() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    conn = await TcpTransport(close_timeout_s=0.5).connect("127.0.0.1", server.getsockname()[1], timeout_s=5)
    peer, _ = server.accept()  # accepted, never read
    big = Message(type="forward", tensor=WireTensor(dtype="u8", shape=(32 << 20,), data=bytes(32 << 20)))
    sender = asyncio.create_task(conn.send(big, timeout_s=60))  # stuck in drain
    await asyncio.sleep(0.3)

    async def closer(delay: float) -> str:
        await asyncio.sleep(delay)
        await conn.close()
        return "closed"

    results = await asyncio.wait_for(asyncio.gather(closer(0), closer(0.2), return_exceptions=True), 10)
    assert results == ["closed", "closed"]
    await asyncio.gather(sender, return_exceptions=True)
    peer.close()
    server.close()
