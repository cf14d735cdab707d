"""An in-process cluster of coordinators and stage workers over a scripted network, for
testing the runtime's failover without processes, sockets or models.

``HistoryBackend`` is a stand-in model whose KV cache is the list of token ids it has seen
and whose logits are a pure function of that whole history: a cache that lost, repeated or
reordered a position gives other tokens, so equal token streams prove the cache was rebuilt
exactly. ``MiniCluster`` wires a ``Coordinator`` and a ``StageWorker`` per member through
``MiniNode`` (a ``RequestPlane`` each); its network can drop, duplicate and delay
messages (seeded), and members can be killed, which re-places the model on the survivors
the way the node's placement would. With ``prefill_members=k`` the plan is disaggregated: the
first k members prefill, the others decode.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, StepOutput
from mesh.errors import BackendError, TransportError
from mesh.placement.pipeline import Plan, Stage
from mesh.runtime.plane import PlanBoard, RequestPlane
from mesh.runtime.request_core import PlanState, Timeouts
from mesh.wire import Message, WireTensor

# short waits, so a lost message costs a test little (``dataclasses.replace`` to change one)
TIMEOUTS = Timeouts(prefill_s=5.0, decode_s=2.0, send_s=1.0, recovery_s=5.0, retry_s=0.1)

VOCAB = 50
EOS = 0


class HistoryBackend(Backend):
    """Layers [layer_start, layer_end) of a fake model; see the module docstring."""

    name = "history"

    def __init__(self, layer_start: int, layer_end: int, num_layers: int, *, step_delay_s: float = 0.0) -> None:
        super().__init__()
        self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, num_layers
        self.step_delay_s = step_delay_s
        self.steps = 0
        self.tokens_computed = 0  # positions run through this stage (a resume skips the replica's)

    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        # keys: the token ids; values: the ids + 1000 x the layer, so a block given to the
        # wrong layer is caught on import
        if not 0 <= start_pos < end_pos <= len(cache):
            raise BackendError(f"positions [{start_pos}, {end_pos}) are not in the cache")
        ids = np.asarray(cache[start_pos:end_pos], dtype="<f4")
        shape = (1, 1, end_pos - start_pos, 1)
        return [(g, WireTensor(dtype="f32", shape=shape, data=ids.tobytes()),
                 WireTensor(dtype="f32", shape=shape, data=(ids + 1000 * g).tobytes()))
                for g in range(self.layer_start, self.layer_end)]

    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        if [g for g, _, _ in layers] != list(range(self.layer_start, self.layer_end)):
            raise BackendError(f"KV for layers {[g for g, _, _ in layers]}; this stage needs "
                               f"[{self.layer_start}, {self.layer_end})")
        tokens = None
        for g, keys, values in layers:
            k, v = np.frombuffer(keys.data, "<f4"), np.frombuffer(values.data, "<f4")
            if not np.array_equal(v, k + 1000 * g) or (tokens is not None and not np.array_equal(k, tokens)):
                raise BackendError(f"layer {g}: the KV block is not this layer's history")
            tokens = k
        assert tokens is not None
        cache.extend(int(t) for t in tokens)

    def load(self, model: Any, layer_start: int, layer_end: int, progress: Any = None) -> None:
        raise NotImplementedError  # built loaded

    def new_cache(self) -> list[int]:
        return []

    def _forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                hidden: WireTensor | None = None) -> StepOutput:
        import time

        self.steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if token_ids is None:
            if hidden is None:
                raise BackendError("no input")
            token_ids = [int(x) for x in np.frombuffer(hidden.data, dtype="<f4")]
        if start_pos != len(cache):
            raise BackendError(f"position {start_pos} but the cache holds {len(cache)}")
        cache.extend(token_ids)
        self.tokens_computed += len(token_ids)
        if self.layer_end < self.num_layers:
            data = np.asarray(token_ids, dtype="<f4").tobytes()
            return StepOutput(hidden=WireTensor(dtype="f32", shape=(1, len(token_ids), 1), data=data))
        digest = hashlib.sha256(repr(list(cache)).encode()).digest()
        logits = np.random.default_rng(int.from_bytes(digest[:8], "big")).random(VOCAB).astype(np.float32) * 3
        logits[EOS] = -1e9  # never EOS: streams run to max_tokens
        return StepOutput(logits=logits)


class _Model:
    """What ``Coordinator`` reads of a model."""

    model_id = "history"
    context_length = 4096
    eos_token_ids = frozenset({EOS})
    tokenizer = None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [1 + len(m["content"]) % (VOCAB - 1) for m in messages]


@dataclass
class NetworkFaults:
    """Per-message faults of the in-process network (seeded by ``MiniCluster``)."""

    loss: float = 0.0
    duplicate: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    drop_types: set[str] = field(default_factory=set)  # every message of these types is lost
    type_delay_s: dict[str, float] = field(default_factory=dict)  # more delay for messages of these types


class MiniNode:
    """One member: a ``RequestPlane`` over the cluster's network (every message, this member's
    own included, goes through that network, so its faults and counts see them all)."""

    def __init__(self, cluster: MiniCluster, member_id: str, timeouts: Timeouts, kv_replica_bytes: int = 0) -> None:
        self.cluster = cluster
        self.member_id = member_id
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.plans = PlanBoard()
        self.events: list[tuple[str, str]] = []
        self.kv_events: list[tuple[str, list[str]]] = []  # (request, members holding its KV cache)
        self.plane = RequestPlane(member_id, model=_Model(), timeouts=timeouts, executor=self.executor,  # type: ignore[arg-type]
                                  send_remote=lambda dst, msg: cluster.deliver(member_id, dst, msg), plans=self.plans,
                                  on_request_event=self.request_event, kv_replica_bytes=kv_replica_bytes,
                                  loopback=False)
        self.coordinator = self.plane.coordinator
        self.worker = self.plane.worker
        self.task = asyncio.get_running_loop().create_task(self.plane.run(), name=f"plane {member_id}")

    def request_event(self, req: str, state: str, stages: list[str] | None = None) -> None:
        self.events.append((req, state))
        if stages is not None:
            self.kv_events.append((req, list(stages)))


class MiniCluster:
    """``n`` members, ``num_layers`` layers split evenly in member order; see the module docstring."""

    def __init__(self, n: int, *, num_layers: int = 6, seed: int = 0, timeouts: Timeouts | None = None,
                 load_s: float = 0.05, step_delay_s: float = 0.0, kv_replica_bytes: int = 0,
                 prefill_members: int = 0) -> None:
        self.timeouts = timeouts or TIMEOUTS
        self.num_layers = num_layers
        self.rng = random.Random(seed)
        self.faults = NetworkFaults()
        self.nodes = {f"m{i}": MiniNode(self, f"m{i}", self.timeouts, kv_replica_bytes) for i in range(n)}
        self.alive = set(self.nodes)
        self.plan: Plan | None = None
        self.plan_error = ""
        self.loading = False
        self.load_s = load_s
        self.step_delay_s = step_delay_s
        self.capacity_layers = num_layers  # the most layers one member can hold
        self.prefill_members = prefill_members  # the first k members prefill (a disaggregated plan)
        self.messages: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._place_now()

    def _publish(self) -> None:
        """Tell every member's plan board what placement says now (as the node does)."""
        if self.plan is None:
            state = PlanState(plan=None, ready=False, reason=self.plan_error)
        elif self.loading:
            state = PlanState(plan=self.plan, ready=False, reason="stages are loading")
        else:
            state = PlanState(plan=self.plan, ready=True, reason="ok")
        for node in self.nodes.values():
            node.plans.update(state)

    def _place_now(self) -> None:
        members = sorted(self.alive)
        if not members or len(members) * self.capacity_layers < self.num_layers:
            self.plan, self.plan_error = None, (f"placement failed: {self.num_layers} layers need more than "
                                                f"{len(members)} member(s) of {self.capacity_layers} layers")
            self._publish()
            return
        k = min(self.prefill_members, len(members) - 1)  # a disaggregated plan while both sides have members
        sides = [self._split(members[:k]), self._split(members[k:])] if k > 0 else [(), self._split(members)]
        self.plan = Plan(num_layers=self.num_layers, stages=sides[1], prefill_stages=sides[0])
        self._publish()

    def _split(self, members: list[str]) -> tuple[Stage, ...]:
        share, extra = divmod(self.num_layers, len(members))
        stages, start = [], 0
        for i, m in enumerate(members):
            end = start + share + (1 if i < extra else 0)
            stages.append(Stage(member_id=m, layer_start=start, layer_end=end))
            self.nodes[m].worker.swap_backend(HistoryBackend(start, end, self.num_layers,
                                                             step_delay_s=self.step_delay_s))
            start = end
        return tuple(stages)

    async def replace(self) -> None:
        """Re-place on the living members, as the node does after a membership change."""
        self.loading = True
        self._publish()
        await asyncio.sleep(self.load_s)
        self.loading = False
        self._place_now()

    def kill(self, member_id: str) -> None:
        """The member dies: links to it fail, every coordinator learns it, placement follows."""
        self.alive.discard(member_id)
        for m in self.alive:
            self.nodes[m].plane.member_lost(member_id)
        self._spawn(self.replace())

    async def deliver(self, src: str, dst: str, msg: Message) -> None:
        if src not in self.alive:
            raise TransportError(f"{src} is dead")
        if dst not in self.alive:
            raise TransportError(f"no link to {dst}")
        self.messages[msg.type] = self.messages.get(msg.type, 0) + 1
        f = self.faults
        if msg.type in f.drop_types or (src != dst and self.rng.random() < f.loss):
            return
        copies = 2 if src != dst and self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            delay = f.delay_s + self.rng.random() * f.jitter_s if src != dst else 0.0
            delay += f.type_delay_s.get(msg.type, 0.0)
            self._spawn(self._arrive(src, dst, msg, delay))

    async def _arrive(self, src: str, dst: str, msg: Message, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        if dst in self.alive:
            await self.nodes[dst].plane.receive(src, msg)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop delivering, cancel every message in flight and every member's plane, and wait
        for them. Raises ExceptionGroup when a plane had ended on an unexpected handler error."""
        self.alive.clear()  # nothing is delivered from now on
        while self._tasks:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for node in self.nodes.values():
            node.task.cancel()
        ended = await asyncio.gather(*(node.task for node in self.nodes.values()), return_exceptions=True)
        for node in self.nodes.values():
            node.executor.shutdown(wait=False, cancel_futures=True)
        # a plane that ended on its own had an unexpected handler error: the test must see it
        errors = [e for e in ended if isinstance(e, Exception)]
        if errors:
            raise ExceptionGroup("a member's request plane failed", errors)


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]  # the prompt the failover tests send


async def run_request(cluster: MiniCluster, params: Any, *, coordinator: str = "m0",
                      on_token: dict[int, Any] | None = None, prompt: list[int] | None = None) -> list[int]:
    """Generate through ``coordinator``'s ``Coordinator``; ``on_token[k]()`` runs right after
    the k-th token (e.g. to kill a member there)."""
    out: list[int] = []
    async for token in cluster.nodes[coordinator].coordinator.generate(prompt or PROMPT, params):
        out.append(token)
        action = (on_token or {}).get(len(out))
        if action is not None:
            action()
    return out


def reference_tokens(params: Any, prompt: list[int] | None = None) -> list[int]:
    """The tokens a fault-free single-member cluster gives."""
    async def go() -> list[int]:
        cluster = MiniCluster(1)
        try:
            return await run_request(cluster, params, prompt=prompt)
        finally:
            await cluster.close()
    return asyncio.run(go())
