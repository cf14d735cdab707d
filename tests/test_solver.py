"""The cost model, the placement optimizer and `python -m mesh plan` against specs/placement.md."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import PlacementError
from mesh.placement.costmodel import (
    Device,
    Link,
    ModelSpec,
    PlacementPlan,
    StagePlan,
    Topology,
    memory_needed,
    predict,
)
from mesh.placement.solver import Request, baseline_plan, score, solve

GIB = 1 << 30
SMALL = ModelSpec.from_dimensions(name="tiny", num_layers=12, hidden_size=512, intermediate_size=1536,
                                  num_attention_heads=8, num_key_value_heads=2, vocab_size=8000, dtype_bytes=2)
EIGHT_B = ModelSpec.from_dimensions(name="llama-3.1-8b", num_layers=32, hidden_size=4096, intermediate_size=14336,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, dtype_bytes=2)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dev(name: str, gib: float, tflops: float = 10.0, gbps: float = 100.0) -> Device:
    return Device(id=name, memory_bytes=int(gib * GIB), flops=tflops * 1e12, memory_bandwidth_bytes_per_s=gbps * 1e9)


def full_mesh(devices: list[Device], latency_s: float = 1e-4, bandwidth: float = 1.25e9) -> Topology:
    links = tuple(Link(a=a.id, b=b.id, latency_s=latency_s, bandwidth_bytes_per_s=bandwidth)
                  for i, a in enumerate(devices) for b in devices[i + 1:])
    return Topology(devices=tuple(devices), links=links)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[Topology, Request]:
    n = draw(st.integers(1, 6))
    devices = [Device(id=f"d{i}", memory_bytes=draw(st.sampled_from([0, 1, 2, 3, 5, 8, 16, 40])) * GIB // 8,
                      flops=draw(st.sampled_from([1e12, 5e12, 2e13, 1e14])),
                      memory_bandwidth_bytes_per_s=draw(st.sampled_from([5e10, 1e11, 4e11, 8e11])))
               for i in range(n)]
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            if draw(st.booleans()) or n <= 2:
                links.append(Link(a=f"d{i}", b=f"d{j}", latency_s=draw(st.sampled_from([1e-5, 1e-4, 5e-3])),
                                  bandwidth_bytes_per_s=draw(st.sampled_from([1e7, 1.25e8, 1.25e9, 5e9]))))
    context = draw(st.sampled_from([256, 2048, 8192]))
    return Topology(devices=tuple(devices), links=tuple(links)), Request(
        context_tokens=context, prompt_tokens=draw(st.integers(1, context)), new_tokens=draw(st.sampled_from([1, 32, 256])))


def _check_plan(plan: PlacementPlan, model: ModelSpec, topology: Topology, request: Request) -> None:
    for role in ("prefill", "decode"):
        stages = plan.role_stages(role)
        start = 0
        for stage in stages:  # P11: contiguous, non-empty, every layer exactly once per role
            assert stage.layer_start == start and stage.layer_end > stage.layer_start
            start = stage.layer_end
        assert start == model.num_layers
    need = memory_needed(plan, model, context_tokens=request.context_tokens, prompt_tokens=request.prompt_tokens)
    for device, nbytes in need.items():  # P11: budgets, KV at the configured context included
        assert 0 < nbytes <= topology.device(device).memory_bytes


@pytest.mark.spec("P11", "P13", "P14")
@PROPERTY
@given(clusters(), st.sampled_from(["ttft", "decode", "goodput"]))
def test_random_clusters(case: tuple[Topology, Request], objective: str) -> None:
    topology, request = case
    try:
        solution = solve(topology, SMALL, request, objective=objective)
    except PlacementError as exc:
        assert "needs" in str(exc) and "largest context" in str(exc)
        base = baseline_plan(topology, SMALL, request)  # P14: the baseline does not fit the budgets either
        assert base is None or any(
            nbytes > topology.device(d).memory_bytes for d, nbytes in memory_needed(
                base, SMALL, context_tokens=request.context_tokens, prompt_tokens=request.prompt_tokens).items())
        return
    _check_plan(solution.plan, SMALL, topology, request)
    assert all(topology.device(d).usable for s in solution.plan.stages for d in s.devices)
    ours = score(solution.predicted, objective)
    if solution.baseline_predicted is not None:  # P13: never predicted worse than the baseline
        assert ours <= score(solution.baseline_predicted, objective) + 1e-12
    for d in topology.devices:  # P13: nor than any device alone that holds the model
        alone = PlacementPlan(stages=(StagePlan(devices=(d.id,), layer_start=0, layer_end=SMALL.num_layers),))
        need = memory_needed(alone, SMALL, context_tokens=request.context_tokens, prompt_tokens=request.prompt_tokens)
        if d.usable and need[d.id] <= d.memory_bytes:
            assert ours <= score(predict(alone, topology, SMALL, prompt_tokens=request.prompt_tokens,
                                         new_tokens=request.new_tokens), objective) + 1e-12


@pytest.mark.spec("P12")
@PROPERTY
@given(clusters(), st.randoms(use_true_random=False))
def test_same_input_same_plan_in_any_device_order(case: tuple[Topology, Request], rnd: random.Random) -> None:
    topology, request = case
    shuffled = list(topology.devices)
    rnd.shuffle(shuffled)
    other = Topology(devices=tuple(shuffled), links=tuple(reversed(topology.links)))
    try:
        a = solve(topology, SMALL, request)
    except PlacementError as exc:
        with pytest.raises(PlacementError) as again:
            solve(other, SMALL, request)
        assert str(again.value) == str(exc)
        return
    b = solve(other, SMALL, request)
    assert a.plan == b.plan and a.predicted == b.predicted


@pytest.mark.spec("P9")
def test_model_spec_counts_match_transformers(default_model: object) -> None:
    from mesh.placement.pipeline import model_size

    spec = ModelSpec.from_config(default_model.config, name="smollm2", dtype_bytes=4)  # type: ignore[attr-defined]
    size = model_size(default_model)  # type: ignore[arg-type]
    assert spec.num_layers == size.num_layers == 30
    assert spec.layer_bytes == size.layer_bytes  # q, k, v, o, gated MLP, two norms
    assert spec.kv_bytes_per_token_per_layer == size.kv_bytes_per_token_per_layer  # GQA: kv heads only
    assert spec.layer_flops_per_token == 2 * spec.layer_bytes / 4
    assert spec.embed_bytes + spec.head_bytes == size.edge_bytes  # tied head: a copy on the last stage


@pytest.mark.spec("P10")
def test_roofline_prefill_compute_bound_decode_bandwidth_bound() -> None:
    one = PlacementPlan(stages=(StagePlan(devices=("a",), layer_start=0, layer_end=EIGHT_B.num_layers),))

    def run(**kw: float) -> tuple[float, float]:
        topo = Topology(devices=(dev("a", 64, **kw),))
        p = predict(one, topo, EIGHT_B, prompt_tokens=4096, new_tokens=64)
        return p.ttft_s, p.decode_tokens_per_s

    ttft, rate = run(tflops=20, gbps=400)
    ttft_f, rate_f = run(tflops=40, gbps=400)
    ttft_b, rate_b = run(tflops=20, gbps=800)
    assert ttft_f == pytest.approx(ttft / 2, rel=0.02) and rate_f == pytest.approx(rate, rel=0.02)
    assert rate_b == pytest.approx(rate * 2, rel=0.02) and ttft_b == pytest.approx(ttft, rel=0.02)
    # a 16 GB model at 400 GB/s reads its weights in 40 ms per token (plus KV)
    assert 1 / rate == pytest.approx((EIGHT_B.num_layers * (EIGHT_B.layer_bytes + EIGHT_B.kv_bytes_per_token_per_layer
                                                            * (4096 + 32)) + EIGHT_B.head_bytes) / 400e9, rel=1e-6)


@pytest.mark.spec("P10")
def test_hops_cost_latency_plus_bytes_and_missing_links_are_unreachable() -> None:
    a, b = dev("a", 8), dev("b", 8)
    plan = PlacementPlan(stages=(StagePlan(devices=("a",), layer_start=0, layer_end=16),
                                 StagePlan(devices=("b",), layer_start=16, layer_end=32)))
    fast = predict(plan, full_mesh([a, b], 1e-4, 1e10), EIGHT_B, prompt_tokens=1000)
    slow = predict(plan, full_mesh([a, b], 1e-2, 1e10), EIGHT_B, prompt_tokens=1000)
    assert slow.ttft_s - fast.ttft_s == pytest.approx(1e-2 - 1e-4, rel=1e-6)
    assert 1 / slow.decode_tokens_per_s - 1 / fast.decode_tokens_per_s == pytest.approx(2 * (1e-2 - 1e-4), rel=1e-6)
    assert math.isinf(predict(plan, Topology(devices=(a, b)), EIGHT_B, prompt_tokens=10).ttft_s)


@pytest.mark.spec("P10", "P13")
def test_disaggregation_spark_and_mac_studio() -> None:
    """The published pair: DGX Spark prefills (FLOP-rich), the M3 Ultra decodes (bandwidth-rich)."""
    spark = Device(id="spark", memory_bytes=100 * GIB, flops=100e12, memory_bandwidth_bytes_per_s=273e9)
    studio = Device(id="studio", memory_bytes=400 * GIB, flops=28e12, memory_bandwidth_bytes_per_s=819e9)
    request = Request(context_tokens=16384, prompt_tokens=8192, new_tokens=32)
    pair = solve(full_mesh([spark, studio]), EIGHT_B, request, objective="goodput")
    alone = solve(Topology(devices=(studio,)), EIGHT_B, request, objective="goodput")
    roles = {s.role: s.devices for s in pair.plan.stages}
    assert roles == {"prefill": ("spark",), "decode": ("studio",)}
    assert alone.predicted.e2e_s / pair.predicted.e2e_s >= 2.5


@pytest.mark.spec("P13")
def test_a_very_slow_link_drops_a_device() -> None:
    a, b = dev("a", 20, tflops=20, gbps=400), dev("b", 20, tflops=20, gbps=400)
    fast = solve(full_mesh([a, b], 1e-5, 1e11), EIGHT_B, Request(context_tokens=4096, prompt_tokens=2048),
                 objective="decode")
    slow = solve(full_mesh([a, b], 0.5, 1e5), EIGHT_B, Request(context_tokens=4096, prompt_tokens=2048),
                 objective="decode")
    assert [len(s.devices) for s in slow.plan.stages] == [1]  # one device holds it: the link only costs
    alone = predict(slow.plan, Topology(devices=(a,)), EIGHT_B, prompt_tokens=2048, new_tokens=256)
    assert slow.predicted.decode_tokens_per_s == pytest.approx(alone.decode_tokens_per_s)
    assert fast.predicted.decode_tokens_per_s >= slow.predicted.decode_tokens_per_s  # a fast link may pay


@pytest.mark.spec("P11", "P14")
@pytest.mark.parametrize("case", ["below_one_layer", "integer_layers", "zero_memory", "kv_dominates"])
def test_hard_cases(case: str) -> None:
    request = Request(context_tokens=2048, prompt_tokens=512)
    whole = memory_needed(PlacementPlan(stages=(StagePlan(devices=("x",), layer_start=0,
                                                          layer_end=SMALL.num_layers),)),
                          SMALL, context_tokens=2048, prompt_tokens=512)["x"]
    if case == "below_one_layer":  # a device that cannot hold one layer gets none
        topo = full_mesh([Device(id="tiny", memory_bytes=SMALL.layer_bytes // 2, flops=1e15,
                                 memory_bandwidth_bytes_per_s=1e13), dev("big", whole / GIB * 1.01)])
        solution = solve(topo, SMALL, request)
        assert {d for s in solution.plan.stages for d in s.devices} == {"big"}
    elif case == "integer_layers":  # enough bytes in total, but no device takes a whole layer's share
        per = whole // 2
        topo = full_mesh([dev("a", per / GIB * 0.99), dev("b", per / GIB * 0.99)])
        with pytest.raises(PlacementError, match=r"needs .* GiB .* usable across 2 device"):
            solve(topo, SMALL, request)
    elif case == "zero_memory":  # zero or unknown memory is unusable, with a precise error
        topo = Topology(devices=(Device(id="z", memory_bytes=0, flops=1e12, memory_bandwidth_bytes_per_s=1e11),))
        with pytest.raises(PlacementError, match=r"0\.00 GiB usable across 0 device"):
            solve(topo, SMALL, request)
    else:  # at a long context the KV cache, not the weights, decides; the error names what fits
        long = Request(context_tokens=1 << 20, prompt_tokens=512)
        topo = Topology(devices=(dev("a", whole / GIB * 2),))
        with pytest.raises(PlacementError) as err:
            solve(topo, SMALL, long)
        fits = int(str(err.value).rsplit("largest context that would fit: ", 1)[1].split()[0])
        assert 2048 < fits < 1 << 20
        solve(topo, SMALL, Request(context_tokens=fits, prompt_tokens=512))
        with pytest.raises(PlacementError):
            solve(topo, SMALL, Request(context_tokens=fits + 64, prompt_tokens=512))


@pytest.mark.spec("P15", "P20")
def test_plan_cli_contract(tmp_path: Path) -> None:
    topo = {"devices": [{"id": "spark", "memory_bytes": 100 * GIB, "flops": 1e14, "memory_bandwidth_bytes_per_s": 2.73e11,
                         "backend": "torch"},
                        {"id": "studio", "memory_bytes": 400 * GIB, "flops": 2.8e13,
                         "memory_bandwidth_bytes_per_s": 8.19e11, "backend": "mlx"}],
            "links": [{"a": "spark", "b": "studio", "latency_s": 1e-4, "bandwidth_bytes_per_s": 1.25e9}]}
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(topo))

    def run(*args: str) -> tuple[int, str, str]:
        out = subprocess.run([sys.executable, "-m", "mesh", "plan", *args], capture_output=True, text=True, timeout=120)
        return out.returncode, out.stdout, out.stderr

    code, out, _ = run("--topology", str(path), "--model", "llama-3.1-8b", "--context", "16384", "--json")
    result = json.loads(out)
    assert code == 0 and result["feasible"] and result["error"] is None
    assert set(result) >= {"feasible", "error", "stages", "memory_bytes", "predicted", "baseline"}
    assert all(set(s) == {"devices", "layer_start", "layer_end", "role"} for s in result["stages"])
    assert {s["role"] for s in result["stages"]} <= {"both", "prefill", "decode"}
    assert set(result["predicted"]) >= {"ttft_s", "decode_tokens_per_s"}
    assert set(result["baseline"]["predicted"]) >= {"ttft_s", "decode_tokens_per_s"}
    assert all(isinstance(v, int) for v in result["memory_bytes"].values())
    code, out, _ = run("--topology", str(path), "--model", "llama-3.1-70b", "--context", "1048576", "--json")
    result = json.loads(out)
    assert code == 2 and not result["feasible"] and "largest context" in result["error"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": [{"id": "x", "memory_bytes": -5, "flops": 1, "memory_bandwidth_bytes_per_s": 1}]}))
    code, out, err = run("--topology", str(bad), "--model", "llama-3.1-8b")
    assert code == 2 and "devices[0].memory_bytes" in err and "Traceback" not in err
    code, out, err = run("--topology", str(bad), "--model", "llama-3.1-8b", "--json")  # stdout: the contract's object
    assert code == 2 and not json.loads(out)["feasible"] and "devices[0].memory_bytes" in json.loads(out)["error"]
    code, _, err = run("--topology", str(path), "--objective", "fastest")
    assert code == 2 and "ttft" in err and "goodput" in err
    # spec P20: a directory with config.json only (a MoE model), quantized or not
    from tests.test_model_sizes import QWEN3_30B_A3B

    folder = tmp_path / "Qwen3-30B-A3B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    used = {}
    for quantize in ("none", "int4"):
        code, out, err = run("--topology", str(path), "--model", str(folder), "--quantize", quantize, "--json")
        assert code == 0, err
        used[quantize] = sum(json.loads(out)["memory_bytes"].values())
    assert used["int4"] < 0.4 * used["none"]
    code, _, err = run("--topology", str(path), "--model", str(folder), "--quantize", "int4", "--bits", "3")
    assert code == 2 and "--bits or --quantize" in err


@pytest.mark.spec("P18")
def test_a_manual_placement_is_checked_against_the_budgets() -> None:
    from mesh.placement.solver import validate_plan

    topo = full_mesh([dev("a", 0.02), dev("b", 8)])
    request = Request(context_tokens=2048, prompt_tokens=512)

    def plan(*ranges: tuple[str, int, int]) -> PlacementPlan:
        return PlacementPlan(stages=tuple(StagePlan(devices=(d,), layer_start=a, layer_end=b) for d, a, b in ranges))

    need = validate_plan(plan(("b", 0, 12)), topo, SMALL, request)
    assert set(need) == {"b"} and need["b"] <= 8 * GIB
    with pytest.raises(PlacementError, match=r"device a needs .* GiB for its 6 layers \+ KV at 2048 tokens; it has 0.02"):
        validate_plan(plan(("a", 0, 6), ("b", 6, 12)), topo, SMALL, request)
    with pytest.raises(PlacementError, match="contiguous"):
        validate_plan(plan(("b", 0, 6), ("b", 7, 12)), topo, SMALL, request)
    with pytest.raises(PlacementError, match="cover 6 of 12"):
        validate_plan(plan(("b", 0, 6)), topo, SMALL, request)
    with pytest.raises(PlacementError, match="no device 'zz'"):
        validate_plan(plan(("zz", 0, 12)), topo, SMALL, request)


@pytest.mark.spec("P10", "P13")
def test_a_tensor_parallel_pair_only_where_the_link_pays() -> None:
    """Two bandwidth-bound devices: splitting every layer halves what each reads per token,
    which pays over Thunderbolt-class links and not over 1 GbE."""
    a, b = dev("a", 10, tflops=20, gbps=400), dev("b", 10, tflops=20, gbps=400)
    request = Request(context_tokens=4096, prompt_tokens=1024, new_tokens=256)
    fast = solve(full_mesh([a, b], 5e-6, 8e9), EIGHT_B, request, objective="decode")
    assert [s.devices for s in fast.plan.stages] == [("a", "b")]
    alone_rate = 1 / (EIGHT_B.num_layers * (EIGHT_B.layer_bytes + EIGHT_B.kv_bytes_per_token_per_layer * 1152)
                      / 400e9)
    assert fast.predicted.decode_tokens_per_s > 1.3 * alone_rate * 0.9  # most of the 2x, less the all-reduces
    slow = solve(full_mesh([a, b], 1e-3, 1.25e8), EIGHT_B, request, objective="decode")
    assert all(len(s.devices) == 1 for s in slow.plan.stages)
    plain = solve(full_mesh([a, b], 5e-6, 8e9), EIGHT_B, request, objective="decode", tensor_parallel=False)
    assert all(len(s.devices) == 1 for s in plain.plan.stages)  # no member offers a trusted link
    only_a = solve(full_mesh([a, b], 5e-6, 8e9), EIGHT_B, request, objective="decode", tensor_parallel={"a"})
    assert all(len(s.devices) == 1 for s in only_a.plan.stages)


@pytest.mark.spec("P10", "N26")
def test_groups_larger_than_pairs_where_the_model_splits_and_the_links_pay() -> None:
    """Four bandwidth-bound devices on Thunderbolt-class links, a model that splits in 2 and 4:
    the group of four wins; a device that may not form groups is left out of them; sizes
    the model does not split into are never proposed."""
    devices = [dev(n, 10, tflops=20, gbps=400) for n in "abcd"]
    request = Request(context_tokens=4096, prompt_tokens=1024, new_tokens=256)
    four = solve(full_mesh(devices, 5e-6, 8e9), EIGHT_B, request, objective="decode", group_sizes=(2, 4))
    assert [s.devices for s in four.plan.stages] == [("a", "b", "c", "d")]
    three = solve(full_mesh(devices, 5e-6, 8e9), EIGHT_B, request, objective="decode", group_sizes=(2, 4),
                  tensor_parallel={"a", "b", "c"})
    assert [s.devices for s in three.plan.stages] == [("a", "b")]  # 3 does not divide; d may not join
    assert four.predicted.decode_tokens_per_s > 1.5 * three.predicted.decode_tokens_per_s
    mixed = solve(full_mesh(devices, 5e-6, 8e9), EIGHT_B, request, objective="decode", group_sizes=(2, 4),
                  tensor_parallel={"a": "torch", "b": "mlx", "c": "mlx", "d": "torch"})
    assert sorted(s.devices for s in mixed.plan.stages if len(s.devices) > 1) in ([("a", "d")], [("b", "c")])
    assert not any(len(s.devices) == 4 for s in mixed.plan.stages)  # a group is of one library


@pytest.mark.spec("P13", "P11")
def test_a_group_as_one_stage_of_a_pipeline_where_a_fast_pair_holds_part_of_the_model() -> None:
    """Two fast devices on a Thunderbolt-class cable that together hold only part of the model,
    and a big slow device: the pair runs its part as a tensor-parallel stage and the big one the
    rest, faster than the plain pipeline; each member holds half of the group's layers."""
    a, b = dev("a", 7, tflops=20, gbps=400), dev("b", 7, tflops=20, gbps=400)
    big = dev("c", 64, tflops=10, gbps=100)
    links = (Link(a="a", b="b", latency_s=5e-6, bandwidth_bytes_per_s=8e9),
             Link(a="a", b="c", latency_s=1e-4, bandwidth_bytes_per_s=1.25e9),
             Link(a="b", b="c", latency_s=1e-4, bandwidth_bytes_per_s=1.25e9))
    topology = Topology(devices=(a, b, big), links=links)
    request = Request(context_tokens=4096, prompt_tokens=1024, new_tokens=256)
    got = solve(topology, EIGHT_B, request, objective="decode", tensor_parallel={"a", "b"})
    grouped = [s for s in got.plan.stages if len(s.devices) > 1]
    assert [s.devices for s in grouped] == [("a", "b")] and len(got.plan.stages) == 2, got.plan
    assert sum(s.layers for s in got.plan.stages) == EIGHT_B.num_layers  # P11: every layer once
    plain = solve(topology, EIGHT_B, request, objective="decode", tensor_parallel=False)
    assert all(len(s.devices) == 1 for s in plain.plan.stages)
    assert got.predicted.decode_tokens_per_s > 1.1 * plain.predicted.decode_tokens_per_s
    need = memory_needed(got.plan, EIGHT_B, context_tokens=4096, prompt_tokens=1024)
    assert need["a"] == need["b"] and all(need[d] <= topology.device(d).memory_bytes for d in need)
