"""Smoke test of `python -m mesh bench-placement` on its smallest profile (spark+studio)."""

from __future__ import annotations

import json

import pytest

from mesh.tools.bench_placement import EXO_REFERENCE, PROFILES, bench_profile


@pytest.mark.spec("P13")
def test_bench_placement_smallest_profile() -> None:
    result = bench_profile("spark+studio", seed=0, repeats=1)
    json.dumps(result)  # everything goes to the JSON line
    assert result["profile"] == "spark+studio" and result["devices"] == 2
    assert {d["id"] for d in result["topology"]["devices"]} == {"spark", "studio"}
    (case,) = result["cases"]
    assert case["model"] == "llama-3.1-8b" and case["objective"] == "goodput" and case["error"] is None
    assert case["request"] == {"context_tokens": 16384, "prompt_tokens": 8192, "new_tokens": 32}
    for key in ("ours", "baseline", "best_single"):
        assert set(case[key]["predicted"]) >= {"ttft_s", "decode_tokens_per_s", "e2e_s"}
    assert case["solves"] == 1 and case["solve_ms_median"] > 0
    assert set(case["singles"]) == {"spark", "studio"}
    # ours is never predicted worse than the baseline or the best single device (P13)
    assert case["speedup_vs_baseline"] >= 1 - 1e-9
    assert case["speedup_vs_best_single"] >= 1 - 1e-9
    ours = case["ours"]["predicted"]
    assert ours["e2e_s"] <= case["baseline"]["predicted"]["e2e_s"] * (1 + 1e-9)
    roles = {s["role"]: s["devices"] for s in case["ours"]["stages"]}
    assert roles == {"prefill": ["spark"], "decode": ["studio"]}  # the published split
    versus = result["vs_mac_studio_alone"]
    assert versus["speedup"] == pytest.approx(case["singles"]["studio"]["e2e_s"] / ours["e2e_s"])
    assert versus["published"] is EXO_REFERENCE


def test_profiles_are_named_and_unknown_names_fail() -> None:
    assert [p.name for p in PROFILES] == ["spark+studio", "home-4", "random-16", "random-64"]
    with pytest.raises(ValueError, match="unknown profile"):
        bench_profile("nope")
