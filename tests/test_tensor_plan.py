"""Placing and recording tensor-parallel groups (spec N26), the status record's rendezvous (S8)
and ``--tp-address`` (S7)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, FrameError, PlacementError
from mesh.kernel.records import MemberInfo, MemberStatus, join
from mesh.models import tensor_parallel_sizes
from mesh.node.config import check_tp_address
from mesh.node.serving import servable
from mesh.placement.pipeline import ModelSize, Plan, Stage
from mesh.placement.planner import describe, recorded_plan, tensor_plan

SIZE = ModelSize(num_layers=4, layer_bytes=1000, edge_bytes=500, kv_bytes_per_token_per_layer=1, tp_sizes=(2, 4))


def _member(m: str, tp: str = "127.0.0.1", memory: int = 10_000, backend: str = "torch") -> SimpleNamespace:
    return SimpleNamespace(member_id=m, tp_address=tp, memory_bytes=memory, backend=backend, role="any")


@pytest.mark.spec("N26")
def test_the_tensor_placement_groups_the_members_offering_an_address() -> None:
    members = [_member("c"), _member("a"), _member("b"), _member("d", tp=""), _member("e", backend="timed")]
    plan = tensor_plan(members, SIZE, context_tokens=10)
    # a, b, c can: the largest size that divides is 2 (not 3); the lowest ids, the lowest leading
    assert plan == Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=4, group=("b",)),))
    four = tensor_plan([_member(m) for m in "wxyz"], SIZE, context_tokens=10)
    assert four.stages[0].members == ("w", "x", "y", "z") and four.group_place("y") == (four.stages[0], 2)
    assert four.stage_of("y") is None and four.role_of("y") == "both"
    assert describe(four) == "w+x+y+z[0,4)"
    assert tensor_plan([_member("a"), _member("b", tp="")], SIZE, context_tokens=10) is None  # never half
    with pytest.raises(PlacementError, match="each member"):
        tensor_plan([_member("a"), _member("b", memory=1000)], SIZE, context_tokens=10)
    # a group is of one library (torch or MLX): the one giving the larger group, torch on a tie
    mlx = tensor_plan([_member("a"), _member("b", backend="mlx"), _member("c", backend="mlx")], SIZE, context_tokens=10)
    assert mlx.stages[0].members == ("b", "c")
    tie = tensor_plan([_member(m, backend="mlx") for m in "ab"] + [_member(m) for m in "cd"], SIZE, context_tokens=10)
    assert tie.stages[0].members == ("c", "d")
    assert tensor_plan([_member("a"), _member("b", backend="timed")], SIZE, context_tokens=10) is None


@pytest.mark.spec("N26")
def test_a_group_plan_survives_the_record_and_names_every_member() -> None:
    plan = Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=2, group=("b", "c")),
                                      Stage(member_id="d", layer_start=2, layer_end=4)))
    assert plan.plan_id != Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=2),
                                                      Stage(member_id="d", layer_start=2, layer_end=4))).plan_id
    state = {"placement": {"plan_id": plan.plan_id, "stages": [s.wire() for s in plan.stages]}}
    assert recorded_plan(SimpleNamespace(state=state), 4) == plan
    bad = {"placement": {"plan_id": "x", "stages": [["a", 0, 4, "b"]]}}
    assert recorded_plan(SimpleNamespace(state=bad), 4) is None
    with pytest.raises(PlacementError, match="two stages"):
        Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=2, group=("d",)),
                                   Stage(member_id="d", layer_start=2, layer_end=4)))


class _View:
    def __init__(self, statuses: dict[str, MemberStatus]) -> None:
        self.statuses = statuses

    def members(self) -> list[Any]:
        return [SimpleNamespace(member_id=m) for m in self.statuses]

    def status(self, member: str) -> MemberStatus:
        return self.statuses.get(member, MemberStatus())


@pytest.mark.spec("N26")
def test_a_group_stage_is_servable_only_when_every_member_holds_it() -> None:
    plan = Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=4, group=("b",)),))
    ready = MemberStatus(plan_id=plan.plan_id, layer_start=0, layer_end=4, state="ready", held=((0, 4),))
    loading = MemberStatus(plan_id=plan.plan_id, layer_start=0, layer_end=4, state="loading")
    ok, why = servable(plan, view=_View({"a": ready, "b": loading}), linked={"a", "b"}, member_id="a", held=[(0, 4)])
    assert not ok and "member b has not loaded" in why
    assert servable(plan, view=_View({"a": ready, "b": ready}), linked={"a", "b"}, member_id="a", held=[(0, 4)])[0]
    # the member's own node reads its own record (its worker holds no stage for the group)
    assert servable(plan, view=_View({"a": ready, "b": ready}), linked={"a"}, member_id="b", held=[])[0]
    assert not servable(plan, view=_View({"a": ready, "b": ready}), linked={"b"}, member_id="a", held=[])[0]


@pytest.mark.spec("S8")
@given(port=st.integers(1, 65535))
def test_the_rendezvous_travels_in_the_status_record(port: int) -> None:
    status = MemberStatus(plan_id="p", layer_start=0, layer_end=4, state="loading", rendezvous=f"10.0.0.1:{port}")
    assert MemberStatus.from_wire(status.to_wire()) == status
    assert "rendezvous" not in MemberStatus(plan_id="p").to_wire()
    with pytest.raises(FrameError, match="rendezvous"):
        MemberStatus.from_wire({**status.to_wire(), "rendezvous": 7})


@pytest.mark.spec("S7")
def test_a_tp_address_must_be_one_this_host_holds() -> None:
    assert check_tp_address("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"--tp-address.*not an IP address.*127\.0\.0\.1"):
        check_tp_address("localhost")
    with pytest.raises(ConfigError, match=r"--tp-address 192\.0\.2\.7: no interface of this host holds it; valid: "):
        check_tp_address("192.0.2.7")
    info = MemberInfo(member_id="a", address="x:1", api_address="x:2", backend="torch", memory_bytes=1,
                      tp_address="127.0.0.1")
    resources, record = join(info)
    assert MemberInfo.from_wire({**record[2], **resources[2], "id": "a"}).tp_address == "127.0.0.1"
    assert MemberInfo.from_wire({**record[2], **{**resources[2], "tp": ""}, "id": "a"}).tp_address == ""
    with pytest.raises(FrameError, match="'tp'"):
        MemberInfo.from_wire({**record[2], **resources[2], "tp": "somewhere", "id": "a"})


@pytest.mark.spec("N26")
def test_group_sizes_come_from_the_heads_and_the_mlp_width() -> None:
    config = SimpleNamespace(num_attention_heads=12, num_key_value_heads=4, intermediate_size=1536)
    assert tensor_parallel_sizes(config) == (2, 4)
    smollm = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    assert tensor_parallel_sizes(smollm) == (3,)
    assert tensor_parallel_sizes(SimpleNamespace()) == ()
