"""Regression (review): every insecure QUIC listen/connect leaves a private key in /tmp.

``transports.quic._configuration(None, ...)`` (``--insecure``) builds a throwaway
``LinkSecurity`` with ``workdir=None``, which makes a ``tempfile.mkdtemp("mesh-tls-")``
directory holding ``node.key`` (a private key), ``node.crt`` and ``ca.crt`` -- and nothing ever
removes it. A node on ``--insecure --transport quic`` re-dialling peers leaves one directory per
attempt for its whole life (unbounded inode/disk growth in the temp dir). The test points
``tempfile`` at its own directory and counts what 1 listen + 5 connects leave behind.
Fix: build the ephemeral certificate in memory only (aioquic takes the objects, not files),
e.g. a LinkSecurity option that writes no files, or remove the directory after use.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from transports.quic import QuicTransport


@pytest.mark.spec("T14")
async def test_insecure_quic_leaves_no_key_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    transport = QuicTransport(security=None)

    async def handler(conn: object) -> None:
        return None

    listener = await transport.listen("127.0.0.1", 0, handler)
    try:
        for _ in range(5):
            conn = await transport.connect("127.0.0.1", listener.port, timeout_s=5)
            await conn.close()
    finally:
        await listener.close()
    await asyncio.sleep(0)
    left = sorted(p.name for p in tmp_path.glob("mesh-tls-*"))
    assert not left, f"{len(left)} directories with a private key left behind: {left[:3]}..."
