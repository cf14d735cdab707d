"""The stage worker: runs this node's layer range for every request that passes through it,
one KV cache per request (specs/node.md N5-N8), answers repeated steps from what it sent
(specs/faults.md FO2), and feeds and loads the coordinator's KV replica (FO8).

The coordinator side of a request is ``mesh.runtime.coordinator.Coordinator``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from backends.base import Backend
from mesh.errors import MeshError, RequestFailed, TransportError
from mesh.runtime.engine import SamplingParams
from mesh.runtime.kvreplica import pack_kv, unpack_kv
from mesh.runtime.sampling import sample
from mesh.wire import Message

log = logging.getLogger(__name__)

RELEASED_MEMORY = 4096  # how many released request ids a stage remembers to drop late steps


class StageWorker:
    """Runs this node's layers for every request that passes through it.

    Compute runs on one worker thread, so the event loop keeps serving heartbeats and HTTP
    (spec N5); steps of different requests interleave there, each with its own KV cache
    (spec N7).
    """

    def __init__(self, member_id: str, send: Callable[[str, Message], Awaitable[None]], executor: Executor) -> None:
        self.member_id = member_id
        self.send = send  # to a member, this node included (loopback)
        self.executor = executor
        self.backend: Backend | None = None
        self.caches: dict[str, Any] = {}
        self._owner: dict[str, tuple[str, float]] = {}  # req -> (coordinator, last use, monotonic s)
        self._released: OrderedDict[str, None] = OrderedDict()
        # spec FO2: a repeated step is answered from what it sent, never computed twice
        self._done: dict[str, tuple[int, str, Message]] = {}  # req -> (last step, sent to, message)
        self._busy: dict[str, int] = {}  # req -> step being computed
        self._replica_due: dict[str, tuple[Backend, Any, int, int]] = {}  # req -> KV to send the coordinator
        # spec N13: a prefill stage's KV to hand to the decode stages; a decode stage's KV arriving
        self._push_due: dict[str, tuple[Backend, Any, int, list[Any]]] = {}  # req -> (backend, cache, n, decode route)
        self._pushes: dict[str, dict[int, tuple[int, Any, Any]]] = {}  # req -> layer -> (layer, keys, values)

    def swap_backend(self, backend: Backend | None) -> None:
        """Install a newly loaded backend; caches of the old one are dropped."""
        self.backend = backend
        self.caches.clear()
        self._done.clear()
        self._busy.clear()
        self._pushes.clear()

    def release(self, request_id: str) -> None:
        """Free a request's KV cache and drop any of its steps still in flight (spec N8)."""
        self.caches.pop(request_id, None)
        self._owner.pop(request_id, None)
        self._done.pop(request_id, None)
        self._busy.pop(request_id, None)
        self._replica_due.pop(request_id, None)
        self._push_due.pop(request_id, None)
        self._pushes.pop(request_id, None)
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
            # spec FO3: a stale plan, a lost cache or a link is worth a new attempt; a backend's
            # own failure on this input would fail again
            fatal = not isinstance(exc, RequestFailed | TransportError)
            reply = Message(type="error", body={"req": req, "message": f"{self.member_id}: {exc}", "fatal": fatal})
            try:
                await self.send(coordinator, reply)
            except MeshError as send_exc:
                log.warning("cannot report failure of req=%s to %s: %s", req, coordinator, send_exc)

    async def on_kv_load(self, sender: str, msg: Message) -> None:
        """Handle a ``kv.load``: start request ``req``'s KV cache from a replica block (spec
        FO8) and answer ``kv.loaded`` (``ok``, or why not) to the sender. A request that has
        started computing here, or was released, is not loaded again."""
        body = msg.body
        req, coordinator = str(body.get("req", "")), str(body.get("coord", ""))
        if not 0 < len(req) <= 64 or not 0 < len(coordinator) <= 128:
            log.warning("dropping a kv.load with a malformed request or coordinator id")
            return
        reply = {"req": req, "member": self.member_id, "ok": True, "end": body.get("end")}
        try:
            backend, layers = self.backend, body.get("layers")
            if backend is None or msg.tensor is None or not isinstance(layers, list):
                raise RequestFailed("no layers loaded here, or a kv.load without KV")
            if req in self.caches or req in self._busy or req in self._done or req in self._released:
                raise RequestFailed(f"req={req} has started here already")
            kv = unpack_kv(layers, msg.tensor)
            cache = backend.new_cache()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, lambda: backend.import_kv(cache, kv))
            if req in self.caches or req in self._busy or req in self._done or req in self._released \
                    or backend is not self.backend:
                raise RequestFailed(f"req={req} started or was released while its KV loaded")
            self.caches[req] = cache
            self._owner[req] = (coordinator, time.monotonic())
        except MeshError as exc:
            reply.update(ok=False, message=f"{self.member_id}: {exc}")
        try:
            await self.send(sender, Message(type="kv.loaded", body=reply))
        except MeshError as exc:
            log.info("cannot answer kv.load of req=%s: %s", req, exc)

    async def _forward(self, req: str, body: dict[str, Any], msg: Message) -> None:
        if req in self._released:
            return
        step = int(body["step"])
        done = self._done.get(req)
        if done is not None and step <= done[0]:
            if step == done[0]:  # the coordinator sent it again: its reply was lost downstream
                await self.send(done[1], done[2])
            return
        if self._busy.get(req, -1) >= step:
            return  # a repeat of the step being computed: its reply is on the way
        self._busy[req] = step
        try:
            out = await self._compute(req, body, msg, step)
        finally:
            if self._busy.get(req) == step:
                del self._busy[req]
        if out is not None and req not in self._released:
            self._done[req] = (step, out[0], out[1])
            await self.send(out[0], out[1])
        push = self._push_due.pop(req, None)
        if push is not None and req not in self._released:  # after the step's own output
            await self._push_kv(req, str(body["coord"]), *push)
        due = self._replica_due.pop(req, None)
        if due is not None and req not in self._released:
            await self._send_replica(req, str(body["coord"]), *due)

    async def _push_kv(self, req: str, coordinator: str, backend: Backend, cache: Any, n: int,
                       decode_route: list[Any]) -> None:
        """A prefill stage of a disaggregated plan (spec N13) sends the KV cache it built,
        positions [0, n), to the decode stages holding the same layers, one ``kv.push`` per
        layer (the next prefill stage computes meanwhile), then frees its own copy. A failure
        only means the decode side recomputes the prefill."""
        try:
            exported = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: backend.export_kv(cache, start_pos=0, end_pos=n))
            for g, keys, values in exported:
                target = next(((m, a, b) for m, a, b in decode_route if a <= g < b), None)
                if target is None or req in self._released:
                    continue
                _, block = pack_kv([(g, keys, values)])
                body = {"req": req, "coord": coordinator, "layer": g, "end": n, "range": [target[1], target[2]]}
                await self.send(str(target[0]), Message(type="kv.push", body=body, tensor=block))
        except MeshError as exc:
            log.info("req=%s: KV cache not handed to the decode stages: %s", req, exc)
        except Exception:  # a plugin's export that breaks its contract: the decode side recomputes
            log.exception("req=%s: exporting the KV cache for the decode stages failed", req)
        finally:
            self.caches.pop(req, None)  # this request decodes elsewhere

    async def on_kv_push(self, sender: str, msg: Message) -> None:
        """A decode stage of a disaggregated plan takes one layer's KV of a request's prefill
        (spec N13); once every layer of its range is there it builds the request's cache and
        answers ``kv.loaded`` to the coordinator (``ok``, or why not)."""
        body = msg.body
        req, coordinator = str(body.get("req", "")), str(body.get("coord", ""))
        layer, end, span = body.get("layer"), body.get("end"), body.get("range")
        if not 0 < len(req) <= 64 or not 0 < len(coordinator) <= 128 or not isinstance(layer, int) \
                or not isinstance(end, int) or not isinstance(span, list) or len(span) != 2:
            log.warning("dropping a malformed kv.push")
            return
        if req in self.caches or req in self._busy or req in self._done or req in self._released:
            return  # decode started without it (the prefill was recomputed here), or it ended
        reply: dict[str, Any] = {"req": req, "member": self.member_id, "end": end, "ok": True}
        try:
            backend = self.backend
            if backend is None or [backend.layer_start, backend.layer_end] != span or msg.tensor is None:
                held = None if backend is None else [backend.layer_start, backend.layer_end]
                raise RequestFailed(f"KV for layers {span} pushed here; this stage holds {held}")
            pending = self._pushes.setdefault(req, {})
            self._owner[req] = (coordinator, time.monotonic())
            for g, keys, values in unpack_kv([layer], msg.tensor):
                if keys.shape[2] != end:
                    raise RequestFailed(f"layer {g}: KV for {keys.shape[2]} positions, {end} announced")
                pending[g] = (g, keys, values)
            if set(pending) != set(range(backend.layer_start, backend.layer_end)):
                return
            del self._pushes[req]
            layers = [pending[g] for g in range(backend.layer_start, backend.layer_end)]
            cache = backend.new_cache()
            await asyncio.get_running_loop().run_in_executor(self.executor, lambda: backend.import_kv(cache, layers))
            if req in self.caches or req in self._busy or req in self._done or req in self._released \
                    or backend is not self.backend:
                return
            self.caches[req] = cache
        except MeshError as exc:
            self._pushes.pop(req, None)
            reply.update(ok=False, message=f"{self.member_id}: {exc}")
        try:
            await self.send(coordinator, Message(type="kv.loaded", body=reply))
        except MeshError as exc:
            log.info("cannot tell %s the KV of req=%s arrived: %s", coordinator, req, exc)

    async def _send_replica(self, req: str, coordinator: str, backend: Backend, cache: Any, pos: int, n: int) -> None:
        """Send the KV entries a step appended, positions [pos, pos + n), to the request's
        coordinator (spec FO8). Exported after the step's output left, so the pipeline does
        not wait for it; a failure only leaves a gap in the replica (a failover re-prefills)."""
        def export() -> Message:
            ids, block = pack_kv(backend.export_kv(cache, start_pos=pos, end_pos=pos + n))
            return Message(type="kv.replica", body={"req": req, "start": pos, "layers": ids}, tensor=block)

        try:
            replica = await asyncio.get_running_loop().run_in_executor(self.executor, export)
            if req not in self._released:
                await self.send(coordinator, replica)
        except MeshError as exc:
            log.info("req=%s: no KV replica from this stage: %s", req, exc)
        except Exception:  # the replica is best effort: a broken export must not fail the request
            log.exception("req=%s: exporting the KV replica failed", req)

    async def _compute(self, req: str, body: dict[str, Any], msg: Message, step: int) -> tuple[str, Message] | None:
        """Run one step of ``req`` on this stage: (where its output goes, the message), or
        None when the request was released meanwhile."""
        backend = self.backend
        route = body["route"]
        idx = int(body["idx"])
        member, start, end = route[idx]
        if backend is None or (backend.layer_start, backend.layer_end) != (start, end):
            held = None if backend is None else [backend.layer_start, backend.layer_end]
            raise RequestFailed(f"stage holds layers {held}, the request's plan needs [{start}, {end})")
        pos = int(body["pos"])
        cache = self.caches.get(req)
        if pos == 0:  # a prefill from the start: a cache a failed resume left is dropped
            cache = self.caches[req] = backend.new_cache()
        elif cache is None:
            raise RequestFailed(f"no KV cache for req={req} at position {pos}")
        self._owner[req] = (str(body["coord"]), time.monotonic())
        tokens = body.get("tokens")
        def run() -> tuple[Any, float]:
            started = time.perf_counter()
            out = backend.forward(cache, start_pos=pos, token_ids=tokens, hidden=msg.tensor)
            return out, time.perf_counter() - started

        out, compute_s = await asyncio.get_running_loop().run_in_executor(self.executor, run)
        before = body.get("t")
        timing: list[Any] = list(before) if isinstance(before, list) and len(before) < 64 else []
        timing.append([self.member_id, round(compute_s, 6)])  # spec N12
        if req in self._released:  # cancelled while computing
            self.release(req)
            return None
        kv_to = body.get("kv_to")
        if pos == 0 and isinstance(kv_to, list) and kv_to:  # spec N13: hand the KV to the decode side
            n = len(tokens) if tokens is not None else (msg.tensor.shape[1] if msg.tensor is not None else 0)
            self._push_due[req] = (backend, cache, n, kv_to)
        if body.get("replica") is True:  # spec FO8: sent once the output has left
            n = len(tokens) if tokens is not None else (msg.tensor.shape[1] if msg.tensor is not None else 0)
            self._replica_due[req] = (backend, cache, pos, n)
        if idx + 1 < len(route):
            nxt = {k: v for k, v in body.items() if k != "tokens"}
            nxt["idx"], nxt["t"] = idx + 1, timing
            return route[idx + 1][0], Message(type="forward", body=nxt, tensor=out.hidden)
        if out.logits is None:
            raise RequestFailed("the last stage produced no logits")
        sp = body["sp"]
        params = SamplingParams(max_tokens=1, temperature=float(sp["t"]), top_p=float(sp["p"]))
        token = sample(out.logits, params, step=step, request_seed=int(sp["seed"]))
        return str(body["coord"]), Message(type="token", body={"req": req, "step": step, "token": token, "t": timing})
