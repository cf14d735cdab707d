"""The node's parts without a node: the liveness core on a fake clock, the records it writes,
readiness, placement reactions and the pure planner."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest

from mesh.errors import FrameError, PlacementError
from mesh.kernel import records
from mesh.kernel.records import ClusterView, MemberInfo, MemberStatus
from mesh.node.liveness import CLOCK_TELL_EVERY_S, FREEZE_GAP_S, Liveness, Monitor, clock_fault
from mesh.node.placing import Placement
from mesh.node.records import RETAINED_REQUESTS, SelfRecords
from mesh.node.serving import Serving, servable
from mesh.placement import planner
from mesh.placement.pipeline import ModelSize, Plan, Stage
from mesh.runtime.request_core import PlanState
from mesh.wire import Message

GIB = 2**30


class FakeState:
    """The replicated state as a dict: emit applies at once (key -> value, None deletes)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.events: list[tuple[str, str, Any]] = []

    def emit(self, type: str, key: str, value: Any) -> None:
        self.events.append((type, key, value))
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.values if k.startswith(prefix))


def member(member_id: str, memory: int = 8 * GIB, role: str = "any") -> MemberInfo:
    return MemberInfo(member_id=member_id, address=f"10.0.0.{len(member_id)}:7600", api_address="127.0.0.1:8000",
                      backend="torch", memory_bytes=memory, incarnation="i-" + member_id, role=role)


def view_of(*members: MemberInfo, statuses: dict[str, MemberStatus] | None = None) -> ClusterView:
    """A read-only view over a fake state holding ``members`` (their join records) and statuses."""
    fake = FakeState()
    for m in members:
        for record in records.join(m):
            fake.emit(*record)
    for member_id, status in (statuses or {}).items():
        fake.emit(*records.status(member_id, status))
    return ClusterView(fake)  # type: ignore[arg-type]


# -- liveness core -------------------------------------------------------------------------
@pytest.mark.spec("N9")
def test_a_member_unreachable_for_twice_dead_after_is_reported() -> None:
    core = Liveness("me", dead_after_s=3.0)
    core.known("b", now=0.0)
    assert core.unreachable(5.0, ["me", "a", "b"], linked=["a"]) == []
    assert core.unreachable(6.5, ["me", "a", "b"], linked=["a"]) == ["b"]
    core.seen("b", now=6.5)
    assert core.unreachable(7.0, ["me", "a", "b"], linked=[]) == []
    assert core.unreachable(13.1, ["me", "a", "b"], linked=[]) == ["a", "b"]  # a last reached at 7.0


@pytest.mark.spec("FO6")
def test_after_a_freeze_silence_is_this_nodes_own_fault() -> None:
    core = Liveness("me", dead_after_s=3.0)
    assert core.tick(100.0) is None
    assert core.tick(100.1) is None and not core.just_resumed(100.1)
    gap = core.tick(100.1 + FREEZE_GAP_S + 1.0)
    assert gap == pytest.approx(FREEZE_GAP_S + 1.0)
    assert core.just_resumed(102.7) and core.just_resumed(105.5)
    assert not core.just_resumed(102.6 + 3.0 + 0.01)


@pytest.mark.spec("FO7")
def test_a_refused_clock_is_told_at_most_every_ten_seconds() -> None:
    core = Liveness("me", dead_after_s=3.0)
    assert core.tell_clock("b", 50.0)
    assert not core.tell_clock("b", 50.0 + CLOCK_TELL_EVERY_S - 0.1)
    assert core.tell_clock("c", 51.0)
    assert core.tell_clock("b", 50.0 + CLOCK_TELL_EVERY_S)
    assert clock_fault("b", 7_200_000) is not None and "2.0 h ahead of member b" in str(clock_fault("b", 7_200_000))
    assert clock_fault("b", -5) is None and clock_fault("b", "soon") is None and clock_fault("b", True) is None


# -- records -------------------------------------------------------------------------------
@pytest.mark.spec("N1")
def test_join_writes_resources_before_the_membership_record() -> None:
    me = member("a", role="prefill")
    assert [t for t, _, _ in records.join(me)] == ["resources.set", "member.join"]
    resources = records.join(me)[0][2]
    assert resources == {"backend": "torch", "memory_bytes": 8 * GIB, "role": "prefill"}
    assert set(records.EVENT_TYPES) >= {"member.join", "member.leave", "status.set", "request.running",
                                        "request.retired", "kv.placed", "kv.freed", "link.down", "profile.set"}
    with pytest.raises(ValueError, match="valid"):
        records.request("r1", "exploded")


@pytest.mark.spec("N2")
def test_a_removed_node_writes_itself_back() -> None:
    fake = FakeState()
    mine = SelfRecords(fake.emit, lambda: fake, lambda: member("a"))
    assert not mine.rejoin_if_removed()  # not joined yet: nothing to restore
    mine.join()
    assert mine.joined.is_set() and not mine.rejoin_if_removed()
    fake.emit("member.leave", records.member_key("a"), None)
    assert mine.rejoin_if_removed() and fake.get(records.member_key("a"))["incarnation"] == "i-a"


@pytest.mark.spec("N21")
def test_a_restarted_node_replaces_the_status_its_last_process_left() -> None:
    fake = FakeState()
    stale = MemberStatus(plan_id="p", layer_start=0, layer_end=4, state="ready", held=((0, 4),))
    fake.emit(*records.status("a", stale))  # written before the restart: nothing is loaded now
    SelfRecords(fake.emit, lambda: fake, lambda: member("a")).join()
    assert MemberStatus.from_wire(fake.get(records.status_key("a"))).held == ()


def test_status_is_written_only_when_it_changes() -> None:
    fake = FakeState()
    mine = SelfRecords(fake.emit, lambda: fake, lambda: member("a"))
    status = MemberStatus(plan_id="p", layer_start=0, layer_end=4, state="ready")
    mine.set_status(status)
    mine.set_status(status)
    assert [t for t, _, _ in fake.events] == ["status.set"]
    fake.values.clear()  # e.g. a restored state without it: written again
    mine.set_status(status)
    assert len(fake.events) == 2


@pytest.mark.spec("K5")
def test_finished_requests_are_retired_and_their_kv_freed() -> None:
    fake = FakeState()
    mine = SelfRecords(fake.emit, lambda: fake, lambda: member("a"))
    mine.request_event("r0", "running", ["a", "b"])
    assert fake.get("kv/r0") == ["a", "b"]
    mine.request_event("r0", "finished")
    assert fake.get("kv/r0") is None and fake.get("request/r0") == "finished"
    for i in range(1, RETAINED_REQUESTS + 1):
        mine.request_event(f"r{i}", "failed")
    assert fake.get("request/r0") is None and fake.get("request/r1") == "failed"


@pytest.mark.spec("N9")
def test_leaving_removes_the_member_and_its_links_figures() -> None:
    fake = FakeState()
    mine = SelfRecords(fake.emit, lambda: fake, lambda: member("a"))
    for record in records.join(member("b")):
        fake.emit(*record)
    fake.emit(*records.link_measured("a", "b", {"transport": "tcp"}))
    fake.emit(*records.link_measured("b", "c", {"transport": "tcp"}))
    fake.emit(*records.link_measured("a", "c", {"transport": "tcp"}))
    assert mine.leave("b")
    assert fake.keys("link/") == ["link/a/c"] and fake.get("member/b") is None
    assert not mine.leave("b")


def test_only_the_lowest_member_records_the_plan_once() -> None:
    fake = FakeState()
    mine = SelfRecords(fake.emit, lambda: fake, lambda: member("a"))
    plan = Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=4),))
    mine.placement(plan, first_member="b")
    assert fake.events == []
    mine.placement(plan, first_member="a")
    mine.placement(plan, first_member="a")
    assert fake.events == [("placement.set", "placement", {"plan_id": plan.plan_id, "stages": [["a", 0, 4]]})]


# -- readiness -----------------------------------------------------------------------------
@pytest.mark.spec("N4")
def test_ready_only_when_every_stage_is_held_and_linked() -> None:
    plan = Plan(num_layers=8, stages=(Stage(member_id="a", layer_start=0, layer_end=4),
                                      Stage(member_id="b", layer_start=4, layer_end=8)))
    loaded = {m: MemberStatus(plan_id=plan.plan_id, layer_start=s, layer_end=e, state="ready", held=((s, e),))
              for m, s, e in (("a", 0, 4), ("b", 4, 8))}
    view = view_of(member("a"), member("b"), statuses=loaded)
    args: dict[str, Any] = {"view": view, "member_id": "a"}
    assert servable(plan, **args, linked={"b"}, held=[(0, 4)]) == (True, "ok")
    assert servable(plan, **args, linked=set(), held=[(0, 4)]) == (False, "no link to member b yet")
    assert "this node has not loaded" in servable(plan, **args, linked={"b"}, held=[])[1]
    serving = Serving("a")
    choose = {"view": view, "linked": {"b"}, "held": [(0, 4)], "num_layers": 8}
    assert serving.choose(plan, "", **choose, clock_fault="clock!") == PlanState(plan=None, ready=False,
                                                                                reason="clock!")
    assert serving.choose(None, "no placement yet", **choose, clock_fault=None) == PlanState(
        plan=None, ready=False, reason="no placement yet")
    switching = view_of(member("a"), member("b"), statuses={**loaded, "b": MemberStatus(state="loading")})
    assert "switching to plan" in servable(plan, view=switching, member_id="a", linked={"b"}, held=[(0, 4)])[1]
    # a status of an older version (no ``held``): what it reports ready is what it holds
    old = MemberStatus.from_wire({k: v for k, v in loaded["b"].to_wire().items() if k != "held"})
    assert old.held == ((4, 8),)
    with pytest.raises(FrameError):
        MemberStatus.from_wire({**loaded["b"].to_wire(), "held": [[0, "x"]]})


@pytest.mark.spec("A9", "N21", "N20")
def test_a_new_request_is_admitted_only_while_a_placed_plan_is_loading() -> None:
    """Not ready with a plan placed whose members are linked and loading (a member joined, or
    replaces a lost one): /health is 503 but a chat completion is admitted and waits for the
    plan (admit_s). Nothing placed, a member not linked, a member whose load failed, or a
    leaving node: refused at once with the reason."""
    from types import SimpleNamespace

    from mesh.node.report import NodeStatus

    plan = Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=2),
                                      Stage(member_id="b", layer_start=2, layer_end=4)))

    def admits(state: PlanState, *, linked: list[str], b: str = "loading", leaving: bool = False) -> bool:
        view = view_of(member("a"), member("b"), statuses={"b": MemberStatus(plan_id=plan.plan_id, layer_start=2,
                                                                              layer_end=4, state=b)})
        status = NodeStatus(member_id="a", model_id="m", num_layers=4, replication=SimpleNamespace(state=view.state),
                            linked=lambda: linked, placement=lambda: (state.plan, ""), serving=lambda: state,
                            leaving=lambda: leaving, stats=lambda: None, metrics_text=lambda: None, security={},
                            spec=lambda: None, dtype="f32")
        assert status.health()[0] is False
        return status.admits()[0]

    loading = PlanState(plan=plan, ready=False, reason="member b has not loaded layers [2, 4) yet")
    assert admits(loading, linked=["b"])
    assert not admits(PlanState(plan=None, ready=False, reason="placement failed: no member"), linked=["b"])
    assert not admits(loading, linked=[])  # b is not reachable
    assert not admits(loading, linked=["b"], b="failed")
    assert not admits(loading, linked=["b"], leaving=True)


@pytest.mark.spec("N21")
def test_the_old_plan_serves_until_every_stage_of_the_new_one_is_held() -> None:
    """Make-before-break: b joins a cluster where a serves all 8 layers; a loads [0, 4) beside
    [0, 8), b loads [4, 8); requests start on a's old plan until both hold their new stages,
    then on the new one. A node that never served (b) starts on the plan the state records."""
    old = Plan(num_layers=8, stages=(Stage(member_id="a", layer_start=0, layer_end=8),))
    new = Plan(num_layers=8, stages=(Stage(member_id="a", layer_start=0, layer_end=4),
                                     Stage(member_id="b", layer_start=4, layer_end=8)))
    a_loading = MemberStatus(plan_id=new.plan_id, layer_start=0, layer_end=4, state="loading", held=((0, 8),))
    b_loading = MemberStatus(plan_id=new.plan_id, layer_start=4, layer_end=8, state="loading")
    view = view_of(member("a"), member("b"), statuses={"a": a_loading, "b": b_loading})
    at_a, at_b = Serving("a"), Serving("b")
    assert at_a.choose(old, "", view=view, linked={"b"}, held=[(0, 8)], clock_fault=None, num_layers=8).ready
    assert at_a.plan == old
    state = at_a.choose(new, "", view=view, linked={"b"}, held=[(0, 8)], clock_fault=None, num_layers=8)
    assert state == PlanState(plan=old, ready=True, reason="ok")  # the old plan goes on serving
    fresh = at_b.choose(new, "", view=view, linked={"a"}, held=[], clock_fault=None, num_layers=8)
    assert not fresh.ready and "has not loaded" in fresh.reason  # nothing recorded yet
    fake = FakeState()
    for m in ("a", "b"):
        for record in records.join(member(m)):
            fake.emit(*record)
        fake.emit(*records.status(m, {"a": a_loading, "b": b_loading}[m]))
    fake.emit(*records.placement(old.plan_id, [["a", 0, 8]], []))
    recorded = ClusterView(fake)  # type: ignore[arg-type]
    assert at_b.choose(new, "", view=recorded, linked={"a"}, held=[], clock_fault=None, num_layers=8).plan == old
    a_ready = MemberStatus(plan_id=new.plan_id, layer_start=0, layer_end=4, state="ready", held=((0, 8), (0, 4)))
    b_ready = MemberStatus(plan_id=new.plan_id, layer_start=4, layer_end=8, state="ready", held=((4, 8),))
    both = view_of(member("a"), member("b"), statuses={"a": a_ready, "b": b_loading})
    assert at_a.choose(new, "", view=both, linked={"b"}, held=[(0, 8), (0, 4)], clock_fault=None,
                       num_layers=8).plan == old  # b still loading
    both = view_of(member("a"), member("b"), statuses={"a": a_ready, "b": b_ready})
    assert at_a.choose(new, "", view=both, linked={"b"}, held=[(0, 8), (0, 4)], clock_fault=None,
                       num_layers=8) == PlanState(plan=new, ready=True, reason="ok")
    gone = view_of(member("b"), statuses={"b": b_ready})  # a left: neither plan serves
    state = at_b.choose(None, "placement failed: x", view=gone, linked=set(), held=[(4, 8)], clock_fault=None,
                        num_layers=8)
    assert not state.ready and state.reason == "placement failed: x"


# -- placement -----------------------------------------------------------------------------
SIZE = ModelSize(num_layers=8, layer_bytes=100 * 2**20, edge_bytes=50 * 2**20, kv_bytes_per_token_per_layer=1024)


@pytest.mark.spec("N3")
def test_the_planner_is_a_pure_function_of_the_view() -> None:
    inputs = planner.PlanInputs(size=SIZE, context_tokens=2048, placement="memory")
    view = view_of(member("b", 2 * GIB), member("a", 2 * GIB))
    first, again = planner.plan(view, inputs), planner.plan(view_of(member("a", 2 * GIB), member("b", 2 * GIB)), inputs)
    assert first == again and [s.member_id for s in first.stages] == ["a", "b"]
    roles = planner.plan(view_of(member("a", role="prefill"), member("b", role="decode")), inputs)
    assert [s.member_id for s in roles.prefill_stages] == ["a"] and [s.member_id for s in roles.stages] == ["b"]


@pytest.mark.spec("N19")
def test_the_cpu_dtype_is_bf16_where_the_profile_measured_it_fast() -> None:
    from types import SimpleNamespace

    from mesh.node.config import NodeConfig, backend_options

    assert planner.compute_dtype(None, None) == "f32" and planner.compute_dtype(None, "cuda") == "f16"
    assert planner.compute_dtype("bf16", "cpu") == "bf16"
    fast = SimpleNamespace(device="cpu", flops={"f32": 1.84e11, "f16": 0.5e11, "bf16": 4.09e11})
    slow = SimpleNamespace(device="cpu", flops={"f32": 1.84e11, "bf16": 2.6e11})  # 1.41x: not enough
    assert planner.compute_dtype(None, None, fast) == "bf16"
    assert planner.compute_dtype(None, "cpu", slow) == "f32"
    assert planner.compute_dtype(None, None, fast, backend="mlx") == "f32"  # the profile measures torch
    assert planner.compute_dtype("f32", None, fast) == "f32"  # --dtype wins
    assert planner.compute_dtype(None, None, SimpleNamespace(device="cpu", flops={"f32": 1e11})) == "f32"
    gpu = SimpleNamespace(device="cuda:0", flops={"f32": 1e13, "bf16": 1e14})
    assert planner.compute_dtype(None, None, gpu) == "f16"  # the profile's device, resolved
    # the backend is built with a measured choice; a plugin only with what the user set
    assert backend_options(NodeConfig(), dtype="bf16") == {"dtype": "bf16"}
    assert backend_options(NodeConfig(dtype="f32"), dtype="bf16") == {"dtype": "f32"}
    assert backend_options(NodeConfig()) == {}


def test_placement_tells_the_loader_once_per_new_plan_and_reports_failures() -> None:
    wanted: list[Plan | None] = []
    changes: list[int] = []
    members = [member("a", 2 * GIB)]
    inputs = planner.PlanInputs(size=SIZE, context_tokens=2048, placement="memory")
    placing = Placement(view=lambda: view_of(*members), inputs=lambda: inputs, want=wanted.append,
                        changed=lambda: changes.append(1))
    placing.replan()
    placing.replan()
    assert placing.plan is not None and wanted == [placing.plan] and len(changes) == 1
    members[:] = [member("a", 1024)]
    placing.replan()
    assert placing.plan is None and placing.error.startswith("placement failed") and wanted[-1] is None
    quiet = Placement(view=lambda: view_of(*members), inputs=lambda: None, want=wanted.append,
                      changed=lambda: None)
    quiet.replan()  # the model's size is not known yet: nothing to do
    assert quiet.plan is None and quiet.error == "no placement yet"


class FakeLinks:
    def __init__(self) -> None:
        self.up: list[str] = []

    def linked(self) -> list[str]:
        return list(self.up)

    async def ping_all(self, timeout_s: float) -> None:
        return None

    async def probe_all(self, interval_s: float, timeout_s: float) -> None:
        return None


def monitor(now: list[float], state: set[str], stopping: bool = False) -> tuple[Monitor, dict[str, list[str]]]:
    calls: dict[str, list[str]] = {"lost": [], "removed": [], "changed": []}

    async def send(member_id: str, msg: Message) -> None:
        calls.setdefault("sent", []).append(member_id)

    mon = Monitor(Liveness("me", dead_after_s=3.0), FakeLinks(), heartbeat_s=0.5, probe_interval_s=30.0,
                  send_timeout_s=1.0, members=lambda: sorted(state), on_round=lambda: None,
                  lost=calls["lost"].append, present=lambda m: m in state,
                  remove=lambda m: (calls["removed"].append(m), state.discard(m)),
                  changed=lambda: calls["changed"].append("x"), stopping=lambda: stopping, send=send,
                  clock=lambda: now[0])
    return mon, calls


@pytest.mark.spec("FO6")
def test_declaring_dead_fails_requests_at_once_and_removes_the_member_unless_just_frozen() -> None:
    now = [100.0]
    mon, calls = monitor(now, {"me", "b", "c"})
    mon.link_down("b")
    assert calls["lost"] == ["b"] and calls["removed"] == ["b"] and calls["changed"]
    mon.core.tick(100.0)
    now[0] = 103.0
    mon.core.tick(103.0)  # a 3 s gap: this process was frozen
    mon.link_down("c")
    assert calls["lost"] == ["b", "c"] and calls["removed"] == ["b"]  # c stays: the silence was ours
    stopping, stop_calls = monitor([0.0], {"me", "b"}, stopping=True)
    stopping.declare_dead("b", "test")
    assert stop_calls["lost"] == ["b"] and stop_calls["removed"] == []


@pytest.mark.spec("N20")
def test_a_member_that_announced_its_leave_goes_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    mon, calls = monitor([100.0], {"me", "b", "c"})
    mon.leaving = lambda m: m == "b"
    with caplog.at_level(logging.INFO, logger="mesh.node.liveness"):
        mon.link_down("b")
        mon.link_down("c")
    assert calls["removed"] == ["b", "c"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "member b left as announced: its last link closed"),
        ("WARNING", "member c left: its last link closed")]


@pytest.mark.spec("FO7")
def test_a_clock_refusal_sets_the_nodes_fault() -> None:
    mon, calls = monitor([0.0], {"me"})
    mon.clock_refused("b", Message(type="clock.refused", body={"ahead_ms": "x"}))
    assert mon.clock_fault is None
    mon.clock_refused("b", Message(type="clock.refused", body={"ahead_ms": 3_600_000}))
    assert mon.clock_fault is not None and "1.0 h ahead" in mon.clock_fault and calls["changed"]


@pytest.mark.spec("N17")
def test_members_whose_load_failed_are_placed_around() -> None:
    inputs = planner.PlanInputs(size=SIZE, context_tokens=2048, placement="memory")
    failed = MemberStatus(plan_id="p1", layer_start=2, layer_end=4, state="failed",
                          error="mlx-lm has no model type 'new_moe'")
    both = [member("a"), member("b")]
    assert [s.member_id for s in planner.plan(view_of(*both), inputs).stages] == ["a", "b"]
    around = planner.plan(view_of(*both, statuses={"b": failed}), inputs)
    assert [(s.member_id, s.layer_start, s.layer_end) for s in around.stages] == [("a", 0, SIZE.num_layers)]
    assert planner.failed_members(view_of(*both, statuses={"b": failed})) == {"b": failed.error}
    # nobody left: the error names who was left out and why
    with pytest.raises(PlacementError, match="no member can load the model.*b failed to load: mlx-lm has no model"):
        planner.plan(view_of(member("b"), statuses={"b": failed}), inputs)
    # a member left too small once the failed one is out: the reason carries the load error
    with pytest.raises(PlacementError, match="left out: b failed to load"):
        planner.plan(view_of(member("a", 1024), member("b"), statuses={"b": failed}), inputs)


@pytest.mark.spec("N17", "N18")
def test_a_failed_load_stays_reported_while_the_member_holds_no_stage() -> None:
    import asyncio

    from mesh.errors import ModelError
    from mesh.node.loader import StageLoader
    from mesh.runtime.stage import StageWorker

    class Refuses:
        name = "refuses"

        def adopt_from(self, other: object) -> None:
            return None

        def load(self, model: object, start: int, end: int, progress: object = None) -> None:
            threads.append(threading.current_thread().name)
            raise ModelError("unsupported architecture 'new_moe'; supported: llama, qwen3_moe")

    statuses: list[MemberStatus] = []
    threads: list[str] = []
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
    loader = StageLoader("b", object(), new_backend=Refuses, holder=StageWorker("b", None, compute),  # type: ignore[arg-type]
                         changed=lambda: None, serving=lambda: None, fits=lambda ranges: True,
                         set_status=statuses.append, publish=lambda record: None,
                         loaded=lambda layers, reused: None, profile=None, spec=None, dtype="f32", executor=compute)
    with_b = Plan(num_layers=8, stages=(Stage(member_id="a", layer_start=0, layer_end=4),
                                        Stage(member_id="b", layer_start=4, layer_end=8)))
    without_b = Plan(num_layers=8, stages=(Stage(member_id="a", layer_start=0, layer_end=8),))
    asyncio.run(loader._load(with_b))
    assert [s.state for s in statuses] == ["loading", "failed"] and "new_moe" in (statuses[-1].error or "")
    asyncio.run(loader._load(without_b))  # placed around: no stage, still failed (not idle)
    assert [s.state for s in statuses] == ["loading", "failed"]
    # the load ran on the node's compute thread, where its steps run (one thread pool team)
    assert threads and all(name.startswith("compute") for name in threads)
    compute.shutdown()


@pytest.mark.spec("B15")
def test_quantize_reaches_the_backend_only_when_given() -> None:
    from mesh.cli import build_parser
    from mesh.node.config import NodeConfig, backend_options

    assert "quantize" not in backend_options(NodeConfig(dtype="bf16"))
    assert backend_options(NodeConfig(quantize="int8")) == {"quantize": "int8"}
    args = build_parser().parse_args(["node", "--quantize", "int8"])
    assert args.quantize == "int8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--quantize", "int3"])


@pytest.mark.spec("B15")
def test_a_backend_without_the_quantize_option_refuses_it_at_start() -> None:
    from mesh.errors import ConfigError
    from mesh.node.config import NodeConfig, check_backend_options

    class Plain:
        def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
            self.device, self.dtype = device, dtype

    check_backend_options(Plain, NodeConfig(dtype="f32"))
    with pytest.raises(ConfigError, match="--quantize: the 'timed' backend takes no quantize option"):
        check_backend_options(Plain, NodeConfig(backend="timed", quantize="int8"))


@pytest.mark.spec("N18")
def test_nodes_on_one_host_find_each_other_and_wait_passively(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from mesh.identity import register_on_host

    host = tmp_path / "host"
    (host).mkdir()
    (host / "999999.node").write_bytes(b"")  # a dead node's file: nobody holds its lock
    code = ("import os, sys; from pathlib import Path; from mesh.identity import register_on_host; "
            "entry, others = register_on_host(Path(sys.argv[1])); "
            "print(len(others), os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules, flush=True); "
            "sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def start(extra: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", code, str(host)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**env, **extra})

    first = start({})
    try:
        assert first.stdout is not None and first.stdout.readline().split() == ["0", "None", "False"]
        assert not (host / "999999.node").exists()  # the stale registration was removed
        second = start({})
        try:
            assert second.stdout is not None and second.stdout.readline().split() == ["1", "PASSIVE", "False"]
        finally:
            second.communicate("", timeout=30)
        chooser = start({"GOMP_SPINCOUNT": "1000"})  # a policy the user chose stays theirs
        try:
            assert chooser.stdout is not None and chooser.stdout.readline().split() == ["1", "None", "False"]
        finally:
            chooser.communicate("", timeout=30)
    finally:
        first.communicate("", timeout=30)
    # all gone: a new registration finds nobody and removes the files they left
    entry, others = register_on_host(host)
    assert entry is not None and others == []
    assert [p.name for p in host.iterdir()] == [f"{os.getpid()}.node"]
    entry.close()


class _Stage:
    """A backend stand-in for the loader: ``load`` takes the range (after ``wait``, if set)."""

    name = "stand-in"

    def __init__(self) -> None:
        self.layer_start = self.layer_end = 0
        self.donor: object = None

    def adopt_from(self, other: object) -> None:
        self.donor = other

    def load(self, model: object, start: int, end: int, progress: object = None) -> None:
        self.layer_start, self.layer_end = start, end


def _loader(fits: bool = True, serving: list[Plan | None] | None = None) -> tuple[Any, Any, list[MemberStatus]]:
    from mesh.node.loader import StageLoader
    from mesh.runtime.stage import StageWorker

    statuses: list[MemberStatus] = []
    worker = StageWorker("a", None, ThreadPoolExecutor(max_workers=1))  # type: ignore[arg-type]
    serving = serving if serving is not None else [None]
    loader = StageLoader("a", object(), new_backend=_Stage, holder=worker, changed=lambda: None,  # type: ignore[arg-type]
                         serving=lambda: serving[0], fits=lambda ranges: fits, set_status=statuses.append,
                         publish=lambda record: None, loaded=lambda layers, reused: None, profile=None, spec=None,
                         dtype="f32", executor=worker.executor, drain_s=30.0)
    return loader, worker, statuses


def _plan(*stages: tuple[str, int, int]) -> Plan:
    return Plan(num_layers=8, stages=tuple(Stage(member_id=m, layer_start=a, layer_end=b) for m, a, b in stages))


@pytest.mark.spec("N21")
def test_the_loader_loads_the_new_stage_beside_the_old_and_retires_the_old_when_unused() -> None:
    import asyncio

    from mesh.node.loader import RETIRE_GRACE_S

    alone, joined = _plan(("a", 0, 8)), _plan(("a", 0, 4), ("b", 4, 8))
    serving: list[Plan | None] = [alone]
    loader, worker, statuses = _loader(serving=serving)
    asyncio.run(loader._load(alone))
    loader.want(joined)
    asyncio.run(loader._load(joined))
    assert worker.held() == [(0, 8), (0, 4)] and worker.stages[(0, 4)].donor is worker.stages[(0, 8)]
    assert statuses[-1].state == "ready" and statuses[-1].held == ((0, 8), (0, 4))
    assert loader.retire_unused(0.0) == []  # the old plan still serves here
    serving[0] = joined  # the switch
    worker.caches["r.0"], worker._cache_stage["r.0"] = [], (0, 8)  # a request still on the old stage
    assert loader.retire_unused(10.0) == []  # unused from now, kept for its request
    assert loader.retire_unused(10.0 + RETIRE_GRACE_S) == []
    worker.release("r.0")
    assert loader.retire_unused(10.0 + RETIRE_GRACE_S) == [(0, 8)]
    assert worker.held() == [(0, 4)] and statuses[-1].held == ((0, 4),)
    # a request that never ends does not pin a stage past --drain-s
    loader.want(alone)
    asyncio.run(loader._load(alone))
    serving[0] = alone
    worker.caches["r.1"], worker._cache_stage["r.1"] = [], (0, 4)
    assert loader.retire_unused(100.0) == [] and loader.retire_unused(100.0 + 30.0) == [(0, 4)]
    assert "r.1" not in worker.caches and worker.ledger.is_released("r.1")
    # the leave is announced: the state says leaving, whatever is loaded
    loader.leave()
    assert statuses[-1].state == "leaving" and statuses[-1].held == ((0, 8),)
    worker.executor.shutdown()


@pytest.mark.spec("N21")
def test_a_stage_that_does_not_fit_beside_the_old_one_replaces_it() -> None:
    import asyncio

    from mesh.node.loader import fits_beside

    loader, worker, statuses = _loader(fits=False)
    asyncio.run(loader._load(_plan(("a", 0, 8))))
    asyncio.run(loader._load(_plan(("a", 0, 4), ("b", 4, 8))))
    assert worker.held() == [(0, 4)] and worker.stages[(0, 4)].donor is not None  # shared layers still taken
    assert [s.held for s in statuses] == [(), ((0, 8),), ((0, 8),), (), ((0, 4),)]
    sizes = {"layer_bytes": 100, "edge_bytes": 50, "kv_bytes_per_layer": 10}
    assert fits_beside([(0, 8), (0, 4)], **sizes, memory_bytes=8 * 110 + 50, shares=True)
    assert not fits_beside([(0, 8), (0, 4)], **sizes, memory_bytes=8 * 110 + 50, shares=False)
    assert fits_beside([(0, 8), (0, 4)], **sizes, memory_bytes=12 * 110 + 50, shares=False)
    worker.executor.shutdown()


@pytest.mark.spec("N20")
def test_a_leaving_member_is_placed_around_and_goes_once_the_plan_without_it_serves() -> None:
    inputs = planner.PlanInputs(size=SIZE, context_tokens=2048, placement="memory")
    leaving = MemberStatus(plan_id="p", layer_start=4, layer_end=8, state="leaving", held=((4, 8),))
    plan = planner.plan(view_of(member("a"), member("b"), statuses={"b": leaving}), inputs)
    assert [(s.member_id, s.layer_start, s.layer_end) for s in plan.stages] == [("a", 0, SIZE.num_layers)]
    with pytest.raises(PlacementError, match="left out: b is leaving"):
        planner.plan(view_of(member("b"), statuses={"b": leaving}), inputs)
    moved: list[str] = []
    at_a = Serving("a", move_off=moved.append)
    a_ready = MemberStatus(plan_id=plan.plan_id, layer_start=0, layer_end=SIZE.num_layers, state="ready",
                           held=((0, 4), (0, SIZE.num_layers)))
    now = view_of(member("a"), member("b"), statuses={"a": a_ready, "b": leaving})
    for _ in range(2):  # the requests through b move once, when the plan without it serves
        assert at_a.choose(plan, "", view=now, linked={"b"}, held=[(0, 4), (0, SIZE.num_layers)], clock_fault=None,
                           num_layers=SIZE.num_layers).plan == plan
    assert moved == ["b"]
    at_b = Serving("b")
    assert not at_b.handed_over(plan, busy=False)  # the plan without b does not serve yet
    at_b.plan = plan
    assert at_b.handed_over(plan, busy=False) and not at_b.handed_over(plan, busy=True)
    assert at_b.handed_over(None, busy=False)  # nobody can take over: nothing to wait for


def _profiled(bandwidth: dict[str, float], extra: list[Any] = ()) -> ClusterView:  # type: ignore[assignment]
    from mesh.placement.perf import profile_record

    fake = FakeState()
    for m, bytes_per_s in bandwidth.items():
        for record in records.join(member(m, 4 * GIB)):
            fake.emit(*record)
        fake.emit(*records.profile(m, profile_record({"f32": 100e9}, bytes_per_s, "cpu")))
    for record in extra:
        fake.emit(*record)
    return ClusterView(fake)  # type: ignore[arg-type]


def _solver_inputs() -> planner.PlanInputs:
    import transformers

    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                      max_position_embeddings=8192, tie_word_embeddings=True)
    from mesh.placement.pipeline import model_size_from_config

    return planner.PlanInputs(size=model_size_from_config(config, 4), context_tokens=2048, placement="solver",
                              spec=planner.model_spec(config, "smollm2", "f32"), dtype="f32")


@pytest.mark.spec("P21")
def test_a_plan_for_the_same_members_moves_only_for_a_gain_above_the_margin_and_the_move() -> None:
    """a serves every layer; b's memory bandwidth (decode is bandwidth-bound) is 5 % or 3x a's.
    Without a recorded plan the solver picks b either way; with a's plan recorded for the same
    members, a 5 % gain does not pay for moving 30 layers, 3x does; a new member re-places at once."""
    inputs = _solver_inputs()
    serving = records.placement("old", [["a", 0, 30]], [], ["a", "b"])
    for bandwidth, moves in ((21e9, False), (60e9, True)):
        fresh = planner.plan(_profiled({"a": 20e9, "b": bandwidth}), inputs)
        assert [s.member_id for s in fresh.stages] == ["b"] and fresh.considered == {"a", "b"}
        found = planner.plan(_profiled({"a": 20e9, "b": bandwidth}, [serving]), inputs)
        assert [s.member_id for s in found.stages] == (["b"] if moves else ["a"])
    kept = planner.plan(_profiled({"a": 20e9, "b": 21e9}, [serving]), inputs)
    gain = planner.score(_profiled({"a": 20e9, "b": 21e9}), inputs, fresh) / planner.score(
        _profiled({"a": 20e9, "b": 21e9}), inputs, kept) - 1
    assert 0.03 < gain < inputs.margin  # what the hysteresis held back
    assert planner.move_s(kept, fresh, inputs.size) == pytest.approx(
        (30 * inputs.size.layer_bytes + inputs.size.edge_bytes) / planner.LOAD_BYTES_PER_S)
    # at the rate b's own last load measured, published in its profile
    from mesh.placement.perf import load_rates, profile_record

    timed = records.profile("b", profile_record({"f32": 100e9}, 21e9, "cpu", load_bytes_per_s=180e6))
    view = _profiled({"a": 20e9, "b": 21e9}, [timed])
    assert load_rates(view) == {"b": 180e6}
    assert planner.move_s(kept, fresh, inputs.size, load_rates(view)) == pytest.approx(
        (30 * inputs.size.layer_bytes + inputs.size.edge_bytes) / 180e6)
    # recorded for a alone: b is new, the plan follows the solver at once
    alone = records.placement("old", [["a", 0, 30]], [], ["a"])
    assert [s.member_id for s in planner.plan(_profiled({"a": 20e9, "b": 21e9}, [alone]), inputs).stages] == ["b"]
    # a margin of 0 follows every predicted gain bigger than the cost of moving (here 6 %)
    import dataclasses

    eager = dataclasses.replace(inputs, margin=0.0)
    assert [s.member_id for s in planner.plan(_profiled({"a": 20e9, "b": 21e9}, [serving]), eager).stages] == ["a"]
    assert [s.member_id for s in planner.plan(_profiled({"a": 20e9, "b": 22e9}, [serving]), eager).stages] == ["b"]


@pytest.mark.spec("P21")
def test_a_slow_link_under_the_serving_plan_moves_it_by_the_solvers_own_objective() -> None:
    """a and c serve over a 10 Mbit/s link (measured); b is as fast as either. Judged on
    decode tokens/s the hop costs a few per cent and the plan stays; judged as the solver
    judges by default (goodput: a request end to end, its prompt's hidden states crossing the
    slow link), the plan moves off it."""
    import dataclasses

    inputs = _solver_inputs()
    slow = {"transport": "tcp", "rtt_p50_s": 0.001, "rtt_p99_s": 0.002, "throughput_bytes_per_s": 1.25e6,
            "samples": 9}
    serving = records.placement("old", [["a", 0, 15], ["c", 15, 30]], [], ["a", "b", "c"])
    view = _profiled({"a": 20e9, "b": 20e9, "c": 20e9}, [serving, records.link_measured("a", "c", slow)])
    assert inputs.objective == "goodput"
    moved = planner.plan(view, inputs)
    assert "c" not in {s.member_id for s in moved.all_stages}
    decode = dataclasses.replace(inputs, objective="decode")
    assert [(s.member_id, s.layer_start) for s in planner.plan(view, decode).stages] == [("a", 0), ("c", 15)]


@pytest.mark.spec("P17", "P21")
def test_the_solver_plans_on_the_links_the_members_measured() -> None:
    inputs = _solver_inputs()
    slow = {"transport": "tcp", "rtt_p50_s": 0.02, "rtt_p99_s": 0.03, "throughput_bytes_per_s": 1.25e6, "samples": 9}
    view = _profiled({"a": 20e9, "b": 20e9, "c": 20e9}, [records.link_measured("a", "b", slow)])
    topo = planner.solver_topology(view, inputs)
    links = {(link.a, link.b): link for link in topo.links}
    assert links[("a", "b")].bandwidth_bytes_per_s == 1.25e6 and links[("a", "b")].latency_s == 0.01
    assert links[("a", "c")].bandwidth_bytes_per_s == planner.NOMINAL_LINK_BYTES_PER_S  # none measured yet


@pytest.mark.spec("P7")
def test_a_profile_far_below_its_peers_on_the_same_hardware_is_measured_again() -> None:
    """The report's case: one node's CPU timed at 0.26 GFLOP/s while another process loaded it,
    its peer on the same CPU at 178: it measures again and publishes the new figures, unless
    they are still off or taken on a busy CPU."""
    import asyncio

    from mesh.node.loader import StageLoader
    from mesh.placement.profile import DeviceProfile, software
    from mesh.runtime.stage import StageWorker

    def profile(f32: float, busy: float = 0.0) -> DeviceProfile:
        return DeviceProfile(memory_total_bytes=8 * GIB, memory_usable_bytes=4 * GIB, flops={"f32": f32},
                             memory_bandwidth_bytes_per_s=2e10, backend="torch", device="cpu",
                             measured_at_ms=1, software=software("torch"), busy=busy)

    published: list[dict[str, Any]] = []
    peers = [{"hardware": "EPYC x2", "device": "cpu", "flops": {"f32": 1.78e11}, "memory_bandwidth_bytes_per_s": 2e10},
             {"hardware": "M2 x8", "device": "cpu", "flops": {"f32": 1e9}, "memory_bandwidth_bytes_per_s": 1e10}]
    again = [profile(1.7e11, busy=0.6), profile(1.2e9), profile(1.7e11)]

    async def remeasure() -> DeviceProfile:
        return again.pop(0)

    compute = ThreadPoolExecutor(max_workers=1)
    loader = StageLoader("a", object(), new_backend=_Stage, holder=StageWorker("a", None, compute),  # type: ignore[arg-type]
                         changed=lambda: None, serving=lambda: None, fits=lambda ranges: True,
                         set_status=lambda status: None, publish=published.append, loaded=lambda layers, reused: None,
                         profile=profile(2.6e8), spec=None, dtype="f32", executor=compute, peers=lambda: peers,
                         remeasure=remeasure)
    loader.hardware = "EPYC x2"
    assert not asyncio.run(loader.check_profile())  # measured again on a busy CPU: kept
    assert not asyncio.run(loader.check_profile())  # measured again, still far below: kept
    assert published == [] and loader.profile.flops["f32"] == 2.6e8
    assert asyncio.run(loader.check_profile()) and loader.profile.flops["f32"] == 1.7e11
    assert published[-1]["flops"] == {"f32": 1.7e11} and published[-1]["hardware"] == "EPYC x2"
    assert not asyncio.run(loader.check_profile()) and again == []  # in line with its peer: nothing to do
    loader.hardware = "Xeon x4"  # no peer on this hardware: nothing to compare with
    loader.profile = profile(2.6e8)
    assert not asyncio.run(loader.check_profile())
    compute.shutdown()


@pytest.mark.spec("N4", "A9")
def test_a_starting_node_answers_503_at_once_then_hands_requests_to_the_api() -> None:
    import asyncio

    import httpx
    from starlette.responses import JSONResponse

    from mesh.node.server import Starting

    shell = Starting()

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shell), base_url="http://node") as client:
            return await client.post("/v1/chat/completions", json={})

    early = asyncio.run(ask())
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    assert early.json()["status"] == "unavailable" and early.json()["reason"] == "the node is starting"
    assert early.json()["error"]["type"] == "server_error"
    shell.app = JSONResponse({"ok": True})
    assert asyncio.run(ask()).json() == {"ok": True}


@pytest.mark.spec("N18")
def test_a_local_cluster_gives_each_node_its_share_of_the_cores(tmp_path, monkeypatch) -> None:
    """N18: nodes of a LocalCluster of two or more wait passively and take the host's cores
    divided among them (at least one thread each), unless the environment chose otherwise."""
    import os

    from mesh.testing import cluster as cluster_module

    spawned: list[dict[str, str]] = []
    monkeypatch.setattr(cluster_module, "_spawn", lambda args, env, log, mode: spawned.append(env) or object())
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    share = str(max(1, (os.cpu_count() or 1) // 3))
    three = cluster_module.LocalCluster(3, tmp_path / "three")
    three.add(), three.add()
    assert [(e.get("OMP_NUM_THREADS"), e.get("OMP_WAIT_POLICY")) for e in spawned] == [(share, "PASSIVE")] * 2
    spawned.clear()
    chosen = cluster_module.LocalCluster(2, tmp_path / "chosen", env={"OMP_NUM_THREADS": "3"})
    chosen.add()
    assert spawned[0]["OMP_NUM_THREADS"] == "3"
    spawned.clear()
    cluster_module.LocalCluster(1, tmp_path / "one").add()
    assert "OMP_NUM_THREADS" not in spawned[0] and "OMP_WAIT_POLICY" not in spawned[0]


@pytest.mark.spec("N26", "S7")
def test_the_tensor_placement_groups_members_offering_a_trusted_link() -> None:
    """``--placement tensor`` over the view: the members that published ``--tp-address`` form the
    group (the lowest id leads); a member without it is not grouped; one able member alone
    gets a plain plan, never half a group."""
    def tp(member_id: str) -> MemberInfo:
        return replace(member(member_id), tp_address="127.0.0.1")

    size = replace(SIZE, tp_sizes=(2,))
    inputs = planner.PlanInputs(size=size, context_tokens=2048, placement="tensor")
    grouped = planner.plan(view_of(tp("b"), tp("a"), member("c")), inputs)
    assert grouped.stages == (Stage(member_id="a", layer_start=0, layer_end=8, group=("b",)),)
    alone = planner.plan(view_of(tp("a"), member("c")), inputs)
    assert all(not s.group for s in alone.stages)
    failed = MemberStatus(state="idle", error="tensor-parallel group failed", ungrouped=True)
    assert MemberStatus.from_wire(failed.to_wire()) == failed
    around = planner.plan(view_of(tp("a"), tp("b"), statuses={"b": failed}), inputs)  # its group just failed
    assert all(not s.group for s in around.stages)


@pytest.mark.spec("N26")
def test_a_member_whose_group_join_fails_in_any_way_reports_failed() -> None:
    """``Groups.follow`` failing with any error (not only a BackendError: a spawn the system
    refused) leaves the member's status ``failed`` with the reason, never a lost task."""
    import asyncio

    from mesh.node.loader import StageLoader
    from mesh.placement.pipeline import Plan, Stage
    from mesh.runtime.stage import StageWorker

    class Refusing:
        following = None

        def held(self) -> None:
            return None

        async def follow(self, *args: Any) -> bool:
            raise OSError("cannot spawn: too many processes")

    statuses: list[MemberStatus] = []
    compute = ThreadPoolExecutor(max_workers=1)
    loader = StageLoader("b", object(), new_backend=object, holder=StageWorker("b", None, compute),  # type: ignore[arg-type]
                         changed=lambda: None, serving=lambda: None, fits=lambda ranges: True,
                         set_status=statuses.append, publish=lambda p: None, loaded=lambda layers, reused: None,
                         profile=None, spec=None, dtype="f32", executor=compute, groups=Refusing())
    plan = Plan(num_layers=4, stages=(Stage(member_id="a", layer_start=0, layer_end=4, group=("b",)),))
    loader._plan = plan
    asyncio.run(loader._follow(plan, plan.stages[0], 1))
    assert [s.state for s in statuses] == ["loading", "failed"] and "too many processes" in statuses[-1].error
    compute.shutdown()
