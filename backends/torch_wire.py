"""Hidden states and KV blocks between torch tensors and the wire format (specs/backend.md:
little-endian raw bytes in C order, bf16 carried as its 16 bits)."""

from __future__ import annotations

import torch

from mesh.errors import BackendError
from mesh.wire import WireTensor

TORCH_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
WIRE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_to_wire(t: torch.Tensor) -> WireTensor:
    """A float tensor as a WireTensor (little-endian raw bytes, bf16 carried as its bits)."""
    if t.dtype not in WIRE_NAMES:
        raise BackendError(f"cannot send dtype {t.dtype}; valid: {sorted(WIRE_NAMES.values())}")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return WireTensor(dtype=WIRE_NAMES[t.dtype], shape=tuple(t.shape), data=raw.numpy().tobytes())


def wire_to_tensor(w: WireTensor) -> torch.Tensor:
    """The inverse of ``tensor_to_wire`` (copies the bytes into a fresh tensor)."""
    if w.dtype not in TORCH_DTYPES:
        raise BackendError(f"hidden states must be f32, f16 or bf16, got {w.dtype}")
    flat = torch.frombuffer(bytearray(w.data), dtype=TORCH_DTYPES[w.dtype])
    return flat.reshape(w.shape)
