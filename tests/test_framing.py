"""Tests of the sans-IO frame codec (transports/framing.py) against specs/transport.md."""

from __future__ import annotations

import itertools
import math
import random
import struct
import zlib
from collections.abc import Iterable
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import PROTOCOL_MAJOR, PROTOCOL_MINOR
from mesh.errors import FrameError
from mesh.wire import DTYPES, Message, WireTensor
from transports.framing import (
    BIG_TENSOR_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    HEADER_BYTES,
    MIN_FRAME_BYTES,
    TRAILER_BYTES,
    WIRE_VERSION,
    FrameDecoder,
    FrameEncoder,
    check_cbor_safe,
)

SETTINGS = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- strategies -------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
           | st.binary(max_size=20) | st.floats(allow_nan=False))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)
bodies = st.dictionaries(st.text(max_size=10), values, max_size=5)


@st.composite
def tensors(draw: st.DrawFn) -> WireTensor:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=4)))
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    return WireTensor(dtype=dtype, shape=shape,
                      data=draw(st.binary(min_size=nbytes, max_size=nbytes)))


messages = st.builds(
    lambda t, b, x: Message(type=t, body=b, tensor=x),
    st.text(min_size=1, max_size=20), bodies, st.none() | tensors(),
)


def decode_all(data: bytes, **kwargs: Any) -> list[Message]:
    decoder = FrameDecoder(**kwargs)
    out = decoder.feed(data)
    decoder.end_of_stream()
    return out


def frame(*, magic: bytes = b"MS", version: int = WIRE_VERSION, flags: int = 0, code: int = 0,
          ndim: int | None = None, env_len: int | None = None, data_len: int | None = None,
          dims: tuple[int, ...] = (), envelope: Any = None, raw_envelope: bytes | None = None,
          data: bytes = b"", crc: int | None = None, trailer: bool = True) -> bytes:
    """Build a frame by hand, every header field overridable (spec T3 layout); its CRC-32
    trailer is the right one unless ``crc`` says otherwise, and absent without ``trailer``."""
    if raw_envelope is None:
        if envelope is None:
            envelope = {"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": "ping", "b": {}}
        raw_envelope = cbor2.dumps(envelope)
    ndim = len(dims) if ndim is None else ndim
    env_len = len(raw_envelope) if env_len is None else env_len
    data_len = len(data) if data_len is None else data_len
    head = HEADER.pack(magic, version, flags, code, ndim, env_len, data_len)
    body = head + b"".join(struct.pack(">I", d) for d in dims) + raw_envelope + data
    if not trailer:
        return body
    return body + struct.pack(">I", zlib.crc32(body) if crc is None else crc)


def feed_in_chunks(stream: bytes, cuts: Iterable[int]) -> tuple[list[Message], FrameError | None]:
    """Feed ``stream`` split at ``cuts`` (offsets, any order), then end the stream: the
    messages returned, and the ``FrameError`` raised by a feed or ``end_of_stream`` (or None)."""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    decoder = FrameDecoder()
    out: list[Message] = []
    try:
        for start, end in itertools.pairwise(bounds):
            out += decoder.feed(stream[start:end])
        decoder.end_of_stream()
    except FrameError as exc:
        return out, exc
    return out, None


# -- T1 / T2: round trips and splitting -------------------------------------------------


@pytest.mark.spec("T1")
@SETTINGS
@given(messages)
def test_any_message_round_trips(msg: Message) -> None:
    assert decode_all(FrameEncoder().encode(msg)) == [msg]


@pytest.mark.spec("T2")
@SETTINGS
@given(st.lists(messages, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_stream_split_anywhere_decodes_the_same(msgs: list[Message], rnd: random.Random) -> None:
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode(m) for m in msgs)
    cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, 6)))
    decoder = FrameDecoder()
    out: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
    decoder.end_of_stream()
    assert out == msgs


@pytest.mark.spec("T2")
def test_byte_by_byte_feeding() -> None:
    msgs = [Message(type="a", body={"x": [1, 2.5, None, b"\x00"]}),
            Message(type="t", body={}, tensor=WireTensor(dtype="f32", shape=(2, 3),
                                                        data=bytes(range(24))))]
    stream = b"".join(FrameEncoder().encode(m) for m in msgs)
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == msgs
    assert decoder.buffered_bytes == 0


@pytest.mark.spec("T2")
def test_many_frames_in_one_feed() -> None:
    msgs = [Message(type=f"m{i}", body={"i": i}) for i in range(1000)]
    assert decode_all(b"".join(FrameEncoder().encode(m) for m in msgs)) == msgs


@pytest.mark.spec("T2")
def test_partial_frame_at_end_of_stream_is_reported() -> None:
    data = FrameEncoder().encode(Message(type="x"))
    decoder = FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    with pytest.raises(FrameError, match="stream ended inside a frame"):
        decoder.end_of_stream()


@pytest.mark.spec("T3")
def test_encode_parts_does_not_copy_the_tensor() -> None:
    """With a tensor: header and envelope, the tensor's own bytes, the CRC trailer, the CRC
    computed over the parts; without: one buffer."""
    data = bytes(4096)
    msg = Message(type="t", tensor=WireTensor(dtype="u8", shape=(4096,), data=data))
    parts = FrameEncoder().encode_parts(msg)
    assert len(parts) == 3 and parts[1] is data
    assert parts[2] == zlib.crc32(parts[0] + data).to_bytes(4, "big")
    assert b"".join(parts) == FrameEncoder().encode(msg)
    assert len(FrameEncoder().encode_parts(Message(type="c", body={"k": 1}))) == 1


# -- T3: the layout ---------------------------------------------------------------------


@pytest.mark.spec("T3")
def test_wire_layout_is_exact() -> None:
    tensor = WireTensor(dtype="bf16", shape=(2, 1), data=b"\x01\x02\x03\x04")
    encoded = FrameEncoder().encode(Message(type="fwd", body={"k": 1}, tensor=tensor))
    envelope = cbor2.dumps({"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": "fwd", "b": {"k": 1}})
    expected = (b"MS" + bytes([2, 1, 3, 2]) + len(envelope).to_bytes(4, "big")
                + (4).to_bytes(8, "big") + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
                + envelope + b"\x01\x02\x03\x04")
    assert encoded == expected + zlib.crc32(expected).to_bytes(4, "big")
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the standard CRC-32 (ISO-HDLC) check value
    assert {name: code for name, (code, _) in DTYPES.items()} == {
        "f32": 1, "f16": 2, "bf16": 3, "i64": 4, "i32": 5, "u8": 6}


@pytest.mark.spec("T3", "T1")
def test_scalar_tensor_and_hand_built_frame_decode() -> None:
    data = struct.pack("<f", 1.5)
    out = decode_all(frame(flags=1, code=1, dims=(), data=data))
    assert out[0].tensor == WireTensor(dtype="f32", shape=(), data=data)


# -- T4: malformed frames ---------------------------------------------------------------

MALFORMED = {
    "bad magic": (frame(magic=b"XX"), "bad magic"),
    "bad magic first byte": (b"Q", "bad magic"),
    "unknown version": (frame(version=3), "unknown wire version 3; this node speaks 2"),
    "wire version 1": (frame(version=1, trailer=False),
                       "wire version 1 not supported; this node speaks 2"),
    "checksum mismatch": (frame(crc=0xDEADBEEF), "frame checksum mismatch: .* 0xdeadbeef"),
    "checksum mismatch with tensor": (
        frame(flags=1, code=1, dims=(2,), data=b"12345678", crc=0), "frame checksum mismatch"),
    "unknown flags": (frame(flags=0x82), "unknown frame flags"),
    "unknown dtype code": (frame(flags=1, code=99, dims=(1,), data=b"x"), "unknown dtype code 99"),
    "dtype code 0 with tensor": (frame(flags=1, code=0, dims=(1,), data=b"x"), "unknown dtype"),
    "ndim too big": (frame(flags=1, code=6, dims=(1,) * 9, data=b"x"), "9 dims"),
    "ndim 255": (frame(flags=1, code=6, ndim=255, data=b"x"), "255 dims"),
    "zero dim": (frame(flags=1, code=6, dims=(3, 0), data=b""), "zero dim"),
    "huge dim": (frame(flags=1, code=1, dims=(2**32 - 1, 2**32 - 1), data=b"1234"),
                 "needs .* bytes but the header says 4"),
    "negative-like dim": (frame(flags=1, code=6, dims=(0xFFFFFFFF,), data=b"1"), "needs"),
    "tensor length mismatch": (frame(flags=1, code=1, dims=(2,), data=b"123"),
                               "needs 8 bytes but the header says 3"),
    "tensor fields without flag": (frame(flags=0, code=1, dims=(1,), data=b"1234"), "must be 0"),
    "zero envelope length": (frame(env_len=0, raw_envelope=b""), "envelope length is 0"),
    "length past max": (frame(flags=1, code=6, dims=(1,), data_len=2**64 - 1),
                        "exceeds the maximum"),
    "envelope length past max": (frame(env_len=2**32 - 1), "exceeds the maximum"),
    "not CBOR": (frame(raw_envelope=b"\xff\xff"), "not valid CBOR"),
    "truncated CBOR": (frame(raw_envelope=b"\xa3\x61"), "not valid CBOR"),
    "non-map CBOR": (frame(envelope=[1, 2, 3]), "must be a CBOR map"),
    "missing key": (frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": "x"}), "lacks key 'b'"),
    "bad version field": (frame(envelope={"v": "1.0", "t": "x", "b": {}}), "major, minor"),
    "empty type": (frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": "", "b": {}}), "non-empty"),
    "int type": (frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": 5, "b": {}}), "non-empty"),
    "list body": (frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": "x", "b": []}), "must be a map"),
    "int map key": (frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": "x", "b": {1: 2}}),
                    "key|CBOR"),
    "trailing garbage in envelope": (
        frame(raw_envelope=cbor2.dumps({"v": [PROTOCOL_MAJOR, 0], "t": "x", "b": {}}) + b"zz"),
        "2 bytes of trailing garbage"),
}


@pytest.mark.spec("T4", "T5")
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_raises_and_decoder_stays_failed(case: str) -> None:
    data, pattern = MALFORMED[case]
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match=pattern):
        decoder.feed(data)
    assert decoder.error is not None
    with pytest.raises(FrameError, match="failed earlier"):
        decoder.feed(FrameEncoder().encode(Message(type="ok")))


@pytest.mark.spec("T4")
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_fed_byte_by_byte_also_raises(case: str) -> None:
    data, pattern = MALFORMED[case]
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match=pattern):
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])


@pytest.mark.spec("T4")
def test_trailing_garbage_after_good_frames() -> None:
    good = [Message(type="a"), Message(type="b", body={"z": 1})]
    stream = b"".join(FrameEncoder().encode(m) for m in good) + b"garbage!"
    decoder = FrameDecoder()
    assert decoder.feed(stream) == good  # good messages first ...
    assert decoder.error is not None
    with pytest.raises(FrameError, match="bad magic"):  # ... then the error, for good
        decoder.feed(b"")
    with pytest.raises(FrameError):
        decoder.end_of_stream()


@pytest.mark.spec("T4")
@pytest.mark.parametrize("value", [
    cbor2.CBORTag(1, 0),  # datetime
    cbor2.CBORTag(4, [1, 2]),  # decimal
    cbor2.CBORTag(35, "a+"),  # regex
    cbor2.CBORTag(36, "Subject: x\n\nhi"),  # MIME
    cbor2.CBORTag(37, b"\x00" * 16),  # UUID
    cbor2.CBORTag(258, [1, 2]),  # set
    cbor2.CBORTag(28, 1),  # shared reference
    cbor2.CBORTag(55799, 1),  # self-describe
    cbor2.CBORTag(27, ["os.system", "true"]),  # "generic object": class named by data
    cbor2.CBORTag(40000, 1),
    cbor2.undefined,
    cbor2.CBORSimpleValue(7),
])
def test_tags_and_special_values_are_rejected(value: Any) -> None:
    data = frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": "x", "b": {"evil": value}})
    with pytest.raises(FrameError):
        FrameDecoder().feed(data)


@pytest.mark.spec("T1")
def test_bignums_are_plain_ints() -> None:
    msg = Message(type="big", body={"n": 2**100, "m": -(2**90)})
    assert decode_all(FrameEncoder().encode(msg)) == [msg]


# -- T5: maximum frame size -------------------------------------------------------------


@pytest.mark.spec("T5")
def test_oversize_frame_rejected_from_header_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=1000)
    header_only = frame(data_len=5000, flags=1, code=6, dims=(5000,))[:22]
    with pytest.raises(FrameError, match=r"frame of \d+ bytes exceeds the maximum 1000"):
        decoder.feed(header_only)
    assert DEFAULT_MAX_FRAME_BYTES == 256 * 1024 * 1024


@pytest.mark.spec("T5")
def test_oversize_envelope_rejected_from_header_alone() -> None:
    """Regression: a 20 MB envelope of small ints blocked a node's event loop for seconds
    while it was decoded and checked; envelopes are capped at 1 MiB (tensors travel outside)."""
    from transports.framing import MAX_ENVELOPE_BYTES

    with pytest.raises(FrameError, match="envelope of .* exceeds the maximum"):
        FrameDecoder().feed(frame(env_len=MAX_ENVELOPE_BYTES + 1)[:18])
    with pytest.raises(FrameError, match="exceeds"):
        FrameEncoder().encode(Message(type="t", body={"x": b"\0" * (MAX_ENVELOPE_BYTES + 1)}))
    big = Message(type="t", tensor=WireTensor(dtype="u8", shape=(4 << 20,), data=bytes(4 << 20)))
    assert decode_all(FrameEncoder().encode(big)) == [big]  # large tensors are still fine


@pytest.mark.spec("T5")
def test_encoder_refuses_oversize_frame() -> None:
    msg = Message(type="t", tensor=WireTensor(dtype="u8", shape=(2000,), data=bytes(2000)))
    with pytest.raises(FrameError, match="exceeds the maximum 1000"):
        FrameEncoder(max_frame_bytes=1000).encode(msg)
    size = len(FrameEncoder().encode(msg))
    assert decode_all(FrameEncoder(max_frame_bytes=size).encode(msg),
                      max_frame_bytes=size) == [msg]


# -- T10: protocol versions -------------------------------------------------------------


@pytest.mark.spec("T10")
def test_other_protocol_major_rejected() -> None:
    data = frame(envelope={"v": [PROTOCOL_MAJOR + 1, 0], "t": "hello", "b": {}})
    with pytest.raises(FrameError, match=f"protocol {PROTOCOL_MAJOR + 1}.0"):
        FrameDecoder().feed(data)
    # a hello of another major names both package versions
    from mesh import __version__

    data = frame(envelope={"v": [PROTOCOL_MAJOR + 1, 0], "t": "hello", "b": {"version": "9.0.0"}})
    with pytest.raises(FrameError, match=rf"peer \(mesh 9\.0\.0\) speaks protocol {PROTOCOL_MAJOR + 1}\.0; "
                                         rf"this node \(mesh {__version__}\)"):
        FrameDecoder().feed(data)


@pytest.mark.spec("T10")
def test_newer_minor_and_unknown_keys_accepted() -> None:
    envelope = {"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR + 3], "t": "hello", "b": {"a": 1},
                "future": [1, 2]}
    decoder = FrameDecoder()
    assert decoder.feed(frame(envelope=envelope)) == [Message(type="hello", body={"a": 1})]
    assert decoder.peer_protocol == (PROTOCOL_MAJOR, PROTOCOL_MINOR + 3)


# -- encoder-side validation ------------------------------------------------------------


@pytest.mark.spec("T1")
@pytest.mark.parametrize("body", [{"x": {1, 2}}, {"x": {1: 2}}, {"x": object()},
                                  {"x": cbor2.CBORTag(1, 0)}])
def test_encoder_rejects_unsafe_bodies(body: dict[str, Any]) -> None:
    with pytest.raises(FrameError):
        FrameEncoder().encode(Message(type="x", body=body))


def test_tuples_are_sent_as_lists_and_depth_is_bounded() -> None:
    out = decode_all(FrameEncoder().encode(Message(type="x", body={"s": (1, (2, 3))})))
    assert out[0].body == {"s": [1, [2, 3]]}
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(FrameError, match="deeper"):
        check_cbor_safe({"d": deep})


@pytest.mark.spec("T4")
def test_every_cbor_tag_but_bignums_is_rejected() -> None:
    # cbor2 decodes some tags itself (datetime, regex, MIME, sets...); none may get through.
    accepted = []
    for tag in range(0, 65536):
        data = frame(envelope={"v": [PROTOCOL_MAJOR, 0], "t": "x",
                               "b": {"v": cbor2.CBORTag(tag, b"\x01")}})
        try:
            FrameDecoder().feed(data)
        except FrameError:
            continue
        accepted.append(tag)
    assert accepted == [2, 3]


@pytest.mark.spec("T5", "T3")
def test_the_crc_trailer_counts_toward_the_maximum() -> None:
    msg = Message(type="t", tensor=WireTensor(dtype="u8", shape=(100,), data=bytes(100)))
    encoded = FrameEncoder().encode(msg)
    envelope = cbor2.dumps({"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": "t", "b": {}})
    size = HEADER_BYTES + 4 + len(envelope) + 100 + TRAILER_BYTES
    assert len(encoded) == size
    assert decode_all(FrameEncoder(max_frame_bytes=size).encode(msg), max_frame_bytes=size) == [msg]
    with pytest.raises(FrameError, match=f"frame of {size} bytes exceeds the maximum {size - 1}"):
        FrameEncoder(max_frame_bytes=size - 1).encode(msg)
    with pytest.raises(FrameError, match=f"frame of {size} bytes exceeds the maximum {size - 1}"):
        FrameDecoder(max_frame_bytes=size - 1).feed(encoded[:HEADER_BYTES])
    for cls in (FrameEncoder, FrameDecoder):
        cls(max_frame_bytes=MIN_FRAME_BYTES)
        with pytest.raises(ValueError, match=f">= {MIN_FRAME_BYTES}"):
            cls(max_frame_bytes=MIN_FRAME_BYTES - 1)


# -- T15: the CRC-32 trailer ------------------------------------------------------------


@pytest.mark.spec("T15", "T4")
def test_wire_version_1_frames_are_rejected() -> None:
    """A frame as a node from before the CRC trailer sends it: refused, naming both versions."""
    v1 = frame(version=1, trailer=False)
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match=r"^wire version 1 not supported; this node speaks 2 "):
        decoder.feed(v1)
    with pytest.raises(FrameError, match="failed earlier"):
        decoder.end_of_stream()
    assert WIRE_VERSION == 2


@pytest.mark.spec("T15", "T2")
@SETTINGS
@given(messages, st.data())
def test_a_single_bit_flip_anywhere_is_a_frame_error(msg: Message, data: st.DataObject) -> None:
    """One bit flipped anywhere in a frame, fed in any chunking after a good frame: the good
    message comes out, then FrameError (from a feed, or from end_of_stream when a flipped
    length leaves the decoder waiting for more); nothing the flipped frame decodes to ever
    comes out. A flip past the header and dims (envelope, tensor, trailer) is a checksum
    mismatch."""
    before = Message(type="before", body={"i": 1})
    flipped = bytearray(FrameEncoder().encode(msg))
    bit = data.draw(st.integers(0, len(flipped) * 8 - 1), label="bit")
    flipped[bit // 8] ^= 1 << (bit % 8)
    stream = FrameEncoder().encode(before) + bytes(flipped)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    out, error = feed_in_chunks(stream, cuts)
    assert out == [before]
    assert error is not None
    prefix = HEADER_BYTES + 4 * (len(msg.tensor.shape) if msg.tensor is not None else 0)
    if bit // 8 >= prefix:
        assert "frame checksum mismatch" in str(error)


@pytest.mark.spec("T15", "T4")
@pytest.mark.parametrize("msg", [
    Message(type="heartbeat", body={"member": "a" * 32, "incarnation": 5, "t": 1.5}),
    Message(type="forward", body={"seq": 3, "pos": [0, 7]},
            tensor=WireTensor(dtype="f32", shape=(2, 3), data=bytes(range(24)))),
], ids=["control", "tensor"])
def test_every_single_bit_flip_of_a_frame_is_detected(msg: Message) -> None:
    """Exhaustively: each of the frame's bits flipped in turn never decodes to a message."""
    encoded = FrameEncoder().encode(msg)
    for bit in range(len(encoded) * 8):
        flipped = bytearray(encoded)
        flipped[bit // 8] ^= 1 << (bit % 8)
        out, error = feed_in_chunks(bytes(flipped), [])
        assert out == [] and error is not None, f"bit {bit} flipped decoded to {out}"


_BIG = Message(type="forward", body={"seq": 9}, tensor=WireTensor(
    dtype="u8", shape=(BIG_TENSOR_BYTES + 1001,), data=random.Random(7).randbytes(BIG_TENSOR_BYTES + 1001)))


@pytest.mark.spec("T15", "T2")
@settings(max_examples=40, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["header", "envelope", "tensor", "trailer"]), st.data())
def test_a_bit_flip_in_a_large_tensor_frame_is_a_frame_error(region: str, data: st.DataObject) -> None:
    """The same through the large-tensor path (``FrameDecoder._fill_big``, CRC computed as the
    chunks arrive): between two good frames, a flipped bit anywhere makes a FrameError (past
    the header, a checksum mismatch); the message after it is not delivered either (the
    decoder stays failed)."""
    encoded = bytearray(FrameEncoder().encode(_BIG))
    prefix = HEADER_BYTES + 4
    envelope_end = len(encoded) - TRAILER_BYTES - len(_BIG.tensor.data)  # type: ignore[union-attr]
    lo, hi = {"header": (0, prefix), "envelope": (prefix, envelope_end),
              "tensor": (envelope_end, len(encoded) - TRAILER_BYTES),
              "trailer": (len(encoded) - TRAILER_BYTES, len(encoded))}[region]
    bit = data.draw(st.integers(lo * 8, hi * 8 - 1), label="bit")
    encoded[bit // 8] ^= 1 << (bit % 8)
    before, after = Message(type="before"), Message(type="after")
    stream = FrameEncoder().encode(before) + bytes(encoded) + FrameEncoder().encode(after)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    out, error = feed_in_chunks(stream, cuts)
    assert out == [before]
    assert error is not None
    if region != "header":  # the envelope too: it is parsed only once the CRC matched
        assert "frame checksum mismatch" in str(error)


@pytest.mark.spec("T15", "T2")
def test_large_frame_split_inside_its_trailer_decodes() -> None:
    """A large tensor frame cut at every offset around its tensor's end and inside its CRC
    trailer decodes the same; with the trailer's last bit flipped it never does."""
    after = FrameEncoder().encode(Message(type="after"))
    encoded = FrameEncoder().encode(_BIG)
    stream = encoded + after
    end = len(encoded)
    for cut in range(end - TRAILER_BYTES - 2, end + 2):
        assert feed_in_chunks(stream, [200, cut]) == ([_BIG, Message(type="after")], None), cut
        bad = bytearray(stream)
        bad[end - 1] ^= 0x80
        out, error = feed_in_chunks(bytes(bad), [200, cut])
        assert out == [] and error is not None and "frame checksum mismatch" in str(error), cut


@pytest.mark.spec("T2", "T5")
def test_large_frame_fed_in_chunks() -> None:
    data = random.Random(5).randbytes(32 * 2**20)
    msg = Message(type="big", tensor=WireTensor(dtype="f32", shape=(8 * 2**20,), data=data))
    stream = FrameEncoder().encode(msg) + FrameEncoder().encode(Message(type="after"))
    decoder = FrameDecoder()
    out: list[Message] = []
    view = memoryview(stream)
    for start in range(0, len(stream), 65536):
        out += decoder.feed(view[start : start + 65536])
    assert out == [msg, Message(type="after")]


@pytest.mark.spec("T2")
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=700_000), min_size=1, max_size=12), st.integers(0, 3))
def test_large_tensors_decode_however_split(cuts: list[int], extra: int) -> None:
    """Tensors of >= 1 MiB are gathered in their own buffer; any split gives the same messages."""
    import os as _os

    from mesh.wire import WireTensor as _WT
    from transports.framing import BIG_TENSOR_BYTES

    big = Message(type="big", body={"i": 1}, tensor=_WT(dtype="u8", shape=(BIG_TENSOR_BYTES + 12345,),
                                                        data=_os.urandom(BIG_TENSOR_BYTES + 12345)))
    small = Message(type="small", body={"k": "v"})
    msgs = [small, big, small, big][: 2 + extra] + [small]
    stream = b"".join(FrameEncoder().encode(m) for m in msgs)
    decoder = FrameDecoder()
    out: list[Message] = []
    pos = 0
    for cut in cuts:
        out += decoder.feed(stream[pos:pos + cut])
        pos += cut
    out += decoder.feed(stream[pos:])
    assert out == msgs and decoder.buffered_bytes == 0
