"""The request plane (mesh/runtime/plane.py): loopback delivery, one dispatch per message type,
malformed messages dropped, handlers owned by its task group, the plan board, drained and
statistics (spec N15, N16)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from mesh.errors import RequestFailed, TransportError
from mesh.placement.pipeline import Plan, Stage
from mesh.runtime import messages
from mesh.runtime.engine import SamplingParams
from mesh.runtime.messages import (
    Forward,
    KvLoad,
    KvLoaded,
    KvPush,
    KvReplica,
    Release,
    Released,
    StepError,
    Token,
)
from mesh.runtime.plane import PlanBoard, PlaneStatistics, PlanState, RequestPlane
from mesh.runtime.request_core import Timeouts
from mesh.testing.minicluster import PROMPT, HistoryBackend, reference_tokens
from mesh.wire import Message, WireTensor

ME = "m0"
LAYERS = 6
TIMEOUTS = Timeouts(prefill_s=5.0, decode_s=2.0, send_s=1.0, recovery_s=2.0, retry_s=0.1)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
BLOCK = WireTensor(dtype="f32", shape=(1, 2, 1, 3, 1), data=bytes(24))


class _Model:
    model_id = "history"
    context_length = 4096
    eos_token_ids = frozenset({0})
    tokenizer = None

    def encode_chat(self, conversation: list[dict[str, str]]) -> list[int]:
        return [1]


class Wire:
    """``send_remote``: records what leaves this member; ``fail`` names unreachable members."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.fail: set[str] = set()
        self.arrived = asyncio.Event()

    async def __call__(self, member: str, msg: Message) -> None:
        if member in self.fail:
            raise TransportError(f"no link to {member}")
        self.sent.append((member, msg))
        self.arrived.set()

    async def next(self, kind: type, timeout_s: float = 5.0) -> tuple[str, Any]:
        """The first message of ``kind`` sent so far, waiting for it (TimeoutError after ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                for member, msg in self.sent:
                    record = messages.decode(msg)
                    if isinstance(record, kind):
                        return member, record
                self.arrived.clear()
                await self.arrived.wait()


def one_stage_plan() -> Plan:
    return Plan(num_layers=LAYERS, stages=(Stage(member_id=ME, layer_start=0, layer_end=LAYERS),))


@pytest.fixture(scope="module")
def expected() -> list[int]:
    """The tokens a fault-free cluster gives for ``PROMPT`` with ``GREEDY``."""
    return reference_tokens(GREEDY)


@pytest.fixture
async def wire() -> Wire:
    return Wire()


@pytest.fixture
async def plane(wire: Wire) -> AsyncIterator[RequestPlane]:
    """A running plane for member ``m0`` holding every layer, with a ready one-stage plan."""
    executor = ThreadPoolExecutor(max_workers=1)
    board = PlanBoard()
    events: list[tuple[str, str]] = []
    p = RequestPlane(ME, model=_Model(), timeouts=TIMEOUTS, executor=executor, send_remote=wire,  # type: ignore[arg-type]
                     plans=board, on_request_event=lambda req, state, stages: events.append((req, state)))
    p.install(HistoryBackend(0, LAYERS, LAYERS))
    board.update(PlanState(plan=one_stage_plan(), ready=True, reason="ok"))
    task = asyncio.create_task(p.run(), name="plane")
    await asyncio.sleep(0)  # run() opens its task group
    try:
        yield p
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        executor.shutdown(wait=False, cancel_futures=True)


async def generate(plane: RequestPlane, params: SamplingParams = GREEDY) -> list[int]:
    return [t async for t in plane.coordinator.generate(PROMPT, params)]


def forward(**override: Any) -> Forward:
    fields: dict[str, Any] = dict(req="r.0", coord="c", plan_id="p", route=[[ME, 0, LAYERS]], idx=0, step=0, pos=0,
                                  tokens=[3, 1, 4], temperature=0.0, top_p=1.0, seed=5)
    fields.update(override)
    return Forward(**fields)


# -- loopback ----------------------------------------------------------------------------
@pytest.mark.spec("N16")
async def test_a_request_through_this_member_only_never_leaves_it(plane: RequestPlane, wire: Wire,
                                                                  expected: list[int]) -> None:
    assert await generate(plane) == expected
    assert wire.sent == []  # forward, token, release and released all looped back in-process


@pytest.mark.spec("N16")
async def test_send_to_another_member_goes_through_send_remote(plane: RequestPlane, wire: Wire) -> None:
    await plane.send("m1", Release(req="r.0").to_message())
    assert [(m, msg.type) for m, msg in wire.sent] == [("m1", "release")]
    wire.fail.add("m2")
    with pytest.raises(TransportError):
        await plane.send("m2", Release(req="r.0").to_message())


# -- dispatch ----------------------------------------------------------------------------
REPLIES = [Token(req="r.0", step=0, token=1, timing=[]), StepError(req="r.0", message="x", fatal=True),
           KvLoaded(req="r.0", member="m1", end=3, ok=True), KvReplica(req="r.0", start=0, layers=[0], block=BLOCK),
           Released(req="r.0")]


@pytest.mark.spec("N15", "N16")
@pytest.mark.parametrize("record", REPLIES, ids=lambda r: type(r).__name__)
async def test_replies_go_to_the_coordinator_decoded(plane: RequestPlane, record: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[tuple[Any, str]] = []
    monkeypatch.setattr(plane.coordinator, "deliver", lambda msg, sender="": got.append((msg, sender)))
    await plane.receive("m1", record.to_message())
    assert got == [(record, "m1")]


@pytest.mark.spec("N15", "N16")
@pytest.mark.parametrize(("record", "handler"), [
    (forward(), "on_forward"),
    (KvLoad(req="r.0", coord="c", layers=[0], end=3, block=BLOCK), "on_kv_load"),
    (KvPush(req="r.0", coord="c", layer=0, end=3, layer_range=(0, 1), block=BLOCK), "on_kv_push"),
], ids=["forward", "kv.load", "kv.push"])
async def test_steps_and_kv_transfers_run_as_tasks_of_the_plane(plane: RequestPlane, record: Any, handler: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ran = asyncio.Event()
    seen: list[Any] = []

    async def record_call(*args: Any) -> None:
        seen.append(args)
        ran.set()

    monkeypatch.setattr(plane.worker, handler, record_call)
    await plane.receive("m1", record.to_message())
    assert seen == []  # receive only starts the task: a slow step never blocks the link's reader
    async with asyncio.timeout(5):
        await ran.wait()
    assert seen[0][-1] == record and (handler == "on_forward" or seen[0][0] == "m1")


@pytest.mark.spec("N8", "N16")
async def test_release_frees_the_cache_and_is_acknowledged(plane: RequestPlane, wire: Wire) -> None:
    plane.worker.caches["r.0"] = []
    await plane.receive("c", Release(req="r.0").to_message())
    assert "r.0" not in plane.worker.caches and plane.worker.ledger.is_released("r.0")
    assert await wire.next(Released) == ("c", Released(req="r.0"))


@pytest.mark.spec("N5", "N16")
async def test_a_forward_is_computed_and_its_token_sent_to_the_coordinator(plane: RequestPlane, wire: Wire) -> None:
    await plane.receive("c", forward().to_message())
    member, token = await wire.next(Token)
    assert member == "c" and token.req == "r.0" and token.step == 0 and token.timing[0][0] == ME
    assert "r.0" in plane.worker.caches


@pytest.mark.spec("FO8", "N16")
async def test_a_kv_load_or_push_this_stage_cannot_take_is_answered_not_ok(plane: RequestPlane, wire: Wire) -> None:
    await plane.receive("c", KvPush(req="r.1", coord="c", layer=0, end=3, layer_range=(0, 2),
                                    block=BLOCK).to_message())
    member, loaded = await wire.next(KvLoaded)
    assert member == "c" and not loaded.ok and "holds [[0, 6]]" in loaded.message
    plane.install(None)
    await plane.receive("m1", KvLoad(req="r.2", coord="c", layers=[0], end=3, block=BLOCK).to_message())
    async with asyncio.timeout(5):
        while len(wire.sent) < 2:
            wire.arrived.clear()
            await wire.arrived.wait()
    member, msg = wire.sent[1]
    assert member == "m1" and messages.decode(msg) == KvLoaded(req="r.2", member=ME, end=3, ok=False,
                                                                message=f"{ME}: no layers loaded here")


# -- malformed messages ------------------------------------------------------------------
MALFORMED = [
    Message(type="forward", body={"req": "x" * 65, "coord": "c", "route": [[ME, 0, 6]], "idx": 0, "step": 0,
                                  "pos": 0, "tokens": [1], "sp": {"t": 0.0, "p": 1.0, "seed": 1}}),
    Message(type="forward", body={"req": "r.0"}),
    Message(type="token", body={"req": "r.0", "step": 0, "token": "one"}),
    Message(type="error", body={"req": ""}),
    Message(type="release", body={}),
    Message(type="released", body={"req": 7}),
    Message(type="kv.replica", body={"req": "r.0", "start": 0, "layers": [0]}),  # no tensor
    Message(type="kv.load", body={"req": "r.0", "coord": "c" * 129, "layers": [0], "end": 3}, tensor=BLOCK),
    Message(type="kv.loaded", body={"req": "r.0", "member": "", "end": 3, "ok": True}),
    Message(type="kv.push", body={"req": "r.0", "coord": "c", "layer": 0, "end": 3, "range": "0-1"}, tensor=BLOCK),
]


@pytest.mark.spec("N15")
@pytest.mark.parametrize("msg", MALFORMED, ids=lambda m: m.type)
async def test_a_malformed_message_is_logged_and_dropped(plane: RequestPlane, wire: Wire, msg: Message,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    touched: list[str] = []

    def spy(name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: touched.append(name)

    for name in ("on_forward", "on_kv_load", "on_kv_push", "release"):
        monkeypatch.setattr(plane.worker, name, spy(name))
    monkeypatch.setattr(plane.coordinator, "deliver", spy("deliver"))
    with caplog.at_level(logging.WARNING, logger="mesh.runtime.plane"):
        await plane.receive("m1", msg)  # never raises
    await asyncio.sleep(0)
    assert touched == [] and wire.sent == []
    assert f"dropping a malformed {msg.type} message from m1" in caplog.text


@pytest.mark.spec("N16")
async def test_every_request_plane_type_is_handled() -> None:
    assert RequestPlane.MESSAGE_TYPES == {"forward", "token", "error", "release", "released", "kv.replica",
                                          "kv.load", "kv.loaded", "kv.push"}


# -- the task group ----------------------------------------------------------------------
@pytest.mark.spec("FO3", "N16")
async def test_a_step_whose_next_stage_is_gone_reports_a_non_fatal_error(wire: Wire) -> None:
    # regression: a send of the step's output that failed ended the plane's task group
    wire.fail.add("m1")
    board, executor = PlanBoard(), ThreadPoolExecutor(max_workers=1)
    p = RequestPlane(ME, model=_Model(), timeouts=TIMEOUTS, executor=executor, send_remote=wire,  # type: ignore[arg-type]
                     plans=board, on_request_event=lambda *a: None)
    p.install(HistoryBackend(0, 3, LAYERS))
    task = asyncio.create_task(p.run())
    try:
        await asyncio.sleep(0)
        await p.receive("c", forward(route=[[ME, 0, 3], ["m1", 3, LAYERS]]).to_message())
        member, error = await wire.next(StepError)
        assert member == "c" and not error.fatal and "no link to m1" in error.message
        assert "r.0" not in p.worker.caches and not task.done()  # the plane still serves
        await p.receive("c", forward(req="r.1", route=[[ME, 0, 3], ["m2", 3, LAYERS]]).to_message())
        assert (await asyncio.wait_for(wire.next(Forward), 5))[0] == "m2"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        executor.shutdown(wait=False, cancel_futures=True)


@pytest.mark.spec("N16")
async def test_an_unexpected_handler_error_ends_run(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    p = RequestPlane(ME, model=_Model(), timeouts=TIMEOUTS, executor=executor, send_remote=wire,  # type: ignore[arg-type]
                     plans=PlanBoard(), on_request_event=lambda *a: None)

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug in a handler")

    monkeypatch.setattr(p.worker, "on_kv_load", broken)
    task = asyncio.create_task(p.run())
    try:
        await asyncio.sleep(0)
        await p.receive("c", KvLoad(req="r.0", coord="c", layers=[0], end=3, block=BLOCK).to_message())
        with pytest.raises(ExceptionGroup) as raised:
            await asyncio.wait_for(task, 5)
        assert raised.group_contains(RuntimeError, match="a bug in a handler")
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


@pytest.mark.spec("N16")
async def test_a_message_while_the_plane_is_not_running_is_dropped(wire: Wire) -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    p = RequestPlane(ME, model=_Model(), timeouts=TIMEOUTS, executor=executor, send_remote=wire,  # type: ignore[arg-type]
                     plans=PlanBoard(), on_request_event=lambda *a: None)
    p.install(HistoryBackend(0, LAYERS, LAYERS))
    await p.receive("c", forward().to_message())  # no task group: the sender's timeout covers it
    assert wire.sent == [] and p.worker.caches == {}
    executor.shutdown(wait=False)


@pytest.mark.spec("FO6", "N16")
async def test_member_lost_frees_the_caches_it_coordinated(plane: RequestPlane, wire: Wire) -> None:
    await plane.receive("c", forward().to_message())
    await wire.next(Token)
    plane.member_lost("c")
    assert plane.worker.caches == {}


# -- the plan board ----------------------------------------------------------------------
@pytest.mark.spec("N16", "FO3")
async def test_wait_ready_returns_at_once_wakes_on_update_and_times_out() -> None:
    board = PlanBoard()
    assert board.state() == PlanState(plan=None, ready=False, reason="no placement yet")
    assert (await board.wait_ready(0.01)).reason == "no placement yet"  # the latest state, no TimeoutError
    waiter = asyncio.create_task(board.wait_ready(5.0))
    await asyncio.sleep(0)
    board.update(PlanState(plan=one_stage_plan(), ready=False, reason="stages are loading"))
    await asyncio.sleep(0)
    assert not waiter.done()  # not ready yet
    ready = PlanState(plan=one_stage_plan(), ready=True, reason="ok")
    board.update(ready)
    assert await asyncio.wait_for(waiter, 1.0) == ready
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await board.wait_ready(5.0) == ready and loop.time() - started < 0.5
    board.update(PlanState(plan=None, ready=False, reason="placement failed: no members"))
    assert (await board.wait_ready(0.02)).reason == "placement failed: no members"


@pytest.mark.spec("N16")
async def test_a_request_on_a_board_that_is_not_ready_fails_with_its_reason(plane: RequestPlane) -> None:
    plane.plans.update(PlanState(plan=None, ready=False, reason="stage 1 has no node"))
    with pytest.raises(RequestFailed, match="stage 1 has no node"):
        await generate(plane)


# -- drained and statistics --------------------------------------------------------------
@pytest.mark.spec("N16")
async def test_drained_waits_for_the_last_request_in_flight(plane: RequestPlane, expected: list[int]) -> None:
    assert await plane.drained(0.0)
    plane.install(HistoryBackend(0, LAYERS, LAYERS, step_delay_s=0.05))
    request = asyncio.create_task(generate(plane))
    await asyncio.sleep(0.01)
    assert plane.statistics().active == 1
    assert not await plane.drained(0.01)
    assert await plane.drained(5.0)
    assert await request == expected


@pytest.mark.spec("N12", "N16")
async def test_statistics_is_a_frozen_record_of_the_plane(plane: RequestPlane) -> None:
    before = plane.statistics()
    assert (before.active, before.recovering, before.failed_attempts, before.recovery_s) == (0, 0, 0, ())
    assert before.measured is None and before.kv_caches == 0 and before.kv_replica_bytes == 0
    await generate(plane)
    stats = plane.statistics()
    assert isinstance(stats, PlaneStatistics) and stats.active == 0 and stats.kv_caches == 0
    assert stats.measured is not None and len(stats.requests["recent"]) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.active = 3  # type: ignore[misc]


@pytest.mark.spec("N10", "FO8")
async def test_a_plugin_that_breaks_its_kv_contract_costs_a_not_ok_answer_not_the_node(
        plane: RequestPlane, wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = plane.worker.backend

    def broken(cache: Any, layers: Any) -> None:
        raise ZeroDivisionError("a plugin bug")

    monkeypatch.setattr(backend, "import_kv", broken)
    block = WireTensor(dtype="f32", shape=(1, 2, 1, 3, 1), data=bytes(24))
    await plane.receive("m1", KvLoad(req="r.5", coord="c", layers=[0], end=3, block=block).to_message())
    member, loaded = await wire.next(KvLoaded)
    assert member == "m1" and not loaded.ok and "ZeroDivisionError" in loaded.message
    await plane.receive("c", forward().to_message())  # the plane still serves
    await wire.next(Token)


@pytest.mark.spec("N21", "FO5")
async def test_a_worker_holding_two_stages_computes_each_request_on_its_routes_range(plane: RequestPlane,
                                                                                      wire: Wire) -> None:
    """Make-before-break: the new stage [0, 3) is held beside the old [0, 6); a request routed
    through either computes on that one; retiring the old stage frees only its caches and
    tells their coordinators."""
    plane.worker.add_stage(HistoryBackend(0, 3, LAYERS))
    assert plane.worker.held() == [(0, LAYERS), (0, 3)]
    await plane.receive("c", forward(req="old.0").to_message())
    await wire.next(Token)  # the old route's last stage: a token
    await plane.receive("c", forward(req="new.0", route=[[ME, 0, 3], ["m1", 3, LAYERS]]).to_message())
    member, hidden = await wire.next(Forward)  # the new route's first stage: on to m1
    assert member == "m1" and hidden.req == "new.0" and hidden.idx == 1
    assert plane.worker.caches_on((0, LAYERS)) == 1 and plane.worker.caches_on((0, 3)) == 1
    wire.sent.clear()
    plane.worker.retire((0, LAYERS))
    assert plane.worker.held() == [(0, 3)] and set(plane.worker.caches) == {"new.0"}
    assert plane.worker.ledger.is_released("old.0")
    member, told = await wire.next(StepError)  # its coordinator fails over now, not at its step timeout
    assert member == "c" and told.req == "old.0" and not told.fatal and "unloaded" in told.message
    wire.sent.clear()
    await plane.receive("c", forward(req="late.0").to_message())  # a late request on the retired range
    _, error = await wire.next(StepError)
    assert not error.fatal and "needs [0, 6)" in error.message  # not fatal: it fails over (FO3)


@pytest.mark.spec("N21", "FO8")
async def test_a_kv_replica_goes_to_the_stage_of_exactly_its_layers(plane: RequestPlane, wire: Wire) -> None:
    """With the old stage [0, 6) and a new [0, 3) held, a replica of layers 0-2 is imported by
    the [0, 3) stage, whichever was added last."""
    from mesh.runtime.kvreplica import pack_kv

    old = plane.worker.stages[(0, LAYERS)]
    plane.worker.add_stage(HistoryBackend(0, 3, LAYERS))
    plane.worker.add_stage(old)  # the old stage re-added: now the newest
    ids, block = pack_kv(HistoryBackend(0, 3, LAYERS).export_kv([1, 2, 3], start_pos=0, end_pos=3))
    await plane.receive("c", KvLoad(req="r.9", coord="c", layers=ids, end=3, block=block).to_message())
    _, loaded = await wire.next(KvLoaded)
    assert loaded.ok, loaded.message
    assert plane.worker._cache_stage["r.9"] == (0, 3)
