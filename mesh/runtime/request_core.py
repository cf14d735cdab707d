"""The coordinator's protocol for one request, sans-IO: attempts, step resends, the wait for a
new plan, the KV replica resume and the prefill-to-decode hand-over (specs/faults.md FO1-FO8,
specs/node.md N9, N13).

``RequestCore`` never reads a clock, sleeps or sends: the shell (``mesh.runtime.coordinator``)
feeds it what happened, with ``now`` (monotonic seconds), and carries out what it returns:

- inputs: ``start(plan, now)``, ``token(step, token, timing, now)``, ``error(message, fatal,
  now)``, ``kv_loaded(member, end, ok, message, now, gone=)``, ``plan_changed(state, now)``,
  ``send_failed(action, error, timed_out, now)``, ``timer(now)`` (at ``get_timer()``),
  ``token_taken(now)`` (the consumer took the last token; the next step may start);
- outputs, in order, from ``next_action()``: ``SendForward``, ``SendKvLoad``, ``Emit`` (a
  token for the client), ``RequestEvent`` (for the cluster state), ``EndAttempt`` (release
  the attempt's caches), ``Observe`` (figures for metrics and statistics), and finally
  ``Finished`` or ``Failed``.

A request keeps its prompt, the tokens generated so far and its sampling seed (FO1), so any
attempt can continue where the last one stopped with the tokens a fault-free run gives.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import BackendError, MeshError, RequestFailed
from mesh.placement.pipeline import Plan
from mesh.runtime.batcher import prefill_chunks
from mesh.runtime.engine import SamplingParams
from mesh.runtime.kvreplica import ReplicaStore, RequestReplica

MAX_ATTEMPTS = 8  # attempts of one request (spec FO3); the recovery budget usually ends it first
REPLAY_STEP_GUESS_S = 0.25  # a decode step's seconds before this request timed one (a replay's time budget, FO9)


class StageFailure(MeshError):
    """One attempt of a request failed in a way a new attempt on a new plan may survive."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds to wait: for the first token (prefill through every stage), for each later
    token, and for a control send on a link; ``recovery_s``: how long a request may take,
    from a stage failure to its next token, to get a working plan again (spec FO3);
    ``retry_s``: the shortest wait before a step whose reply has not come is sent again;
    ``admit_s``: how long a new request waits for a plan to serve while one is placed but not
    ready (a plan change that could not keep the old plan serving, spec N21, or a first load)
    before it is refused (HTTP 503)."""

    prefill_s: float = 120.0
    decode_s: float = 30.0
    send_s: float = 5.0
    recovery_s: float = 60.0
    retry_s: float = 0.5
    admit_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanState:
    """What a request needs to know of placement: the plan and whether it is ready (every
    stage loaded and linked), else why not."""

    plan: Plan | None
    ready: bool
    reason: str


# -- outputs -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class SendForward:
    """Send step ``step`` of attempt ``req`` to ``member``, the first stage of ``route``."""

    member: str
    req: str
    plan_id: str
    route: list[list[Any]]
    step: int
    pos: int
    tokens: list[int]
    kv_to: list[list[Any]] | None
    replica: bool
    split: list[int] | None = None  # spec FO9: sub-step sizes of a replayed step
    prefix: list[list[Any]] | None = None  # spec N24: cached prompt prefixes the first stage may start from
    keep: list[Any] | None = None  # spec N24: [n, key]: the stages keep the prompt's whole chunks once computed


@dataclass(frozen=True, slots=True, kw_only=True)
class SendKvLoad:
    """Send ``member`` the replica's KV of ``layers`` for positions [0, ``end``) (spec FO8);
    a send still going at ``deadline`` (monotonic s) counts as failed (``timed_out``)."""

    member: str
    req: str
    layers: list[int]
    end: int
    block: Any
    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Emit:
    token: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestEvent:
    """The request's lifecycle for the cluster state: ``state`` and, while it runs, the
    members holding its KV caches."""

    state: str
    stages: list[str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EndAttempt:
    """Attempt ``req`` ended: free its KV caches on ``members`` (spec FO5)."""

    req: str
    members: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Observe:
    """A figure for metrics and statistics: ``kind`` is ``step`` (``value``: the step's wall
    seconds; ``timing``: per-stage compute, ``prefill``), ``failover`` (``detail``: why),
    ``recovered`` (``value``: seconds from the failure to the next token), ``resume``
    (``detail``: resumed/reprefill), ``handover`` (``detail``: moved/recomputed) or ``prefix``
    (``detail``: hit/miss; ``value``: positions taken from the prefix cache, spec N24)."""

    kind: str
    value: float = 0.0
    detail: str = ""
    why: str = ""  # for the log: why a resume or hand-over fell back
    timing: Any = None
    prefill: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    error: MeshError


Action = SendForward | SendKvLoad | Emit | RequestEvent | EndAttempt | Observe | Finished | Failed


# -- the core ----------------------------------------------------------------------------
@dataclass(slots=True)
class _Attempt:
    req: str
    plan: Plan
    route: list[list[Any]]
    prefill_route: list[list[Any]]
    members: frozenset[str]
    tokens: list[int] = field(default_factory=list)
    pos: int = 0
    first_step: int = 0
    recompute: bool = False  # the KV hand-over failed: the decode stages prefill themselves
    phase: str = "resume"  # resume -> step -> (handover) -> step ...
    step: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    resend_at: float = 0.0
    limit_s: float = 0.0
    retry_s: float = 0.0
    forward: SendForward | None = None
    waiting: set[str] = field(default_factory=set)  # kv.loaded still awaited
    early: dict[str, tuple[Any, bool, str]] = field(default_factory=dict)  # kv.loaded before the hand-over began
    wait_end: int = 0
    wait_started: float = 0.0


class RequestCore:
    """One request on one coordinator; see the module docstring.

    ``rid``: the request id (attempts are ``rid.N``); ``prompt``: its token ids (non-empty);
    ``seed``: the sampler's seed; ``replicas``/``replica``: the KV replica store and this
    request's replica (None: off); ``coordinator``: this coordinator's member id, whose own
    stages send no replica when an attempt runs on it alone (spec FO8).
    """

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, *, seed: int, timeouts: Timeouts,
                 eos_token_ids: frozenset[int] | set[int], replicas: ReplicaStore | None = None,
                 replica: RequestReplica | None = None, prefill_s_per_token: float = 0.01,
                 prefill_chunk: int = 0, prefix: list[tuple[int, str]] | None = None,
                 keep: tuple[int, str] | None = None, coordinator: str | None = None) -> None:
        self.rid, self.prompt, self.params, self.seed = rid, list(prompt), params, seed
        self.coordinator = coordinator
        self.prefix = list(prefix or [])  # spec N24: (n, key) of the prompt's whole chunks, longest first
        self.keep = list(keep) if keep is not None else None  # spec N24: what the stages keep of the prompt
        self.prefill_chunk = prefill_chunk  # spec N23: prompt positions per sub-step (0: the whole prompt in one)
        self.timeouts = timeouts
        self.eos = frozenset(eos_token_ids)
        self.replicas, self.replica = replicas, replica
        self.prefill_s_per_token = prefill_s_per_token  # the last prefill's pace, to time its resends
        self.generated: list[int] = []  # spec FO1: with the prompt and seed, all a new attempt needs
        self.attempt: _Attempt | None = None
        self.attempts = 0
        self.step_times: deque[float] = deque(maxlen=16)
        self.failed_at = 0.0
        self.failure: StageFailure | None = None
        self.plan_wait: tuple[float, float] | None = None  # (settled at, recovery deadline)
        self.closing: str | None = None
        self.outcome = ""  # finished / failed once ended
        self._actions: deque[Action] = deque()
        self._paused = False  # a token was emitted and not taken yet

    # -- queries -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return bool(self.outcome)

    @property
    def current(self) -> str:
        """The current attempt's wire id ('' between attempts)."""
        return self.attempt.req if self.attempt is not None else ""

    @property
    def members(self) -> frozenset[str]:
        return self.attempt.members if self.attempt is not None else frozenset()

    def waiting_for_plan(self) -> bool:
        return self.plan_wait is not None

    def next_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    def settling(self, now: float) -> bool:
        """Recovering, and too early to look at placement (the loss has not reached it yet)."""
        return self.plan_wait is not None and now < self.plan_wait[0]

    def wants(self, action: SendForward | SendKvLoad) -> bool:
        """Whether a send the shell is about to do still belongs to the current protocol state
        (a resume that fell back no longer needs its remaining KV loads)."""
        a = self.attempt
        if self.done or a is None or action.req != a.req:
            return False
        return a.phase == "resume" if isinstance(action, SendKvLoad) else a.phase == "step" and action.step == a.step

    def get_timer(self) -> float | None:
        """When ``timer(now)`` must be called next (monotonic s), or None."""
        if self.done:
            return None
        if self.plan_wait is not None:
            settle_at, deadline = self.plan_wait
            return settle_at or deadline
        a = self.attempt
        if a is None:
            return None
        if a.phase == "step":
            return None if self._paused else min(a.resend_at, a.deadline)
        return a.deadline  # resume, handover

    # -- inputs --------------------------------------------------------------------------
    def start(self, plan: Plan, now: float) -> None:
        self._start_attempt(plan, now)

    def token(self, req: str, step: int, token: int, timing: Any, now: float, cached: int = 0) -> None:
        """The token of step ``step`` of attempt ``req``; ``cached``: positions its first stage
        took from the prefix cache (spec N24)."""
        a = self.attempt
        if self.done or a is None or req != a.req or a.phase != "step" or step != a.step or self._paused:
            return  # a reply to another attempt or step, or a repeat of the one just taken: stale
        took = now - a.sent_at
        prefill = self._is_prefill(a)
        self._out(Observe(kind="step", value=took, timing=timing, prefill=prefill))
        if a.forward is not None and a.forward.prefix:
            self._out(Observe(kind="prefix", detail="hit" if cached else "miss", value=cached))
        if prefill and self._prompt_part(a.pos, len(a.tokens)) == len(a.tokens):  # a replay's pace is not a prefill's
            self.prefill_s_per_token = took / max(1, len(a.tokens) - cached)
        else:
            self.step_times.append(took)
        if self.failed_at:  # spec FO3: recovery = from the failure to the next token
            self._out(Observe(kind="recovered", value=now - self.failed_at))
            self.failed_at = 0.0
        self.generated.append(int(token))  # a Sampled token's logprobs go to the consumer only (Emit)
        finished = len(self.generated) == self.params.max_tokens or (
            token in self.eos and not self.params.ignore_eos)
        self._out(Emit(token=token))
        if finished:
            self._end_attempt()
            self._finish("finished")
            return
        self._paused = True  # the next step starts once the consumer took this token
        if bool(a.prefill_route) and a.pos == 0 and not a.recompute:
            # spec N13: wait for every decode stage to report the prefill's KV cache loaded,
            # within max(send timeout, 2x the prefill's time)
            a.phase, a.waiting, a.wait_end = "handover", {s[0] for s in a.route}, len(a.tokens)
            a.wait_started = now
            a.deadline = now + max(self.timeouts.send_s, 2 * took)
            # a decode stage fed by an earlier prefill stage may answer before the last prefill
            # stage's token arrives here (its answer was kept, not dropped)
            for member, (end, ok, message) in list(a.early.items()):
                self.kv_loaded(a.req, member, end, ok, message, now)
            return
        a.pos += len(a.tokens)
        a.tokens = [int(token)]

    def sent(self, action: SendForward, now: float) -> None:
        """A step's send returned at ``now``: its resend is timed from here (a send that waited
        on a busy link must not count against the reply, spec FO2)."""
        a = self.attempt
        if a is not None and a.phase == "step" and a.forward is action and not self.done:
            a.resend_at = min(a.deadline, now + a.retry_s)

    def token_taken(self, now: float) -> None:
        """The consumer took the last ``Emit``: start the next step (decoding paces itself by
        the client, as a generator does)."""
        if not self._paused or self.done:
            return
        self._paused = False
        a = self.attempt
        if a is not None and a.phase == "step":
            self._send_step(a, a.step + 1, now)

    def error(self, req: str, message: str, fatal: bool, now: float) -> None:
        a = self.attempt
        if self.done or a is None or req != a.req:
            return
        if fatal:
            self._end_attempt()
            self._fail(RequestFailed(f"req={self.rid} failed: {message}"))
        else:
            self._attempt_failed(StageFailure(message), now)

    def member_lost(self, member_id: str, now: float) -> None:
        """Spec FO6: an attempt through a lost member fails at once."""
        if self.attempt is not None and member_id in self.attempt.members and not self.done:
            self._attempt_failed(StageFailure(f"member {member_id} was lost"), now)

    def shutdown(self, reason: str, now: float) -> None:
        self.closing = reason
        if self.done:
            return
        if self.attempt is not None:
            self._attempt_failed(StageFailure(reason), now)
        else:
            self.plan_changed(PlanState(plan=None, ready=False, reason=reason), now)

    def kv_loaded(self, req: str, member: str, end: Any, ok: bool, message: str, now: float, *,
                  gone: bool = False) -> None:
        a = self.attempt
        if (not self.done and a is not None and req == a.req and a.phase == "step" and a.prefill_route
                and a.pos == 0 and not a.recompute):
            a.early[member] = (end, ok, message)  # the prefill's token is still on its way
            return
        if self.done or a is None or req != a.req or a.phase not in ("resume", "handover") or end != a.wait_end:
            return
        if not ok and gone and a.phase == "resume":  # the stage itself failed: another plan, the replica kept
            self._attempt_failed(StageFailure(message), now)
            return
        if not ok:
            self._kv_wait_over(a, message, now)
            return
        a.waiting.discard(member)
        if not a.waiting:
            self._kv_wait_over(a, None, now)

    def send_failed(self, action: SendForward | SendKvLoad, error: MeshError | None, timed_out: bool,
                    now: float) -> None:
        a = self.attempt
        if self.done or a is None or action.req != a.req:
            return
        if isinstance(action, SendKvLoad) and a.phase == "resume":
            if timed_out:
                self._resume_done(a, 0, f"KV loads not sent within {now - a.wait_started:.1f} s", now)
            else:
                self._attempt_failed(StageFailure(f"cannot send the KV replica: {error}"), now)
        elif isinstance(action, SendForward) and a.phase == "step" and action.step == a.step:
            self._attempt_failed(StageFailure(f"cannot reach stage {action.member}: {error}"), now)

    def plan_changed(self, state: PlanState, now: float) -> None:
        """While recovering: a plan whose stages are all loaded and linked starts the next
        attempt (spec FO3); a failed placement, a shutdown or the end of the recovery budget
        ends the request."""
        if self.plan_wait is None or self.done:
            return
        settle_at, deadline = self.plan_wait
        if self.closing is not None:
            return self._fail(RequestFailed(f"req={self.rid}: {self.closing}"))
        if now >= deadline:
            return self._fail(RequestFailed(
                f"req={self.rid} cannot continue after {self.failure}: no working plan within "
                f"{self.timeouts.recovery_s:.0f} s of the failure"))
        if now < settle_at:
            return  # let the loss reach membership and placement first
        self.plan_wait = (0.0, deadline)
        if state.ready and state.plan is not None:
            self.plan_wait = None
            self._start_attempt(state.plan, now)
        elif state.reason.startswith("placement failed"):
            self._fail(RequestFailed(f"req={self.rid} cannot continue after {self.failure}: {state.reason}"))

    def timer(self, now: float, plan: PlanState | None = None) -> None:
        """Deadlines that passed: resend a late step, give up on a step, a KV load or a
        hand-over; while recovering, look at ``plan`` again."""
        if self.done:
            return
        if self.plan_wait is not None:
            self.plan_changed(plan or PlanState(plan=None, ready=False, reason=""), now)
            return
        a = self.attempt
        if a is None or a.phase == "step" and self._paused:
            return
        if a.phase == "step":
            if now >= a.deadline:
                self._attempt_failed(StageFailure(f"no token within {a.limit_s:.0f} s at step {a.step}"), now)
            elif now >= a.resend_at and a.forward is not None:
                # spec FO2: stages answer a repeated step from what they sent, never compute it twice
                self._out(a.forward)
                a.resend_at = min(a.deadline, now + a.retry_s)
        elif a.phase in ("resume", "handover") and now >= a.deadline:
            self._kv_wait_over(a, f"{sorted(a.waiting)} did not answer in time", now)

    # -- the protocol --------------------------------------------------------------------
    def _out(self, action: Action) -> None:
        self._actions.append(action)

    def _replicates(self, a: _Attempt) -> bool:
        """Whether the stages of attempt ``a`` send KV replicas (spec FO8): not when every stage
        is on this coordinator, where a replica would be lost with the only node that could use
        it (exporting it cost a single node 12 % of its compute at 8 concurrent streams)."""
        return (self.replica is not None and not self.replica.broken
                and not (self.coordinator is not None and a.members == {self.coordinator}))

    def _start_attempt(self, plan: Plan, now: float) -> None:
        if self.attempts >= MAX_ATTEMPTS:
            return self._fail(RequestFailed(
                f"req={self.rid}: gave up after {MAX_ATTEMPTS} attempts; the last failed with: {self.failure}"))
        req = f"{self.rid}.{self.attempts}"
        resume = self.attempts > 0
        self.attempts += 1
        a = self.attempt = _Attempt(
            req=req, plan=plan, route=[[s.member_id, s.layer_start, s.layer_end] for s in plan.stages],
            prefill_route=[[s.member_id, s.layer_start, s.layer_end] for s in plan.prefill_stages],
            members=frozenset(m for s in plan.all_stages for m in s.members))  # a group's members too (N26)
        a.tokens, a.first_step = [*self.prompt, *self.generated], len(self.generated)
        if self.replica is not None and resume:
            self._start_resume(a, now)
        else:
            self._resume_done(a, 0, None, now)

    def _start_resume(self, a: _Attempt, now: float) -> None:
        """Spec FO8: load every stage with its layers' KV for positions [0, R) from the
        replica, R = the prefix every layer covers (at most all but the last token)."""
        replica = self.replica
        assert replica is not None
        end = min(replica.covered(), len(a.tokens) - 1)
        if end <= 0:
            return self._resume_done(a, 0, replica.broken or "a layer's replica is missing", now)
        if end < len(self.prompt):  # spec FO9: resume where an original step began (the prompt was one)
            return self._resume_done(a, 0, f"the replica covers {end} of the prompt's {len(self.prompt)} positions",
                                     now)
        try:
            blocks = [(s.member_id, *replica.block(s.layer_start, s.layer_end, end)) for s in a.plan.stages]
        except BackendError as exc:
            return self._resume_done(a, 0, f"the KV replica cannot be used: {exc}", now)
        a.phase, a.waiting, a.wait_end, a.wait_started = "resume", {m for m, _, _ in blocks}, end, now
        a.deadline = now + max(self.timeouts.send_s, 2 * self.prefill_s_per_token * end)
        for member, ids, block in blocks:
            self._out(SendKvLoad(member=member, req=a.req, layers=list(ids), end=end, block=block, deadline=a.deadline))

    def _kv_wait_over(self, a: _Attempt, failure: str | None, now: float) -> None:
        if a.phase == "resume":
            self._resume_done(a, 0 if failure else a.wait_end, failure, now)
            return
        # hand-over (spec N13): moved, or the decode stages recompute the prefill
        self._out(Observe(kind="handover", detail="recomputed" if failure else "moved", why=failure or ""))
        token = self.generated[-1]
        if failure:
            a.recompute = True
            a.tokens, a.pos = [*self.prompt, *self.generated], 0
        else:
            self._out(RequestEvent(state="running", stages=[m for m, _, _ in a.route]))  # the KV cache moved
            a.pos += len(a.tokens)
            a.tokens = [token]
        a.phase = "step"
        a.waiting = set()
        if not self._paused:  # the consumer took the token already
            self._send_step(a, a.step + 1, now)

    def _resume_done(self, a: _Attempt, pos: int, failure: str | None, now: float) -> None:
        if self.replica is not None:
            if self.attempts > 1:
                self._out(Observe(kind="resume", detail="resumed" if pos else "reprefill", value=now - a.wait_started
                                  if pos else 0.0, why=failure or ""))
            if self.replicas is not None:
                self.replicas.start_attempt(self.replica, a.req, pos)
        a.pos, a.tokens = pos, a.tokens[pos:]
        a.phase = "step"
        a.waiting = set()
        self._send_step(a, a.first_step, now)

    def _is_prefill(self, a: _Attempt) -> bool:
        return a.step == a.first_step or a.pos == 0

    def _send_step(self, a: _Attempt, step: int, now: float) -> None:
        if step >= self.params.max_tokens:  # not reached: the last token ends the request
            self._end_attempt()
            return self._finish("finished")
        a.step = step
        # spec N13: a disaggregated plan prefills (from position 0) on its prefill stages
        handover = bool(a.prefill_route) and a.pos == 0 and not a.recompute
        prefill = self._is_prefill(a)
        if step == a.first_step or a.pos == 0:
            where = a.prefill_route if handover else a.route
            self._out(RequestEvent(state="running", stages=[m for m, _, _ in where]))  # where the KV cache is
        route = a.prefill_route if handover else a.route
        split = self._split(a.pos, len(a.tokens))
        offer = [[n, key] for n, key in self.prefix] if a.pos == 0 and not handover and split else None
        a.forward = SendForward(member=str(route[0][0]), req=a.req, plan_id=a.plan.plan_id, route=route, step=step,
                                pos=a.pos, tokens=list(a.tokens), kv_to=a.route if handover else None,
                                replica=self._replicates(a), split=split,
                                prefix=offer or None,
                                keep=self.keep if a.pos == 0 and not handover and self._prompt_part(0, len(a.tokens))
                                else None)
        a.limit_s = self.timeouts.prefill_s if prefill else self.timeouts.decode_s
        # spec FO2: resend a step whose reply is late: after 4x a typical decode step, or 3x the
        # prefill this coordinator expects (resending a prefill that is still running costs the
        # first stage nothing, but a finished one re-sends its hidden states); at least 4 times
        # before the limit
        decode_s = statistics.median(self.step_times) if self.step_times else REPLAY_STEP_GUESS_S
        prompt_part = self._prompt_part(a.pos, len(a.tokens))
        typical = 4 * decode_s if not prefill else 3 * self.prefill_s_per_token * prompt_part
        # spec FO9: each one-token sub-step of a replay beyond the step's first takes about a decode step
        extra = len(a.tokens) - prompt_part - (0 if prompt_part else 1)
        if prefill and extra > 0:
            replay_s = extra * decode_s
            typical += 3 * replay_s
            a.limit_s += 4 * replay_s
        a.retry_s = min(a.limit_s / 4, max(self.timeouts.retry_s, typical))
        a.sent_at = now
        a.deadline = now + a.limit_s
        a.resend_at = min(a.deadline, now + a.retry_s)
        self._out(a.forward)

    def _split(self, pos: int, n: int) -> list[int] | None:
        """The sub-steps of a step over positions [pos, pos + n), or None for one: the prompt
        in the chunks ``prefill_chunks`` cuts for ``prefill_chunk`` (spec N23), then one
        sub-step per generated token, as the original steps were (spec FO9: a replay computes
        in their shapes)."""
        prompt_part = self._prompt_part(pos, n)
        if self.prefill_chunk:
            sizes = prefill_chunks(pos, pos + prompt_part, self.prefill_chunk)
        else:
            sizes = [prompt_part] if prompt_part else []
        sizes += [1] * (n - prompt_part)
        return sizes if len(sizes) > 1 else None

    def _prompt_part(self, pos: int, n: int) -> int:
        """How many of the positions [pos, pos + n) are the prompt's."""
        return min(n, max(0, len(self.prompt) - pos))

    def _end_attempt(self) -> None:
        a = self.attempt
        if a is not None:
            self._out(EndAttempt(req=a.req, members=a.members))
            self.attempt = None

    def _attempt_failed(self, failure: StageFailure, now: float) -> None:
        self.prefix = []  # spec N24: a new attempt computes every position (the same values, FO9)
        self._end_attempt()
        self._paused = False
        self.failed_at = self.failed_at or now
        self.failure = failure
        self._out(Observe(kind="failover", detail=str(failure)))
        settle = min(0.2 * self.attempts, 1.0)  # let the loss reach membership and placement
        self.plan_wait = (now + settle, self.failed_at + self.timeouts.recovery_s)
        if self.closing is not None:
            self._fail(RequestFailed(f"req={self.rid}: {self.closing}"))

    def _finish(self, outcome: str) -> None:
        self.outcome = outcome
        self.plan_wait = None
        self._out(Finished(tokens=len(self.generated)))

    def _fail(self, error: MeshError) -> None:
        self._end_attempt()
        self.outcome = "failed"
        self.plan_wait = None
        self._out(Failed(error=error))
