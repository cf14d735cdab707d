"""``python -m mesh bench-transport``: each transport on loopback beside a raw asyncio socket.

For every configuration (tcp, tbip and quic, each plaintext and with TLS 1.3) on 127.0.0.1:

1. small-message RTT: ``--round-trips`` ping-pongs of a message with a 64-byte body; p50
   and p99 in microseconds, and the ratio to a raw asyncio stream echoing 64 bytes;
2. large-message throughput: ``--large-count`` messages of ``--large-mib`` MiB (a u8 tensor)
   sent one way, timed until the receiver holds the last one; GB/s (10^9 bytes/s), and the
   ratio to a raw asyncio stream moving the same bytes.

The raw baselines run in the same process and the same run, before and after the
transports (the better of the two is used, so machine noise does not flatter us). The cost
of encryption is each transport's TLS figure over its plaintext one. A program, not a test:
prints the machine and appends JSON with ``--json``. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh.node.linkstats import percentile
from mesh.security import LinkSecurity
from mesh.tools.benchutil import append_jsonl, machine_profile
from mesh.wire import Message, WireTensor
from transports.base import Connection, Transport

HOST = "127.0.0.1"
SMALL_BODY = {"p": "x" * 64}


async def _raw_rtt(round_trips: int) -> list[float]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.readexactly(64):
                writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(echo, HOST, 0)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, server.sockets[0].getsockname()[1])
        import socket

        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(round_trips):
            start = time.perf_counter()
            writer.write(b"x" * 64)
            await writer.drain()
            await reader.readexactly(64)
            samples.append(time.perf_counter() - start)
        writer.close()
    return samples


async def _raw_throughput(size: int, count: int) -> float:
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        left = size * count
        while left > 0:
            data = await reader.read(1 << 20)
            if not data:
                break
            left -= len(data)
        done.set()
        writer.close()

    server = await asyncio.start_server(sink, HOST, 0, limit=1 << 20)
    payload = bytes(size)
    async with server:
        _, writer = await asyncio.open_connection(HOST, server.sockets[0].getsockname()[1])
        writer.transport.set_write_buffer_limits(high=4 << 20)
        view = memoryview(payload)
        start = time.perf_counter()
        for _ in range(count):  # 1 MiB writes: the fastest way asyncio 3.11 moves a large buffer
            for offset in range(0, size, 1 << 20):
                writer.write(view[offset:offset + (1 << 20)])
                await writer.drain()
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - start
        writer.close()
    return size * count / elapsed


async def _pair(transport: Transport) -> tuple[Any, Connection, Connection]:
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)

    listener = await transport.listen(HOST, 0, handler)
    client = await transport.connect(HOST, listener.port, timeout_s=10)
    server = await asyncio.wait_for(accepted.get(), 10)
    return listener, client, server


async def _transport_figures(transport: Transport, round_trips: int, size: int, count: int) -> dict[str, Any]:
    listener, client, server = await _pair(transport)
    try:
        async def echo() -> None:
            for _ in range(round_trips):
                await server.send(await server.recv(timeout_s=30), timeout_s=30)

        echo_task = asyncio.create_task(echo())
        samples = []
        small = Message(type="ping", body=SMALL_BODY)
        for _ in range(round_trips):
            start = time.perf_counter()
            await client.send(small, timeout_s=30)
            await client.recv(timeout_s=30)
            samples.append(time.perf_counter() - start)
        await echo_task

        big = Message(type="bulk", tensor=WireTensor(dtype="u8", shape=(size,), data=bytes(size)))

        async def receive_all(n: int) -> None:
            for _ in range(n):
                await server.recv(timeout_s=600)

        warm_up = asyncio.create_task(receive_all(2))  # first allocations and buffer growth, untimed
        for _ in range(2):
            await client.send(big, timeout_s=600, lane="bulk")
        await asyncio.wait_for(warm_up, 600)
        receiver = asyncio.create_task(receive_all(count))
        start = time.perf_counter()
        for _ in range(count):
            await client.send(big, timeout_s=600, lane="bulk")
        await asyncio.wait_for(receiver, 600)
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
        await server.close()
        await listener.close()
    return {"rtt_samples": samples, "throughput_bytes_per_s": size * count / elapsed}


def _configurations(workdir: Path) -> list[tuple[str, bool, Transport]]:
    from transports.quic import QuicTransport
    from transports.tbip import TbipTransport
    from transports.tcp import TcpTransport

    cluster = os.urandom(32)
    security = LinkSecurity(ed25519.Ed25519PrivateKey.generate(), cluster, workdir / "tls")
    return [("tcp", False, TcpTransport()), ("tcp", True, TcpTransport(security=security)),
            ("tbip", False, TbipTransport()), ("tbip", True, TbipTransport(security=security)),
            ("quic", False, QuicTransport()), ("quic", True, QuicTransport(security=security))]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    size, count, trips = args.large_mib << 20, args.large_count, args.round_trips
    raw_rtt = await _raw_rtt(trips)
    raw_tp = await _raw_throughput(size, count)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        for name, secure, transport in _configurations(Path(tmp)):
            quic = name == "quic"
            figures = await _transport_figures(transport, trips, size,
                                               max(1, count // 8) if quic else count)  # QUIC is slow in Python
            rows.append({"transport": name, "tls": secure, **figures})
    raw_rtt = min(raw_rtt, await _raw_rtt(trips), key=lambda s: percentile(s, 50))
    raw_tp = max(raw_tp, await _raw_throughput(size, count))
    raw_p50, raw_p99 = percentile(raw_rtt, 50), percentile(raw_rtt, 99)
    out = []
    for row in rows:
        p50, p99 = percentile(row["rtt_samples"], 50), percentile(row["rtt_samples"], 99)
        out.append({"transport": row["transport"], "tls": row["tls"], "rtt_p50_us": p50 * 1e6,
                    "rtt_p99_us": p99 * 1e6, "rtt_p50_vs_raw": p50 / raw_p50,
                    "throughput_gb_per_s": row["throughput_bytes_per_s"] / 1e9,
                    "throughput_vs_raw": row["throughput_bytes_per_s"] / raw_tp})
    for row in out:  # the cost of encryption: TLS over plaintext, same transport
        plain = next(r for r in out if r["transport"] == row["transport"] and not r["tls"])
        row["tls_rtt_cost"] = row["rtt_p50_us"] / plain["rtt_p50_us"]
        row["tls_throughput_cost"] = plain["throughput_gb_per_s"] / row["throughput_gb_per_s"]
    return {"raw": {"rtt_p50_us": raw_p50 * 1e6, "rtt_p99_us": raw_p99 * 1e6,
                    "throughput_gb_per_s": raw_tp / 1e9},
            "round_trips": trips, "large_message_bytes": size, "large_count": count, "results": out}


def run_transport_bench(args: argparse.Namespace) -> int:
    profile = machine_profile()
    print(f"machine: {profile['cpu']}, {profile['cores']} cores, {profile['memory_bytes'] / 2**30:.1f} GiB; "
          f"commit {profile['commit']}; {profile['date']}")
    results = asyncio.run(_run(args))
    raw = results["raw"]
    print(f"{args.round_trips} round trips of a 64-byte message; {args.large_count} one-way messages of "
          f"{args.large_mib} MiB (QUIC: {max(1, args.large_count // 8)}); all on 127.0.0.1")
    print(f"raw asyncio socket: RTT p50 {raw['rtt_p50_us']:.0f} us, p99 {raw['rtt_p99_us']:.0f} us; "
          f"{raw['throughput_gb_per_s']:.2f} GB/s with {args.large_mib} MiB messages")
    print(f"{'transport':<10}{'TLS':<5}{'RTT p50 us':>11}{'p99 us':>9}{'x raw':>7}{'GB/s':>8}{'x raw':>7}"
          f"{'TLS cost RTT':>14}{'TLS cost GB/s':>15}")
    for r in results["results"]:
        print(f"{r['transport']:<10}{'yes' if r['tls'] else 'no':<5}{r['rtt_p50_us']:>11.0f}{r['rtt_p99_us']:>9.0f}"
              f"{r['rtt_p50_vs_raw']:>7.2f}{r['throughput_gb_per_s']:>8.3f}{r['throughput_vs_raw']:>7.2f}"
              + (f"{r['tls_rtt_cost']:>14.2f}{r['tls_throughput_cost']:>15.2f}" if r["tls"] else ""))
    if args.json:
        append_jsonl(args.json, {"suite": "mesh-bench-transport", "schema": 2, "machine": profile, **results})
        print(f"appended to {args.json}")
    return 0
