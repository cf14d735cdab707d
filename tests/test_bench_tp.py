"""bench-tp's pure parts: the link a group's measured all-reduce implies, and the prediction of a
group's decode step from its members' calibrations (spec P10, P19)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.placement.costmodel import ModelSpec, allreduce_s, head_s
from mesh.tools.bench_tp import predict_step, probed_link

SPEC = ModelSpec.from_dimensions(name="m@bf16", num_layers=12, hidden_size=768, intermediate_size=2304,
                                 num_attention_heads=12, num_key_value_heads=6, vocab_size=32000, dtype_bytes=2)


@pytest.mark.spec("P10")
@given(k=st.integers(2, 8), measured=st.floats(1e-5, 1e-2), bandwidth=st.floats(1e8, 1e11))
def test_the_probed_link_reproduces_the_measured_all_reduce(k: int, measured: float, bandwidth: float) -> None:
    latency, kept = probed_link(k, measured, 1536, bandwidth)
    assert kept == bandwidth
    if measured > 2 * (k - 1) / k * 1536 / bandwidth:
        assert math.isclose(allreduce_s(k, 1536, kept, latency), measured, rel_tol=1e-9)


@pytest.mark.spec("P10", "P19")
def test_a_group_step_is_its_members_calibrated_share_plus_its_all_reduces() -> None:
    profile = SimpleNamespace(flops={"bf16": 4e11}, memory_bandwidth_bytes_per_s=2e10)
    cal = {"model": SPEC.name, "decode_layer_s": 2e-3, "prefill_layer_s": 1e-3, "prefill_token_layer_s": 1e-5}
    one, _ = predict_step(1, 2, 2, profile, "bf16", cal, SPEC, (1e-4, 1e9), prompt=64, steps=40)
    two, reduce = predict_step(2, 1, 2, profile, "bf16", cal, SPEC, (1e-4, 1e9), prompt=64, steps=40)
    assert math.isclose(reduce, allreduce_s(2, SPEC.hidden_bytes, 1e9, 1e-4))
    # half of each layer on each member (both calibrated at their thread), two all-reduces per layer,
    # the LM head whole on a member of half the machine, and the next token's way to the members
    head = head_s(SPEC, 2e11, 1e10) - head_s(SPEC, 4e11, 2e10)
    assert two - one == pytest.approx(12 * (2 * reduce - 2e-3 / 2) + head + 1e-4 + 8 / 1e9, rel=1e-6)


@pytest.mark.spec("P10")
def test_the_published_table_compares_each_library_with_its_own_single_device() -> None:
    """bench-tp records of torch and MLX at one commit: one row per library and size, each
    group's "vs one device" against that library's size 1 (records without a backend are
    torch's), torch first."""
    from mesh.tools.benchstats import stats_block
    from mesh.tools.publish_text import Selection
    from mesh.tools.publish_tp import render_tensor_parallel

    def record(size: int, step: float, backend: str | None) -> dict:
        config = {"size": size, "threads": 2 // size, "dtype": "bf16", "model": "random llama",
                  "dimensions": {"num_hidden_layers": 12}} | ({"backend": backend} if backend else {})
        return {"kind": "tp", "status": "ok", "commit": "abc", "machine": {"cpu": "EPYC", "cores": 2},
                "timestamp": "2026-12-07T00:00:00+00:00", "config": config,
                "results": {"step_s": stats_block([step] * 3), "allreduce_s": stats_block([1e-4] * 3) if size > 1
                            else None, "predicted_step_s": step, "error": 0.0, "predicted_allreduce_s": 1e-4}}

    sel = Selection(commit="abc", skipped_dirty=0, records=[record(2, 0.080, "mlx"), record(1, 0.040, "mlx"),
                                                            record(2, 0.060, None), record(1, 0.020, None)])
    rows = [line for line in render_tensor_parallel(sel, "benchmarks/tensor-parallel.jsonl").splitlines()
            if line.startswith("| torch") or line.startswith("| mlx")]
    assert [r.split("|")[1:3] for r in rows] == [[" torch ", " 1 "], [" torch ", " 2 "], [" mlx ", " 1 "],
                                                 [" mlx ", " 2 "]]
    assert "0.33x" in rows[1] and "0.50x" in rows[3]  # 20 / 60 ms; 40 / 80 ms: each its own library's one device
