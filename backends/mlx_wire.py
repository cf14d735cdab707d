"""Moving MLX arrays over the wire, and mlx itself imported on first use (split from
``backends/mlx.py`` so that the batched-step module uses them without importing the backend)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mesh.errors import BackendError
from mesh.wire import WireTensor

INSTALL_HINT = "pip install 'mesh-cluster[mlx]'"
DTYPE_NAMES = ("bf16", "f16", "f32")
_NUMPY: dict[str, np.dtype[Any]] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}


def _mlx() -> Any:
    """``mlx.core``, or BackendError naming the extra that installs mlx and mlx-lm."""
    try:
        import mlx.core as mx
        import mlx_lm.models.cache  # noqa: F401  (checks mlx-lm is there too)
    except ImportError as exc:
        raise BackendError(f"the mlx backend needs mlx and mlx-lm ({exc}); install them: {INSTALL_HINT}") from exc
    return mx


def array_to_wire(a: Any) -> WireTensor:
    """A float ``mx.array`` (f32/f16/bf16) as a WireTensor (bf16 carried as its bits)."""
    mx = _mlx()
    names = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}
    if a.dtype not in names:
        raise BackendError(f"cannot send dtype {a.dtype}; valid: {sorted(DTYPE_NAMES)}")
    raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    data = np.asarray(raw).astype(_NUMPY[names[a.dtype]], copy=False).tobytes()
    return WireTensor(dtype=names[a.dtype], shape=tuple(a.shape), data=data)


def wire_to_array(w: WireTensor, dtype: Any, what: str = "hidden states") -> Any:
    """The inverse of ``array_to_wire``, cast to ``dtype`` (an mlx dtype)."""
    mx = _mlx()
    if w.dtype not in _NUMPY:
        raise BackendError(f"{what} must be f32, f16 or bf16, got {w.dtype}")
    arr = mx.array(np.frombuffer(w.data, dtype=_NUMPY[w.dtype]).reshape(w.shape))
    if w.dtype == "bf16":
        arr = arr.view(mx.bfloat16)
    return arr.astype(dtype)
