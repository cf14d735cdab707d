"""Messages that cross a link: a versioned control envelope plus an optional tensor.

This module knows the shape of a message, not how it is framed (``transports/framing.py``)
nor what it means (``mesh/runtime/coordinator.py``). Spec: specs/transport.md (T1-T4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import FrameError

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
