"""Fuzzing every decoder that reads bytes or values a peer chose: frames (headers, tensor
headers, CBOR envelopes) and the hello handshake. Malformed input raises our error, never
another exception, and the frame decoder never allocates more than its frame limit.
(Discovery announcements are fuzzed in tests/test_discovery.py.)"""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
import zlib
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import PROTOCOL_MAJOR, PROTOCOL_MINOR
from mesh.errors import FrameError, MeshError
from mesh.kernel.records import MemberInfo
from mesh.node.links import Links
from mesh.testing.scripted import ScriptedConnection
from mesh.wire import Message, WireTensor
from transports.framing import HEADER, MAGIC, WIRE_VERSION, FrameDecoder, FrameEncoder
from transports.tcp import TcpTransport

LIMIT = 64 * 1024  # a small frame limit, so "never more than the limit" is measurable
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.integers(0, 2**16), inner),
    max_leaves=20,
)


def _frame(envelope: bytes, *, flags: int = 0, code: int = 0, dims: tuple[int, ...] = (),
           data: bytes = b"", data_len: int | None = None) -> bytes:
    head = HEADER.pack(MAGIC, WIRE_VERSION, flags, code, len(dims), len(envelope),
                       len(data) if data_len is None else data_len)
    body = head + b"".join(struct.pack(">I", d) for d in dims) + envelope + data
    return body + struct.pack(">I", zlib.crc32(body))  # the CRC-32 trailer (spec T3, T15)


def _decode_all(data: bytes, chunk: int) -> list[Message]:
    decoder = FrameDecoder(max_frame_bytes=LIMIT)
    out: list[Message] = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i:i + chunk])
    return out


def _bounded(data: bytes, chunk: int) -> None:
    """Decode; only FrameError may escape; peak allocation stays under the frame limit."""
    tracemalloc.start()
    try:
        _decode_all(data, chunk)
    except FrameError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < LIMIT + len(data) + 64 * 1024, f"decoder allocated {peak} bytes"


@pytest.mark.spec("T4", "T5")
@FUZZ
@given(st.binary(max_size=4096), st.integers(1, 512))
def test_random_bytes(data: bytes, chunk: int) -> None:
    _bounded(data, chunk)


@pytest.mark.spec("T4", "T5")
@FUZZ
@given(st.binary(min_size=1, max_size=300), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                     min_size=1, max_size=6), st.integers(1, 64))
def test_mutated_valid_frames(body: bytes, flips: list[tuple[int, int]], chunk: int) -> None:
    tensor = WireTensor(dtype="u8", shape=(len(body),), data=body)
    stream = bytearray(FrameEncoder().encode(Message(type="x", body={"b": body[:10]}, tensor=tensor)))
    for pos, value in flips:
        stream[pos % len(stream)] = value
    _bounded(bytes(stream), chunk)
    _bounded(bytes(stream[: flips[0][0] % len(stream)]), chunk)  # truncated too


@pytest.mark.spec("T4", "T10")
@FUZZ
@given(cbor_values, st.integers(1, 64))
def test_arbitrary_cbor_envelopes(value: Any, chunk: int) -> None:
    envelopes = [value, {"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": "x", "b": value},
                 {"v": value, "t": value, "b": {"k": value}}]
    for envelope in envelopes:
        try:
            raw = cbor2.dumps(envelope)
        except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError):
            continue
        try:
            messages = _decode_all(_frame(raw), chunk)
        except FrameError:
            continue
        assert len(messages) == 1 and isinstance(messages[0].body, dict)


@pytest.mark.spec("T4", "T5")
@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.lists(st.integers(0, 2**32 - 1), max_size=10),
       st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_tensor_headers(flags: int, code: int, dims: list[int], data_len: int, data: bytes) -> None:
    envelope = cbor2.dumps({"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": "x", "b": {}})
    raw = _frame(envelope, flags=flags, code=code, dims=tuple(dims), data=data, data_len=data_len)
    _bounded(raw, 7)


@pytest.mark.spec("S5", "T4")
@FUZZ
@given(st.dictionaries(st.sampled_from(["member", "model", "started_ms", "x"]), cbor_values, max_size=4)
       | st.fixed_dictionaries({"member": st.dictionaries(
           st.sampled_from(["id", "address", "api", "backend", "memory_bytes", "incarnation", "alt"]),
           cbor_values, max_size=7), "model": st.just("m")}))
def test_hello_handshake_bodies(body: dict[str, Any]) -> None:
    """A peer's hello, whatever its body, is accepted or refused with our error."""
    me = MemberInfo(member_id="a" * 32, address="127.0.0.1:1", api_address="127.0.0.1:2", backend="torch",
                    memory_bytes=1, incarnation="i")

    async def ignore(*args: object) -> None:
        return None

    links = Links(TcpTransport(), me=lambda: me, model_id="m", started_ms=0, on_message=ignore, on_up=ignore,
                  on_down=lambda m: None, on_fatal=lambda e: None, dead_after_s=5, send_timeout_s=5)
    try:
        asyncio.run(links._handshake(ScriptedConnection([Message(type="hello", body=body)])))
    except MeshError:
        pass
