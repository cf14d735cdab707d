"""Predicted beside measured performance of the running cluster (specs/placement.md P16)."""

from __future__ import annotations

import pytest

from mesh.kernel.crdt import ClusterState
from mesh.kernel.hlc import Timestamp
from mesh.kernel.records import ClusterView, link_key, member_key, resources_key
from mesh.placement.costmodel import ModelSpec
from mesh.placement.perf import (
    Measured,
    predicted,
    profile_key,
    profile_record,
    topology,
)
from mesh.placement.pipeline import Plan, Stage

SPEC = ModelSpec.from_dimensions(name="tiny", num_layers=4, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100, dtype_bytes=4)


def _state(values: dict[str, object]) -> ClusterView:
    state = ClusterState()
    for seq, (key, value) in enumerate(sorted(values.items()), start=1):
        state.apply(dot=("n", seq), hlc=Timestamp(physical_ms=seq, counter=0), key=key, value=value, replaces=[])
    return ClusterView(state)


def _member(i: str) -> dict[str, object]:
    return {member_key(i): {"address": f"127.0.0.1:{i}", "api": "127.0.0.1:1", "incarnation": "x"},
            resources_key(i): {"backend": "torch", "memory_bytes": 1 << 30}}


@pytest.mark.spec("P16")
def test_prediction_needs_profiles_and_links_then_follows_the_cost_model() -> None:
    plan = Plan(num_layers=4, stages=(Stage(member_id="1", layer_start=0, layer_end=2),
                                      Stage(member_id="2", layer_start=2, layer_end=4)))
    base = {**_member("1"), **_member("2")}
    assert predicted(_state(base), plan, SPEC, "f32", prompt_tokens=16, new_tokens=8) is None
    profiles = {profile_key("1"): profile_record({"f32": 1e11}, 1e10, "cpu"),
                profile_key("2"): profile_record({"f32": 2e11, "bf16": 4e11}, 2e10, "cpu")}
    assert predicted(_state({**base, **profiles}), plan, SPEC, "f32", prompt_tokens=16, new_tokens=8) is None  # no link yet
    links = {link_key("1", "2"): {"transport": "tcp", "rtt_p50_s": 0.002, "rtt_p99_s": 0.004,
                                  "throughput_bytes_per_s": 1e9, "samples": 5},
             link_key("2", "1"): {"transport": "tcp", "rtt_p50_s": 0.002, "rtt_p99_s": 0.004,
                                  "throughput_bytes_per_s": 5e8, "samples": 5}}
    view = _state({**base, **profiles, **links})
    topo = topology(view, "f32")
    assert [(d.id, d.flops, d.memory_bandwidth_bytes_per_s) for d in topo.devices] == [("1", 1e11, 1e10), ("2", 2e11, 2e10)]
    link = topo.link("1", "2")
    assert link is not None and link.latency_s == 0.001 and link.bandwidth_bytes_per_s == 1e9  # the better direction
    got = predicted(view, plan, SPEC, "f32", prompt_tokens=16, new_tokens=8)
    assert got is not None and got["ttft_s"] > 0.001 and 0 < got["decode_tokens_per_s"] < 1 / 0.001
    assert topology(view, "bf16").devices[0].id == "2"  # only members with that dtype measured


@pytest.mark.spec("P16")
def test_measured_medians() -> None:
    measured = Measured()
    assert measured.summary() is None
    for i in range(100):
        measured.record(prompt_tokens=10 + i, new_tokens=11, ttft_s=0.1, decode_s=0.5)
    summary = measured.summary()
    assert summary is not None and summary["requests"] == 64 and summary["ttft_s"] == 0.1
    assert summary["decode_tokens_per_s"] == pytest.approx(20.0) and summary["prompt_tokens"] == 10 + 36 + 31
