"""Measured device profiles: what one device can compute and move, for the placement solver.

A ``DeviceProfile`` holds, for one backend device (torch's "cpu", "cuda:0", "mps"; MLX's
"cpu", "gpu"), measured with that backend's own library (``mesh/placement/kernels.py``):

- ``memory_total_bytes`` / ``memory_usable_bytes``: bytes (psutil for CPU and MPS's unified
  memory, ``torch.cuda.mem_get_info`` for CUDA); usable = available x fraction, rounded down
  to 64 MiB as in ``mesh.identity.usable_memory_bytes``.
- ``flops``: dtype name -> dense matmul FLOP/s. An n x n by n x n matmul does n^3
  multiply-adds = 2 n^3 floating-point operations (the convention of LINPACK/HPL and
  BLAS benchmarks); ``robust_seconds`` of a few runs, after a warm-up.
- ``memory_bandwidth_bytes_per_s``: the bytes/s a matrix-vector product (f32, a matrix far
  larger than the caches) reads, ``robust_seconds`` of a few runs: decode is a GEMV per weight matrix per
  token, so this, not a copy kernel, bounds it. (STREAM "Copy" (McCalpin, IEEE TCCA
  newsletter, 1995) measures 2.6x more on the CI machine; decode never sees that.)

This module is a measurement shell (it reads ``time.perf_counter``); it knows nothing of the
cluster or of plans. Figures are cached in ``<data dir>/profile.json``. Spec: specs/placement.md
(P7, P8).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from mesh.errors import ConfigError
from mesh.identity import MEMORY_GRANULE, usable_memory_bytes
from mesh.placement.kernels import Ops, ops, resolve_device

log = logging.getLogger(__name__)

PROFILE_VERSION = 4  # 4: median of runs, outliers dropped; 3: software and busy recorded; 2: bandwidth from a GEMV (1: from a copy kernel)
PROFILE_FILE = "profile.json"
DTYPES = ("f32", "f16", "bf16")
MIN_RUN_S = 0.01  # grow the matmul until one run takes >= 10 ms, so timer noise is small
MAX_MATMUL_N = 8192
MAX_RUNS = 5
COPY_BYTES = 256 << 20  # far larger than any CPU's last-level cache
# Share of the machine's CPU time other processes may take while a CPU is measured for the
# figures to be kept: 3 nodes measuring at once gave bf16/f32 ratios of 0.01 to 696 on a
# 2-core machine (2.05-2.11 alone); a quarter of the cores is a light desktop's background.
BUSY_LIMIT = 0.25
OUTLIER_RATIO = 1.5  # a run this much slower than the fastest was interrupted: dropped
# Figures outside these bounds are measurement failures, not devices (a phone CPU does about 1e10
# FLOP/s, an 8-GPU node's one device 1e15; memory from about 1e9 to 1e13 bytes/s): measured
# again once, and never cached (spec P7)
SANE_FLOPS = (1e8, 1e16)
SANE_BANDWIDTH = (1e8, 3e13)


def robust_seconds(times: list[float]) -> float:
    """The time of a kernel from repeated runs: the runs more than ``OUTLIER_RATIO`` times the
    fastest are dropped (another process took the core meanwhile; noise only ever adds time),
    and the median of the rest is taken (not the minimum: one lucky run is not the device)."""
    fastest = min(times)
    kept = sorted(t for t in times if t <= OUTLIER_RATIO * fastest)
    return float(statistics.median(kept))


def insane(flops: dict[str, float], bandwidth: float) -> list[str]:
    """The figures of a profile outside ``SANE_FLOPS`` / ``SANE_BANDWIDTH``, named."""
    out = [f"{dtype} {value / 1e9:.3g} GFLOP/s" for dtype, value in flops.items()
           if not SANE_FLOPS[0] <= value <= SANE_FLOPS[1]]
    if not SANE_BANDWIDTH[0] <= bandwidth <= SANE_BANDWIDTH[1]:
        out.append(f"memory bandwidth {bandwidth / 1e9:.3g} GB/s")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """What one device offers; see the module docstring for units and how each is measured."""

    memory_total_bytes: int
    memory_usable_bytes: int
    flops: dict[str, float]
    memory_bandwidth_bytes_per_s: float
    backend: str
    device: str
    measured_at_ms: int
    software: str = ""  # the backend library that measured it, e.g. "torch 2.13.0+cpu"
    busy: float = 0.0  # share of the CPU other processes used while it was measured (0-1; CPU only)
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        for name in ("memory_total_bytes", "memory_usable_bytes", "measured_at_ms"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                _bad(name, value, "an integer >= 0")
        if self.memory_usable_bytes > self.memory_total_bytes:
            _bad("memory_usable_bytes", self.memory_usable_bytes, f"<= memory_total_bytes ({self.memory_total_bytes})")
        if not isinstance(self.flops, dict) or not self.flops:
            _bad("flops", self.flops, f"a non-empty map from {list(DTYPES)} to FLOP/s")
        for dtype, value in self.flops.items():
            if dtype not in DTYPES or not _positive(value):
                _bad("flops", {dtype: value}, f"dtype names in {list(DTYPES)} with finite FLOP/s > 0")
        if not _positive(self.memory_bandwidth_bytes_per_s):
            _bad("memory_bandwidth_bytes_per_s", self.memory_bandwidth_bytes_per_s, "a finite number > 0")
        for name in ("backend", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _bad(name, value, "a non-empty string")
        if not isinstance(self.software, str):
            _bad("software", self.software, "a string")
        if not (isinstance(self.busy, float) and 0.0 <= self.busy <= 1.0):
            _bad("busy", self.busy, "a float in [0, 1]")
        if type(self.version) is not int or self.version != PROFILE_VERSION:
            _bad("version", self.version, f"{PROFILE_VERSION} (the format this build reads)")

    def to_wire(self) -> dict[str, Any]:
        """A dict of ints, floats, strings and a str->float map: safe for CBOR and JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"flops": dict(self.flops)}

    @classmethod
    def from_wire(cls, d: object) -> DeviceProfile:
        """A profile from ``to_wire`` output (a peer's message or a cached file, maybe corrupt);
        ConfigError names the first missing, unknown or malformed field."""
        if not isinstance(d, dict):
            raise ConfigError(f"a device profile must be a map, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for name in [*names, *sorted(map(str, d))]:
            if name not in d or name not in names:
                raise ConfigError(f"device profile field {name!r} is {'missing' if name in names else 'unknown'}; "
                                  f"valid fields: {names}")
        flops = d["flops"]
        if isinstance(flops, dict):
            flops = {k: _as_float(v) for k, v in flops.items()}
        return cls(**dict(d, flops=flops, memory_bandwidth_bytes_per_s=_as_float(d["memory_bandwidth_bytes_per_s"]),
                          busy=_as_float(d["busy"])))


def _as_float(x: Any) -> Any:
    """JSON and CBOR may carry a whole float as an int; anything else is left for validation."""
    return float(x) if type(x) is int else x


def _bad(name: str, value: object, valid: str) -> NoReturn:
    raise ConfigError(f"device profile field {name!r} is {value!r}; it must be {valid}")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _resolve_device(backend: str, device: str | None) -> str:
    """The device string a profile is stored under (``kernels.resolve_device``)."""
    return resolve_device(backend, device)


def _memory(device: str, memory_fraction: float) -> tuple[int, int]:
    """(total, usable) bytes of ``device``; usable = available x fraction, whole 64 MiB."""
    if device.startswith("cuda"):
        import torch

        if not 0.0 < memory_fraction <= 1.0:
            raise ConfigError(f"--memory-fraction must be in (0, 1], got {memory_fraction}")
        free, total = torch.cuda.mem_get_info(torch.device(device))
        usable = int(free * memory_fraction)
        return int(total), usable - usable % MEMORY_GRANULE
    import psutil

    return int(psutil.virtual_memory().total), usable_memory_bytes(memory_fraction)


def _timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds ``fn(*args)`` takes (``kernels.Ops`` return once the device's work is done)."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _matmul_flops(dtype: str, ops: Ops, deadline: float) -> float:
    """FLOP/s of an n x n matmul, n doubled from 128 until one run takes >= MIN_RUN_S; the
    runs while growing are the warm-up. Raises whatever the library raises for an unusable dtype."""
    n = 128
    while True:
        a, b = ops.matrix(n, n, dtype, True), ops.matrix(n, n, dtype, True)
        _timed(ops.matmul, a, b)  # the first run at a size: warm-up, not counted
        elapsed = _timed(ops.matmul, a, b)
        # 8x the work at 2n: stop when a run is long enough or the budget can't pay for it.
        if elapsed >= MIN_RUN_S or n >= MAX_MATMUL_N or time.perf_counter() + 16 * elapsed > deadline:
            break
        n *= 2
    runs = [elapsed]
    for _ in range(MAX_RUNS - 1):
        if time.perf_counter() + min(runs) > deadline:
            break
        runs.append(_timed(ops.matmul, a, b))
    return 2.0 * n**3 / robust_seconds(runs)  # n^3 multiply-adds


def _gemv_bandwidth(ops: Ops, free_bytes: int, deadline: float) -> float:
    """Bytes/s of a matrix-vector product over a matrix far larger than the caches: the way
    decode reads its weights (one GEMV per weight matrix per token), so the figure decode is
    bound by. Bytes moved per run = the matrix's size (the vectors are negligible). On this
    project's 2-core CI machine it is about 40 % of STREAM Copy (25 vs 66 GB/s)."""
    size = max(16 << 20, min(COPY_BYTES, free_bytes // 8))
    cols = 4096
    rows = size // 4 // cols
    matrix = ops.matrix(rows, cols, "f32", False)  # written: pages touched
    vector = ops.matrix(cols, 1, "f32", False)
    _timed(ops.mv, matrix, vector)  # warm-up
    runs: list[float] = []
    for i in range(MAX_RUNS):  # at least one run after the warm-up, even past the deadline
        if i and time.perf_counter() + min(runs) > deadline:
            break
        runs.append(_timed(ops.mv, matrix, vector))
    return rows * cols * 4 / robust_seconds(runs)


def measure_profile(
    *, backend: str = "torch", device: str | None = None, memory_fraction: float = 0.8, budget_s: float = 3.0
) -> DeviceProfile:
    """Measure ``device`` now, in about ``budget_s`` seconds (a slow dtype may overrun it by a
    run); dtypes the device cannot multiply in are left out. A figure outside the sanity
    bounds (``insane``) is measured again once; if it still is, the profile is returned marked
    ``busy`` 1.0, so that it serves this run and is never cached. ConfigError for a bad
    argument."""
    profile = _measure_once(backend=backend, device=device, memory_fraction=memory_fraction, budget_s=budget_s)
    wrong = insane(profile.flops, profile.memory_bandwidth_bytes_per_s)
    if wrong:
        log.warning("profile: %s out of bounds; measuring again", ", ".join(wrong))
        profile = _measure_once(backend=backend, device=device, memory_fraction=memory_fraction, budget_s=budget_s)
        wrong = insane(profile.flops, profile.memory_bandwidth_bytes_per_s)
        if wrong:
            log.warning("profile: %s out of bounds again; using it for this run only", ", ".join(wrong))
            profile = replace(profile, busy=1.0)
    return profile


def _measure_once(*, backend: str, device: str | None, memory_fraction: float, budget_s: float) -> DeviceProfile:
    resolved = _resolve_device(backend, device)
    total, usable = _memory(resolved, memory_fraction)
    if not budget_s > 0:
        raise ConfigError(f"budget_s must be > 0 seconds, got {budget_s}")
    timed = ops(backend, resolved)
    start = time.perf_counter()
    cpu_before = _cpu_times() if resolved == "cpu" else None
    flops: dict[str, float] = {}
    for i, dtype in enumerate(DTYPES):  # spec P7: 3/4 of the budget for matmuls, shared out
        deadline = start + budget_s * 0.75 * (i + 1) / len(DTYPES)
        try:
            value = _matmul_flops(dtype, timed, deadline)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            log.info("profile: %s matmul on %s is not supported: %s", dtype, resolved, exc)
            continue
        if math.isfinite(value) and value > 0:
            flops[dtype] = value
    if not flops:
        raise ConfigError(f"--device {resolved!r}: no dtype in {list(DTYPES)} can run a matmul there")
    bandwidth = _gemv_bandwidth(timed, usable, max(time.perf_counter(), start + budget_s))
    busy = _others_share(cpu_before, _cpu_times()) if cpu_before is not None else 0.0
    log.info("profile of %s: %s GFLOP/s, %.1f GB/s%s", resolved, {k: round(v / 1e9, 1) for k, v in flops.items()},
             bandwidth / 1e9, f" (other processes used {busy:.0%} of the CPU meanwhile)" if busy else "")
    return DeviceProfile(
        memory_total_bytes=total, memory_usable_bytes=usable, flops=flops, memory_bandwidth_bytes_per_s=bandwidth,
        backend=backend, device=resolved, measured_at_ms=time.time_ns() // 1_000_000, software=software(backend),
        busy=busy,
    )


def hardware(device: str) -> str:
    """What a device is, for comparing profiles of members on the same hardware: a CPU's model
    name (Linux ``/proc/cpuinfo``, else ``platform.processor()``) and core count, or a CUDA
    device's name; "" when unknown."""
    import platform

    if device.startswith("cuda"):
        try:
            import torch

            return str(torch.cuda.get_device_name(torch.device(device)))
        except Exception:  # no driver, a bad index: unknown, not a failure
            return ""
    if device != "cpu":
        return ""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor()
    return f"{name} x{os.cpu_count()}" if name else ""


def software(backend: str) -> str:
    """The library a profile of ``backend`` is measured with (it times that library's matmul
    and GEMV kernels), as ``"torch <version>"`` or ``"mlx <version>"``: a profile measured with
    another version is re-measured."""
    if backend == "mlx":
        import mlx.core as mx

        return f"mlx {mx.__version__}"
    import torch

    return f"torch {torch.__version__}"


def _cpu_times() -> tuple[float, float, float] | None:
    """(monotonic seconds, CPU seconds all processes spent busy (Linux ``/proc/stat``: every
    state but idle and iowait, in ``SC_CLK_TCK`` ticks), CPU seconds of this process), or None
    where ``/proc/stat`` cannot be read (the share of others is then not known: 0)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return time.monotonic(), busy / hz, time.process_time()


def _others_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float:
    """Share of the machine's CPU time (0-1) that processes other than this one used between
    two ``_cpu_times`` readings."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    others = (after[1] - before[1]) - (after[2] - before[2])
    return float(min(1.0, max(0.0, others / ((after[0] - before[0]) * (os.cpu_count() or 1)))))


def load_or_measure_profile(data_dir: Path, *, refresh: bool = False, shared_dir: Path | None = None,
                            **measure_kwargs: Any) -> DeviceProfile:
    """The profile cached in ``data_dir/profile.json`` with memory re-read now; or a fresh
    measurement, then cached, when the file is missing, corrupt (logs a warning), of another
    version, backend, device or backend library version (``software``), or ``refresh`` is set
    (``--remeasure``). A measurement taken while other processes used more than ``BUSY_LIMIT``
    of the CPU is returned but never cached. ``measure_kwargs``: measure_profile's.

    With ``shared_dir`` (the host directory of this user's nodes, ``mesh.identity.host_dir``),
    a node without a usable cache of its own takes the host's (``profile-<backend>-<device>.json``
    there) and measures only when there is none, holding a lock on that directory while it
    reads or measures (``SHARED_LOCK_TIMEOUT_S``), so the nodes started together on one machine
    measure one at a time and once, and get one profile: measured at the same time, each
    would time the others' load (spec P7)."""
    unknown = set(measure_kwargs) - {"backend", "device", "memory_fraction", "budget_s"}
    if unknown:
        raise TypeError(f"load_or_measure_profile() got unknown arguments {sorted(unknown)}")
    backend = measure_kwargs.get("backend", "torch")
    device = _resolve_device(backend, measure_kwargs.get("device"))
    path = data_dir / PROFILE_FILE
    cached = None if refresh else _cached(path, backend, device)
    if cached is None and shared_dir is not None:
        shared = shared_dir / f"profile-{backend}-{device.replace(':', '-')}.json"
        with _locked(shared_dir / "profile.lock"):
            cached = None if refresh else _cached(shared, backend, device)
            if cached is None:
                measured = measure_profile(**{**measure_kwargs, "device": device})
                _store_unless_busy(shared, measured)
            else:
                log.info("profile: this host's, measured by another node (%s)", shared)
        _store_unless_busy(path, cached or measured)
    elif cached is None:
        measured = measure_profile(**{**measure_kwargs, "device": device})
        _store_unless_busy(path, measured)
    if cached is None:
        return measured
    total, usable = _memory(device, measure_kwargs.get("memory_fraction", 0.8))
    return replace(cached, memory_total_bytes=total, memory_usable_bytes=usable)


SHARED_LOCK_TIMEOUT_S = 30.0  # another node measures in about budget_s; past this, measure anyway


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created) while the block runs, waiting at most
    ``SHARED_LOCK_TIMEOUT_S``; without a lock (an unwritable directory, or the wait timed out,
    with a log line) the block runs anyway: sharing a profile is an aid, not a need."""
    import fcntl

    handle = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = open(path, "ab")
        deadline = time.monotonic() + SHARED_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("profile: %s stayed locked for %.0f s; measuring without it", path,
                                SHARED_LOCK_TIMEOUT_S)
                    break
                time.sleep(0.05)
    except OSError as exc:
        log.debug("profile: cannot lock %s: %s", path, exc)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _cached(path: Path, backend: str, device: str) -> DeviceProfile | None:
    """The profile in ``path`` when it is readable, of this format version, backend and device."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and type(raw.get("version")) is int and raw["version"] != PROFILE_VERSION:
            log.info("profile: %s has format version %r, not %d; re-measuring", path, raw.get("version"),
                     PROFILE_VERSION)
            return None
        cached = DeviceProfile.from_wire(raw)
    except (OSError, UnicodeDecodeError, ValueError, ConfigError) as exc:
        log.warning("profile: %s is unreadable or corrupt (%s); re-measuring", path, exc)
        return None
    if (cached.backend, cached.device) != (backend, device):
        return None
    now = software(backend)
    if cached.software != now:
        log.info("profile: %s was measured with %s, this is %s; re-measuring", path, cached.software or "?", now)
        return None
    return cached


def _store_unless_busy(path: Path, profile: DeviceProfile) -> None:
    """Cache ``profile`` in ``path`` unless other processes took more than ``BUSY_LIMIT`` of
    the CPU while it was measured: such figures serve this run only (logged), and the next
    start measures again."""
    if profile.busy > BUSY_LIMIT:
        log.warning("profile: other processes used %.0f%% of the CPU while it was measured; using it for this run "
                    "but not caching it (restart when the machine is quieter, or pass --remeasure)", profile.busy * 100)
        return
    _store(path, profile)


def _store(path: Path, profile: DeviceProfile) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile.to_wire(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a crash never leaves half a file
    except OSError as exc:
        log.warning("profile: cannot cache the profile in %s: %s", path, exc)


def profile_from_spec(
    *, memory_bytes: int, flops: float, memory_bandwidth_bytes_per_s: float,
    backend: str = "torch", dtype: str = "f32",
) -> DeviceProfile:
    """A simulated device (placement tests, ``python -m mesh plan`` topology files): all of
    ``memory_bytes`` usable, ``flops`` FLOP/s in ``dtype``. Spec P8. ConfigError names a bad field."""
    return DeviceProfile(
        memory_total_bytes=memory_bytes, memory_usable_bytes=memory_bytes, flops={dtype: _as_float(flops)},
        memory_bandwidth_bytes_per_s=_as_float(memory_bandwidth_bytes_per_s),
        backend=backend, device="simulated", measured_at_ms=0,
    )
