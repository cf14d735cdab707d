"""The request plane: this node's coordinator and stage worker behind one message switch,
with loopback delivery when a step's next stage is this node, and one task group for the
handlers of steps and KV transfers. The node and the in-process test cluster both use it.

Ports (never the node itself): ``send_remote(member, msg)`` sends on a link; ``plans`` is the
``PlanBoard`` the owner keeps up to date; ``on_request_event(req, state, stages)`` records a
request's lifecycle. Spec: specs/node.md N5-N13, N15, N16, specs/faults.md FO1-FO8.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from mesh.errors import FrameError, MeshError
from mesh.models import Model
from mesh.runtime import messages
from mesh.runtime.batcher import Batching
from mesh.runtime.coordinator import Coordinator
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
from mesh.runtime.metrics import NodeMetrics
from mesh.runtime.request_core import PlanState, Timeouts
from mesh.runtime.stage import StageWorker
from mesh.wire import Message

log = logging.getLogger(__name__)


class PlanBoard:
    """The placement a request needs to know, kept up to date by the owner (``update``):
    requests start on a ready plan, and a recovering request waits here for one (spec FO3)."""

    def __init__(self) -> None:
        self._state = PlanState(plan=None, ready=False, reason="no placement yet")
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()

    def update(self, state: PlanState) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()  # wakes every waiter of wait_changed, once
        self._state = state
        if state.ready:
            self._ready.set()
        else:
            self._ready.clear()

    def state(self) -> PlanState:
        return self._state

    async def wait_changed(self, timeout_s: float) -> PlanState:
        """The state after the next ``update``, or the latest one after ``timeout_s`` seconds
        (never raises TimeoutError)."""
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout_s))
        except TimeoutError:
            pass
        return self._state

    async def wait_ready(self, timeout_s: float) -> PlanState:
        """The state once it is ready, or the latest one after ``timeout_s`` seconds (never
        raises TimeoutError)."""
        if not self._state.ready and timeout_s > 0:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                pass
        return self._state


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaneStatistics:
    """What the request plane holds now: requests in flight on this coordinator (``active``,
    of which ``recovering`` wait for a plan), attempts failed so far, the last recovery times
    (s, spec FO3), KV caches held by the stage worker, the KV replica's bytes (spec FO8),
    ``requests`` (live and recent request timings) and ``measured`` (TTFT and decode rate of
    finished requests, spec P16; None before one finished); ``batches`` and ``batched_steps``:
    batches the stage ran and the steps in them (spec N22); ``queued`` and ``refused``:
    requests waiting for a turn now and refused so far (HTTP 429, spec A19); ``prefix``: the
    prefix cache (spec N24): this coordinator's requests that started from a cached prefix
    (``hits``) or offered prefixes none of which was held (``misses``), the positions they
    reused (``tokens``), and the entries and bytes this stage holds."""

    active: int
    recovering: int
    failed_attempts: int
    recovery_s: tuple[float, ...]
    kv_caches: int
    kv_replica_bytes: int
    requests: dict[str, Any]
    measured: dict[str, Any] | None
    batches: int = 0
    batched_steps: int = 0
    queued: int = 0
    refused: int = 0
    prefix: dict[str, int] | None = None


class RequestPlane:
    """This member's request plane; see the module docstring.

    ``member_id``: this member; ``model``: what the coordinator reads (id, context length, EOS
    ids, chat template); ``timeouts``: every wait of a request (s); ``executor``: where the
    stage computes (one worker, off the event loop, spec N5); ``send_remote(member, msg)``:
    sends on a link, raising MeshError when it cannot; ``plans``: the owner's ``PlanBoard``;
    ``on_request_event(req, state, stages)``: a request's lifecycle for the cluster state;
    ``kv_replica_bytes``: the KV replica's budget (0: off, spec FO8); ``metrics``: counters
    to feed, if any; ``loopback=False`` sends this member's own messages through
    ``send_remote`` too (a test network that counts or delays them); ``batching``: batch and
    admission bounds (``mesh.runtime.batcher.Batching``; default: the defaults).

    ``coordinator`` is the ``Engine`` the API serves; ``worker`` runs this member's stage.
    ``run()`` must be running while messages are received (spec N16).
    """

    MESSAGE_TYPES = frozenset(messages.DECODERS)

    def __init__(self, member_id: str, *, model: Model, timeouts: Timeouts, executor: Executor,
                 send_remote: Callable[[str, Message], Awaitable[None]], plans: PlanBoard,
                 on_request_event: Callable[[str, str, list[str] | None], None], kv_replica_bytes: int = 0,
                 metrics: NodeMetrics | None = None, loopback: bool = True, batching: Batching | None = None) -> None:
        self.member_id = member_id
        self.loopback = loopback  # False: messages to this member go through send_remote too (a test network)
        self.send_remote = send_remote
        self.plans = plans
        self.coordinator = Coordinator(member_id, model, timeouts, send=self.send, plans=plans,
                                       on_request_event=on_request_event, kv_replica_bytes=kv_replica_bytes,
                                       metrics=metrics, batching=batching)
        batching = self.coordinator.batching
        self.worker = StageWorker(member_id, self.send, executor, max_batch=batching.max_batch,
                                  prefill_batch=batching.prefill_batch, prefix_cache_bytes=batching.prefix_cache_bytes,
                                  tokenizer=lambda: model.tokenizer)
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Own the handlers of steps and KV transfers until cancelled; an unexpected error of
        one ends the plane and is raised here (the handlers report every expected failure to
        the request's coordinator themselves)."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                await asyncio.Future()  # until cancelled
            finally:
                self._tasks = None

    async def send(self, member_id: str, msg: Message) -> None:
        """Send to a member; delivered in-process when it is this node. Raises MeshError when
        a link cannot take it."""
        if member_id == self.member_id and self.loopback:
            await self.receive(member_id, msg)
        else:
            await self.send_remote(member_id, msg)

    async def receive(self, sender: str, msg: Message) -> None:
        """Handle one request-plane message: decoded and checked once here (spec N15); a
        malformed one is logged and dropped."""
        try:
            record = messages.decode(msg)
        except FrameError as exc:
            log.warning("dropping a malformed %s message from %s: %s", msg.type, sender, exc)
            return
        match record:
            case Token() | StepError() | KvLoaded() | KvReplica() | Released():
                self.coordinator.deliver(record, sender)
            case Release(req=req):
                self.worker.release(req)
                self._spawn(self._ack_release(sender, req), "released")
            case Forward():
                self._spawn(self.worker.on_forward(record), f"forward {record.req}")
            case KvLoad():
                self._spawn(self.worker.on_kv_load(sender, record), f"kv.load {record.req}")
            case KvPush():
                self._spawn(self.worker.on_kv_push(sender, record), f"kv.push {record.req}")

    def _spawn(self, handler: Awaitable[None], name: str) -> None:
        if self._tasks is None:  # not running (starting or stopping): the sender's timeout covers it
            log.debug("request plane not running: dropping %s", name)
            handler.close()  # type: ignore[attr-defined]
            return
        self._tasks.create_task(handler, name=name)  # type: ignore[arg-type]

    async def _ack_release(self, member_id: str, req: str) -> None:
        try:
            await self.send(member_id, Released(req=req).to_message())
        except MeshError as exc:  # the coordinator sends the release again, or is gone
            log.debug("cannot acknowledge the release of req=%s to %s: %s", req, member_id, exc)

    def member_lost(self, member_id: str) -> None:
        """Spec FO6: the current attempt of every request through ``member_id`` fails at once;
        caches of requests it coordinated are freed (nobody will release them)."""
        self.coordinator.member_lost(member_id)
        self.worker.release_coordinated_by(member_id)

    def expire(self, idle_s: float) -> None:
        """Free KV caches unused for ``idle_s`` seconds (a coordinator that never released)."""
        self.worker.expire(idle_s)

    def install(self, backend: Any) -> None:
        """Compute with ``backend`` from now on (None: no stage); caches of the old one go."""
        self.worker.swap_backend(backend)

    def shutdown(self, reason: str) -> None:
        """End every request in flight with ``reason`` (their streams end with an error event)."""
        self.coordinator.shutdown(reason)

    async def leave(self, drain_s: float, handed_over: Callable[[], bool] = lambda: True) -> bool:
        """A graceful leave (spec N20): refuse new requests, let the ones this node coordinates
        finish and wait until ``handed_over()`` (the owner's test that the others serve
        without this node), for up to ``drain_s`` seconds in all; then end what is left with
        an error event (their streams are never cut). True when all that happened in time."""
        self.coordinator.refuse_new("this node is leaving the cluster: send requests to another node")
        deadline = asyncio.get_running_loop().time() + drain_s
        finished = await self.coordinator.drained(drain_s)
        while finished and not handed_over():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                finished = False
                break
            await asyncio.sleep(min(0.1, left))
        self.coordinator.shutdown("the node is shutting down")
        await self.coordinator.drained(2.0)
        return finished

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight on this coordinator; False after ``timeout_s``."""
        return await self.coordinator.drained(timeout_s)

    def statistics(self) -> PlaneStatistics:
        """A frozen record of what the plane holds now (see ``PlaneStatistics``)."""
        c = self.coordinator
        return PlaneStatistics(active=c.active, recovering=c.recovering, failed_attempts=c.failed_attempts,
                               recovery_s=tuple(c.recovery_times)[-32:], kv_caches=len(self.worker.caches),
                               kv_replica_bytes=c.replicas.nbytes, requests=c.requests.to_wire(),
                               measured=c.measured.summary(), batches=self.worker.batcher.batches,
                               batched_steps=self.worker.batcher.steps, queued=c.admission.queued,
                               refused=c.admission.refused,
                               prefix={"hits": c.prefix_hits, "misses": c.prefix_misses, "tokens": c.prefix_tokens,
                                       "entries": len(self.worker.prefixes), "bytes": self.worker.prefixes.nbytes})
