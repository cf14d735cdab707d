"""Continuous batching at a stage (mesh/runtime/batcher.py, specs/node.md N22, N23) and
admission control (mesh/runtime/admission.py, specs/api.md A19), with a fake backend that
records the batches it is given."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import Backend, BatchItem, StepOutput
from mesh.errors import ApiError, BackendError, ConfigError
from mesh.runtime.admission import Admission
from mesh.runtime.batcher import Batching, StepBatcher, prefill_chunks


class Recorder(Backend):
    """Logits are [first token id, positions]; token 999 is refused; ``gate`` holds a batch."""

    name = "recorder"

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__()
        self.layer_start, self.layer_end, self.num_layers = 0, 1, 1
        self.batches: list[list[int]] = []  # first token of each item, per batch
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def load(self, model: Any, layer_start: int, layer_end: int, progress: Any = None) -> None:
        raise NotImplementedError

    def new_cache(self) -> Any:
        return []

    def _forward(self, cache: Any, *, start_pos: int, token_ids: Any = None, hidden: Any = None) -> StepOutput:
        raise AssertionError("the batcher calls forward_batch")

    def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        self.gate.wait(5)
        self.batches.append([it.token_ids[0] for it in items])  # type: ignore[index]
        if self.fail is not None:
            raise self.fail
        import numpy as np

        return [BackendError("token 999 refused") if it.token_ids[0] == 999  # type: ignore[index]
                else StepOutput(logits=np.array([it.token_ids[0], it.n_positions], dtype=np.float32)) for it in items]


def item(token: int, n: int = 1) -> BatchItem:
    return BatchItem(cache=[], start_pos=0, token_ids=[token] * n)


async def _submit(batcher: StepBatcher, backend: Backend, items: list[BatchItem], stages: int = 1) -> list[Any]:
    async def one(it: BatchItem) -> Any:
        try:
            out, _ = await batcher.step(backend, it, stages=stages)
            return [int(v) for v in out.logits]  # type: ignore[union-attr]
        except BackendError as exc:
            return exc

    return await asyncio.wait_for(asyncio.gather(*(one(it) for it in items)), 10)


@pytest.mark.spec("N22")
def test_steps_ready_together_run_as_one_batch_and_each_gets_its_own_result() -> None:
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 3)
    got = asyncio.run(_submit(batcher, backend, [item(1), item(999), item(3)]))
    assert backend.batches == [[1, 999, 3]]
    assert got[0] == [1, 1] and got[2] == [3, 1] and isinstance(got[1], BackendError)  # only its own error


@pytest.mark.spec("N22")
def test_a_pipeline_of_k_stages_splits_the_requests_into_k_micro_batches() -> None:
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 8)  # 8 requests hold a cache here
    asyncio.run(_submit(batcher, backend, [item(t) for t in range(8)], stages=2))
    assert backend.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]  # ceil(8 / 2) each, first come first served
    backend.batches.clear()
    asyncio.run(_submit(StepBatcher(ThreadPoolExecutor(1), lambda b: 8, max_batch=3), backend,
                        [item(t) for t in range(8)]))
    assert [len(b) for b in backend.batches] == [3, 3, 2]  # --max-batch


@pytest.mark.spec("N23")
def test_a_batch_holds_the_decode_steps_and_prefill_positions_up_to_the_chunk() -> None:
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 4, prefill_batch=4)
    asyncio.run(_submit(batcher, backend, [item(10, 4), item(11, 3), item(1), item(2)]))
    # the first chunk fills the budget: the second prompt's waits; the decode steps ride along
    assert backend.batches == [[10, 1, 2], [11]]


@given(st.integers(0, 600), st.integers(0, 600), st.integers(1, 64))
@pytest.mark.spec("N23")
def test_prefill_chunks_cut_at_the_multiples_of_the_chunk_whatever_the_start(start: int, n: int, chunk: int) -> None:
    sizes = prefill_chunks(start, start + n, chunk)
    assert sum(sizes) == n and all(0 < s <= chunk for s in sizes)
    cuts = {start + sum(sizes[:i]) for i in range(len(sizes) + 1)}
    assert {m for m in range(start, start + n + 1) if m % chunk == 0} <= cuts  # every multiple is a cut
    assert len(sizes) == len({m for m in range(start + 1, start + n) if m % chunk == 0}) + (n > 0)  # and no other


def chunks(token: int, sizes: list[int]) -> list[BatchItem]:
    """A prompt's chunks on one cache (token ``token`` + i in chunk i), in order."""
    cache: list[Any] = []
    out, at = [], 0
    for i, n in enumerate(sizes):
        out.append(BatchItem(cache=cache, start_pos=at, token_ids=[token + i] * n))
        at += n
    return out


@pytest.mark.spec("N23", "B16")
def test_a_prompt_alone_packs_its_chunks_up_to_the_batch_budget_and_beside_streams_what_their_time_allows() -> None:
    backend = Recorder()
    alone = StepBatcher(ThreadPoolExecutor(1), lambda b: 1, prefill_batch=8)

    async def prompt(batcher: StepBatcher, sizes: list[int]) -> list[Any]:
        outs, took = await asyncio.wait_for(batcher.submit(backend, chunks(100, sizes)), 10)
        assert took > 0
        return [[int(v) for v in o.logits] for o in outs]  # type: ignore[union-attr]

    got = asyncio.run(prompt(alone, [4, 4, 4, 2]))
    assert backend.batches == [[100, 101], [102, 103]]  # 8 positions per batch, in order, on one cache
    assert got == [[100, 4], [101, 4], [102, 4], [103, 2]]  # every chunk's own output
    backend.batches.clear()
    beside = StepBatcher(ThreadPoolExecutor(1), lambda b: 2, prefill_batch=8)  # one stream runs beside it

    async def mixed() -> None:
        await asyncio.wait_for(asyncio.gather(prompt(beside, [4, 4, 4]), _submit(beside, backend, [item(1)])), 10)

    asyncio.run(mixed())  # nothing measured yet: one chunk per batch beside the decode step
    assert backend.batches[0] == [100, 1] and all(len(b) == 1 for b in backend.batches[1:])
    beside._decode_s.clear()
    beside._position_s.clear()
    beside._decode_s.extend([0.02] * 3)  # decode batches take 20 ms, a prompt position 5 ms:
    beside._position_s.extend([0.005] * 3)  # (2 - 1) x 20 ms holds 4 positions
    assert beside._budget(backend) == 4  # active 2, no prompt queued: a stream runs
    beside._position_s.extend([0.0025] * 6)
    assert beside._budget(backend) == 8  # ... 8 at 2.5 ms, capped by --prefill-batch


@pytest.mark.spec("N23")
def test_a_prompt_job_stops_between_batches_and_a_failed_chunk_runs_none_after_it() -> None:
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 1, prefill_batch=4)
    done: list[int] = []

    async def go() -> tuple[list[Any], Any]:
        outs, _ = await batcher.submit(backend, chunks(10, [4, 4, 4]), stop=lambda: done.append(1) is None)
        failing = chunks(998, [4, 4, 4])  # its second chunk (token 999) is refused
        try:
            await batcher.submit(backend, failing)
        except BackendError as exc:
            return outs, exc
        return outs, None

    outs, error = asyncio.run(asyncio.wait_for(go(), 10))
    assert len(outs) == 1 and done == [1]  # stopped after its first batch: one chunk computed
    assert isinstance(error, BackendError) and backend.batches == [[10], [998], [999]]  # nothing after the refusal


@pytest.mark.spec("N22")
def test_the_batcher_waits_briefly_for_steps_still_coming_and_no_longer() -> None:
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 3)
    batcher._last_s = 0.01  # a batch took 10 ms: wait up to min(4 ms, 2.5 ms) for the others

    async def go() -> None:
        first = asyncio.ensure_future(_submit(batcher, backend, [item(1)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the second step comes a moment later, within the wait
        await _submit(batcher, backend, [item(2)])
        await first
        await asyncio.wait_for(_submit(batcher, backend, [item(3)]), 1)  # 3 active, 1 comes: runs alone

    asyncio.run(go())
    assert backend.batches == [[1, 2], [3]]


@pytest.mark.spec("N22")
def test_a_step_cancelled_before_its_batch_never_runs_and_a_failed_batch_reaches_its_waiters() -> None:
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 1)

    async def go() -> None:
        backend.gate.clear()
        running = asyncio.ensure_future(_submit(batcher, backend, [item(1)]))
        await asyncio.sleep(0.05)  # the first batch holds the compute thread
        doomed = asyncio.ensure_future(batcher.step(backend, item(2)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        backend.gate.set()
        await running
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert backend.batches == [[1]]
    broken = Recorder(fail=RuntimeError("plugin bug"))
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 2)

    async def failing() -> None:
        results = await asyncio.gather(batcher.step(broken, item(1)), batcher.step(broken, item(2)),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        broken.fail = None
        out, _ = await asyncio.wait_for(batcher.step(broken, item(3)), 5)  # the batcher goes on
        assert list(out.logits) == [3, 1]  # type: ignore[union-attr]

    asyncio.run(failing())


@pytest.mark.spec("A19")
def test_batching_flags_are_checked_by_name() -> None:
    assert Batching().prefill_chunk > 0
    for field, flag in (("max_batch", "--max-batch"), ("prefill_chunk", "--prefill-chunk"),
                        ("prefill_batch", "--prefill-batch"), ("max_running", "--max-running")):
        with pytest.raises(ConfigError, match=flag):
            Batching(**{field: 0})
    with pytest.raises(ConfigError, match="--max-queued"):
        Batching(max_queued=-1)
    Batching(max_queued=0)  # no queue: beyond the running ones, 429 at once


@pytest.mark.spec("A19")
def test_admission_runs_a_bounded_number_queues_the_next_in_order_and_refuses_the_rest() -> None:
    async def go() -> None:
        gate = Admission(max_running=1, max_queued=2)
        order: list[str] = []
        first = await gate.acquire()

        async def wait(name: str) -> None:
            started = await gate.acquire()
            order.append(name)
            await asyncio.sleep(0.01)
            gate.release(started)

        b = asyncio.ensure_future(wait("b"))
        c = asyncio.ensure_future(wait("c"))
        await asyncio.sleep(0.01)
        assert (gate.running, gate.queued) == (1, 2)
        with pytest.raises(ApiError) as refused:
            await gate.acquire()
        assert refused.value.status == 429 and refused.value.type == "rate_limit_error"
        assert refused.value.retry_after_s is not None and 1 <= refused.value.retry_after_s <= 60
        gate.release(first)
        await asyncio.wait_for(asyncio.gather(b, c), 5)
        assert order == ["b", "c"] and (gate.running, gate.queued) == (0, 0)

    asyncio.run(go())


@pytest.mark.spec("A19")
def test_a_client_that_leaves_while_queued_leaves_nothing_and_a_turn_passes_on() -> None:
    async def go() -> None:
        gate = Admission(max_running=1, max_queued=4, wait_s=0.2)
        held = await gate.acquire()
        leaver = asyncio.ensure_future(gate.acquire())
        stayer = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0.01)
        leaver.cancel()  # the client went away
        await asyncio.sleep(0.01)
        assert gate.queued == 1
        gate.release(held)
        await asyncio.wait_for(stayer, 1)
        assert (gate.running, gate.queued) == (1, 0)
        with pytest.raises(ApiError) as late:  # nobody releases: the wait ends with a 429
            await gate.acquire()
        assert late.value.status == 429 and gate.queued == 0
        gate.release()
        assert gate.running == 0

    asyncio.run(go())


@pytest.mark.spec("A19", "N22")
def test_a_coordinator_runs_max_running_requests_queues_the_next_and_refuses_beyond_the_queue() -> None:
    """Through a 2-member pipeline: with one place and one queue slot, the first request runs,
    the second waits and then runs, the third is refused with 429; both texts equal the
    reference, and the stages batched the steps of concurrent requests (8 requests, no bound)."""
    from mesh.runtime.engine import SamplingParams
    from mesh.testing.minicluster import MiniCluster, reference_tokens, run_request

    params = SamplingParams(max_tokens=6, temperature=0.0)
    want = reference_tokens(params)

    async def go() -> None:
        cluster = MiniCluster(2, step_delay_s=0.01)
        try:
            await asyncio.wait_for(cluster.nodes["m0"].plans.wait_ready(5), 10)
            coordinator = cluster.nodes["m0"].coordinator
            coordinator.admission = Admission(max_running=1, max_queued=1)
            first = asyncio.ensure_future(run_request(cluster, params))
            await asyncio.sleep(0.02)
            second = asyncio.ensure_future(run_request(cluster, params))
            await asyncio.sleep(0.02)
            with pytest.raises(ApiError) as refused:
                await run_request(cluster, params)
            assert refused.value.status == 429
            assert await asyncio.wait_for(first, 10) == want and await asyncio.wait_for(second, 10) == want
            coordinator.admission = Admission(max_running=8, max_queued=0)
            texts = await asyncio.wait_for(asyncio.gather(*(run_request(cluster, params) for _ in range(8))), 20)
            assert texts == [want] * 8
            worker = cluster.nodes["m1"].worker
            assert worker.batcher.steps > worker.batcher.batches  # some batch held several requests' steps
        finally:
            await cluster.close()

    asyncio.run(go())


class Laned(Recorder):
    """A Recorder that runs steps on two threads at once (B17), noting the thread and the lanes
    it was told share the cores for each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: list[tuple[str, int, list[int]]] = []  # (thread, lanes, first tokens) per batch
        self._told = threading.local()
        self.decoding = threading.Event()  # a decode batch is computing
        self.prompt_started = threading.Event()

    @property
    def concurrent_steps(self) -> bool:
        return True

    def share_threads(self, lanes: int, *, lane: bool = False) -> None:
        self._told.lanes = (lanes, lane)

    def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        tokens = [it.token_ids[0] for it in items]  # type: ignore[index]
        self.lanes.append((threading.current_thread().name, self._told.lanes, tokens))
        if items[0].n_positions > 1:
            self.prompt_started.set()
            assert self.decoding.wait(5)  # the prompt computes while a decode batch does
        else:
            self.decoding.set()
            self.prompt_started.wait(5)
        return super()._forward_batch(items)


@pytest.mark.spec("N25", "B17")
def test_a_prompt_beside_running_requests_prefills_on_its_own_lane_while_they_decode() -> None:
    """N25: a prompt that arrives while other requests run computes all its chunks (up to
    --prefill-batch positions per forward) on the prefill lane's thread at the same time as the
    decode batches, the cores shared between the two lanes (share_threads(2)); alone, a prompt
    runs on the compute thread with every core."""
    backend = Laned()
    batcher = StepBatcher(ThreadPoolExecutor(1, thread_name_prefix="compute"), lambda b: 2, prefill_batch=4)

    async def go() -> tuple[Any, Any]:
        prompt = asyncio.create_task(batcher.submit(backend, chunks(50, [2, 2, 2])))
        decode = asyncio.create_task(batcher.step(backend, item(1)))
        return await asyncio.wait_for(asyncio.gather(prompt, decode), 10)

    (outs, _), (one, _) = asyncio.run(go())
    assert [[int(v) for v in o.logits] for o in outs] == [[50, 2], [51, 2], [52, 2]] and int(one.logits[0]) == 1
    prompt_batches = [(name, lanes, tokens) for name, lanes, tokens in backend.lanes if tokens[0] >= 50]
    assert [t for _, _, t in prompt_batches] == [[50, 51], [52]]  # 4 positions per forward at most
    assert all(name.startswith("mesh-prefill") for name, _, _ in prompt_batches)
    assert all(lanes == (2, True) for _, lanes, _ in prompt_batches)  # the lane's share, even between batches
    assert ("compute_0", (2, False), [1]) in [(n[-9:], lanes, t) for n, lanes, t in backend.lanes]  # both computing
    alone = Laned()
    alone.decoding.set()
    solo = StepBatcher(ThreadPoolExecutor(1, thread_name_prefix="compute"), lambda b: 1, prefill_batch=4)
    asyncio.run(asyncio.wait_for(solo.submit(alone, chunks(50, [2, 2])), 10))
    assert [(n[-9:], lanes) for n, lanes, _ in alone.lanes] == [("compute_0", (1, False))]  # no one else: every core


@pytest.mark.spec("N25", "B17")
def test_a_lane_prompt_left_alone_goes_back_to_the_stage_batches_on_every_core() -> None:
    """N25: once the requests beside a prompt on the prefill lane have ended, its remaining
    chunks run in the stage's own batches on the compute thread with every core (the lane's
    thread never computes with more than its share: B17)."""
    active = [2]

    class Ending(Laned):
        def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
            out = super()._forward_batch(items)
            active[0] = 1  # the request beside the prompt ended
            return out

    backend = Ending()
    backend.decoding.set()
    batcher = StepBatcher(ThreadPoolExecutor(1, thread_name_prefix="compute"), lambda b: active[0], prefill_batch=2)
    outs, _ = asyncio.run(asyncio.wait_for(batcher.submit(backend, chunks(50, [2, 2, 2])), 10))
    assert [[int(v) for v in o.logits] for o in outs] == [[50, 2], [51, 2], [52, 2]]
    assert [(n.split("_")[0], lanes, t) for n, lanes, t in backend.lanes] == [
        ("mesh-prefill", (2, True), [50]), ("compute", (1, False), [51]), ("compute", (1, False), [52])]


@pytest.mark.spec("N22")
def test_a_step_cancelled_while_the_batcher_gathers_leaves_the_batcher_serving() -> None:
    """N22: the only waiting step cancelled during the gathering wait is dropped; the runner
    ends cleanly and the next step runs."""
    backend = Recorder()
    batcher = StepBatcher(ThreadPoolExecutor(1), lambda b: 4)  # 4 active: the batcher waits for more
    batcher._last_s = 1.0  # a gathering window of GATHER_MAX_S

    async def go() -> Any:
        lone = asyncio.create_task(batcher.step(backend, item(1)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        lone.cancel()
        await asyncio.sleep(0.05)
        assert batcher._runner is not None and batcher._runner.done() and batcher._runner.exception() is None
        out, _ = await asyncio.wait_for(batcher.step(backend, item(2)), 5)
        return out

    out = asyncio.run(go())
    assert int(out.logits[0]) == 2 and backend.batches == [[2]]
