"""The matmul and matrix-vector product a device profile times, in the backend's own library.

A profile must measure the kernels the backend will run: torch's for the torch backend, MLX's
for the MLX backend (on Apple silicon MLX's Metal kernels and torch's MPS ones differ, and on a
CPU the two libraries' BLAS and quantized paths differ too). ``ops(backend, device)`` gives the
three operations ``mesh/placement/profile.py`` needs, each returning only once the work is
done (GPU work is queued: torch synchronizes the device, MLX evaluates the lazy result):

- ``matrix(rows, cols, dtype, random)``: a ``rows x cols`` matrix of dtype ``f32``/``f16``/
  ``bf16`` on the device, materialized (random in [0, 1), or ones);
- ``matmul(a, b)``: ``a @ b``;
- ``mv(m, v)``: ``m @ v`` for a vector ``v`` (``matrix(cols, 1, ...)`` flattened).

Errors: ``ConfigError`` naming the valid choices for a backend not in ``BACKENDS`` or a device
the library does not offer here; what the library raises (RuntimeError, TypeError, ValueError)
for a dtype it cannot multiply in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mesh.errors import ConfigError

BACKENDS = ("torch", "mlx")
MLX_DEVICES = ("cpu", "gpu")


@dataclass(frozen=True, slots=True)
class Ops:
    """A device's timed operations (see the module docstring)."""

    matrix: Callable[[int, int, str, bool], Any]
    matmul: Callable[[Any, Any], Any]
    mv: Callable[[Any, Any], Any]


def resolve_device(backend: str, device: str | None) -> str:
    """The device string a profile is stored under: torch ``cuda`` -> ``cuda:<current index>``,
    ``cpu``, ``mps``; MLX ``cpu`` or ``gpu`` (default: MLX's default device). ConfigError for
    an unknown backend or an unavailable device."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} cannot be profiled; valid: {list(BACKENDS)}")
    if backend == "mlx":
        return _mlx_device(device)
    import torch

    if device is None:  # the torch backend's own default (backends/torch.py)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.cuda.current_device() if dev.index is None and count else dev.index or 0
        if index >= count:
            raise ConfigError(f"--device {device!r}: this machine has {count} CUDA device(s)")
        return f"cuda:{index}"
    if dev.type not in ("cpu", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device!r} is not available here; use cpu, cuda[:N] or mps")
    return dev.type


def _mlx() -> Any:
    try:
        import mlx.core as mx
    except ImportError as exc:
        raise ConfigError("--backend 'mlx' needs mlx: pip install 'mesh[mlx]'") from exc
    return mx


def _mlx_device(device: str | None) -> str:
    mx = _mlx()
    gpu = mx.is_available(mx.gpu) if hasattr(mx, "is_available") else mx.default_device().type == mx.gpu
    if device is None:  # the MLX backend's own default (backends/mlx.py)
        return "gpu" if gpu and mx.default_device().type == mx.gpu else "cpu"
    if device not in MLX_DEVICES:
        raise ConfigError(f"--device {device!r} is not an mlx device; valid: {list(MLX_DEVICES)}")
    if device == "gpu" and not gpu:
        raise ConfigError("--device 'gpu' is not available in this mlx build; use cpu")
    return device


def ops(backend: str, device: str) -> Ops:
    """The operations of ``backend`` on ``device`` (as ``resolve_device`` returned it)."""
    return _mlx_ops(device) if backend == "mlx" else _torch_ops(device)


def _torch_ops(device: str) -> Ops:
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        elif device == "mps":
            torch.mps.synchronize()

    def matrix(rows: int, cols: int, dtype: str, random: bool) -> Any:
        kind = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
        make = torch.rand if random else torch.ones  # ones are written too: every page is touched
        out = make(rows, cols, device=device).to(kind)
        sync()
        return out

    def done(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def run(a: Any, b: Any) -> Any:
            out = fn(a, b)
            sync()
            return out
        return run

    return Ops(matrix=matrix, matmul=done(torch.matmul), mv=done(lambda m, v: torch.mv(m, v.reshape(-1))))


def _mlx_ops(device: str) -> Ops:
    mx = _mlx()
    stream = mx.gpu if device == "gpu" else mx.cpu
    kinds = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}

    def matrix(rows: int, cols: int, dtype: str, random: bool) -> Any:
        with mx.stream(stream):
            out = (mx.random.uniform(shape=(rows, cols)) if random else mx.ones((rows, cols))).astype(kinds[dtype])
            mx.eval(out)
        return out

    def matmul(a: Any, b: Any) -> Any:
        with mx.stream(stream):
            out = a @ b
            mx.eval(out)
        return out

    def mv(m: Any, v: Any) -> Any:
        with mx.stream(stream):
            out = m @ v.reshape(-1)
            mx.eval(out)
        return out

    return Ops(matrix=matrix, matmul=matmul, mv=mv)
