"""Requests through pipeline stages: the coordinator, the ``Engine`` the API serves. It is the
asyncio shell of ``mesh.runtime.request_core.RequestCore``, which holds the protocol (attempts,
step resends, re-placement waits, the KV replica resume, the hand-over); the shell only sends
what the core asks, feeds it replies and timers, and streams its tokens. The stage worker,
which runs this node's layer range for every request, is ``mesh.runtime.stage``.

A request, end to end: the node holding the HTTP connection coordinates. Per token it sends
a ``forward`` to stage 0 (the prompt at step 0 = prefill, one token afterwards = decode);
each stage runs its layers and forwards hidden states to the next; the last stage samples
and sends the ``token`` back to the coordinator, which streams it and starts the next step.
Tokens and activations go point to point; nothing here is a cluster event. Every wait has a
timeout; ``release`` frees KV caches on every stage.
Spec: specs/node.md (N5-N10, N13), specs/faults.md (FO1-FO8).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

from mesh.errors import ApiError, MeshError, ModelError, RequestFailed
from mesh.models import Model, encode_text
from mesh.placement.perf import Measured
from mesh.runtime.admission import Admission
from mesh.runtime.batcher import Batching
from mesh.runtime.engine import SamplingParams
from mesh.runtime.kvreplica import ReplicaStore
from mesh.runtime.messages import (
    Forward,
    KvLoad,
    KvLoaded,
    KvReplica,
    Release,
    Released,
    StepError,
    Token,
)
from mesh.runtime.metrics import NodeMetrics
from mesh.runtime.prefix import keep_key, prefix_keys
from mesh.runtime.reqstats import RequestLog, RequestStats
from mesh.runtime.request_core import (
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
from mesh.wire import Message

log = logging.getLogger(__name__)

RELEASE_TRIES = 8  # sends of a ``release`` that is not acknowledged (a lossy link loses some)
RELEASE_ACK_S = 0.5  # how long each waits for its ``released``
IDLE_WAIT_S = 60.0  # the longest a request's shell waits with no deadline of the core's


class PlanSource(Protocol):
    """The placement a request reads (``mesh.runtime.plane.PlanBoard`` implements it)."""

    def state(self) -> PlanState: ...

    async def wait_ready(self, timeout_s: float) -> PlanState: ...

    async def wait_changed(self, timeout_s: float) -> PlanState: ...


class _Live:
    """A request in flight: its core, its inbox of replies and its statistics."""

    def __init__(self, core: RequestCore, stats: RequestStats) -> None:
        self.core = core
        self.stats = stats
        self.inbox: asyncio.Queue[Token | StepError | KvLoaded | None] = asyncio.Queue()  # None only wakes


class Coordinator:
    """The real ``mesh.runtime.engine.Engine``: runs requests through the current plan.

    Ports: ``send(member, msg)`` (loopback included), ``plans`` (a ``PlanBoard``: the plan and
    whether it is ready), ``on_request_event(req, state, stages)``; ``clock``: monotonic s.
    """

    def __init__(self, member_id: str, model: Model, timeouts: Timeouts, *,
                 send: Callable[[str, Message], Awaitable[None]], plans: PlanSource,
                 on_request_event: Callable[[str, str, list[str] | None], None], kv_replica_bytes: int = 0,
                 metrics: NodeMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 batching: Batching | None = None) -> None:
        self.member_id = member_id
        self.batching = batching or Batching()
        self.admission = Admission(self.batching.max_running, self.batching.max_queued)
        self.prefix_hits = self.prefix_misses = self.prefix_tokens = 0  # spec N24: requests, reused positions
        self.send = send
        self.plans = plans
        self.on_request_event = on_request_event
        self.metrics = metrics
        self.clock = clock
        self.replicas = ReplicaStore(kv_replica_bytes)  # spec FO8
        self.model = model
        self.timeouts = timeouts
        self.measured = Measured()  # TTFT and decode rate of finished requests (spec P16)
        self.model_id = model.model_id
        self.context_length = model.context_length
        self.eos_token_ids = model.eos_token_ids
        self.tokenizer = model.tokenizer
        self._live: dict[str, _Live] = {}  # request id -> the request in flight
        self._closing: str | None = None  # why this node is shutting down
        self._prefill_s_per_token = 0.01  # the last prefill's pace, to time its resends
        self._release_acks: dict[tuple[str, str], asyncio.Event] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.failed_attempts = 0
        self.recovery_times: deque[float] = deque(maxlen=256)  # s from a failure to the next token
        self.requests = RequestLog()  # live and recent timings (GET /v1/cluster)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        try:
            return self.model.encode_chat(messages, tools) if tools else self.model.encode_chat(messages)
        except ModelError as exc:
            raise ApiError(str(exc), param="messages") from exc

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return encode_text(self.tokenizer, text, add_special_tokens=add_special_tokens)

    @property
    def active(self) -> int:
        """Requests in flight on this coordinator (running an attempt or waiting for a plan)."""
        return len(self._live)

    @property
    def recovering(self) -> int:
        """Requests waiting for a new plan now."""
        return sum(1 for live in self._live.values() if live.core.waiting_for_plan())

    def deliver(self, msg: Token | StepError | KvLoaded | KvReplica | Released, sender: str = "") -> None:
        """Route a ``token``, ``error`` or ``kv.loaded`` reply to its request, a ``kv.replica``
        block to its request's replica, or a ``released`` to the release waiting for it
        (unknown ids dropped)."""
        if isinstance(msg, KvReplica):
            self.replicas.add(msg.req, msg.layers, msg.start, msg.block)
        elif isinstance(msg, Released):
            acked = self._release_acks.get((msg.req, sender))
            if acked is not None:
                acked.set()
        else:
            live = self._live.get(msg.req.rpartition(".")[0])  # an attempt's id is "<request>.<attempt>"
            if live is not None:
                live.inbox.put_nowait(msg)

    def refuse_new(self, reason: str) -> None:
        """Refuse requests from now on with ``reason`` (RequestFailed: HTTP 503); the ones in
        flight go on (a graceful leave drains them, spec N20)."""
        self._closing = reason

    def shutdown(self, reason: str) -> None:
        """Fail every request in flight with ``reason`` (their streams end with an error event)."""
        self._closing = reason
        now = self.clock()
        for live in self._live.values():
            live.core.shutdown(reason, now)
            live.inbox.put_nowait(None)

    def member_lost(self, member_id: str) -> None:
        """Fail at once the current attempt of every request whose route passes through a
        lost member (spec N9, FO6); the request itself then recovers (spec FO3)."""
        now = self.clock()
        for live in self._live.values():
            if member_id in live.core.members:
                live.core.member_lost(member_id, now)
                live.inbox.put_nowait(None)

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False after ``timeout_s`` seconds."""
        if self._idle.is_set():  # wait_for with no time left fails even an event that is set
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        if not prompt_ids:
            raise ApiError("the prompt is empty", param="messages")
        await self._ready()
        # spec A19: a bounded number of requests run, the next ones wait in order, the rest get 429
        turn = await self.admission.acquire()
        try:
            state = await self._ready()
            async with aclosing(self._run(prompt_ids, params, state)) as tokens:
                async for token in tokens:
                    yield token
        finally:
            self.admission.release(turn)

    async def _ready(self) -> PlanState:
        """The plan to start a request on; raises RequestFailed (HTTP 503) when there is none
        (after waiting up to ``admit_s`` for one that is placed and loading, spec N21)."""
        if self._closing is not None:
            raise RequestFailed(self._closing)
        state: PlanState = self.plans.state()
        if not state.ready and state.plan is not None:  # placed and loading: wait a while (spec N21)
            state = await self.plans.wait_ready(self.timeouts.admit_s)
        if not state.ready or state.plan is None:
            raise RequestFailed(f"the model is not ready: {state.reason}")
        if self._closing is not None:
            raise RequestFailed(self._closing)
        return state

    async def _run(self, prompt_ids: list[int], params: SamplingParams, state: PlanState) -> AsyncIterator[int]:
        assert state.plan is not None  # _ready's promise
        rid = secrets.token_hex(8)
        chunk, caching = self.batching.prefill_chunk, self.batching.prefix_cache_bytes > 0  # spec N24
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        started = self.clock()
        replica = self.replicas.open(rid, state.plan.num_layers)
        core = RequestCore(rid, prompt_ids, params, seed=seed, timeouts=self.timeouts,
                           eos_token_ids=set(self.eos_token_ids), replicas=self.replicas, replica=replica,
                           prefill_s_per_token=self._prefill_s_per_token, prefill_chunk=self.batching.prefill_chunk,
                           prefix=prefix_keys(prompt_ids, chunk) if caching else None,
                           keep=keep_key(prompt_ids, chunk) if caching else None, coordinator=self.member_id)
        live = self._live[rid] = _Live(core, self.requests.start(rid, len(prompt_ids)))
        self._idle.clear()
        first_token_at, recoveries, outcome = 0.0, [], "cancelled"  # unless it finishes or fails
        log.info("req=%s start: %d prompt tokens, plan %s", rid, len(prompt_ids), state.plan.plan_id)
        try:
            core.start(state.plan, started)
            while True:
                while (action := core.next_action()) is not None:
                    if isinstance(action, Emit):
                        live.stats.token()
                        first_token_at = first_token_at or self.clock()
                        yield action.token
                        core.token_taken(self.clock())
                    elif isinstance(action, Finished | Failed):
                        outcome = "finished" if isinstance(action, Finished) else "failed"
                        if isinstance(action, Failed):
                            raise action.error
                        return
                    else:
                        await self._carry_out(live, action, recoveries)
                await self._next_input(live)
        except MeshError:
            outcome = "failed"
            raise
        finally:
            # the consumer may stop early (a client that went away): free the caches of the
            # attempt still running, or of one whose end the loop did not reach
            ends = [a for a in iter(core.next_action, None) if isinstance(a, EndAttempt)]
            if core.attempt is not None:
                ends.append(EndAttempt(req=core.attempt.req, members=core.attempt.members))
            for end in ends:
                await self._release(end.req, end.members)
            if outcome == "cancelled" and core.done:
                outcome = core.outcome
            self._prefill_s_per_token = core.prefill_s_per_token
            del self._live[rid]
            if not self._live:
                self._idle.set()
            ended = self.clock()
            if outcome == "finished":
                self.measured.record(prompt_tokens=len(prompt_ids), new_tokens=len(core.generated),
                                     ttft_s=first_token_at - started, decode_s=ended - first_token_at)
            self.replicas.close(rid)
            self.requests.end(live.stats, outcome)
            self.recovery_times.extend(recoveries)
            if self.metrics is not None:
                self.metrics.request_finished(outcome=outcome, tokens=len(core.generated),
                                              ttft_s=first_token_at - started if first_token_at else None,
                                              decode_s=ended - first_token_at if first_token_at else None)
            self.on_request_event(rid, outcome, None)
            log.info("req=%s end: %d tokens in %.2f s%s", rid, len(core.generated), ended - started,
                     f", {len(recoveries)} recoveries" if recoveries else "")

    async def _carry_out(self, live: _Live, action: Any, recoveries: list[float]) -> None:
        """Do one of the core's actions other than emitting a token or ending."""
        core = live.core
        if isinstance(action, SendForward):
            if not core.wants(action):
                return
            fwd = Forward(req=action.req, coord=self.member_id, plan_id=action.plan_id, route=action.route, idx=0,
                          step=action.step, pos=action.pos, tokens=action.tokens, temperature=core.params.temperature,
                          top_p=core.params.top_p, seed=core.seed, kv_to=action.kv_to, replica=action.replica,
                          split=action.split, prefix=action.prefix, keep=action.keep, logprobs=core.params.logprobs,
                          grammar=[core.params.json_schema, list(core.generated)] if core.params.json_schema else None)
            try:
                await self.send(action.member, fwd.to_message())
            except MeshError as exc:
                core.send_failed(action, exc, False, self.clock())
            else:
                core.sent(action, self.clock())
        elif isinstance(action, SendKvLoad):
            if not core.wants(action):
                return
            load = KvLoad(req=action.req, coord=self.member_id, layers=action.layers, end=action.end,
                          block=action.block)
            try:
                await asyncio.wait_for(self.send(action.member, load.to_message()),
                                       max(0.001, action.deadline - self.clock()))
            except TimeoutError:
                core.send_failed(action, None, True, self.clock())
            except MeshError as exc:
                core.send_failed(action, exc, False, self.clock())
        elif isinstance(action, RequestEvent):
            self.on_request_event(core.rid, action.state, action.stages)
        elif isinstance(action, EndAttempt):
            await self._release(action.req, action.members)
        elif isinstance(action, Observe):
            self._observe(live, action, recoveries)

    def _observe(self, live: _Live, seen: Observe, recoveries: list[float]) -> None:
        rid, metrics = live.core.rid, self.metrics
        if seen.kind == "step":
            live.stats.step(seen.timing, seen.value, seen.prefill)
        elif seen.kind == "recovered":
            recoveries.append(seen.value)
            if metrics is not None:
                metrics.recovery.observe(seen.value)
        elif seen.kind == "failover":
            self.failed_attempts += 1
            live.stats.phase = "recovering"
            if metrics is not None:
                metrics.failovers.inc()
            log.warning("req=%s attempt %d failed after %d tokens: %s", rid, live.core.attempts - 1,
                        len(live.core.generated), seen.detail)
        elif seen.kind == "resume":
            if metrics is not None:
                metrics.kv_resumes.labels(outcome=seen.detail).inc()
            log.info("req=%s: resumed from the KV replica in %.2f s", rid, seen.value) if seen.detail == "resumed" \
                else log.info("req=%s: prefilling from position 0 (%s)", rid, seen.why or "no KV replica")
        elif seen.kind == "prefix":  # spec N24
            self.prefix_hits += seen.detail == "hit"
            self.prefix_misses += seen.detail == "miss"
            self.prefix_tokens += int(seen.value)
        elif seen.kind == "handover":
            if metrics is not None:
                metrics.kv_handovers.labels(outcome=seen.detail).inc()
            if seen.why:
                log.info("req=%s: KV hand-over failed (%s): the decode stages recompute the prefill", rid, seen.why)

    async def _next_input(self, live: _Live) -> None:
        """Wait for what the core waits for: a reply, a deadline, or (recovering) a ready plan;
        feed it to the core."""
        core, now = live.core, self.clock()
        timer = core.get_timer()
        wait_s = max(0.0, timer - now) if timer is not None else IDLE_WAIT_S
        if core.waiting_for_plan() and not core.settling(now):
            getter = asyncio.ensure_future(live.inbox.get())
            board = asyncio.ensure_future(self.plans.wait_changed(wait_s))  # a failed placement ends it (FO4)
            try:
                await asyncio.wait([getter, board], timeout=wait_s + 1.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
                board.cancel()
            core.timer(self.clock(), self.plans.state())
            return
        if not live.inbox.empty():  # replies that came first go before a due timer
            msg = live.inbox.get_nowait()
        else:
            try:
                msg = await asyncio.wait_for(live.inbox.get(), wait_s)
            except TimeoutError:
                core.timer(self.clock(), self.plans.state())
                return
        now = self.clock()
        if isinstance(msg, Token):
            core.token(msg.req, msg.step, msg.token, msg.timing, now, msg.cached)
        elif isinstance(msg, StepError):
            core.error(msg.req, msg.message, msg.fatal, now)
        elif isinstance(msg, KvLoaded):
            core.kv_loaded(msg.req, msg.member, msg.end, msg.ok, msg.message, now, gone=msg.gone)

    async def _release(self, req: str, members: frozenset[str]) -> None:
        """Free ``req``'s KV caches on ``members`` (spec FO5): each stage acknowledges with
        ``released``; a release whose answer does not come is sent again (a lost message
        must not leave a cache behind), up to ``RELEASE_TRIES`` times."""
        async def one(member: str) -> None:
            acked = self._release_acks[(req, member)] = asyncio.Event()
            try:
                for _ in range(RELEASE_TRIES):
                    try:
                        await asyncio.wait_for(self.send(member, Release(req=req).to_message()), self.timeouts.send_s)
                        await asyncio.wait_for(acked.wait(), RELEASE_ACK_S)
                        return
                    except TimeoutError:
                        continue
                    except MeshError as exc:  # no link: the member is gone, or will drop the cache with it
                        log.info("req=%s: release on %s failed: %s", req, member, exc)
                        return
                log.warning("req=%s: %s never acknowledged the release", req, member)
            finally:
                self._release_acks.pop((req, member), None)

        await asyncio.gather(*(one(m) for m in sorted(members)))
