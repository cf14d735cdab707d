"""Requests through pipeline stages: the coordinator (the Engine the API uses) and the
stage worker (runs this node's layer range for every request, one KV cache per request).

A request, end to end: the node holding the HTTP connection coordinates. Per token it sends
a ``forward`` to stage 0 (the prompt at step 0 = prefill, one token afterwards = decode);
each stage runs its layers and forwards hidden states to the next; the last stage samples
and sends the ``token`` back to the coordinator, which streams it and starts the next step.
Tokens and activations go point to point; nothing here is a cluster event. Every wait has a
timeout; a lost stage fails its requests at once; ``release`` frees KV caches on every stage.
Spec: specs/node.md (N5-N10).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from backends.base import Backend
from mesh.engine import SamplingParams
from mesh.errors import ApiError, MeshError, ModelError, PeerTimeout, RequestFailed
from mesh.models import Model
from mesh.placement import Plan
from mesh.sampling import sample
from mesh.perf import Measured
from mesh.wire import Message

log = logging.getLogger(__name__)

RELEASED_MEMORY = 4096  # how many released request ids a stage remembers to drop late steps


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds to wait: for the first token (prefill through every stage), for each later
    token, and for a control send on a link."""

    prefill_s: float = 120.0
    decode_s: float = 30.0
    send_s: float = 5.0


class NodeServices(Protocol):
    """What the runtime needs from the node shell."""

    member_id: str

    async def send(self, member_id: str, msg: Message) -> None: ...

    def current_plan(self) -> Plan | None: ...

    def ready(self) -> tuple[bool, str]: ...

    def cluster_info(self) -> dict[str, Any]: ...

    def request_event(self, req: str, state: str, stages: list[str] | None = None) -> None: ...


class StageWorker:
    """Runs this node's layers for every request that passes through it.

    Compute runs on one worker thread, so the event loop keeps serving heartbeats and HTTP
    (spec N5); steps of different requests interleave there, each with its own KV cache
    (spec N7).
    """

    def __init__(self, node: NodeServices, executor: ThreadPoolExecutor) -> None:
        self.node = node
        self.executor = executor
        self.backend: Backend | None = None
        self.caches: dict[str, Any] = {}
        self._owner: dict[str, tuple[str, float]] = {}  # req -> (coordinator, last use, monotonic s)
        self._released: OrderedDict[str, None] = OrderedDict()

    def swap_backend(self, backend: Backend | None) -> None:
        """Install a newly loaded backend; caches of the old one are dropped."""
        self.backend = backend
        self.caches.clear()

    def release(self, request_id: str) -> None:
        """Free a request's KV cache and drop any of its steps still in flight (spec N8)."""
        self.caches.pop(request_id, None)
        self._owner.pop(request_id, None)
        self._released[request_id] = None
        while len(self._released) > RELEASED_MEMORY:
            self._released.popitem(last=False)

    def release_coordinated_by(self, member_id: str) -> None:
        """Free the caches of requests whose coordinator was lost: nobody will release them."""
        for req in [r for r, (coord, _) in self._owner.items() if coord == member_id]:
            self.release(req)

    def expire(self, idle_s: float) -> None:
        """Free caches unused for ``idle_s`` seconds (a coordinator that never sent ``release``)."""
        cutoff = time.monotonic() - idle_s
        for req in [r for r, (_, used) in self._owner.items() if used < cutoff]:
            log.warning("req=%s: freeing a KV cache idle for over %.0f s", req, idle_s)
            self.release(req)

    async def on_forward(self, msg: Message) -> None:
        """Handle one ``forward`` step; any failure goes back to the coordinator as ``error``."""
        body = msg.body
        req = str(body.get("req", ""))
        coordinator = str(body.get("coord", ""))
        if not 0 < len(req) <= 64 or not 0 < len(coordinator) <= 128:
            log.warning("dropping a forward step with a malformed request or coordinator id")
            return
        try:
            await self._forward(req, body, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure of a step must reach the waiting request
            if not isinstance(exc, MeshError):
                log.exception("stage step failed: req=%s", req)
            self.release(req)
            self._released.pop(req, None)  # a failed step is not a cancellation: it may be retried
            reply = Message(type="error", body={"req": req, "message": f"{self.node.member_id}: {exc}"})
            try:
                await self.node.send(coordinator, reply)
            except MeshError as send_exc:
                log.warning("cannot report failure of req=%s to %s: %s", req, coordinator, send_exc)

    async def _forward(self, req: str, body: dict[str, Any], msg: Message) -> None:
        if req in self._released:
            return
        backend = self.backend
        route = body["route"]
        idx = int(body["idx"])
        member, start, end = route[idx]
        if backend is None or (backend.layer_start, backend.layer_end) != (start, end):
            held = None if backend is None else [backend.layer_start, backend.layer_end]
            raise RequestFailed(f"stage holds layers {held}, the request's plan needs [{start}, {end})")
        step, pos = int(body["step"]), int(body["pos"])
        cache = self.caches.get(req)
        if cache is None:
            if pos != 0:
                raise RequestFailed(f"no KV cache for req={req} at position {pos}")
            cache = self.caches[req] = backend.new_cache()
        self._owner[req] = (str(body["coord"]), time.monotonic())
        tokens = body.get("tokens")
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(
            self.executor,
            lambda: backend.forward(cache, start_pos=pos, token_ids=tokens, hidden=msg.tensor),
        )
        if req in self._released:  # cancelled while computing
            self.release(req)
            return
        if idx + 1 < len(route):
            nxt = {k: v for k, v in body.items() if k != "tokens"}
            nxt["idx"] = idx + 1
            await self.node.send(route[idx + 1][0], Message(type="forward", body=nxt, tensor=out.hidden))
            return
        if out.logits is None:
            raise RequestFailed("the last stage produced no logits")
        sp = body["sp"]
        params = SamplingParams(max_tokens=1, temperature=float(sp["t"]), top_p=float(sp["p"]))
        token = sample(out.logits, params, step=step, request_seed=int(sp["seed"]))
        await self.node.send(str(body["coord"]), Message(type="token", body={"req": req, "step": step, "token": token}))


class Coordinator:
    """The real ``mesh.engine.Engine``: runs requests through the current plan."""

    def __init__(self, node: NodeServices, model: Model, timeouts: Timeouts) -> None:
        self.node = node
        self.model = model
        self.timeouts = timeouts
        self.measured = Measured()  # TTFT and decode rate of finished requests (spec P16)
        self.model_id = model.model_id
        self.context_length = model.context_length
        self.eos_token_ids = model.eos_token_ids
        self.tokenizer = model.tokenizer
        self._pending: dict[str, tuple[asyncio.Queue[Message], set[str]]] = {}

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.model.encode_chat(messages)
        except ModelError as exc:
            raise ApiError(str(exc), param="messages") from exc

    def health(self) -> tuple[bool, str]:
        return self.node.ready()

    def cluster_info(self) -> dict[str, Any]:
        return self.node.cluster_info()

    def deliver(self, msg: Message) -> None:
        """Route a ``token`` or ``error`` reply to its waiting request (unknown ids dropped)."""
        pending = self._pending.get(str(msg.body.get("req", "")))
        if pending is not None:
            pending[0].put_nowait(msg)

    @property
    def active(self) -> int:
        """Requests in flight on this coordinator."""
        return len(self._pending)

    def shutdown(self, reason: str) -> None:
        """Fail every request in flight with ``reason`` (their streams end with an error event)."""
        for req, (queue, _) in self._pending.items():
            queue.put_nowait(Message(type="error", body={"req": req, "message": reason}))

    def member_lost(self, member_id: str) -> None:
        """Fail at once every request whose route passes through a lost member (spec N9)."""
        for req, (queue, members) in self._pending.items():
            if member_id in members:
                queue.put_nowait(Message(type="error", body={"req": req, "message": f"member {member_id} was lost"}))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        ready, reason = self.node.ready()
        plan = self.node.current_plan()
        if not ready or plan is None:
            raise RequestFailed(f"the model is not ready: {reason}")
        if not prompt_ids:
            raise ApiError("the prompt is empty", param="messages")
        req = secrets.token_hex(8)
        route: list[list[Any]] = [[s.member_id, s.layer_start, s.layer_end] for s in plan.stages]
        first_member = plan.stages[0].member_id
        members = {s.member_id for s in plan.stages}
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._pending[req] = (queue, members)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        base = {
            "req": req,
            "coord": self.node.member_id,
            "plan": plan.plan_id,
            "route": route,
            "idx": 0,
            "sp": {"t": params.temperature, "p": params.top_p, "seed": seed},
        }
        started = time.monotonic()
        first_token_at = 0.0
        produced = 0
        outcome = "cancelled"  # unless it finishes or fails below
        log.info("req=%s start: %d prompt tokens, plan %s", req, len(prompt_ids), plan.plan_id)
        self.node.request_event(req, "running", [s.member_id for s in plan.stages])
        try:
            tokens, pos = list(prompt_ids), 0
            for step in range(params.max_tokens):
                body = dict(base, step=step, pos=pos, tokens=tokens)
                await self.node.send(first_member, Message(type="forward", body=body))
                timeout = self.timeouts.prefill_s if step == 0 else self.timeouts.decode_s
                try:
                    reply = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise PeerTimeout(f"req={req}: no token within {timeout:.0f} s at step {step}") from None
                if reply.type == "error":
                    raise RequestFailed(f"req={req} failed: {reply.body.get('message')}")
                token = int(reply.body["token"])
                produced += 1
                if produced == 1:
                    first_token_at = time.monotonic()
                if produced == params.max_tokens or (token in self.eos_token_ids and not params.ignore_eos):
                    outcome = "finished"
                yield token
                if outcome == "finished":
                    return
                pos += len(tokens)
                tokens = [token]
        except MeshError:
            outcome = "failed"
            raise
        finally:
            self._pending.pop(req, None)
            if outcome == "finished":
                self.measured.record(prompt_tokens=len(prompt_ids), new_tokens=produced,
                                     ttft_s=first_token_at - started, decode_s=time.monotonic() - first_token_at)
            self.node.request_event(req, outcome)
            await self._release(req, members)
            log.info("req=%s end: %d tokens in %.2f s", req, produced, time.monotonic() - started)

    async def _release(self, req: str, members: set[str]) -> None:
        async def one(member: str) -> None:
            try:
                await asyncio.wait_for(self.node.send(member, Message(type="release", body={"req": req})), self.timeouts.send_s)
            except (MeshError, TimeoutError) as exc:
                log.warning("req=%s: release on %s failed: %s", req, member, exc)

        await asyncio.gather(*(one(m) for m in sorted(members)))
