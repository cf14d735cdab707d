"""Calibration of a loaded stage and its use by the cost model (specs/placement.md P19)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import StepOutput
from mesh.errors import PlacementError
from mesh.kernel.records import link_key
from mesh.placement.calibrate import (
    DECODE_STEPS,
    PREFILL_TOKENS,
    fastest,
    fit_calibration,
    time_stage,
)
from mesh.placement.costmodel import (
    Calibration,
    Device,
    ModelSpec,
    PlacementPlan,
    StagePlan,
    Topology,
    decode_stage_s,
    head_s,
    predict,
    prefill_stage_s,
)
from mesh.placement.perf import predicted, profile_key, profile_record, topology
from mesh.placement.pipeline import Plan, Stage
from tests.test_perf import SPEC, _member, _state

FLOPS, BANDWIDTH = 1e11, 2e10


def _stage(devices: tuple[str, ...] = ("a",), start: int = 0, end: int = 4) -> StagePlan:
    return StagePlan(devices=devices, layer_start=start, layer_end=end)


@pytest.mark.spec("P19")
@settings(max_examples=60, deadline=None)
@given(decode=st.floats(1e-5, 1e-2), fixed=st.floats(0, 1e-2), per_token=st.floats(1e-7, 1e-3),
       layers=st.integers(1, 40), last=st.booleans())
def test_fit_recovers_the_step_times_it_was_measured_from(decode: float, fixed: float, per_token: float,
                                                           layers: int, last: bool) -> None:
    """Stage times made by the cost model from a calibration give that calibration back."""
    model = ModelSpec.from_dimensions(name="m@f32", num_layers=40, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, dtype_bytes=4)
    truth = Calibration(model=model.name, decode_layer_s=decode, prefill_layer_s=fixed, prefill_token_layer_s=per_token)
    topo = Topology(devices=(Device(id="a", memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH,
                                    calibration=truth),))
    stage = _stage(end=layers)
    head = head_s(model, FLOPS, BANDWIDTH) if last else 0.0
    prefill = {p: prefill_stage_s(topo, model, stage, p) + head for p in PREFILL_TOKENS}
    # decode_stage_s adds the KV read at the context; time_stage measures at a short one
    step = layers * decode + head
    got = fit_calibration(model=model, layers=layers, prefill_s=prefill, decode_s=step, head_s=head, flops=FLOPS)
    assert got.model == "m@f32"
    assert math.isclose(got.decode_layer_s, decode, rel_tol=1e-6)
    assert math.isclose(got.prefill_token_layer_s, per_token, rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(got.prefill_layer_s, fixed, rel_tol=1e-6, abs_tol=1e-12)


@pytest.mark.spec("P19")
def test_fit_rejects_what_it_cannot_fit_and_stays_positive_under_noise() -> None:
    with pytest.raises(PlacementError):
        fit_calibration(model=SPEC, layers=0, prefill_s={8: 1.0, 128: 2.0}, decode_s=0.1, head_s=0.0, flops=FLOPS)
    with pytest.raises(PlacementError):
        fit_calibration(model=SPEC, layers=2, prefill_s={8: 1.0}, decode_s=0.1, head_s=0.0, flops=FLOPS)
    # the longer prompt measured faster (a noisy machine): no negative slope, still > 0
    got = fit_calibration(model=SPEC, layers=2, prefill_s={8: 0.02, 128: 0.01}, decode_s=0.004, head_s=0.0,
                          flops=FLOPS)
    assert got.prefill_token_layer_s >= 0 and got.prefill_layer_s >= 0
    assert got.prefill_layer_s + got.prefill_token_layer_s > 0
    with pytest.raises(PlacementError, match="decode_layer_s"):
        Calibration(model="m", decode_layer_s=math.nan, prefill_layer_s=0.0, prefill_token_layer_s=1e-4)
    # the cost model's head estimate above the measured step (seen: decode clamped to 0 ms/layer
    # and a prediction of 6.2 tok/s where 11-18 were measured): the layers keep half the step
    got = fit_calibration(model=SPEC, layers=30, prefill_s={8: 0.03, 128: 0.1}, decode_s=0.02, head_s=0.05,
                          flops=FLOPS)
    assert math.isclose(got.decode_layer_s, 0.01 / 30) and got.prefill_layer_s + got.prefill_token_layer_s > 0


class _FakeBackend:
    """Records forward calls; a step costs nothing."""

    def __init__(self, layer_start: int, *, last: bool = False, head: bool = True) -> None:
        self.layer_start = layer_start
        self.is_last, self.head = last, head
        self.calls: list[tuple[int, int, str]] = []
        self.caches = 0
        self.heads = 0

    def run_head(self) -> None:
        if not self.head:
            raise NotImplementedError("no head alone")
        self.heads += 1

    def new_cache(self) -> Any:
        self.caches += 1
        return object()

    def forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                hidden: Any = None) -> StepOutput:
        n = len(token_ids) if token_ids is not None else hidden.shape[1]
        self.calls.append((start_pos, n, "tokens" if token_ids is not None else f"hidden{list(hidden.shape)}"))
        return StepOutput(logits=None, hidden=None)


@pytest.mark.spec("P19")
@pytest.mark.parametrize("first", [True, False])
def test_time_stage_runs_each_prefill_twice_on_fresh_caches_then_decodes(first: bool) -> None:
    backend = _FakeBackend(0 if first else 3)
    prefill, decode, head = time_stage(backend, hidden_size=16)  # type: ignore[arg-type]
    assert sorted(prefill) == list(PREFILL_TOKENS) and all(t >= 0 for t in prefill.values()) and decode >= 0
    assert head is None and backend.heads == 0  # not a last stage: no head to time
    shapes = [c[2] for c in backend.calls]
    assert all(s == "tokens" for s in shapes) if first else all(s.startswith("hidden[1, ") for s in shapes)
    decodes = [c for c in backend.calls if c[1] == 1]
    assert len(decodes) == DECODE_STEPS
    assert [c[0] for c in decodes] == list(range(PREFILL_TOKENS[0], PREFILL_TOKENS[0] + DECODE_STEPS))
    assert backend.caches == 2 * len(PREFILL_TOKENS) + 1  # never a cache a request holds


@pytest.mark.spec("P19")
def test_calibration_replaces_the_roofline_only_for_its_model_and_members() -> None:
    cal = Calibration(model=SPEC.name, decode_layer_s=0.01, prefill_layer_s=0.002, prefill_token_layer_s=1e-4)
    plain = Device(id="a", memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH)
    calibrated = Device(id="a", memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH,
                        calibration=cal)
    other = Device(id="a", memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH,
                   calibration=Calibration(model="another@f32", decode_layer_s=0.01, prefill_layer_s=0.002,
                                           prefill_token_layer_s=1e-4))
    stage = _stage()
    roofline = Topology(devices=(plain,))
    assert decode_stage_s(Topology(devices=(other,)), SPEC, stage, 100) == decode_stage_s(roofline, SPEC, stage, 100)
    kv_read = SPEC.kv_bytes_per_token_per_layer * 100 / BANDWIDTH
    assert math.isclose(decode_stage_s(Topology(devices=(calibrated,)), SPEC, stage, 100), 4 * (0.01 + kv_read))
    attention = SPEC.attn_flops_per_position * 50 * 50 / 2 / FLOPS
    assert math.isclose(prefill_stage_s(Topology(devices=(calibrated,)), SPEC, stage, 50),
                        4 * (0.002 + 1e-4 * 50 + attention))
    # a tensor-parallel group: its slowest member's figures over k, plus the all-reduces; roofline
    # unless every member measured the model
    slow = Calibration(model=SPEC.name, decode_layer_s=0.02, prefill_layer_s=0.004, prefill_token_layer_s=2e-4)
    b = Device(id="b", memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH, calibration=slow)
    from mesh.placement.costmodel import Link

    pair = Topology(devices=(calibrated, b), links=(Link(a="a", b="b", latency_s=1e-4, bandwidth_bytes_per_s=1e9),))
    plain_b = Device(id="b", memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH)
    tp = _stage(("a", "b"))
    reduce = 2 * (2 * 1 / 2 * SPEC.hidden_bytes / 1e9 + 2 * 1e-4)  # two ring all-reduces of a token, k = 2
    assert math.isclose(decode_stage_s(pair, SPEC, tp, 100),
                        4 * (0.02 / 2 + SPEC.kv_bytes_per_token_per_layer * 100 / (2 * BANDWIDTH) + reduce))
    half_plain = Topology(devices=(calibrated, plain_b), links=pair.links)
    plain_pair = Topology(devices=(plain, plain_b), links=pair.links)
    assert decode_stage_s(half_plain, SPEC, tp, 100) == decode_stage_s(plain_pair, SPEC, tp, 100)
    plan = PlacementPlan(stages=(stage,))
    assert predict(plan, Topology(devices=(calibrated,)), SPEC, prompt_tokens=50, new_tokens=8).decode_tokens_per_s \
        < predict(plan, roofline, SPEC, prompt_tokens=50, new_tokens=8).decode_tokens_per_s  # 10 ms/layer is slow


@pytest.mark.spec("P19", "P16")
def test_published_calibration_reaches_the_prediction_for_its_model_only() -> None:
    cal = Calibration(model=SPEC.name, decode_layer_s=0.01, prefill_layer_s=0.002, prefill_token_layer_s=1e-4)
    plan = Plan(num_layers=4, stages=(Stage(member_id="1", layer_start=0, layer_end=2),
                                      Stage(member_id="2", layer_start=2, layer_end=4)))
    links = {link_key("1", "2"): {"transport": "tcp", "rtt_p50_s": 0.002, "rtt_p99_s": 0.004,
                                  "throughput_bytes_per_s": 1e9, "samples": 5}}
    base = {**_member("1"), **_member("2"), **links}
    bad = profile_record({"f32": FLOPS}, BANDWIDTH, "cpu") | {"calibration": {"model": SPEC.name, "decode_layer_s": -1}}
    state = {**base, profile_key("1"): profile_record({"f32": FLOPS}, BANDWIDTH, "cpu", calibration=cal),
             profile_key("2"): bad}
    view = _state(state)
    devices = {d.id: d for d in topology(view, "f32", SPEC.name).devices}
    assert devices["1"].calibration == cal and devices["2"].calibration is None  # malformed: ignored
    assert topology(view, "f32", "other@f32").devices[0].calibration is None
    assert topology(view, "f32").devices[0].calibration is None  # placement asks without a model
    got = predicted(view, plan, SPEC, "f32", prompt_tokens=16, new_tokens=8)
    assert got is not None and got["calibrated"] is False
    both = _state({**state, profile_key("2"): profile_record({"f32": FLOPS}, BANDWIDTH, "cpu", calibration=cal)})
    got = predicted(both, plan, SPEC, "f32", prompt_tokens=16, new_tokens=8)
    assert got is not None and got["calibrated"] is True
    assert got["decode_tokens_per_s"] < 1 / (4 * 0.01)  # four calibrated layers at 10 ms each, plus the rest


@pytest.mark.spec("P19")
def test_repeated_timings_keep_the_fastest_time_of_each_step() -> None:
    first = ({8: 0.02, 128: 0.30}, 0.010, 0.004)
    assert fastest(None, first) == first
    assert fastest(first, ({8: 0.03, 128: 0.20}, 0.012, 0.003)) == ({8: 0.02, 128: 0.20}, 0.010, 0.003)
    assert fastest(({8: 0.02, 128: 0.30}, 0.010, None), first) == first
    assert fastest(({8: 0.02, 128: 0.30}, 0.010, None), ({8: 0.02, 128: 0.30}, 0.010, None))[2] is None


@pytest.mark.spec("P19")
def test_a_last_stage_times_its_head_alone_when_the_backend_can() -> None:
    backend = _FakeBackend(0, last=True)
    *_, head = time_stage(backend, hidden_size=16)  # type: ignore[arg-type]
    assert head is not None and head >= 0 and backend.heads == 1 + 8  # one untimed, then the timed runs
    *_, head = time_stage(_FakeBackend(0, last=True, head=False), hidden_size=16)  # type: ignore[arg-type]
    assert head is None  # a plugin backend without run_head keeps the roofline estimate


@pytest.mark.spec("P19", "P10")
def test_a_measured_head_is_subtracted_published_and_priced_whole_on_every_group_member() -> None:
    """The head's own time replaces the roofline's (which said 3 ms where MLX on CPU took 30):
    the layers' figure is what is left, and a tensor-parallel group pays the head whole, at its
    slowest member's timing, while dividing the layers by k."""
    layers, per_layer, head = 30, 0.002, 0.04
    step = layers * per_layer + head
    got = fit_calibration(model=SPEC, layers=layers, prefill_s={8: 0.2, 128: 0.5}, decode_s=step,
                          head_s=0.003, flops=FLOPS, measured_head_s=head)
    assert math.isclose(got.decode_layer_s, per_layer) and got.head_s == head
    assert Calibration(**got.to_wire()) == got
    plain = fit_calibration(model=SPEC, layers=layers, prefill_s={8: 0.2, 128: 0.5}, decode_s=step,
                            head_s=0.003, flops=FLOPS)
    assert plain.head_s is None and "head_s" not in plain.to_wire()
    assert math.isclose(plain.decode_layer_s, (step - 0.003) / layers)
    # a head timed longer than the step (noise): the layers keep a share, never zero
    capped = fit_calibration(model=SPEC, layers=layers, prefill_s={8: 0.2, 128: 0.5}, decode_s=0.01,
                             head_s=0.003, flops=FLOPS, measured_head_s=0.05)
    assert capped.decode_layer_s > 0
    with pytest.raises(PlacementError, match="head_s"):
        Calibration(model="m", decode_layer_s=0.01, prefill_layer_s=0.0, prefill_token_layer_s=1e-4, head_s=-1.0)

    from mesh.placement.costmodel import Link

    def device(name: str, h: float | None) -> Device:
        cal = Calibration(model=SPEC.name, decode_layer_s=0.01, prefill_layer_s=0.002, prefill_token_layer_s=1e-4,
                          head_s=h)
        return Device(id=name, memory_bytes=1 << 30, flops=FLOPS, memory_bandwidth_bytes_per_s=BANDWIDTH,
                      calibration=cal)

    link = (Link(a="a", b="b", latency_s=1e-4, bandwidth_bytes_per_s=1e9),)
    whole = PlacementPlan(stages=(_stage(("a",), 0, SPEC.num_layers),))
    pair = PlacementPlan(stages=(_stage(("a", "b"), 0, SPEC.num_layers),))

    def step_s(plan: PlacementPlan, *devices: Device) -> float:
        links = link if len(devices) > 1 else ()
        return 1 / predict(plan, Topology(devices=devices, links=links), SPEC, prompt_tokens=8,
                           new_tokens=2).decode_tokens_per_s

    base = step_s(whole, device("a", None))
    assert math.isclose(step_s(whole, device("a", 0.05)) - base, 0.05 - head_s(SPEC, FLOPS, BANDWIDTH))
    both = step_s(pair, device("a", 0.05), device("b", 0.02)) - step_s(pair, device("a", None), device("b", None))
    assert math.isclose(both, 0.05 - head_s(SPEC, FLOPS, BANDWIDTH))  # the slowest member's head, once
    # published with the profile, read back by the topology
    cal = device("a", 0.05).calibration
    record = profile_record({"f32": FLOPS}, BANDWIDTH, "cpu", calibration=cal)
    topo = topology(_state({**_member("1"), profile_key("1"): record}), "f32", SPEC.name)
    assert topo.devices[0].calibration == cal


@pytest.mark.spec("P19")
@pytest.mark.parametrize("library", ["torch", "mlx"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_backends_run_their_head_alone_on_a_last_stage_only(tmp_path: Any, library: str, tied: bool) -> None:
    from mesh.errors import BackendError
    from mesh.models import Model, resolve_model
    from mesh.testing.tiny import tiny_model

    if library == "mlx":
        pytest.importorskip("mlx.core")
        from backends.mlx import MlxBackend as Backend
    else:
        from backends.torch import TorchBackend as Backend  # type: ignore[assignment]
    model = Model(resolve_model(str(tiny_model("llama", tmp_path / "m", tie_word_embeddings=tied))))
    last, first = Backend(device="cpu"), Backend(device="cpu")
    last.load(model, 2, 5)
    first.load(model, 0, 2)
    *_, head = time_stage(last, hidden_size=64)
    assert head is not None and head > 0
    assert time_stage(first, hidden_size=64)[2] is None
    with pytest.raises(BackendError, match="LM head"):
        first.run_head()


@pytest.mark.spec("P10", "N26")
def test_a_groups_measured_collective_prices_its_all_reduces() -> None:
    """The leader publishes what its group's all-reduce took inside steps; the topology carries
    it for exactly that set of members, and a decode step of the group costs two of them per
    layer instead of the link's latency (malformed figures, or members not placed, are ignored)."""
    links = {link_key("1", "2"): {"transport": "tcp", "rtt_p50_s": 2e-4, "rtt_p99_s": 4e-4,
                                  "throughput_bytes_per_s": 1e9, "samples": 5}}
    measured = {"members": ["2", "1"], "seconds": 1.5e-3}
    state = {**_member("1"), **_member("2"), **links,
             profile_key("1"): profile_record({"f32": FLOPS}, BANDWIDTH, "cpu", collective=measured),
             profile_key("2"): profile_record({"f32": FLOPS}, BANDWIDTH, "cpu",
                                              collective={"members": ["1", "9"], "seconds": 1.0})}
    topo = topology(_state(state), "f32")
    assert topo.collectives == ((("1", "2"), 1.5e-3),)
    group = _stage(("1", "2"))
    wire = Topology(devices=topo.devices, links=topo.links)
    extra = decode_stage_s(topo, SPEC, group, 100) - decode_stage_s(wire, SPEC, group, 100)
    assert extra == pytest.approx(4 * 2 * (1.5e-3 - 2 * 1e-4), rel=1e-6)  # 4 layers, 2 all-reduces each
