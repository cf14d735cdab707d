"""Predicted and measured performance of the running cluster (pure, sans-IO).

A member publishes its measured device profile as ``profile/<id>`` (``mesh/placement/profile.py``:
matmul FLOP/s per dtype, memory bandwidth) and its links' measurements as
``link/<from>/<to>`` (``mesh/node/linkstats.py``). From those and the members' offered memory this
module builds the cost model's ``Topology`` and predicts TTFT and decode tokens/s of the
current plan (``mesh/placement/costmodel.py``), shown in ``/v1/cluster`` beside what the coordinator
measured. Spec: specs/placement.md P16.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from mesh.errors import PlacementError
from mesh.kernel.records import ClusterView, profile_key
from mesh.placement.costmodel import (
    Calibration,
    Device,
    Link,
    ModelSpec,
    PlacementPlan,
    StagePlan,
    Topology,
    predict,
)
from mesh.placement.pipeline import Plan

MEASURED_WINDOW = 64  # requests kept for the measured figures



def profile_record(flops: dict[str, float], bandwidth_bytes_per_s: float, device: str,
                   calibration: Calibration | None = None, hardware: str = "",
                   load_bytes_per_s: float | None = None, collective: dict[str, Any] | None = None) -> dict[str, Any]:
    """The published value of a member's profile (FLOP/s per dtype, bytes/s), the hardware it
    was measured on (``profile.hardware``: members on the same hardware check each other's
    figures, spec P7), once its stage is loaded the stage's calibration (spec P19), the
    rate its last load read weights at (bytes of loaded weights per second, spec P21), and
    for a tensor-parallel group it leads, its collective as measured (``{"members": [ids],
    "seconds": s}``, spec P10)."""
    record: dict[str, Any] = {"flops": dict(sorted(flops.items())),
                              "memory_bandwidth_bytes_per_s": bandwidth_bytes_per_s, "device": device}
    if hardware:
        record["hardware"] = hardware
    if load_bytes_per_s is not None and _positive(load_bytes_per_s):
        record["load_bytes_per_s"] = float(load_bytes_per_s)
    if calibration is not None:
        record["calibration"] = calibration.to_wire()
    if collective is not None:
        record["collective"] = collective
    return record


PEER_RATIO = 3.0  # a figure this many times below the same hardware's median is a measurement gone wrong


def below_peers(flops: dict[str, float], bandwidth: float, peers: list[dict[str, Any]]) -> list[str]:
    """The figures of a profile (FLOP/s per dtype, bytes/s) more than ``PEER_RATIO`` times
    below the median of the same figure in ``peers`` (published profile records of other
    members on the same hardware), named; empty without peers. Noise is not the concern:
    the issue this catches is a profile timed while the CPU was busy (0.26 against 178
    GFLOP/s for one CPU, spec P7)."""
    out = []
    figures = {**{f"{dtype} FLOP/s": value for dtype, value in flops.items()}, "memory bandwidth": bandwidth}
    for name, mine in figures.items():
        theirs = []
        for record in peers:
            value = (record.get("flops") or {}).get(name.split()[0]) if name.endswith("FLOP/s") \
                else record.get("memory_bandwidth_bytes_per_s")
            if _positive(value):
                theirs.append(float(value))
        if theirs and mine * PEER_RATIO < statistics.median(theirs):
            out.append(f"{name} {mine:.3g} against {statistics.median(theirs):.3g}")
    return out


def _calibration(record: dict[str, Any], model: str | None) -> Calibration | None:
    """A published calibration for ``model``; None when absent, for another model, or malformed."""
    raw = record.get("calibration")
    if model is None or not isinstance(raw, dict) or raw.get("model") != model:
        return None
    try:
        return Calibration(model=model, decode_layer_s=raw["decode_layer_s"], prefill_layer_s=raw["prefill_layer_s"],
                           prefill_token_layer_s=raw["prefill_token_layer_s"], head_s=raw.get("head_s"))
    except (KeyError, PlacementError):
        return None


def topology(view: ClusterView, dtype: str, model: str | None = None) -> Topology:
    """Devices (members with a valid published profile for ``dtype``, with their calibration
    for ``model`` when given and published) and links (latency = median RTT / 2, bandwidth =
    probe throughput) from the cluster state."""
    devices = []
    for member in view.members():
        record = view.state.get(profile_key(member.member_id))
        if not isinstance(record, dict):
            continue
        flops, bandwidth = (record.get("flops") or {}), record.get("memory_bandwidth_bytes_per_s")
        rate = flops.get(dtype) if isinstance(flops, dict) else None
        if not isinstance(rate, int | float) or not isinstance(bandwidth, int | float) \
                or not _positive(rate) or not _positive(bandwidth):
            continue
        devices.append(Device(id=member.member_id, memory_bytes=member.memory_bytes, flops=float(rate),
                              memory_bandwidth_bytes_per_s=float(bandwidth), backend=member.backend,
                              calibration=_calibration(record, model)))
    ids = {d.id for d in devices}
    collectives = {}
    for member in view.members():  # spec P10: what a group's collective took, as its leader measured
        record = view.state.get(profile_key(member.member_id))
        found = record.get("collective") if isinstance(record, dict) else None
        members = found.get("members") if isinstance(found, dict) else None
        if (isinstance(members, list) and len(members) >= 2 and all(isinstance(m, str) and m in ids for m in members)
                and _positive(found.get("seconds"))):
            collectives[tuple(sorted(members))] = float(found["seconds"])
    best: dict[tuple[str, str], Link] = {}
    for row in view.links():
        a, b = sorted((row["from"], row["to"]))
        if a not in ids or b not in ids or not _positive(row["rtt_p50_s"]) or not _positive(row["throughput_bytes_per_s"]):
            continue
        link = Link(a=a, b=b, latency_s=row["rtt_p50_s"] / 2, bandwidth_bytes_per_s=row["throughput_bytes_per_s"])
        old = best.get((a, b))
        if old is None or link.bandwidth_bytes_per_s > old.bandwidth_bytes_per_s:
            best[(a, b)] = link
    return Topology(devices=tuple(devices), links=tuple(best[k] for k in sorted(best)),
                    collectives=tuple(sorted(collectives.items())))


def load_rates(view: ClusterView) -> dict[str, float]:
    """``{member id: bytes/s}``: the rate each member's last load read weights at, where its
    published profile says (spec P21)."""
    out = {}
    for member in view.members():
        record = view.state.get(profile_key(member.member_id))
        rate = record.get("load_bytes_per_s") if isinstance(record, dict) else None
        if _positive(rate):
            out[member.member_id] = float(rate)
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def solver_form(plan: Plan) -> PlacementPlan:
    """The cost model's ``PlacementPlan`` of a runtime ``Plan``: a stage's members (its
    tensor-parallel group, or its one member) as its devices, prefill
    stages in role ``prefill`` and the others ``decode`` (a disaggregated plan) or ``both``."""
    decode_role = "decode" if plan.prefill_stages else "both"
    return PlacementPlan(stages=tuple(
        StagePlan(devices=s.members, layer_start=s.layer_start, layer_end=s.layer_end,
                  role="prefill" if i < len(plan.prefill_stages) else decode_role)
        for i, s in enumerate(plan.all_stages)))


def predicted(view: ClusterView, plan: Plan | None, model: ModelSpec, dtype: str, *, prompt_tokens: int,
              new_tokens: int) -> dict[str, Any] | None:
    """The cost model's TTFT (s) and decode tokens/s for ``plan``; None until every stage's
    member has published a profile (and every hop a link measurement)."""
    if plan is None:
        return None
    topo = topology(view, dtype, model.name)
    ids = {d.id for d in topo.devices}
    if any(s.member_id not in ids for s in plan.all_stages):
        return None
    try:
        p = predict(solver_form(plan), topo, model, prompt_tokens=max(1, prompt_tokens), new_tokens=max(1, new_tokens))
    except PlacementError:
        return None
    if p.ttft_s == float("inf"):
        return None
    calibrated = all(topo.device(s.member_id).calibrated_for(model) is not None for s in plan.all_stages)
    return {"ttft_s": p.ttft_s, "decode_tokens_per_s": p.decode_tokens_per_s, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "calibrated": calibrated}


class Measured:
    """TTFT and decode rate of the last requests this node coordinated."""

    def __init__(self) -> None:
        self._rows: deque[tuple[int, int, float, float]] = deque(maxlen=MEASURED_WINDOW)

    def record(self, *, prompt_tokens: int, new_tokens: int, ttft_s: float, decode_s: float) -> None:
        """One finished request: prompt and generated tokens, TTFT and the seconds from the
        first token to the last."""
        if new_tokens >= 1 and ttft_s > 0:
            self._rows.append((prompt_tokens, new_tokens, ttft_s, decode_s))

    def summary(self) -> dict[str, Any] | None:
        """Medians over the window: prompt and new tokens, TTFT (s), decode tokens/s."""
        if not self._rows:
            return None
        rates = [(n - 1) / d for _, n, _, d in self._rows if n > 1 and d > 0]
        return {"requests": len(self._rows),
                "prompt_tokens": int(statistics.median(r[0] for r in self._rows)),
                "new_tokens": int(statistics.median(r[1] for r in self._rows)),
                "ttft_s": statistics.median(r[2] for r in self._rows),
                "decode_tokens_per_s": statistics.median(rates) if rates else None}
