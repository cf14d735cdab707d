"""Messages that cross a link: a versioned control envelope plus an optional tensor, and
the one rule set for values that travel as CBOR (``check_cbor_safe``).

This module knows the shape of a message, not how it is framed (``transports/framing.py``)
nor what it means (``mesh/runtime/coordinator.py``). Spec: specs/transport.md (T1-T4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import FrameError, MeshError

# dtype name -> (wire code, itemsize in bytes). Codes are part of the wire format (spec T3).
DTYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (2, 2),
    "bf16": (3, 2),
    "i64": (4, 8),
    "i32": (5, 4),
    "u8": (6, 1),
}
DTYPE_BY_CODE: dict[int, str] = {code: name for name, (code, _) in DTYPES.items()}
MAX_TENSOR_DIMS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class WireTensor:
    """A tensor as raw little-endian bytes with its dtype and shape.

    ``dtype`` is a key of ``DTYPES`` (f32, f16, bf16, i64, i32, u8); ``shape`` has 0..8
    dims, each >= 1; ``len(data) == prod(shape) * itemsize``.

    Raises:
        FrameError: on an unknown dtype, a bad dim, or a byte length that does not match.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise FrameError(f"unknown tensor dtype {self.dtype!r}; valid: {sorted(DTYPES)}")
        if len(self.shape) > MAX_TENSOR_DIMS:
            raise FrameError(f"tensor has {len(self.shape)} dims; at most {MAX_TENSOR_DIMS}")
        for dim in self.shape:
            if not isinstance(dim, int) or dim < 1:
                raise FrameError(f"tensor dim {dim!r} invalid; dims must be integers >= 1")
        expected = math.prod(self.shape) * DTYPES[self.dtype][1]
        if len(self.data) != expected:
            raise FrameError(
                f"tensor {self.dtype}{list(self.shape)} needs {expected} bytes, got {len(self.data)}"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def rows(self, start: int, stop: int) -> WireTensor:
        """Positions ``[start, stop)`` of a ``[1, n, ...]`` tensor (hidden states), as bytes.

        Raises:
            FrameError: when the tensor is not ``[1, n, ...]`` or the range is outside ``[0, n]``.
        """
        if len(self.shape) < 2 or self.shape[0] != 1 or not 0 <= start < stop <= self.shape[1]:
            raise FrameError(f"positions [{start}, {stop}) of a {self.dtype}{list(self.shape)} tensor")
        row = math.prod(self.shape[2:]) * DTYPES[self.dtype][1]
        return WireTensor(dtype=self.dtype, shape=(1, stop - start, *self.shape[2:]),
                          data=self.data[start * row:stop * row])

    @staticmethod
    def join_rows(parts: list[WireTensor]) -> WireTensor:
        """``[1, n_i, ...]`` tensors of one dtype and row shape joined along positions.

        Raises:
            FrameError: on an empty list, or parts that differ in dtype or row shape.
        """
        if not parts or any(p.dtype != parts[0].dtype or p.shape[0] != 1 or p.shape[2:] != parts[0].shape[2:]
                            or len(p.shape) < 2 for p in parts):
            raise FrameError("only [1, n, ...] tensors of one dtype and row shape join")
        return WireTensor(dtype=parts[0].dtype, shape=(1, sum(p.shape[1] for p in parts), *parts[0].shape[2:]),
                          data=b"".join(p.data for p in parts))


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One control message (CBOR-encodable ``body``) with an optional tensor.

    ``type`` names the message (e.g. ``"hello"``, ``"forward"``); ``body`` holds only
    CBOR-safe values (str, int, float, bool, None, bytes, lists, str-keyed dicts).
    """

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    tensor: WireTensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise FrameError("message type must be a non-empty string")
        if not isinstance(self.body, dict):
            raise FrameError("message body must be a map")


# -- CBOR safety: one rule set for every layer -------------------------------------------------
#
# A CBOR-safe value is None, a bool, an int, a float, a str, bytes, a list, or a map whose keys
# are str, nested at most ``max_depth`` containers deep (a container at depth ``max_depth``,
# the value itself being depth 0, is refused). Subclasses of these types count as them; sets,
# tuples (unless allowed), other objects and non-str map keys are refused, so nothing but these
# types is ever built from, or sent as, CBOR. Where the layers genuinely differ, a parameter
# says so:
#
# - ``allow_tuples``: an encoder may take tuples (they decode as lists); a decoder never sees
#   them, and the kernel refuses them (a tuple would not equal itself after a round trip).
# - ``allow_bignums``: without it ints must lie in [MIN_SMALL_INT, MAX_SMALL_INT] (CBOR major
#   types 0/1 that every 64-bit reader takes). The kernel refuses bignums (its state hashes and
#   persisted events must read back everywhere); framing carries them (tags 2 and 3 decode to
#   int, and the layers above may send any int).
# - ``allow_non_finite``: NaN and infinities. The kernel refuses them (NaN != NaN breaks state
#   comparison); framing carries them (a float is a float on the wire).
# - ``max_depth``: the kernel's payloads nest at most 32 deep, message envelopes 64.

MIN_SMALL_INT, MAX_SMALL_INT = -(2**63), 2**64 - 1
_ANY_SCALAR = frozenset({str, int, float, bool, bytes, type(None)})
_PLAIN_SCALAR = frozenset({str, bool, bytes, type(None)})  # safe whatever the parameters


class UnsafeValueError(MeshError):
    """A value that is not CBOR-safe under the rules asked for; the message names its path.
    Each layer re-raises it as its own error (``FrameError``, ``KernelError``)."""


def check_cbor_safe(value: Any, *, max_depth: int, where: str = "value", allow_tuples: bool = False,
                    allow_bignums: bool = False, allow_non_finite: bool = False, depth: int = 0) -> None:
    """Check that ``value`` is CBOR-safe (the rules above); ``depth``: the depth of ``value``
    itself inside a larger value.

    Raises:
        UnsafeValueError: naming the path (from ``where``) of the first unsafe value and what
            would be valid.
    """
    scalars = _ANY_SCALAR if allow_bignums and allow_non_finite else _PLAIN_SCALAR
    if _is_safe(value, max_depth, allow_tuples, allow_bignums, allow_non_finite, scalars, depth):
        return
    _explain_unsafe(value, where, max_depth, allow_tuples, allow_bignums, allow_non_finite, depth)


def _is_safe(value: Any, max_depth: int, tuples: bool, bignums: bool, non_finite: bool,
             scalars: frozenset[type], depth: int) -> bool:
    """The fast path: exact types, no path strings unless it fails (plain loops, not ``all()``
    over generators: framing runs this for every message). False may still be safe (a
    subclass); ``_explain_unsafe`` decides."""
    kind = type(value)
    if kind in scalars:
        return True
    if kind is int:
        return bignums or MIN_SMALL_INT <= value <= MAX_SMALL_INT
    if kind is float:
        return non_finite or math.isfinite(value)
    if depth >= max_depth:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in scalars
                                        and not _is_safe(item, max_depth, tuples, bignums, non_finite, scalars,
                                                         depth + 1)):
                return False
        return True
    if kind is list or (tuples and kind is tuple):
        for item in value:
            if type(item) not in scalars and not _is_safe(item, max_depth, tuples, bignums, non_finite, scalars,
                                                          depth + 1):
                return False
        return True
    return False


def _explain_unsafe(value: Any, where: str, max_depth: int, tuples: bool, bignums: bool, non_finite: bool,
                    depth: int) -> None:
    """The slow path: raise UnsafeValueError for the first unsafe value, or return when
    ``value`` is safe after all (subclasses of the safe types)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        if not bignums and not MIN_SMALL_INT <= value <= MAX_SMALL_INT:
            raise UnsafeValueError(f"{where}: integer out of the 64-bit CBOR range "
                                   f"[-2**63, 2**64 - 1] (no bignums here)")
        return
    if isinstance(value, float):
        if not non_finite and not math.isfinite(value):
            raise UnsafeValueError(f"{where}: float {value!r} is not finite")
        return
    is_list = isinstance(value, list) or (tuples and isinstance(value, tuple))
    if not is_list and not isinstance(value, dict):
        kinds = "None, bool, int, float, str, bytes, list" + (", tuple" if tuples else "") + " or a str-keyed map"
        raise UnsafeValueError(f"{where}: a {type(value).__name__} is not CBOR-safe; valid: {kinds}")
    if depth >= max_depth:
        raise UnsafeValueError(f"{where}: nested deeper than {max_depth} levels")
    if is_list:
        for i, item in enumerate(value):
            _explain_unsafe(item, f"{where}[{i}]", max_depth, tuples, bignums, non_finite, depth + 1)
        return
    for key, item in value.items():
        if not isinstance(key, str):
            raise UnsafeValueError(f"{where}: map key {key!r:.40} is a {type(key).__name__}; map keys must be strings")
        _explain_unsafe(item, f"{where}[{key[:40]!r}]", max_depth, tuples, bignums, non_finite, depth + 1)
