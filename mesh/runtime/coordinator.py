"""Requests through pipeline stages: the coordinator (the Engine the API uses). The stage
worker, which runs this node's layer range for every request, is ``mesh.runtime.stage``.

A request, end to end: the node holding the HTTP connection coordinates. Per token it sends
a ``forward`` to stage 0 (the prompt at step 0 = prefill, one token afterwards = decode);
each stage runs its layers and forwards hidden states to the next; the last stage samples
and sends the ``token`` back to the coordinator, which streams it and starts the next step.
Tokens and activations go point to point; nothing here is a cluster event. Every wait has a
timeout; ``release`` frees KV caches on every stage.

Failover (specs/faults.md FO1-FO6): a request keeps its prompt, the tokens generated so far and
its sampling seed (the sampler draws from (seed, step), so any step can be replayed). A step
whose reply does not come is sent again (stages answer a repeated step from the output they
kept, never by computing it twice); when a stage fails or is lost, the coordinator waits for
a plan whose stages are all loaded and linked (the survivors re-place the model), then runs a
new attempt that prefills prompt + generated tokens from position 0 (or, when its KV replica
covers them, loads the stages' KV caches and prefills only the rest: spec FO8,
``mesh.runtime.kvreplica``) and continues at the same step, so the client's stream goes on with the
tokens a fault-free run would give. Attempts
carry their own wire id, so replies of a failed attempt never reach a later one. When no plan
comes within the recovery budget the request ends with an explicit error.
Spec: specs/node.md (N5-N10).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import statistics
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from mesh.errors import ApiError, BackendError, MeshError, ModelError, RequestFailed
from mesh.models import Model
from mesh.placement.perf import Measured
from mesh.placement.pipeline import Plan
from mesh.runtime.engine import SamplingParams
from mesh.runtime.kvreplica import ReplicaStore, RequestReplica
from mesh.runtime.metrics import NodeMetrics
from mesh.runtime.reqstats import RequestLog, RequestStats
from mesh.runtime.stage import NodeServices, StageWorker
from mesh.wire import Message

__all__ = ["Coordinator", "NodeServices", "StageFailure", "StageWorker", "Timeouts"]

log = logging.getLogger(__name__)

RELEASE_TRIES = 8  # sends of a ``release`` that is not acknowledged (a lossy link loses some)
RELEASE_ACK_S = 0.5  # how long each waits for its ``released``
MAX_ATTEMPTS = 8  # attempts of one request (spec FO3); the recovery budget usually ends it first


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds to wait: for the first token (prefill through every stage), for each later
    token, and for a control send on a link; ``recovery_s``: how long a request may take,
    from a stage failure to its next token, to get a working plan again (spec FO3);
    ``retry_s``: the shortest wait before a step whose reply has not come is sent again."""

    prefill_s: float = 120.0
    decode_s: float = 30.0
    send_s: float = 5.0
    recovery_s: float = 60.0
    retry_s: float = 0.5


class StageFailure(MeshError):
    """One attempt of a request failed in a way a new attempt on a new plan may survive."""


class Coordinator:
    """The real ``mesh.runtime.engine.Engine``: runs requests through the current plan."""

    def __init__(self, node: NodeServices, model: Model, timeouts: Timeouts, *, kv_replica_bytes: int = 0) -> None:
        self.node = node
        self.replicas = ReplicaStore(kv_replica_bytes)  # spec FO8
        self.model = model
        self.timeouts = timeouts
        self.measured = Measured()  # TTFT and decode rate of finished requests (spec P16)
        self.model_id = model.model_id
        self.context_length = model.context_length
        self.eos_token_ids = model.eos_token_ids
        self.tokenizer = model.tokenizer
        self._pending: dict[str, tuple[asyncio.Queue[Message], set[str]]] = {}
        self.recovering = 0  # requests waiting for a new plan now
        self._closing: str | None = None  # why this node is shutting down
        self._prefill_s_per_token = 0.01  # the last prefill's pace, to time its resends
        self._release_acks: dict[tuple[str, str], asyncio.Event] = {}
        self.metrics: NodeMetrics | None = None  # set by the node (GET /metrics)
        self.failed_attempts = 0
        self.recovery_times: deque[float] = deque(maxlen=256)  # s from a failure to the next token
        self.requests = RequestLog()  # live and recent timings (GET /v1/cluster)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.model.encode_chat(messages)
        except ModelError as exc:
            raise ApiError(str(exc), param="messages") from exc

    def health(self) -> tuple[bool, str]:
        return self.node.ready()

    def metrics_text(self) -> bytes | None:
        """``GET /metrics`` (Prometheus text format), or None without metrics."""
        return self.metrics.text() if self.metrics is not None else None

    def cluster_info(self) -> dict[str, Any]:
        return self.node.cluster_info()

    def deliver(self, msg: Message, sender: str = "") -> None:
        """Route a ``token``, ``error`` or ``kv.loaded`` reply to its waiting request, a
        ``kv.replica`` block to its request's replica, or a ``released`` to the release
        waiting for it (unknown ids dropped)."""
        if msg.type == "kv.replica":
            layers, start = msg.body.get("layers"), msg.body.get("start")
            if msg.tensor is not None and isinstance(layers, list) and isinstance(start, int) \
                    and all(isinstance(g, int) for g in layers):
                self.replicas.add(str(msg.body.get("req", "")), layers, start, msg.tensor)
            return
        if msg.type == "released":
            acked = self._release_acks.get((str(msg.body.get("req", "")), sender))
            if acked is not None:
                acked.set()
            return
        pending = self._pending.get(str(msg.body.get("req", "")))
        if pending is not None:
            pending[0].put_nowait(msg)

    @property
    def active(self) -> int:
        """Requests in flight on this coordinator (running an attempt or waiting for a plan)."""
        return len(self._pending) + self.recovering

    def shutdown(self, reason: str) -> None:
        """Fail every request in flight with ``reason`` (their streams end with an error event)."""
        self._closing = reason
        for req, (queue, _) in self._pending.items():
            queue.put_nowait(Message(type="error", body={"req": req, "message": reason}))

    def member_lost(self, member_id: str) -> None:
        """Fail at once the current attempt of every request whose route passes through a
        lost member (spec N9); the request itself then recovers (spec FO3)."""
        for req, (queue, members) in self._pending.items():
            if member_id in members:
                queue.put_nowait(Message(type="error", body={"req": req, "message": f"member {member_id} was lost",
                                                             "lost": member_id}))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        ready, reason = self.node.ready()
        plan = self.node.current_plan()
        if not ready or plan is None:
            raise RequestFailed(f"the model is not ready: {reason}")
        if not prompt_ids:
            raise ApiError("the prompt is empty", param="messages")
        rid = secrets.token_hex(8)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generated: list[int] = []  # spec FO1: with the prompt and seed, all a new attempt needs
        started = time.monotonic()
        last_failure: StageFailure | None = None
        first_token_at = 0.0
        recoveries: list[float] = []
        outcome = "cancelled"  # unless it finishes or fails below
        replica = self.replicas.open(rid, plan.num_layers)
        stats = self.requests.start(rid, len(prompt_ids))
        log.info("req=%s start: %d prompt tokens, plan %s", rid, len(prompt_ids), plan.plan_id)
        try:
            failed_at = 0.0
            for attempt in range(MAX_ATTEMPTS):
                steps = self._attempt(f"{rid}.{attempt}", rid, plan, prompt_ids, generated, params, seed,
                                      replica=replica, resume=attempt > 0, stats=stats)
                try:
                    async for token in steps:
                        if failed_at:  # spec FO3: recovery = from the failure to the next token
                            recoveries.append(time.monotonic() - failed_at)
                            failed_at = 0.0
                            if self.metrics is not None:
                                self.metrics.recovery.observe(recoveries[-1])
                        generated.append(token)
                        stats.token()
                        if len(generated) == 1:
                            first_token_at = time.monotonic()
                        done = len(generated) == params.max_tokens or (
                            token in self.eos_token_ids and not params.ignore_eos)
                        if done:
                            outcome = "finished"
                        yield token
                        if done:
                            return
                    return  # not reached: an attempt ends by the return above or an error
                except StageFailure as exc:
                    failed_at = failed_at or time.monotonic()
                    self.failed_attempts += 1
                    if self.metrics is not None:
                        self.metrics.failovers.inc()
                    log.warning("req=%s attempt %d failed after %d tokens: %s", rid, attempt, len(generated), exc)
                    self.recovering += 1
                    stats.phase = "recovering"
                    last_failure = exc
                    try:
                        plan = await self._await_plan(rid, exc, failed_at + self.timeouts.recovery_s, attempt)
                    finally:
                        self.recovering -= 1
                finally:
                    await steps.aclose()  # the attempt releases its caches now, not when collected
            raise RequestFailed(f"req={rid}: gave up after {MAX_ATTEMPTS} attempts; the last failed with: {last_failure}")
        except MeshError:
            outcome = "failed"
            raise
        finally:
            if outcome == "finished":
                self.measured.record(prompt_tokens=len(prompt_ids), new_tokens=len(generated),
                                     ttft_s=first_token_at - started, decode_s=time.monotonic() - first_token_at)
            self.replicas.close(rid)
            self.requests.end(stats, outcome)
            self.recovery_times.extend(recoveries)
            if self.metrics is not None:
                ended = time.monotonic()
                self.metrics.request_finished(outcome=outcome, tokens=len(generated),
                                              ttft_s=first_token_at - started if first_token_at else None,
                                              decode_s=ended - first_token_at if first_token_at else None)
            self.node.request_event(rid, outcome)
            log.info("req=%s end: %d tokens in %.2f s%s", rid, len(generated), time.monotonic() - started,
                     f", {len(recoveries)} recoveries" if recoveries else "")

    async def _attempt(self, req: str, rid: str, plan: Plan, prompt_ids: list[int], generated: list[int],
                       params: SamplingParams, seed: int, *, replica: RequestReplica | None = None,
                       resume: bool = False, stats: RequestStats | None = None) -> AsyncGenerator[int, None]:
        """One attempt of a request on ``plan``: prefill prompt + generated tokens from position
        0 (or, with ``resume``, load the stages' KV from ``replica`` and prefill only what it
        lacks: spec FO8), then decode, yielding each new token. Raises StageFailure when a
        stage fails, is lost or does not answer (after sending the step again), RequestFailed
        otherwise."""
        route: list[list[Any]] = [[s.member_id, s.layer_start, s.layer_end] for s in plan.stages]
        prefill_route: list[list[Any]] = [[s.member_id, s.layer_start, s.layer_end] for s in plan.prefill_stages]
        members = {s.member_id for s in plan.all_stages}
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._pending[req] = (queue, members)
        base = {"req": req, "coord": self.node.member_id, "plan": plan.plan_id, "route": route, "idx": 0,
                "sp": {"t": params.temperature, "p": params.top_p, "seed": seed}}
        step_times: list[float] = []
        try:
            tokens, pos = [*prompt_ids, *generated], 0
            if replica is not None:
                if resume:
                    pos = await self._resume(req, plan, replica, queue, len(tokens) - 1)
                    if self.metrics is not None:
                        self.metrics.kv_resumes.labels(outcome="resumed" if pos else "reprefill").inc()
                self.replicas.start_attempt(replica, req, pos)
                tokens = tokens[pos:]
            recompute = False  # the KV hand-over failed: the decode stages prefill themselves
            first_step = len(generated)  # grows as the caller takes tokens
            for step in range(first_step, params.max_tokens):
                # spec N13: a disaggregated plan prefills (from position 0) on its prefill stages
                handover = bool(prefill_route) and pos == 0 and not recompute
                if step == first_step or pos == 0:
                    where = prefill_route if handover else route
                    self.node.request_event(rid, "running", [m for m, _, _ in where])  # where the KV cache is
                body = dict(base, step=step, pos=pos, tokens=tokens)
                if handover:
                    body.update(route=prefill_route, kv_to=route)
                if replica is not None and not replica.broken:
                    body["replica"] = True
                prefill = step == first_step or pos == 0
                limit = self.timeouts.prefill_s if prefill else self.timeouts.decode_s
                # spec FO2: resend a step whose reply is late: after 4x a typical decode step, or
                # 3x the prefill this coordinator expects (resending a prefill that is still
                # running costs the first stage nothing, but a finished one re-sends its
                # hidden states); at least 4 times before the limit
                typical = (4 * statistics.median(step_times) if step_times else 0.0) if not prefill \
                    else 3 * self._prefill_s_per_token * len(tokens)
                retry = min(limit / 4, max(self.timeouts.retry_s, typical))
                sent = time.monotonic()
                first = str((prefill_route if handover else route)[0][0])
                reply = await self._step(queue, first, body, step, limit, retry)
                took = time.monotonic() - sent
                if stats is not None and reply.type == "token":
                    stats.step(reply.body.get("t"), took, prefill)
                if prefill:
                    self._prefill_s_per_token = took / len(tokens)
                else:
                    step_times.append(took)
                    if len(step_times) > 16:
                        step_times.pop(0)
                if reply.type == "error":
                    if reply.body.get("fatal") is True:
                        raise RequestFailed(f"req={rid} failed: {reply.body.get('message')}")
                    raise StageFailure(str(reply.body.get("message")))
                token = int(reply.body["token"])
                yield token
                if handover:
                    moved = await self._await_handover(req, plan, queue, len(tokens), took)
                    if self.metrics is not None:
                        self.metrics.kv_handovers.labels(outcome="moved" if moved else "recomputed").inc()
                    if not moved:
                        recompute = True
                        tokens, pos = [*prompt_ids, *generated], 0  # generated holds the token by now
                        continue
                    self.node.request_event(rid, "running", [m for m, _, _ in route])  # the KV cache moved
                pos += len(tokens)
                tokens = [token]
        finally:
            self._pending.pop(req, None)
            await self._release(req, members)

    async def _step(self, queue: asyncio.Queue[Message], first_member: str, body: dict[str, Any], step: int,
                    limit_s: float, retry_s: float) -> Message:
        """Send one step and wait for its token (or an error), sending it again every
        ``retry_s`` seconds until ``limit_s``; replies to other steps are stale and dropped."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                await self.node.send(first_member, Message(type="forward", body=body))
            except MeshError as exc:
                raise StageFailure(f"cannot reach stage {first_member}: {exc}") from exc
            resend_at = min(deadline, time.monotonic() + retry_s)
            while (left := resend_at - time.monotonic()) > 0:
                try:
                    reply = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                if reply.type == "error" or reply.body.get("step") == step:
                    return reply
            if time.monotonic() >= deadline:
                raise StageFailure(f"no token within {limit_s:.0f} s at step {step}")

    async def _await_handover(self, req: str, plan: Plan, queue: asyncio.Queue[Message], end: int,
                              prefill_s: float) -> bool:
        """Wait for every decode stage of a disaggregated plan to report the prefill's KV cache,
        positions [0, end), loaded (spec N13). False, so that the decode stages recompute the
        prefill, when one reports a failure or the KV does not arrive within max(send timeout,
        2x the prefill's time). Raises StageFailure when a stage fails or is lost."""
        deadline = time.monotonic() + max(self.timeouts.send_s, 2 * prefill_s)
        failure = await self._await_kv_loaded(req, queue, {s.member_id for s in plan.stages}, end, deadline)
        if failure is not None:
            log.info("req=%s: KV hand-over failed (%s): the decode stages recompute the prefill", req, failure)
        return failure is None

    async def _await_kv_loaded(self, req: str, queue: asyncio.Queue[Message], members: set[str], end: int,
                               deadline: float) -> str | None:
        """Wait for a ``kv.loaded`` of positions [0, ``end``) from every one of ``members``:
        None when all loaded, else why not (one refused, or ``deadline`` passed). Raises
        StageFailure when a stage fails or is lost (RequestFailed when fatally)."""
        waiting = set(members)
        while waiting:
            try:
                reply = await asyncio.wait_for(queue.get(), max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                return f"{sorted(waiting)} did not answer in time"
            if reply.type == "error":
                if reply.body.get("fatal") is True:
                    raise RequestFailed(f"req={req} failed: {reply.body.get('message')}")
                raise StageFailure(str(reply.body.get("message")))
            if reply.type != "kv.loaded" or reply.body.get("end") != end:
                continue
            if reply.body.get("ok") is not True:
                return str(reply.body.get("message"))
            waiting.discard(str(reply.body.get("member", "")))
        return None

    async def _resume(self, req: str, plan: Plan, replica: RequestReplica, queue: asyncio.Queue[Message],
                      limit: int) -> int:
        """Load every stage of ``plan`` with its layers' KV for positions [0, R) from
        ``replica`` (spec FO8), R = the prefix every layer's replica covers, at most ``limit``.
        Returns R, or 0 when the attempt must prefill from position 0 instead (no usable
        replica, or a stage that did not load in time: a load is only worth it if it is
        quicker than re-prefilling). Raises StageFailure when a stage fails or is lost."""
        end = min(replica.covered(), limit)
        if end <= 0:
            log.info("req=%s: no usable KV replica (%s): prefilling from position 0", req,
                     replica.broken or "a layer's replica is missing")
            return 0
        try:
            blocks = [(s.member_id, *replica.block(s.layer_start, s.layer_end, end)) for s in plan.stages]
        except BackendError as exc:
            log.info("req=%s: the KV replica cannot be used (%s): prefilling from position 0", req, exc)
            return 0
        started = time.monotonic()
        deadline = started + max(self.timeouts.send_s, 2 * self._prefill_s_per_token * end)
        try:
            for member, ids, block in blocks:
                body = {"req": req, "coord": self.node.member_id, "layers": ids, "end": end}
                await asyncio.wait_for(self.node.send(member, Message(type="kv.load", body=body, tensor=block)),
                                       max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            log.info("req=%s: KV loads not sent within %.1f s: prefilling from position 0", req,
                     time.monotonic() - started)
            return 0
        except MeshError as exc:
            raise StageFailure(f"cannot send the KV replica: {exc}") from exc
        failure = await self._await_kv_loaded(req, queue, {member for member, _, _ in blocks}, end, deadline)
        if failure is not None:
            log.info("req=%s: the KV replica did not load (%s): prefilling from position 0", req, failure)
            return 0
        log.info("req=%s: resumed at position %d from the KV replica in %.2f s", req, end, time.monotonic() - started)
        return end

    async def _await_plan(self, rid: str, failure: StageFailure, deadline: float, attempt: int) -> Plan:
        """Wait until the cluster has a plan whose stages are all loaded and linked (spec FO3);
        RequestFailed, naming the reason, when placement fails or the recovery budget runs out."""
        await asyncio.sleep(min(0.2 * (attempt + 1), 1.0))  # let the loss reach membership and placement
        while True:
            if self._closing is not None:
                raise RequestFailed(f"req={rid}: {self._closing}")
            if time.monotonic() >= deadline:
                raise RequestFailed(f"req={rid} cannot continue after {failure}: no working plan within "
                                    f"{self.timeouts.recovery_s:.0f} s of the failure")
            plan = self.node.current_plan()
            ready, reason = self.node.ready()
            if ready and plan is not None and all(self.node.linked(s.member_id) for s in plan.all_stages):
                return plan
            if reason.startswith("placement failed"):
                raise RequestFailed(f"req={rid} cannot continue after {failure}: {reason}")
            await asyncio.sleep(0.05)

    async def _release(self, req: str, members: set[str]) -> None:
        """Free ``req``'s KV caches on ``members`` (spec FO5): each stage acknowledges with
        ``released``; a release whose answer does not come is sent again (a lost message
        must not leave a cache behind), up to ``RELEASE_TRIES`` times."""
        async def one(member: str) -> None:
            acked = self._release_acks[(req, member)] = asyncio.Event()
            try:
                for _ in range(RELEASE_TRIES):
                    try:
                        await asyncio.wait_for(self.node.send(member, Message(type="release", body={"req": req})),
                                               self.timeouts.send_s)
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
