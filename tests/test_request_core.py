"""The coordinator's request protocol, step by step on a fake clock (no asyncio, no network):
attempts, resends, re-placement waits, the KV replica resume and the hand-over."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import RequestFailed
from mesh.placement.pipeline import Plan, Stage
from mesh.runtime.engine import SamplingParams
from mesh.runtime.request_core import (
    MAX_ATTEMPTS,
    Emit,
    EndAttempt,
    Failed,
    Finished,
    Observe,
    PlanState,
    RequestCore,
    RequestEvent,
    SendForward,
    SendKvLoad,
    Timeouts,
)

TIMEOUTS = Timeouts(prefill_s=8.0, decode_s=4.0, send_s=1.0, recovery_s=10.0, retry_s=0.5)
PROMPT = [11, 12, 13]


def plan(*members: str, prefill: tuple[str, ...] = ()) -> Plan:
    n = len(members)
    stages = tuple(Stage(member_id=m, layer_start=i * 4, layer_end=(i + 1) * 4) for i, m in enumerate(members))
    pre = tuple(Stage(member_id=m, layer_start=i * 4 * n // len(prefill), layer_end=(i + 1) * 4 * n // len(prefill))
                for i, m in enumerate(prefill)) if prefill else ()
    return Plan(num_layers=4 * n, stages=stages, prefill_stages=pre)


def drain(core: RequestCore) -> list[Any]:
    out = []
    while (action := core.next_action()) is not None:
        out.append(action)
    return out


def core_for(max_tokens: int = 4, **kw: Any) -> RequestCore:
    return RequestCore("r", PROMPT, SamplingParams(max_tokens=max_tokens), seed=7, timeouts=TIMEOUTS,
                       eos_token_ids={0}, **kw)


def forwards(actions: list[Any]) -> list[SendForward]:
    return [a for a in actions if isinstance(a, SendForward)]


@pytest.mark.spec("N9")
def test_a_request_runs_step_by_step_and_releases_its_caches() -> None:
    core = core_for(max_tokens=3)
    core.start(plan("a", "b"), now=0.0)
    first = drain(core)
    assert first[0] == RequestEvent(state="running", stages=["a", "b"])
    (fwd,) = forwards(first)
    assert (fwd.member, fwd.req, fwd.step, fwd.pos, fwd.tokens) == ("a", "r.0", 0, 0, PROMPT)
    core.token("r.0", 0, 5, None, now=0.2)
    out = drain(core)
    assert Emit(token=5) in out and not forwards(out) and core.get_timer() is None  # waits for the consumer
    core.token_taken(now=0.3)
    (fwd,) = forwards(drain(core))
    assert (fwd.step, fwd.pos, fwd.tokens) == (1, 3, [5])
    core.token("r.0", 1, 6, None, now=0.4)
    core.token_taken(now=0.4)
    core.token("r.0", 2, 7, None, now=0.5)
    out = drain(core)
    assert out[-3:] == [Emit(token=7), EndAttempt(req="r.0", members=frozenset({"a", "b"})), Finished(tokens=3)]
    assert core.generated == [5, 6, 7] and core.outcome == "finished"


def test_an_end_of_sequence_token_finishes_unless_ignored() -> None:
    core = core_for(max_tokens=9)
    core.start(plan("a"), 0.0)
    drain(core)
    core.token("r.0", 0, 0, None, 0.1)
    assert isinstance(drain(core)[-1], Finished)
    ignoring = RequestCore("r", PROMPT, SamplingParams(max_tokens=9, ignore_eos=True), seed=1, timeouts=TIMEOUTS,
                           eos_token_ids={0})
    ignoring.start(plan("a"), 0.0)
    drain(ignoring)
    ignoring.token("r.0", 0, 0, None, 0.1)
    assert not ignoring.done


@pytest.mark.spec("FO2")
def test_a_late_step_is_sent_again_then_the_attempt_fails() -> None:
    core = core_for()
    core.start(plan("a"), 0.0)
    (fwd,) = forwards(drain(core))
    # a prefill of 3 tokens at the default pace: resent after max(retry_s, 3 x 0.01 x 3) = 0.5 s
    assert core.get_timer() == pytest.approx(0.5)
    core.timer(0.5)
    assert forwards(drain(core)) == [fwd]  # the same step again: stages answer it from what they kept
    core.token("r.0", 5, 9, None, 0.6)  # a reply to another step: stale
    core.token("r.9", 0, 9, None, 0.6)  # of another attempt: stale
    assert not drain(core)
    core.timer(TIMEOUTS.prefill_s)
    out = drain(core)
    assert isinstance(out[0], EndAttempt) and out[1].kind == "failover" and "no token within 8 s" in out[1].detail
    assert core.waiting_for_plan()


@pytest.mark.spec("FO3", "FO1")
def test_after_a_failure_the_next_attempt_continues_at_the_same_step_on_a_new_plan() -> None:
    core = core_for(max_tokens=5)
    core.start(plan("a", "b"), 0.0)
    drain(core)
    core.token("r.0", 0, 5, None, 1.0)
    core.token_taken(1.0)
    core.token("r.0", 1, 6, None, 1.1)
    core.token_taken(1.1)
    drain(core)
    core.error("r.0", "b: boom", fatal=False, now=2.0)
    assert core.settling(2.1)
    core.plan_changed(PlanState(plan=plan("a", "b"), ready=True, reason="ok"), 2.1)  # the stale plan: too early
    assert core.attempt is None
    assert core.get_timer() == pytest.approx(2.2)  # settles 0.2 s after the first failure
    core.plan_changed(PlanState(plan=None, ready=False, reason="member b is loading"), 2.3)
    assert core.get_timer() == pytest.approx(12.0)  # now the recovery deadline
    core.plan_changed(PlanState(plan=plan("a", "c"), ready=True, reason="ok"), 3.0)
    out = drain(core)
    (fwd,) = forwards(out)
    assert (fwd.req, fwd.step, fwd.pos, fwd.tokens, fwd.route[1][0]) == ("r.1", 2, 0, [*PROMPT, 5, 6], "c")
    assert fwd.split == [3, 1, 1]  # spec FO9: the prompt in one, then a token at a time, as the first attempt did
    core.token("r.1", 2, 7, None, 3.5)
    assert Observe(kind="recovered", value=pytest.approx(1.5)) in drain(core)


def test_recovery_ends_when_placement_fails_or_the_budget_runs_out() -> None:
    core = core_for()
    core.start(plan("a"), 0.0)
    drain(core)
    core.member_lost("a", 1.0)
    core.plan_changed(PlanState(plan=None, ready=False, reason="placement failed: does not fit"), 2.0)
    (failed,) = [a for a in drain(core) if isinstance(a, Failed)]
    assert isinstance(failed.error, RequestFailed) and "does not fit" in str(failed.error)
    late = core_for()
    late.start(plan("a"), 0.0)
    drain(late)
    late.error("r.0", "lost", fatal=False, now=1.0)
    late.timer(1.0 + TIMEOUTS.recovery_s, PlanState(plan=None, ready=False, reason="waiting"))
    assert "no working plan within 10 s" in str(drain(late)[-1].error)


def test_a_fatal_error_fails_the_request_at_once() -> None:
    core = core_for()
    core.start(plan("a"), 0.0)
    drain(core)
    core.error("r.0", "a: bad input", fatal=True, now=0.5)
    out = drain(core)
    assert out == [EndAttempt(req="r.0", members=frozenset({"a"})), out[-1]]
    assert isinstance(out[-1], Failed) and "bad input" in str(out[-1].error)


def test_shutdown_ends_a_running_or_recovering_request() -> None:
    running = core_for()
    running.start(plan("a"), 0.0)
    drain(running)
    running.shutdown("the node is shutting down", 1.0)
    assert "shutting down" in str(drain(running)[-1].error)
    recovering = core_for()
    recovering.start(plan("a"), 0.0)
    drain(recovering)
    recovering.member_lost("a", 1.0)
    drain(recovering)
    recovering.shutdown("the node is shutting down", 1.1)
    assert isinstance(drain(recovering)[-1], Failed)


def test_a_request_gives_up_after_max_attempts() -> None:
    core = core_for()
    core.start(plan("a"), 0.0)
    now = 0.0
    for _ in range(MAX_ATTEMPTS):
        drain(core)
        core.error(core.current, "flaky", fatal=False, now=now)
        now += 1.0
        core.plan_changed(PlanState(plan=plan("a"), ready=True, reason="ok"), now)
    assert "gave up after 8 attempts" in str(drain(core)[-1].error)


@pytest.mark.spec("N13")
def test_a_disaggregated_prefill_hands_its_kv_to_the_decode_stages() -> None:
    core = core_for()
    core.start(plan("d1", "d2", prefill=("p",)), 0.0)
    out = drain(core)
    assert out[0] == RequestEvent(state="running", stages=["p"])
    (fwd,) = forwards(out)
    assert fwd.member == "p" and fwd.kv_to == [["d1", 0, 4], ["d2", 4, 8]]
    core.token("r.0", 0, 5, None, 1.0)
    drain(core)
    core.token_taken(1.0)  # the consumer is fast: the next step waits for the hand-over
    assert not forwards(drain(core)) and core.get_timer() == pytest.approx(3.0)  # max(send_s, 2 x 1 s)
    core.kv_loaded("r.0", "d1", 3, True, "", 1.5)
    core.kv_loaded("r.0", "d2", 99, True, "", 1.5)  # another prefix: not this hand-over's
    assert not drain(core)
    core.kv_loaded("r.0", "d2", 3, True, "", 1.6)
    out = drain(core)
    assert Observe(kind="handover", detail="moved") in out
    assert RequestEvent(state="running", stages=["d1", "d2"]) in out
    (fwd,) = forwards(out)
    assert (fwd.member, fwd.step, fwd.pos, fwd.tokens, fwd.kv_to) == ("d1", 1, 3, [5], None)


def test_a_failed_hand_over_makes_the_decode_stages_prefill_themselves() -> None:
    core = core_for()
    core.start(plan("d1", prefill=("p",)), 0.0)
    drain(core)
    core.token("r.0", 0, 5, None, 1.0)
    drain(core)
    core.timer(3.0)  # the KV never arrived
    out = drain(core)
    assert Observe(kind="handover", detail="recomputed", why="['d1'] did not answer in time") in out
    assert not forwards(out)  # the consumer has not taken the token yet
    core.token_taken(3.1)
    out = drain(core)
    (fwd,) = forwards(out)
    assert (fwd.member, fwd.step, fwd.pos, fwd.tokens, fwd.split) == ("d1", 1, 0, [*PROMPT, 5], [3, 1])
    assert RequestEvent(state="running", stages=["d1"]) in out


class FakeReplica:
    def __init__(self, covered: int) -> None:
        self._covered, self.broken = covered, ""

    def covered(self) -> int:
        return self._covered

    def block(self, start: int, end: int, upto: int) -> tuple[list[int], str]:
        return list(range(start, end)), f"kv[{start},{end})[:{upto}]"


@pytest.mark.spec("FO8")
def test_a_new_attempt_resumes_from_the_kv_replica() -> None:
    core = core_for(max_tokens=6, replica=FakeReplica(covered=4))  # type: ignore[arg-type]
    core.start(plan("a", "b"), 0.0)
    assert forwards(drain(core))[0].replica
    for step, token in enumerate((5, 6)):
        core.token("r.0", step, token, None, 0.1 * (step + 1))
        core.token_taken(0.1 * (step + 1))
    drain(core)
    core.member_lost("b", 1.0)
    drain(core)
    core.plan_changed(PlanState(plan=plan("a", "c"), ready=True, reason="ok"), 2.0)
    loads = [a for a in drain(core) if isinstance(a, SendKvLoad)]
    assert [(x.member, x.layers, x.end) for x in loads] == [("a", [0, 1, 2, 3], 4), ("c", [4, 5, 6, 7], 4)]
    assert core.wants(loads[1])
    core.kv_loaded("r.1", "a", 4, True, "", 2.1)
    core.kv_loaded("r.1", "c", 4, True, "", 2.2)
    out = drain(core)
    assert Observe(kind="resume", detail="resumed", value=pytest.approx(0.2)) in out
    (fwd,) = forwards(out)
    assert (fwd.step, fwd.pos, fwd.tokens) == (2, 4, [6])  # positions [0, 4) came from the replica
    assert fwd.split is None  # one position: one step


@pytest.mark.spec("FO9")
@pytest.mark.parametrize("covered, pos, tokens, split, why", [
    (3, 3, [5, 6, 7], [1, 1, 1], ""),  # a lagging replica: the generated tokens re-fed one per sub-step
    (5, 5, [7], None, ""),
    (2, 0, [*PROMPT, 5, 6, 7], [3, 1, 1, 1], "the replica covers 2 of the prompt's 3 positions"),
])
def test_a_resume_re_feeds_positions_in_the_shapes_of_the_original_steps(
        covered: int, pos: int, tokens: list[int], split: list[int] | None, why: str) -> None:
    core = core_for(max_tokens=8, replica=FakeReplica(covered=covered))  # type: ignore[arg-type]
    core.start(plan("a"), 0.0)
    for step, token in enumerate((5, 6, 7)):
        core.token("r.0", step, token, None, 0.1 * (step + 1))
        core.token_taken(0.1 * (step + 1))
    drain(core)
    core.member_lost("a", 1.0)
    core.plan_changed(PlanState(plan=plan("b"), ready=True, reason="ok"), 2.0)
    out = drain(core)
    if pos:
        core.kv_loaded("r.1", "b", pos, True, "", 2.1)
        out = drain(core)
    else:
        assert Observe(kind="resume", detail="reprefill", why=why) in out
    (fwd,) = forwards(out)
    assert (fwd.step, fwd.pos, fwd.tokens, fwd.split) == (3, pos, tokens, split)
    # the sub-steps beyond the first each add about a decode step (0.1 s here) to the budget
    assert core.attempt is not None
    assert core.attempt.limit_s == pytest.approx(TIMEOUTS.prefill_s + 4 * 0.1 * (len(split or [1]) - 1))


def test_a_resume_that_cannot_load_prefills_from_the_start() -> None:
    core = core_for(max_tokens=6, replica=FakeReplica(covered=4))  # type: ignore[arg-type]
    core.start(plan("a"), 0.0)
    drain(core)
    core.token("r.0", 0, 5, None, 0.1)
    core.token_taken(0.1)
    core.error("r.0", "lost", fatal=False, now=1.0)
    core.plan_changed(PlanState(plan=plan("a"), ready=True, reason="ok"), 2.0)
    (load,) = [a for a in drain(core) if isinstance(a, SendKvLoad)]
    core.kv_loaded("r.1", "a", 3, False, "a: no layers", 2.1)
    out = drain(core)
    assert Observe(kind="resume", detail="reprefill", why="a: no layers") in out
    (fwd,) = forwards(out)
    assert (fwd.pos, fwd.tokens) == (0, [*PROMPT, 5]) and not core.wants(load)


@pytest.mark.spec("FO8", "N26")
def test_a_resume_on_a_stage_that_is_gone_keeps_the_replica_for_the_next_plan() -> None:
    """A kv.load answered "gone" (the stage itself failed: a tensor-parallel group lost a
    member) fails the attempt instead of re-prefilling on that stage; the next plan resumes
    from the same replica."""
    core = core_for(max_tokens=6, replica=FakeReplica(covered=4))  # type: ignore[arg-type]
    core.start(plan("a"), 0.0)
    drain(core)
    for step, token in enumerate((5, 6)):
        core.token("r.0", step, token, None, 0.1 * (step + 1))
        core.token_taken(0.1 * (step + 1))
    core.error("r.0", "lost", fatal=False, now=1.0)
    core.plan_changed(PlanState(plan=plan("a"), ready=True, reason="ok"), 2.0)
    (load,) = [x for x in drain(core) if isinstance(x, SendKvLoad)]
    core.kv_loaded("r.1", "a", 4, False, "a: the tensor-parallel group failed", 2.1, gone=True)
    assert not forwards(drain(core))  # no re-prefill on the stage that is gone
    core.plan_changed(PlanState(plan=plan("b"), ready=True, reason="ok"), 3.0)
    (again,) = [x for x in drain(core) if isinstance(x, SendKvLoad)]
    assert (again.member, again.end) == ("b", 4)
    core.kv_loaded("r.2", "b", 4, True, "", 3.1)
    (fwd,) = forwards(drain(core))
    assert (fwd.pos, fwd.tokens) == (4, [6])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["token", "lost", "stale", "late"]), min_size=1, max_size=30))
def test_any_sequence_of_faults_keeps_the_token_stream_a_prefix_of_the_fault_free_one(events: list[str]) -> None:
    """Whatever fails, the tokens a request emits are the fault-free stream's first ones
    (the stages' tokens are a pure function of the step here), and it ends one way or another."""
    core = core_for(max_tokens=6)
    now = 0.0
    core.start(plan("a", "b"), now)
    emitted: list[int] = []
    for event in [*events, *["token"] * 40]:
        now += 0.7
        for action in drain(core):
            if isinstance(action, Emit):
                emitted.append(action.token)
        if core.done:
            break
        if core.waiting_for_plan():
            core.plan_changed(PlanState(plan=plan("a", "b"), ready=True, reason="ok"), now)
            continue
        fwd = core.attempt.forward if core.attempt else None
        if fwd is None:
            core.token_taken(now)
            continue
        if event == "token":
            core.token(fwd.req, fwd.step, 100 + fwd.step, None, now)
            core.token_taken(now)
        elif event == "lost":
            core.member_lost("b", now)
        elif event == "stale":
            core.token(fwd.req + "x", fwd.step, 1, None, now)
        else:
            core.timer(now + TIMEOUTS.prefill_s)
    emitted += [a.token for a in drain(core) if isinstance(a, Emit)]
    assert emitted == [100 + i for i in range(len(emitted))]


@pytest.mark.spec("FO2")
def test_a_step_is_resent_only_after_its_send_returned_and_a_repeated_reply_is_ignored() -> None:
    core = core_for()
    core.start(plan("a"), 0.0)
    (fwd,) = forwards(drain(core))
    core.sent(fwd, now=2.0)  # the send waited 2 s on a busy link
    assert core.get_timer() == pytest.approx(2.5)
    core.timer(1.0)
    assert not forwards(drain(core))
    core.token("r.0", 0, 5, None, 2.1)
    core.token("r.0", 0, 5, None, 2.1)  # the same reply twice before the consumer took the token
    assert [a for a in drain(core) if isinstance(a, Emit)] == [Emit(token=5)] and core.generated == [5]


@pytest.mark.spec("N23", "FO9")
def test_a_prompt_is_prefilled_in_chunks_and_a_replay_uses_the_same_chunks() -> None:
    prompt = list(range(1, 11))  # 10 tokens in chunks of 4: [4, 4, 2]
    core = RequestCore("r", prompt, SamplingParams(max_tokens=8), seed=7, timeouts=TIMEOUTS, eos_token_ids={0},
                       prefill_chunk=4)
    core.start(plan("a"), 0.0)
    (fwd,) = forwards(drain(core))
    assert (fwd.pos, fwd.tokens, fwd.split) == (0, prompt, [4, 4, 2])
    for step, token in enumerate((50, 51)):
        core.token("r.0", step, token, None, 0.1 * (step + 1))
        core.token_taken(0.1 * (step + 1))
    decode = forwards(drain(core))[-1]
    assert (decode.pos, decode.tokens, decode.split) == (11, [51], None)
    assert core.prefill_s_per_token == pytest.approx(0.1 / 10)  # a chunked prefill still sets the pace
    core.member_lost("a", 1.0)
    core.plan_changed(PlanState(plan=plan("b"), ready=True, reason="ok"), 2.0)
    (replay,) = forwards(drain(core))  # no replica: the prompt again in its chunks, then one per token
    assert (replay.pos, replay.tokens, replay.split) == (0, [*prompt, 50, 51], [4, 4, 2, 1, 1])
    short = RequestCore("s", prompt[:3], SamplingParams(max_tokens=2), seed=7, timeouts=TIMEOUTS,
                        eos_token_ids={0}, prefill_chunk=4)
    short.start(plan("a"), 0.0)
    assert forwards(drain(short))[0].split is None  # a prompt within one chunk is one step
