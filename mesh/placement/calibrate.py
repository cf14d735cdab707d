"""Calibration: how fast this device runs the layers it loaded, for the cost model.

The roofline (``mesh/placement/costmodel.py``) is what the hardware allows; small layers never get
there (each operator pays a fixed dispatch cost, and a GEMV over a few MiB runs well below the
bandwidth a large one reaches). So after a node loads its layer range it times that stage:
two prefills (``PREFILL_TOKENS``) and a few decode steps, on a scratch KV cache that no request
uses. The cost model's own estimates of the parts it keeps (the LM head on the last stage,
attention's quadratic FLOPs) are subtracted, and what is left is divided by the number of
layers: ``Calibration`` (seconds per layer for a decode step, and a line in the prompt length
for prefill). On a last stage whose backend can run its LM head alone (``Backend.run_head``)
the head is timed too, and that time, not the roofline's, is subtracted and published: the
head is computed whole on every member of a tensor-parallel group, so folding it into the
per-layer figure (which a group divides by its size) mispredicts groups (an MLX CPU head
measured 30 ms of a 113 ms step in bf16 where the roofline said 3 ms).

This is a measurement shell (it reads ``time.perf_counter``); the fit, ``fit_calibration``,
is pure. Spec: specs/placement.md P19.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from mesh.errors import PlacementError
from mesh.placement.costmodel import Calibration, ModelSpec
from mesh.wire import WireTensor

if TYPE_CHECKING:
    from backends.base import Backend

PREFILL_TOKENS = (8, 128)  # two prompt lengths: the line through them gives prefill's fixed and per-token parts
DECODE_STEPS = 8
BUDGET_S = 5.0  # stop adding decode steps past this (a slow device still gets a figure)
HEAD_RUNS = 8
MEASURED_HEAD_SHARE = 0.9  # a timed head may take up to this share of a step; the layers keep the rest


def fit_calibration(*, model: ModelSpec, layers: int, prefill_s: dict[int, float], decode_s: float,
                    head_s: float, flops: float, measured_head_s: float | None = None) -> Calibration:
    """Per-layer figures from a stage's measured step times (pure).

    Args:
        model: the model the stage belongs to (its ``name`` is recorded).
        layers: decoder layers in the stage (>= 1).
        prefill_s: prompt length (tokens) -> seconds to prefill it, for two lengths.
        decode_s: seconds per decode step at a short context.
        head_s: the cost model's seconds for the LM head in one step (0 unless the stage is last),
            taken as at most half of a measured step, so no per-layer figure is ever zero.
        flops: the device's FLOP/s, for attention's quadratic part of prefill.
        measured_head_s: the LM head's own median seconds, timed alone (None: unmeasured). When
            given it replaces ``head_s``, capped at ``MEASURED_HEAD_SHARE`` of a step, and is
            published as the calibration's ``head_s``.

    Raises PlacementError for fewer than two prompt lengths or a non-positive count.
    """
    if layers < 1 or len(prefill_s) < 2 or not decode_s > 0 or not flops > 0:
        raise PlacementError("a calibration needs >= 1 layer, two prefill lengths, a decode time and FLOP/s > 0")
    (p1, t1), (p2, t2) = sorted(prefill_s.items())[:2]

    def head(t: float) -> float:
        if measured_head_s is not None:  # timed alone: trusted, but the layers keep a share
            return min(measured_head_s, t * MEASURED_HEAD_SHARE)
        # the head's time is the cost model's estimate, not measured: where it claims more than
        # half of a measured step it is wrong (decode clamped to 0 ms/layer, and /v1/cluster
        # predicted 6.2 tok/s where 11-18 were measured), so it gets at most half
        return min(head_s, t / 2)

    def per_layer(p: int, t: float) -> float:
        attention = model.attn_flops_per_position * p * p / 2 / flops
        return max(0.0, (t - head(t)) / layers - attention)

    y1, y2 = per_layer(p1, t1), per_layer(p2, t2)
    slope = max(0.0, (y2 - y1) / (p2 - p1))
    intercept = max(0.0, y1 - slope * p1)
    if intercept + slope <= 0:  # measurement noise larger than the step: keep something positive
        slope = max(y1 / p1, y2 / p2, 1e-9)
    decode = (decode_s - head(decode_s)) / layers  # > 0: the layers keep at least half the step
    return Calibration(model=model.name, decode_layer_s=decode, prefill_layer_s=intercept,
                       prefill_token_layer_s=slope, head_s=measured_head_s or None)


# (prompt length -> prefill seconds, decode step seconds, LM head seconds or None when untimed)
StageTimes = tuple[dict[int, float], float, float | None]


def fastest(a: StageTimes | None, b: StageTimes) -> StageTimes:
    """The faster of two timings of one stage, step by step: on a shared host a slow time
    is another process's load, never the stage's own speed."""
    if a is None:
        return b
    prefill = {n: min(a[0].get(n, t), t) for n, t in b[0].items()}
    heads = [h for h in (a[2], b[2]) if h is not None]
    return prefill, min(a[1], b[1]), min(heads) if heads else None


def time_stage(backend: Backend, *, hidden_size: int, budget_s: float = BUDGET_S) -> StageTimes:
    """(prefill seconds per prompt length, median decode step seconds, median LM head seconds)
    of a loaded stage.

    A stage that is not first gets all-zero f32 hidden states [1, n, hidden_size]. Each
    prefill runs twice on a fresh cache and keeps the faster; decode steps continue the cache
    of the shorter prompt until ``DECODE_STEPS`` steps or ``budget_s`` seconds (at least two).
    The head (``Backend.run_head``: last stages only) runs once untimed, then ``HEAD_RUNS``
    times; None where the stage is not last or the backend cannot run it alone.
    Raises what the backend raises (BackendError).
    """
    first = backend.layer_start == 0

    def run(cache: Any, pos: int, n: int) -> float:
        if first:
            kwargs: dict[str, Any] = {"token_ids": [0] * n}
        else:
            kwargs = {"hidden": WireTensor(dtype="f32", shape=(1, n, hidden_size), data=bytes(4 * n * hidden_size))}
        start = time.perf_counter()
        backend.forward(cache, start_pos=pos, **kwargs)
        return time.perf_counter() - start

    prefill: dict[int, float] = {}
    for n in PREFILL_TOKENS:
        prefill[n] = min(run(backend.new_cache(), 0, n) for _ in range(2))
    cache = backend.new_cache()
    pos = PREFILL_TOKENS[0]
    run(cache, 0, pos)
    deadline = time.perf_counter() + budget_s
    steps: list[float] = []
    while len(steps) < DECODE_STEPS and (len(steps) < 2 or time.perf_counter() < deadline):
        steps.append(run(cache, pos, 1))
        pos += 1
    return prefill, statistics.median(steps), _time_head(backend) if backend.is_last else None


def _time_head(backend: Backend) -> float | None:
    def once() -> float:
        start = time.perf_counter()
        backend.run_head()
        return time.perf_counter() - start

    try:
        once()  # the first call pays one-off costs
    except NotImplementedError:
        return None
    return statistics.median(once() for _ in range(HEAD_RUNS))
