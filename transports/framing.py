"""Sans-IO frame codec: ``Message`` <-> bytes on a stream.

No asyncio, sockets, threads or time here: the encoder turns a message into buffers, the
decoder turns fed bytes into messages. Transports (``transports/tcp.py``) own the I/O.
Spec: specs/transport.md T1-T5, T10, T15.

Wire layout of one frame (all integers big-endian; spec T3)::

    offset  size      field
    0       2         magic b"MS"
    2       1         wire version, u8 (2)
    3       1         flags, u8: bit0 = has tensor; bits 1-7 must be 0
    4       1         tensor dtype code, u8 (``mesh.wire.DTYPES``; 0 when no tensor)
    5       1         tensor ndim, u8, 0..8 (0 when no tensor; 0 with a tensor = scalar)
    6       4         envelope length E, u32, >= 1
    10      8         tensor data length D, u64 (0 when no tensor)
    18      4*ndim    tensor dims, u32 each, >= 1
    ..      E         CBOR envelope {"v": [major, minor], "t": type, "b": body}
    ..      D         raw tensor bytes, elements little-endian, C order
    ..      4         CRC-32 of every byte of the frame before it, u32

The tensor's dtype and shape sit in the fixed header, ahead of the envelope, so the whole
frame length (18 + 4*ndim + E + D + 4) and the tensor's consistency (D == prod(dims) *
itemsize) are checked from the first few dozen bytes, before anything large is buffered
(spec T5). ``max_frame_bytes`` bounds that whole length, the 4-byte trailer included.

The trailer is ``zlib.crc32`` (CRC-32/ISO-HDLC, the polynomial of zlib, gzip and Ethernet)
over header, dims, envelope and tensor bytes. It catches every single-bit flip and every
burst of up to 32 bits, which TLS would catch too but a plaintext (``--insecure``) link or the
fault injector (``transports/faults.py``, spec F7) would otherwise deliver as a different
valid message. A mismatch is a ``FrameError`` like any malformed frame (spec T15). The
encoder computes it over its parts without joining them; the decoder computes it as bytes
arrive (a large tensor chunk by chunk in ``FrameDecoder._fill_big``) and checks it before it
parses the envelope: nothing past the fixed header and dims is interpreted before the CRC
matched. Wire version 1 (no trailer) is rejected.

CBOR is RFC 8949, via ``cbor2``. The envelope is decoded with every CBOR tag rejected
except bignums (tags 2 and 3, which decode to ``int``), and every value is checked to be
str, int, float, bool, None, bytes, a list or a str-keyed map: nothing a peer sends can
make us build another kind of object.
Unknown envelope keys are ignored, so a later minor protocol version may add some.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from typing import Any

import cbor2

from mesh import PROTOCOL_MAJOR, PROTOCOL_MINOR, __version__, wire
from mesh.errors import FrameError
from mesh.wire import DTYPE_BY_CODE, DTYPES, MAX_TENSOR_DIMS, Message, WireTensor

MAGIC = b"MS"
WIRE_VERSION = 2  # 2: adds the CRC-32 trailer; 1 (no trailer) is rejected
FLAG_TENSOR = 0x01
HEADER = struct.Struct(">2sBBBBIQ")
HEADER_BYTES = HEADER.size  # 18
DIM = struct.Struct(">I")
TRAILER = struct.Struct(">I")  # CRC-32 of everything before it
TRAILER_BYTES = TRAILER.size  # 4
MIN_FRAME_BYTES = HEADER_BYTES + 1 + TRAILER_BYTES  # a 1-byte envelope, no tensor
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
# Control envelopes are small (the largest are 256 KiB kernel sync pages); tensors travel as
# raw bytes outside the envelope. A cap of 1 MiB bounds the CBOR a peer can make us decode
# and check on the event loop before anything else about it is known.
MAX_ENVELOPE_BYTES = 1 << 20
MAX_BODY_DEPTH = 64
BIG_TENSOR_BYTES = 1 << 20  # tensors this large bypass the stream buffer (FrameDecoder._fill_big)

# Tags cbor2 decodes by itself (datetime, decimal, regex, MIME, UUID, sets, shared refs...):
# each is overridden to fail, except the bignums 2 and 3. Any other tag reaches _reject_tag.
_BUILTIN_TAGS = (0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261,
                 1004, 43000, 55799)


def _reject_tag(tag: Any, immutable: bool) -> Any:
    raise FrameError(f"CBOR tag {getattr(tag, 'tag', tag)} is not allowed in an envelope")


def _rejecter(tag: int) -> Any:
    def reject(value: Any, immutable: bool) -> Any:
        raise FrameError(f"CBOR tag {tag} is not allowed in an envelope")

    return reject


_REJECT_SEMANTIC = {tag: _rejecter(tag) for tag in _BUILTIN_TAGS}


def check_cbor_safe(value: Any, *, where: str = "body", allow_tuples: bool = False,
                    depth: int = 0) -> None:
    """Check ``value`` is CBOR-safe by ``mesh.wire.check_cbor_safe``'s rules as a link carries
    them: bignums, NaN and infinities pass (a message may hold any int or float), nested at
    most ``MAX_BODY_DEPTH`` deep; tuples pass when ``allow_tuples`` (an encoder's input: they
    decode as lists).

    Raises:
        FrameError: naming the path (``where``) of the first unsafe value.
    """
    try:
        wire.check_cbor_safe(value, max_depth=MAX_BODY_DEPTH, where=where, allow_tuples=allow_tuples,
                             allow_bignums=True, allow_non_finite=True, depth=depth)
    except wire.UnsafeValueError as exc:
        raise FrameError(str(exc)) from None


class FrameEncoder:
    """Encode messages into frames (spec T3).

    ``max_frame_bytes`` bounds the whole frame, CRC trailer included; a larger one raises
    ``FrameError`` here, before anything is sent (spec T5).
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < MIN_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {MIN_FRAME_BYTES}")
        self.max_frame_bytes = max_frame_bytes

    def encode_parts(self, msg: Message) -> list[bytes]:
        """Frame ``msg`` as buffers to write in order; the tensor data is not copied.

        Without a tensor: one buffer (header, envelope, CRC trailer). With one: three, the
        header with dims and envelope, the tensor data itself, the 4-byte CRC trailer (its
        CRC is computed over the parts, never a joined copy).

        Raises:
            FrameError: the body is not CBOR-safe, or the frame exceeds the maximum.
        """
        if not isinstance(msg, Message):
            raise FrameError(f"can only send a Message, not a {type(msg).__name__}")
        check_cbor_safe(msg.body, allow_tuples=True)
        envelope = {"v": [PROTOCOL_MAJOR, PROTOCOL_MINOR], "t": msg.type, "b": msg.body}
        try:
            raw_envelope = cbor2.dumps(envelope)
        except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
            raise FrameError(f"message {msg.type!r} cannot be encoded as CBOR: {exc}") from exc
        if len(raw_envelope) > MAX_ENVELOPE_BYTES:
            raise FrameError(f"envelope of {len(raw_envelope)} bytes exceeds {MAX_ENVELOPE_BYTES}")
        tensor = msg.tensor
        if tensor is None:
            flags, code, dims, data_len = 0, 0, b"", 0
        else:
            flags, code = FLAG_TENSOR, DTYPES[tensor.dtype][0]
            dims = b"".join(DIM.pack(d) for d in tensor.shape)
            data_len = len(tensor.data)
        total = HEADER_BYTES + len(dims) + len(raw_envelope) + data_len + TRAILER_BYTES
        if total > self.max_frame_bytes:
            raise FrameError(f"frame of {total} bytes exceeds the maximum {self.max_frame_bytes}")
        ndim = 0 if tensor is None else len(tensor.shape)
        head = HEADER.pack(MAGIC, WIRE_VERSION, flags, code, ndim, len(raw_envelope), data_len)
        first = head + dims + raw_envelope
        crc = zlib.crc32(first)
        if tensor is None:
            return [first + TRAILER.pack(crc)]
        data = bytes(tensor.data)  # no copy when it is bytes already
        return [first, data, TRAILER.pack(zlib.crc32(data, crc))]

    def encode(self, msg: Message) -> bytes:
        """Frame ``msg`` as one bytes object (copies the tensor; see ``encode_parts``)."""
        return b"".join(self.encode_parts(msg))


class _Pending:
    """The parsed fixed header (and dims) of the frame being buffered."""

    __slots__ = ("data_len", "dtype", "envelope_len", "prefix_len", "shape", "total")

    def __init__(self, dtype: str | None, shape: tuple[int, ...], envelope_len: int,
                 data_len: int, prefix_len: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.envelope_len = envelope_len
        self.data_len = data_len
        self.prefix_len = prefix_len
        self.total = prefix_len + envelope_len + data_len + TRAILER_BYTES


class _Big:
    """A frame whose large tensor is gathered outside the stream buffer: its raw envelope
    (parsed once the CRC matched), the chunks that carry the tensor (joined once when
    complete: one copy per byte, no zero-filled buffer, no memmove of a growing stream
    buffer), tensor bytes gathered, the running CRC-32 and the trailer bytes gathered."""

    __slots__ = ("chunks", "crc", "envelope", "have", "trailer")

    def __init__(self, envelope: bytes, crc: int) -> None:
        self.envelope = envelope
        self.chunks: list[bytes] = []
        self.have = 0
        self.crc = crc
        self.trailer = bytearray()


def _crc_mismatch(crc: int, trailer: int) -> FrameError:
    """The error for a frame whose CRC-32 ``crc`` is not the one its trailer holds (spec T15)."""
    return FrameError(f"frame checksum mismatch: CRC-32 of the frame is 0x{crc:08x}, its trailer "
                      f"says 0x{trailer:08x} (corrupted in transit)")


class FrameDecoder:
    """Decode a byte stream into messages, however it is split (spec T2).

    Feed bytes as they arrive; ``feed`` returns every message completed so far. A malformed
    frame, or one whose CRC-32 trailer does not match, raises ``FrameError`` (specs T4,
    T15); no message is returned before its frame's CRC matched. If good messages preceded
    the bad frame in the same feed they are returned and the error is raised by the next
    ``feed``. Once failed the decoder stays failed. ``end_of_stream`` reports a stream that
    stopped inside a frame.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < MIN_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {MIN_FRAME_BYTES}")
        self.max_frame_bytes = max_frame_bytes
        self.peer_protocol: tuple[int, int] | None = None
        self._buf = bytearray()
        self._pos = 0
        self._pending: _Pending | None = None
        self._error: FrameError | None = None
        self._big: _Big | None = None  # a frame with a large tensor being gathered

    @property
    def error(self) -> FrameError | None:
        """The error that failed this decoder, or None."""
        return self._error

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet part of a returned message."""
        big = self._big
        return len(self._buf) - self._pos + (big.have + len(big.trailer) if big is not None else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Buffer ``data`` and return the messages it completes, in order.

        Raises:
            FrameError: a frame is malformed, or this decoder failed before.
        """
        if self._error is not None:
            raise FrameError(f"decoder failed earlier: {self._error}")
        out: list[Message] = []
        try:
            if self._big is not None:
                msg, used = self._fill_big(data)
                if msg is None:
                    return out
                out.append(msg)
                data = memoryview(data)[used:]
            self._buf += data
            while (msg := self._next()) is not None:
                out.append(msg)
        except FrameError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            self._pending = self._big = None
            if not out:
                raise
            return out
        # Drop consumed bytes once per feed: only bytes of this feed move, so it stays linear.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def end_of_stream(self) -> None:
        """Say the stream ended.

        Raises:
            FrameError: the decoder failed, or the stream stopped inside a frame.
        """
        if self._error is not None:
            raise FrameError(f"decoder failed earlier: {self._error}")
        if self.buffered_bytes:
            raise FrameError(f"stream ended inside a frame ({self.buffered_bytes} bytes buffered)")

    def _next(self) -> Message | None:
        avail = len(self._buf) - self._pos
        if not avail:
            return None
        if self._pending is None:
            self._pending = self._parse_header(avail)
            if self._pending is None:
                return None
        pending = self._pending
        start = self._pos + pending.prefix_len
        mid = start + pending.envelope_len
        end = mid + pending.data_len
        if pending.dtype is not None and pending.data_len >= BIG_TENSOR_BYTES and avail < pending.total:
            if avail < pending.prefix_len + pending.envelope_len:
                return None
            # Move to a dedicated buffer: what is here now, then each later feed directly.
            self._big = _Big(bytes(self._buf[start:mid]), zlib.crc32(memoryview(self._buf)[self._pos:mid]))
            self._fill_big(memoryview(self._buf)[mid:])  # copied: the buffer is reused
            self._pos = len(self._buf)
            return None
        if avail < pending.total:
            return None
        # spec T15: nothing of a frame is interpreted beyond its header until its CRC matched
        crc = zlib.crc32(memoryview(self._buf)[self._pos:end])
        if crc != (trailer := TRAILER.unpack_from(self._buf, end)[0]):
            raise _crc_mismatch(crc, trailer)
        type_, body, self.peer_protocol = self._parse_envelope(bytes(self._buf[start:mid]))
        tensor = None
        if pending.dtype is not None:
            tensor = WireTensor(dtype=pending.dtype, shape=pending.shape,
                                data=bytes(memoryview(self._buf)[mid:end]))
        self._pos = end + TRAILER_BYTES
        self._pending = None
        return Message(type=type_, body=body, tensor=tensor)

    def _fill_big(self, data: bytes | bytearray | memoryview) -> tuple[Message | None, int]:
        """Gather ``data`` into the large tensor being received, then its CRC trailer;
        (the message once complete and its CRC matched, bytes of ``data`` used).

        Raises:
            FrameError: the frame's CRC-32 does not match its trailer (spec T15), or its
                envelope is malformed (spec T4).
        """
        big, pending = self._big, self._pending
        assert big is not None and pending is not None and pending.dtype is not None
        used = min(len(data), pending.data_len - big.have)
        if used:
            # a whole bytes chunk is kept as it is (no copy); a part of one, or a mutable
            # buffer, is copied; the CRC runs over each chunk while it is hot in cache
            chunk = data if type(data) is bytes and used == len(data) else bytes(memoryview(data)[:used])
            big.crc = zlib.crc32(chunk, big.crc)
            big.chunks.append(chunk)
            big.have += used
            if big.have < pending.data_len:
                return None, used
        take = min(len(data) - used, TRAILER_BYTES - len(big.trailer))
        big.trailer += memoryview(data)[used : used + take]
        used += take
        if len(big.trailer) < TRAILER_BYTES:
            return None, used
        self._pending, self._big = None, None
        if big.crc != (trailer := TRAILER.unpack(big.trailer)[0]):
            raise _crc_mismatch(big.crc, trailer)
        type_, body, self.peer_protocol = self._parse_envelope(big.envelope)
        tensor = WireTensor(dtype=pending.dtype, shape=pending.shape, data=b"".join(big.chunks))
        return Message(type=type_, body=body, tensor=tensor), used

    def _parse_header(self, avail: int) -> _Pending | None:
        pos, buf = self._pos, self._buf
        head = bytes(buf[pos : pos + min(avail, 2)])
        if head != MAGIC[: len(head)]:
            raise FrameError(f"bad magic {head!r}; frames start with {MAGIC!r}")
        if avail < HEADER_BYTES:
            return None
        _, version, flags, code, ndim, envelope_len, data_len = HEADER.unpack_from(buf, pos)
        if version != WIRE_VERSION:
            if version == 1:  # frames of nodes from before the CRC trailer
                raise FrameError(f"wire version 1 not supported; this node speaks {WIRE_VERSION} "
                                 "(version 1 frames carry no CRC-32; run one mesh version on every node)")
            raise FrameError(f"unknown wire version {version}; this node speaks {WIRE_VERSION}")
        if flags & ~FLAG_TENSOR:
            raise FrameError(f"unknown frame flags 0x{flags:02x}; only bit0 (tensor) is defined")
        if envelope_len < 1:
            raise FrameError("envelope length is 0; every frame carries a CBOR envelope")
        if envelope_len > MAX_ENVELOPE_BYTES:  # spec T5: refuse before buffering it
            raise FrameError(f"envelope of {envelope_len} bytes exceeds the maximum {MAX_ENVELOPE_BYTES}")
        has_tensor = bool(flags & FLAG_TENSOR)
        if not has_tensor and (code or ndim or data_len):
            raise FrameError(
                f"frame without tensor has dtype code {code}, ndim {ndim}, data length "
                f"{data_len}; all must be 0"
            )
        if has_tensor and code not in DTYPE_BY_CODE:
            raise FrameError(f"unknown dtype code {code}; valid: {sorted(DTYPE_BY_CODE)}")
        if ndim > MAX_TENSOR_DIMS:
            raise FrameError(f"tensor has {ndim} dims; at most {MAX_TENSOR_DIMS}")
        prefix_len = HEADER_BYTES + 4 * ndim
        total = prefix_len + envelope_len + data_len + TRAILER_BYTES
        if total > self.max_frame_bytes:  # spec T5: refuse before buffering it
            raise FrameError(f"frame of {total} bytes exceeds the maximum {self.max_frame_bytes}")
        if avail < prefix_len:
            return None
        shape = tuple(DIM.unpack_from(buf, pos + HEADER_BYTES + 4 * i)[0] for i in range(ndim))
        if not has_tensor:
            return _Pending(None, (), envelope_len, 0, prefix_len)
        dtype = DTYPE_BY_CODE[code]
        if any(d < 1 for d in shape):
            raise FrameError(f"tensor shape {list(shape)} has a zero dim; dims must be >= 1")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if expected != data_len:
            raise FrameError(
                f"tensor {dtype}{list(shape)} needs {expected} bytes but the header says "
                f"{data_len}"
            )
        return _Pending(dtype, shape, envelope_len, data_len, prefix_len)

    def _parse_envelope(self, raw: bytes) -> tuple[str, dict[str, Any], tuple[int, int]]:
        """(type, body, the peer's (major, minor) protocol version) of an envelope."""
        stream = io.BytesIO(raw)
        try:
            decoder = cbor2.CBORDecoder(
                stream, tag_hook=_reject_tag, semantic_decoders=_REJECT_SEMANTIC,
                max_depth=MAX_BODY_DEPTH + 2, allow_duplicate_keys=False,
                strict_hashable_types=True,
            )
            envelope = decoder.decode()
        except Exception as exc:  # cbor2 raises several types on bad input
            cause = exc.__cause__
            if isinstance(cause, FrameError):
                raise FrameError(str(cause)) from exc
            raise FrameError(f"envelope is not valid CBOR: {exc}") from exc
        if stream.tell() != len(raw):
            raise FrameError(
                f"{len(raw) - stream.tell()} bytes of trailing garbage after the CBOR envelope"
            )
        if not isinstance(envelope, dict):
            raise FrameError(f"envelope is a {type(envelope).__name__}; it must be a CBOR map")
        check_cbor_safe(envelope, where="envelope")
        for key in ("v", "t", "b"):
            if key not in envelope:
                raise FrameError(f"envelope lacks key {key!r}; it needs 'v', 't' and 'b'")
        version, type_, body = envelope["v"], envelope["t"], envelope["b"]
        if (not isinstance(version, list) or len(version) != 2
                or not all(type(x) is int and x >= 0 for x in version)):
            raise FrameError(f"envelope 'v' is {version!r}; it must be [major, minor]")
        if version[0] != PROTOCOL_MAJOR:  # spec T10
            body = envelope.get("b")  # a hello names the peer's package version: say it
            theirs = body.get("version") if isinstance(body, dict) else None
            peer = f"peer (mesh {theirs[:32]})" if isinstance(theirs, str) else "peer"
            raise FrameError(
                f"{peer} speaks protocol {version[0]}.{version[1]}; this node (mesh {__version__}) speaks "
                f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR} and needs major {PROTOCOL_MAJOR}: run the same major "
                "version of mesh on every node"
            )
        if not isinstance(type_, str) or not type_:
            raise FrameError(f"envelope 't' is {type_!r}; it must be a non-empty string")
        if not isinstance(body, dict):
            raise FrameError(f"envelope 'b' is a {type(body).__name__}; it must be a map")
        return type_, body, (version[0], version[1])
