"""The stage worker: runs this node's layer range for every request that passes through it,
one KV cache per request (specs/node.md N5-N8), answers repeated steps from what it sent
(specs/faults.md FO2), and feeds and loads the coordinator's KV replica (FO8). Which step to
compute, replay or drop is decided by the sans-IO ``mesh.runtime.stage_core.StageLedger``;
this shell computes, keeps the KV caches and sends.

The coordinator side of a request is ``mesh.runtime.coordinator.Coordinator``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from backends.base import Backend, BatchItem, StepOutput
from mesh.errors import BackendError, MeshError, RequestFailed, StageFailed, TransportError
from mesh.runtime.batcher import MAX_BATCH, PREFILL_BATCH, StepBatcher
from mesh.runtime.engine import SamplingParams
from mesh.runtime.grammar import Grammars
from mesh.runtime.kvreplica import pack_kv, unpack_kv
from mesh.runtime.messages import (
    Forward,
    KvLoad,
    KvLoaded,
    KvPush,
    KvReplica,
    StepError,
    Token,
)
from mesh.runtime.prefix import PREFIX_CACHE_MB, PrefixStore
from mesh.runtime.sampling import sample, with_logprobs
from mesh.runtime.stage_core import COMPUTE, Replay, StageLedger
from mesh.wire import Message, WireTensor

log = logging.getLogger(__name__)


class StageWorker:
    """Runs this node's layers for every request that passes through it.

    Compute runs on one worker thread, so the event loop keeps serving heartbeats and HTTP
    (spec N5); the steps of different requests that are ready together run there as one batch
    (``mesh.runtime.batcher``, spec N22), each with its own KV cache (spec N7). ``send(member,
    msg)`` reaches any member, this node included; ``max_batch`` and ``prefill_batch`` bound a
    batch's steps and prompt positions.
    """

    def __init__(self, member_id: str, send: Callable[[str, Message], Awaitable[None]], executor: Executor,
                 clock: Callable[[], float] = time.monotonic, *, max_batch: int = MAX_BATCH,
                 prefill_batch: int = PREFILL_BATCH, prefix_cache_bytes: int = PREFIX_CACHE_MB * 2**20,
                 tokenizer: Callable[[], Any] | None = None) -> None:
        self.member_id = member_id
        self.send = send
        self.executor = executor
        self.clock = clock
        self.batcher = StepBatcher(executor, lambda b: self.caches_on((b.layer_start, b.layer_end)),
                                   max_batch=max_batch, prefill_batch=prefill_batch)
        # the stages this node holds, by layer range: one, or two while a plan change loads the
        # new one beside the old (make-before-break, spec N21); requests pick theirs by route
        self.stages: dict[tuple[int, int], Backend] = {}
        self.backend: Backend | None = None  # the newest stage (the current plan's)
        self.caches: dict[str, Any] = {}
        self._cache_stage: dict[str, tuple[int, int]] = {}  # req -> the range its cache is of
        self._tells: set[asyncio.Task[None]] = set()  # errors on their way to coordinators (``retire``)
        self.ledger = StageLedger()
        self.prefixes = PrefixStore(prefix_cache_bytes)  # spec N24
        self.grammars = Grammars(tokenizer or _no_tokenizer)  # spec A27: constrained requests' matchers
        self._replica_due: dict[str, tuple[Backend, Any, int, int]] = {}  # req -> KV to send the coordinator
        self._keep_due: dict[str, tuple[Backend, Any, list[Any]]] = {}  # req -> prompt chunks to keep (N24)
        # spec N13: a prefill stage's KV to hand to the decode stages; a decode stage's KV arriving
        self._push_due: dict[str, tuple[Backend, Any, int, list[Any]]] = {}  # req -> (backend, cache, n, decode route)
        self._pushes: dict[str, dict[int, tuple[int, Any, Any]]] = {}  # req -> layer -> (layer, keys, values)

    def swap_backend(self, backend: Backend | None) -> None:
        """Hold only ``backend`` (None: nothing); every cache of the stages it replaces goes."""
        self.stages = {} if backend is None else {(backend.layer_start, backend.layer_end): backend}
        self.backend = backend
        self.caches.clear()
        self._cache_stage.clear()
        self.ledger.reset()
        self._pushes.clear()
        self.prefixes.keep_only(set(self.stages))

    def add_stage(self, backend: Backend) -> None:
        """Hold ``backend`` beside the stages held already (spec N21): requests whose route
        names its range compute on it, the others go on with theirs. A stage of the same range
        is replaced (its caches go)."""
        key = (backend.layer_start, backend.layer_end)
        if key in self.stages:
            self.retire(key)
        self.stages[key] = self.backend = backend

    def retire(self, layers: tuple[int, int]) -> None:
        """Stop holding the stage of ``layers`` (if held); the requests with a cache on it are
        released here and their coordinators told at once (a non-fatal ``error``: the attempt
        fails over, spec FO3), so none waits out its step timeout for a reply that cannot come."""
        if self.stages.pop(layers, None) is None:
            return
        self.prefixes.keep_only(set(self.stages))
        for req in [r for r, key in self._cache_stage.items() if key == layers]:
            owner = self.ledger.owner.get(req)
            self.release(req)
            if owner is not None:
                self._tell(owner[0], StepError(req=req, fatal=False, message=(
                    f"{self.member_id}: layers [{layers[0]}, {layers[1]}) were unloaded here for a new plan")))
        if self.backend is not None and (self.backend.layer_start, self.backend.layer_end) == layers:
            self.backend = next(reversed(self.stages.values()), None)

    def _tell(self, member: str, error: StepError) -> None:
        """Send ``error`` to ``member`` in the background; a failure is logged (the request's
        own timeouts still end it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous test): nobody to tell
            return

        async def go() -> None:
            try:
                await self.send(member, error.to_message())
            except MeshError as exc:
                log.info("cannot tell %s that req=%s moves: %s", member, error.req, exc)

        task = loop.create_task(go(), name=f"tell {error.req}")
        self._tells.add(task)
        task.add_done_callback(self._tells.discard)

    def held(self) -> list[tuple[int, int]]:
        """The layer ranges of the stages held, oldest first; a stage whose tensor-parallel
        group failed (its backend's ``failure``, spec N26) is not one: no plan can serve on it."""
        return [key for key, backend in self.stages.items() if not getattr(backend, "failure", None)]

    def caches_on(self, layers: tuple[int, int]) -> int:
        """How many requests hold a KV cache on the stage of ``layers``."""
        return sum(1 for key in self._cache_stage.values() if key == layers)

    def _stage(self, start: int, end: int) -> Backend:
        backend = self.stages.get((start, end))
        if backend is None:
            held = [list(k) for k in self.stages] or None
            raise RequestFailed(f"stage holds layers {held}, the request's plan needs [{start}, {end})")
        return backend

    def _keep(self, req: str, backend: Backend, cache: Any) -> None:
        self.caches[req] = cache
        self._cache_stage[req] = (backend.layer_start, backend.layer_end)

    def _drop(self, req: str) -> None:
        self.caches.pop(req, None)
        self._cache_stage.pop(req, None)
        self._replica_due.pop(req, None)
        self._keep_due.pop(req, None)
        self._push_due.pop(req, None)
        self._pushes.pop(req, None)
        self.grammars.drop(req)

    def release(self, request_id: str) -> None:
        """Free a request's KV cache and drop any of its steps still in flight (spec N8)."""
        self._drop(request_id)
        self.ledger.release(request_id)

    async def _keep_prefix(self, req: str, backend: Backend, cache: Any, keep: list[Any]) -> None:
        """Spec N24: keep positions ``[0, n)`` of ``req``'s KV cache (the prompt's whole chunks,
        just computed) in the prefix cache under ``key`` (``keep = [n, key]``), exported after
        the step's output left. Nothing is kept when the cache does not hold them or the backend
        cannot export."""
        n, key = int(keep[0]), str(keep[1])
        layers = (backend.layer_start, backend.layer_end)
        if self.prefixes.has(layers, key) or self.prefixes.budget <= 0:
            return
        try:
            exported = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: backend.export_kv(cache, start_pos=0, end_pos=n))
        except BackendError as exc:  # fewer positions than n, or a backend that cannot export
            log.debug("req=%s: prefix not kept: %s", req, exc)
            return
        except Exception:  # a plugin's export that breaks its contract: nothing kept
            log.exception("req=%s: exporting a prefix for the prefix cache failed", req)
            return
        if self.stages.get(layers) is backend:
            self.prefixes.put(layers, key, exported, n)

    async def _from_prefix(self, fwd: Forward, backend: Backend) -> tuple[Forward, Any] | None:
        """Spec N24: a new request's first step that names cached prefixes starts from the longest
        this stage holds (the first stage picks; a later one must hold the one picked): the
        step trimmed to the positions after it, and a new KV cache holding it. None when the
        first stage holds none (or its chunks do not line up with the step's); RequestFailed
        when a later stage lacks the prefix the first one took (the attempt starts over)."""
        layers = (backend.layer_start, backend.layer_end)
        first = fwd.tokens is not None
        if not first and fwd.pos == 0:
            return None  # a later stage of a step that found no prefix
        chosen = None
        for n, key in fwd.prefix or []:
            if (n == fwd.pos or first) and self.prefixes.has(layers, key):
                chosen = (int(n), str(key))
                break
        if chosen is None:
            if first:
                return None
            raise RequestFailed(f"req={fwd.req}: prefix of {fwd.pos} positions is not in this stage's prefix cache")
        n, key = chosen
        split = list(fwd.split or [fwd.n_positions])
        skipped = 0
        while split and skipped < n - fwd.pos:
            skipped += split.pop(0)
        if first and (skipped != n or not split):
            return None  # chunks that do not end where the prefix does: compute from scratch
        entry = self.prefixes.get(layers, key)
        assert entry is not None
        cache = backend.new_cache()
        await asyncio.get_running_loop().run_in_executor(self.executor, lambda: backend.import_kv(cache, entry.layers))
        if not first:
            return fwd, cache
        trimmed = Forward(req=fwd.req, coord=fwd.coord, plan_id=fwd.plan_id, route=fwd.route, idx=fwd.idx,
                          step=fwd.step, pos=n, tokens=fwd.tokens[n:], temperature=fwd.temperature,  # type: ignore[index]
                          top_p=fwd.top_p, seed=fwd.seed, kv_to=fwd.kv_to, replica=fwd.replica, timing=fwd.timing,
                          split=split if len(split) > 1 else None, prefix=[[n, key]], keep=fwd.keep,
                          logprobs=fwd.logprobs, grammar=fwd.grammar)
        return trimmed, cache

    def release_coordinated_by(self, member_id: str) -> None:
        """Free the caches of requests whose coordinator was lost: nobody will release them."""
        for req in self.ledger.coordinated_by(member_id):
            self.release(req)

    def expire(self, idle_s: float) -> None:
        """Free caches unused for ``idle_s`` seconds (a coordinator that never sent ``release``)."""
        for req in self.ledger.idle(self.clock(), idle_s):
            log.warning("req=%s: freeing a KV cache idle for over %.0f s", req, idle_s)
            self.release(req)

    def _taken(self, req: str) -> bool:
        """Whether a KV load or push for ``req`` comes too late (it started or ended here)."""
        return req in self.caches or self.ledger.started(req)

    async def on_forward(self, fwd: Forward) -> None:
        """Handle one ``forward`` step; any failure, sending its output included, goes back to
        the coordinator as ``error`` (never out of this handler: it would end the plane)."""
        req = fwd.req
        try:
            sent = await self._step(fwd)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure of a step must reach the waiting request
            if not isinstance(exc, MeshError):
                log.exception("stage step failed: req=%s", req)
            self.ledger.failed(req, fwd.step)  # not a cancellation: the step may be retried
            self._drop(req)
            # spec FO3: a stale plan, a lost cache, a link or a stage that is gone (a failed
            # tensor-parallel group) is worth a new attempt; a backend's own failure on this input
            # would fail again
            fatal = not isinstance(exc, RequestFailed | TransportError | StageFailed)
            reply = StepError(req=req, message=f"{self.member_id}: {exc}", fatal=fatal).to_message()
            try:
                await self.send(fwd.coord, reply)
            except MeshError as send_exc:
                log.warning("cannot report failure of req=%s to %s: %s", req, fwd.coord, send_exc)
            return
        if not sent:
            return
        push = self._push_due.pop(req, None)
        if push is not None and not self.ledger.is_released(req):  # after the step's own output
            await self._push_kv(req, fwd.coord, *push)
        due = self._replica_due.pop(req, None)
        if due is not None and not self.ledger.is_released(req):
            await self._send_replica(req, fwd.coord, *due)
        keep = self._keep_due.pop(req, None)
        if keep is not None:
            await self._keep_prefix(req, *keep)

    async def _step(self, fwd: Forward) -> bool:
        """Compute, replay or drop one step and send its output; True when it was computed."""
        decision = self.ledger.step(fwd.req, fwd.step)
        if isinstance(decision, Replay):
            await self.send(decision.member, decision.message)
            return False
        if decision != COMPUTE:
            return False
        out = await self._compute(fwd)
        member, message = out if out is not None else (None, None)
        if self.ledger.computed(fwd.req, fwd.step, member, message):
            await self.send(member, message)  # type: ignore[arg-type]
        return True

    async def on_kv_load(self, sender: str, load: KvLoad) -> None:
        """Handle a ``kv.load``: start request ``req``'s KV cache from a replica block (spec
        FO8) and answer ``kv.loaded`` (``ok``, or why not) to the sender. A request that has
        started computing here, or was released, is not loaded again."""
        req = load.req
        try:
            if not self.stages:
                raise RequestFailed("no layers loaded here")
            # the stage of exactly these layers (an import takes every layer of its stage): with
            # an old and a new stage held, both may cover them (spec N21); else one covering
            # them, whose import says what is wrong
            span = (min(load.layers), max(load.layers) + 1) if load.layers else (0, 0)
            backend = self.stages.get(span) or next(
                (b for (a, z), b in reversed(self.stages.items()) if all(a <= g < z for g in load.layers)), None)
            if backend is None:
                raise RequestFailed(f"KV of layers {load.layers} sent here; this node holds {self.held()}")
            if self._taken(req):
                raise RequestFailed(f"req={req} has started here already")
            kv = unpack_kv(load.layers, load.block)
            cache = backend.new_cache()
            await asyncio.get_running_loop().run_in_executor(self.executor, lambda: backend.import_kv(cache, kv))
            if self._taken(req) or self.stages.get((backend.layer_start, backend.layer_end)) is not backend:
                raise RequestFailed(f"req={req} started or was released while its KV loaded")
            self._keep(req, backend, cache)
            self.ledger.touch(req, load.coord, self.clock())
        except Exception as exc:  # a plugin may raise anything: the coordinator re-prefills (FO8)
            await self._answer_kv(sender, req, load.end, _as_mesh_error(exc, f"req={req}: importing the KV replica"))
            return
        await self._answer_kv(sender, req, load.end, None)

    async def _answer_kv(self, member: str, req: str, end: int, error: MeshError | None) -> None:
        """Answer ``kv.loaded`` to ``member``: ``req``'s KV cache for positions [0, ``end``) is
        in place, or why not (``error``). A send that fails is only logged: the waiting
        coordinator's deadline covers it (spec FO8, N13)."""
        reply = KvLoaded(req=req, member=self.member_id, end=end, ok=error is None,
                         message="" if error is None else f"{self.member_id}: {error}",
                         gone=isinstance(error, StageFailed))
        try:
            await self.send(member, reply.to_message())
        except MeshError as exc:
            log.info("cannot answer kv.loaded of req=%s to %s: %s", req, member, exc)

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
                if target is None or self.ledger.is_released(req):
                    continue
                _, block = pack_kv([(g, keys, values)])
                push = KvPush(req=req, coord=coordinator, layer=g, end=n, layer_range=(target[1], target[2]), block=block)
                await self.send(str(target[0]), push.to_message())
        except MeshError as exc:
            log.info("req=%s: KV cache not handed to the decode stages: %s", req, exc)
        except Exception:  # a plugin's export that breaks its contract: the decode side recomputes
            log.exception("req=%s: exporting the KV cache for the decode stages failed", req)
        finally:
            self.caches.pop(req, None)  # this request decodes elsewhere
            self._cache_stage.pop(req, None)

    async def on_kv_push(self, sender: str, push: KvPush) -> None:
        """A decode stage of a disaggregated plan takes one layer's KV of a request's prefill
        (spec N13); once every layer of its range is there it builds the request's cache and
        answers ``kv.loaded`` to the coordinator (``ok``, or why not)."""
        req, end = push.req, push.end
        if self._taken(req):
            return  # decode started without it (the prefill was recomputed here), or it ended
        try:
            backend = self.stages.get(push.layer_range)
            if backend is None:
                held = [list(k) for k in self.stages] or None
                raise RequestFailed(f"KV for layers {list(push.layer_range)} pushed here; this stage holds {held}")
            pending = self._pushes.setdefault(req, {})
            self.ledger.touch(req, push.coord, self.clock())
            for g, keys, values in unpack_kv([push.layer], push.block):
                if keys.shape[2] != end:
                    raise RequestFailed(f"layer {g}: KV for {keys.shape[2]} positions, {end} announced")
                pending[g] = (g, keys, values)
            if set(pending) != set(range(backend.layer_start, backend.layer_end)):
                return  # more layers to come
            del self._pushes[req]
            layers = [pending[g] for g in range(backend.layer_start, backend.layer_end)]
            cache = backend.new_cache()
            await asyncio.get_running_loop().run_in_executor(self.executor, lambda: backend.import_kv(cache, layers))
            if self._taken(req) or self.stages.get(push.layer_range) is not backend:
                return
            self._keep(req, backend, cache)
        except Exception as exc:  # a plugin may raise anything: the decode side recomputes (N13)
            self._pushes.pop(req, None)
            await self._answer_kv(push.coord, req, end, _as_mesh_error(exc, f"req={req}: importing pushed KV"))
            return
        await self._answer_kv(push.coord, req, end, None)

    async def _send_replica(self, req: str, coordinator: str, backend: Backend, cache: Any, pos: int, n: int) -> None:
        """Send the KV entries a step appended, positions [pos, pos + n), to the request's
        coordinator (spec FO8). Exported after the step's output left, so the pipeline does
        not wait for it; a failure only leaves a gap in the replica (a failover re-prefills)."""
        def export() -> Message:
            ids, block = pack_kv(backend.export_kv(cache, start_pos=pos, end_pos=pos + n))
            return KvReplica(req=req, start=pos, layers=ids, block=block).to_message()

        try:
            replica = await asyncio.get_running_loop().run_in_executor(self.executor, export)
            if not self.ledger.is_released(req):
                await self.send(coordinator, replica)
        except MeshError as exc:
            log.info("req=%s: no KV replica from this stage: %s", req, exc)
        except Exception:  # the replica is best effort: a broken export must not fail the request
            log.exception("req=%s: exporting the KV replica failed", req)

    async def _compute(self, fwd: Forward) -> tuple[str, Message] | None:
        """Run one step on this stage: (where its output goes, the message), or None when the
        request was released meanwhile."""
        _, start, end = fwd.route[fwd.idx]
        backend = self._stage(int(start), int(end))
        started = await self._from_prefix(fwd, backend) if fwd.prefix and not fwd.kv_to else None
        if started is not None:
            fwd = started[0]
            self._keep(fwd.req, backend, started[1])
        req, pos = fwd.req, fwd.pos
        cache = self.caches.get(req)
        if pos == 0:  # a prefill from the start: a cache a failed resume left is dropped
            cache = backend.new_cache()
            self._keep(req, backend, cache)
        elif cache is None or self._cache_stage.get(req) != (start, end):
            raise RequestFailed(f"no KV cache for req={req} at position {pos}")
        self.ledger.touch(req, fwd.coord, self.clock())

        out, compute_s = await run_step(self.batcher, backend, cache, fwd, stop=lambda: self.ledger.is_released(req))
        timing = [*(fwd.timing or []), [self.member_id, round(compute_s, 6)]]  # spec N12
        if self.ledger.is_released(req):  # cancelled while computing
            self.release(req)
            return None
        if pos == 0 and fwd.kv_to:  # spec N13: hand the KV to the decode side
            self._push_due[req] = (backend, cache, fwd.n_positions, fwd.kv_to)
        if fwd.replica:  # spec FO8: sent once the output has left (from 0 when the prefix cache gave the start)
            first = 0 if started is not None else pos
            self._replica_due[req] = (backend, cache, first, pos + fwd.n_positions - first)
        if fwd.keep is not None:  # spec N24: kept once the output has left
            self._keep_due[req] = (backend, cache, fwd.keep)
        if fwd.idx + 1 < len(fwd.route):
            nxt = Forward(req=req, coord=fwd.coord, plan_id=fwd.plan_id, route=fwd.route, idx=fwd.idx + 1,
                          step=fwd.step, pos=pos, tokens=None, temperature=fwd.temperature, top_p=fwd.top_p,
                          seed=fwd.seed, kv_to=fwd.kv_to, replica=fwd.replica, timing=timing, hidden=out.hidden,
                          split=fwd.split, prefix=fwd.prefix if started is not None or fwd.pos else None,
                          keep=fwd.keep, logprobs=fwd.logprobs, grammar=fwd.grammar)
            return str(fwd.route[fwd.idx + 1][0]), nxt.to_message()
        if out.logits is None:
            raise RequestFailed("the last stage produced no logits")
        params = SamplingParams(max_tokens=1, temperature=fwd.temperature, top_p=fwd.top_p)
        if fwd.grammar is not None:  # spec A27: only tokens the schema allows next
            schema, generated, logits = fwd.grammar[0], fwd.grammar[1], out.logits

            def constrained() -> int:  # CPU work (a matcher built from a tokenizer: ~0.3 s once)
                picked = sample(self.grammars.constrain(req, schema, generated, logits), params, step=fwd.step,
                                request_seed=fwd.seed)
                self.grammars.advance(req, picked)
                return picked

            token = await asyncio.get_running_loop().run_in_executor(self.executor, constrained)
        else:
            token = sample(out.logits, params, step=fwd.step, request_seed=fwd.seed)
        if fwd.logprobs is not None:  # spec A26: where the last stage samples, from the model's logits
            token = with_logprobs(out.logits, token, fwd.logprobs)
        cached = pos if fwd.prefix and pos else 0  # spec N24: the positions the prefix cache gave
        return fwd.coord, Token(req=req, step=fwd.step, token=token, timing=timing, cached=cached).to_message()


async def run_step(batcher: StepBatcher, backend: Backend, cache: Any, fwd: Forward,
                   stop: Callable[[], bool] = lambda: False) -> tuple[StepOutput, float]:
    """One step on ``backend``, batched with other requests' steps by ``batcher``: (its
    output, compute seconds). With ``fwd.split``, its sub-steps in order, as many per batch as
    the batcher's budget allows, until ``stop()``: a prefill in chunks (spec N23), or a
    replayed step in the shapes of the original steps, so reduced-precision results do not
    depend on how a failover grouped the tokens (spec FO9). Hidden states of the sub-steps are
    joined along positions; the logits are the last sub-step's."""
    sizes = fwd.split if fwd.split and len(fwd.split) > 1 else [fwd.n_positions]
    items, at = [], 0
    for n in sizes:
        whole = len(sizes) == 1
        items.append(BatchItem(
            cache=cache, start_pos=fwd.pos + at,
            token_ids=(fwd.tokens if whole else fwd.tokens[at:at + n]) if fwd.tokens else None,
            hidden=(fwd.hidden if whole else fwd.hidden.rows(at, at + n)) if fwd.hidden is not None else None))
        at += n
    outs, total_s = await batcher.submit(backend, items, stages=len(fwd.route), stop=stop)
    parts = [o.hidden for o in outs if o.hidden is not None]
    if len(parts) > 1:
        return StepOutput(hidden=WireTensor.join_rows(parts)), total_s
    return outs[-1], total_s


def _no_tokenizer() -> Any:
    raise RequestFailed("this stage has no tokenizer for constrained decoding")


def _as_mesh_error(exc: Exception, what: str) -> MeshError:
    """``exc`` as the MeshError a peer is told; a backend plugin that broke its contract
    (any other exception) is logged with its traceback here, and the node keeps serving."""
    if isinstance(exc, MeshError):
        return exc
    log.exception("%s failed", what)
    return BackendError(f"{what} failed: {exc!r}")
