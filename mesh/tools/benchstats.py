"""Summaries of repeated measurements and the rule that says when a difference is noise.

Every published figure is a sample of n repeated measurements (a request's TTFT, a run of
a benchmark): it is shown as its median with its range (min-max) and n. Two figures are
compared by the ratio of their medians, and the comparison reads "within noise" when the
medians differ by no more than the larger of the two interquartile ranges (q3 - q1, the
spread of the middle half of each sample): the difference is then no bigger than what
repeating the same measurement already showed. The IQR rather than min-max, since the range
of individual values only grows with n and would call ever larger differences noise; still a
simple rule, not a test of significance (a single measurement has no spread, so a comparison
with n = 1 on both sides is never called noise; see specs/report.md RP6). Quartiles: the
"inclusive" method of ``statistics.quantiles``.

Pure functions, no I/O; the benchmarks, ``python -m mesh report`` and ``python -m mesh
publish`` share them (the noise rule and which baseline a run is compared with) so that a
table and the report call the same difference the same thing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """n values of one measurement: median, min, max (same unit as the values)."""

    n: int
    median: float
    low: float
    high: float
    q1: float
    q3: float

    @property
    def spread(self) -> float:
        """max - min (0 for a single value)."""
        return self.high - self.low

    @property
    def iqr(self) -> float:
        """q3 - q1 (0 for a single value): the spread the noise rule uses."""
        return self.q3 - self.q1

    def fmt(self, scale: float = 1.0, digits: int = 1, *, with_n: bool = False) -> str:
        """``median (min-max)`` scaled, e.g. ``214 (201-230)``; a single value is shown alone."""
        def f(x: float) -> str:
            return f"{x * scale:,.{digits}f}"
        text = f(self.median) if self.n == 1 or f(self.low) == f(self.high) else \
            f"{f(self.median)} ({f(self.low)}-{f(self.high)})"
        return text + (f", n={self.n}" if with_n else "")


def sample(values: Iterable[Any]) -> Sample | None:
    """The sample of the finite numbers among ``values``; None when there are none."""
    nums = [float(v) for v in values
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))]
    if not nums:
        return None
    median = statistics.median(nums)
    q1, _, q3 = statistics.quantiles(nums, n=4, method="inclusive") if len(nums) > 1 else (median, median, median)
    return Sample(n=len(nums), median=median, low=min(nums), high=max(nums), q1=q1, q3=q3)


def stats_block(values: list[float]) -> dict[str, Any] | None:
    """The JSON form the benchmarks record: n, p50, mean, min, max and every value (``runs``)."""
    if not values:
        return None
    return {"n": len(values), "p50": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values), "runs": list(values)}


def from_block(block: Any) -> Sample | None:
    """A ``Sample`` from a recorded stats block (``runs`` when present, else p50/min/max and
    q1/q3, which default to min/max when the block has no quartiles) or a bare number (n = 1)."""
    if isinstance(block, int | float) and not isinstance(block, bool):
        return sample([block])
    if not isinstance(block, dict):
        return None
    if isinstance(block.get("runs"), list):
        return sample(block["runs"])
    p50 = block.get("p50", block.get("median"))
    if isinstance(p50, int | float) and not isinstance(p50, bool):
        low, high = float(block.get("min", p50)), float(block.get("max", p50))
        return Sample(n=int(block.get("n", 1)), median=float(p50), low=low, high=high,
                      q1=float(block.get("q1", low)), q3=float(block.get("q3", high)))
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """``ours`` against ``baseline``: ratio of medians (> 1 is better for ours when
    ``higher_is_better``, inverted otherwise) and whether the difference is within noise."""

    ratio: float
    within_noise: bool

    def fmt(self) -> str:
        """``0.93x`` or ``0.98x (within noise)``."""
        return f"{self.ratio:.2f}x" + (" (within noise)" if self.within_noise else "")


def compare(ours: Sample | None, baseline: Sample | None, *, higher_is_better: bool = True) -> Comparison | None:
    """The comparison of two samples (spec RP6), or None when either is missing or zero."""
    if ours is None or baseline is None or ours.median == 0 or baseline.median == 0:
        return None
    ratio = ours.median / baseline.median if higher_is_better else baseline.median / ours.median
    noise = max(ours.iqr, baseline.iqr)
    return Comparison(ratio=ratio, within_noise=abs(ours.median - baseline.median) <= noise and noise > 0)


def _field(record: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def record_time(record: dict[str, Any]) -> float:
    """A record's ``timestamp`` as POSIX seconds; 0 when missing or unreadable."""
    try:
        return datetime.fromisoformat(str(record.get("timestamp"))).timestamp()
    except (ValueError, OverflowError, OSError):
        return 0.0


def pick_baseline(run: dict[str, Any], baselines: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline a bench run's decode tokens/s is compared with (spec RP3): an ok
    ``transformers_generate`` (``mlx_lm_generate`` first for backend "mlx") with the same model
    and prompt_tokens, preferring the same commit and machine, then the nearest timestamp.
    None for a run against a remote cluster (``target: url``): a baseline measures the
    client's machine, not the cluster."""
    if _field(run, "config", "target") == "url":
        return None
    names = ["mlx_lm_generate", "transformers_generate"] if _field(run, "config", "backend") == "mlx" \
        else ["transformers_generate"]
    for name in names:
        found = [b for b in baselines if b.get("name") == name and b.get("status") == "ok"
                 and from_block(_field(b, "results", "decode_tok_s")) is not None
                 and _field(b, "config", "model") == _field(run, "config", "model")
                 and _field(b, "config", "prompt_tokens") == _field(run, "config", "prompt_tokens")]
        if found:
            return min(found, key=lambda b: (b.get("commit") != run.get("commit"),
                                             _field(b, "machine", "cpu") != _field(run, "machine", "cpu"),
                                             abs(record_time(b) - record_time(run))))
    return None
