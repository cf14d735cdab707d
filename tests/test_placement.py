"""Placement laws over random clusters (hypothesis) and its error messages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import PlacementError
from mesh.placement.pipeline import (
    Capacity,
    ModelSize,
    Plan,
    Stage,
    largest_context,
    per_layer_bytes,
    place_pipeline,
)

MIB = 1 << 20
SIZE = ModelSize(num_layers=30, layer_bytes=14 * MIB, edge_bytes=216 * MIB, kv_bytes_per_token_per_layer=1536)

members_st = st.lists(
    st.builds(
        Capacity,
        member_id=st.text(alphabet="abcdef0123456789", min_size=1, max_size=6),
        usable_bytes=st.integers(min_value=0, max_value=4 << 30),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda c: c.member_id,
)


def _cap(member: Capacity, context: int) -> int:
    return max(0, (member.usable_bytes - SIZE.edge_bytes) // per_layer_bytes(SIZE, context))


@pytest.mark.spec("P1", "P3", "P5")
@settings(max_examples=300, deadline=None)
@given(members=members_st, context=st.integers(min_value=1, max_value=16384))
def test_plan_is_contiguous_and_fits(members: list[Capacity], context: int) -> None:
    try:
        plan = place_pipeline(members, SIZE, context_tokens=context)
    except PlacementError as exc:
        assert sum(_cap(m, context) for m in members) < SIZE.num_layers
        assert "GiB" in str(exc) and "largest context that fits" in str(exc)
        return
    covered = [layer for s in plan.stages for layer in range(s.layer_start, s.layer_end)]
    assert covered == list(range(SIZE.num_layers))  # every layer exactly once, in order
    by_id = {m.member_id: m for m in members}
    for stage in plan.stages:
        assert 0 < stage.layer_end - stage.layer_start <= _cap(by_id[stage.member_id], context)


@pytest.mark.spec("P2")
@settings(max_examples=200, deadline=None)
@given(members=members_st, data=st.data())
def test_plan_is_deterministic_in_any_order(members: list[Capacity], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(members))
    try:
        a = place_pipeline(members, SIZE, context_tokens=2048)
    except PlacementError:
        with pytest.raises(PlacementError):
            place_pipeline(shuffled, SIZE, context_tokens=2048)
        return
    b = place_pipeline(shuffled, SIZE, context_tokens=2048)
    assert a == b and a.plan_id == b.plan_id


@pytest.mark.spec("P4")
@settings(max_examples=100, deadline=None)
@given(n=st.integers(min_value=1, max_value=8))
def test_equal_members_get_equal_shares(n: int) -> None:
    members = [Capacity(member_id=f"m{i}", usable_bytes=8 << 30) for i in range(n)]
    plan = place_pipeline(members, SIZE, context_tokens=8192)
    sizes = [s.layer_end - s.layer_start for s in plan.stages]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 30


@pytest.mark.spec("P4")
def test_shares_follow_memory_left_for_layers() -> None:
    big, small = Capacity(member_id="a", usable_bytes=3 << 30), Capacity(member_id="b", usable_bytes=1 << 30)
    plan = place_pipeline([big, small], SIZE, context_tokens=8192)
    caps = [_cap(big, 8192), _cap(small, 8192)]
    quota_a = 30 * caps[0] / sum(caps)  # 23.4: memory left for layers, not raw memory
    assert [(s.member_id, s.layer_end - s.layer_start) for s in plan.stages] == [("a", round(quota_a)), ("b", 30 - round(quota_a))]
    # a member that can hold exactly its layers gets all of them
    exact = [Capacity(member_id="c", usable_bytes=SIZE.edge_bytes + 2 * per_layer_bytes(SIZE, 8192)),
             Capacity(member_id="d", usable_bytes=SIZE.edge_bytes + 28 * per_layer_bytes(SIZE, 8192))]
    plan = place_pipeline(exact, SIZE, context_tokens=8192)
    assert [(s.member_id, s.layer_start, s.layer_end) for s in plan.stages] == [("c", 0, 2), ("d", 2, 30)]


@pytest.mark.spec("P3", "P5")
def test_unusable_members_and_precise_error() -> None:
    plan = place_pipeline([Capacity(member_id="zero", usable_bytes=0), Capacity(member_id="ok", usable_bytes=4 << 30)],
                          SIZE, context_tokens=8192)
    assert [s.member_id for s in plan.stages] == ["ok"]
    with pytest.raises(PlacementError) as info:
        place_pipeline([Capacity(member_id="a", usable_bytes=600 * MIB), Capacity(member_id="b", usable_bytes=600 * MIB)],
                       SIZE, context_tokens=8192)
    message = str(info.value)
    assert "30 layers" in message and "8192 tokens" in message and "2 member(s)" in message
    fit = largest_context([Capacity(member_id="a", usable_bytes=600 * MIB), Capacity(member_id="b", usable_bytes=600 * MIB)], SIZE)
    assert f"largest context that fits: {fit} tokens" in message and 0 < fit < 8192
    place_pipeline([Capacity(member_id="a", usable_bytes=600 * MIB), Capacity(member_id="b", usable_bytes=600 * MIB)],
                   SIZE, context_tokens=fit)
    with pytest.raises(PlacementError):
        place_pipeline([], SIZE, context_tokens=1)


@pytest.mark.spec("P1", "P6")
def test_plan_validation_and_membership_change() -> None:
    with pytest.raises(PlacementError):
        Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=2),))
    with pytest.raises(PlacementError):
        Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=2), Stage(member_id="b", layer_start=3, layer_end=4)))
    one = place_pipeline([Capacity(member_id="a", usable_bytes=4 << 30)], SIZE, context_tokens=8192)
    two = place_pipeline([Capacity(member_id="a", usable_bytes=4 << 30), Capacity(member_id="b", usable_bytes=4 << 30)],
                         SIZE, context_tokens=8192)
    assert one.plan_id != two.plan_id and len(two.stages) == 2
