"""Continuous batching at one stage: the steps of different requests that are ready at the
same time run as one ``Backend.forward_batch`` on the compute thread (specs/node.md N22).

Requests join and leave at step boundaries: every batch is formed anew from the steps
waiting when the compute thread frees, so a request that arrives waits at most one batch and
one that ends leaves nothing behind. The policy (the same at every stage, so a pipeline's
micro-batches keep their shape as they move):

- **Micro-batches.** A pipeline of ``k`` stages keeps up to ``k`` micro-batches in flight:
  a batch takes at most ``ceil(active / k)`` steps (``active``: the requests holding a KV
  cache on this stage), so on the first stage the requests split into ``k`` groups and stage
  2 computes one group while stage 1 computes the next (GPipe's micro-batching, Huang et al.
  2019, applied to decode steps as in Orca, Yu et al. OSDI 2022).
- **Token budget.** A prompt goes as one job of chunks (``Forward.split``, spec N23, cut by
  ``prefill_chunks``: the same cuts under any load). While no other request runs on the
  stage a batch holds up to ``prefill_batch`` of its positions, several chunks in one
  forward; beside running requests' decode steps, only what fits in ``STALL_LIMIT - 1`` decode batches' time at the measured seconds per prompt
  position, and at least one chunk, so a long prompt holds a running stream for about
  ``STALL_LIMIT`` of its usual gaps (chunked prefill with a token budget: Agrawal et al.,
  Sarathi-Serve, OSDI 2024). How many chunks share a forward changes no result: each chunk
  attends in its own shape (B16).
- **Prefill lane** (spec N25). On a backend whose steps may run at once (``concurrent_steps``,
  B17), a prompt that arrives while other requests run on the stage goes to a thread of its
  own instead: its chunks, up to ``prefill_batch`` positions per forward, compute at the same
  time as the decode batches, the cores divided between the two (``share_threads``), so a
  running stream waits for its own step only. The token budget above then only governs the
  prompts of a backend that computes one step at a time.
- **Gathering.** When fewer steps wait than the batch could take while requests on this stage
  are between steps, the batcher waits up to ``min(GATHER_MAX_S, GATHER_SHARE x the last
  batch's seconds)`` for them: on one node the replies of a batch come back as the next
  steps within a millisecond, and without the wait the first would run alone.
- **Order.** Steps are taken first come, first served; a batch holds steps of one stage
  (with an old and a new stage held during a plan change, each computes its own).

Every error of a batch reaches each step's waiter; a waiter cancelled before its step ran
takes the step out of the queue.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from backends.base import Backend, BatchItem, StepOutput
from mesh.errors import ConfigError
from mesh.runtime.admission import MAX_QUEUED, MAX_RUNNING
from mesh.runtime.prefix import PREFIX_CACHE_MB

MAX_BATCH = 32  # steps in one batch at a stage (--max-batch)
# prompt positions per prefill chunk (--prefill-chunk) and at most per batch (--prefill-batch).
# On the default model (bf16, int4) on this project's 2-core EPYC (2026-12-06) a prompt
# position costs about 2 ms at depth 0 and 4.5 ms at depth 4096, a decode step 20 ms. Packed
# 256 positions per forward, a 4096-token prompt alone prefills in 11.7-12.8 s in chunks of
# 128, 12.9-14.5 s in chunks of 16 and 15.3-15.7 s in chunks of 8; beside a running stream
# its longest gap is 0.55-0.57 s, 121-124 ms and 84-90 ms (README, Performance, Batching)
PREFILL_CHUNK = 16
PREFILL_BATCH = 256
GATHER_MAX_S = 0.004  # the longest wait for steps still coming
GATHER_SHARE = 0.25  # ... and at most this share of the last batch's time
# a batch holding prompt chunks beside running requests' decode steps takes about this many
# decode batches' time (StepBatcher._budget): a running stream's gap while a long prompt
# prefills stays about this many times its usual gap
STALL_LIMIT = 2.0
RECENT = 9  # batches whose median seconds the budget uses (one slow batch moves it little)


@dataclass(frozen=True, slots=True, kw_only=True)
class Batching:
    """How a node shares its compute among requests: ``max_batch`` steps per batch at a stage,
    prompts prefilled in chunks of ``prefill_chunk`` positions, at most ``prefill_batch`` prompt
    positions per batch, ``max_running`` requests coordinated at once and ``max_queued`` waiting;
    ``prefix_cache_bytes``: the stage's prefix cache (spec N24; 0: off). Raises
    ConfigError naming the flag for a value below 1 (0 for ``max_queued``)."""

    max_batch: int = MAX_BATCH
    prefill_chunk: int = PREFILL_CHUNK
    prefill_batch: int = PREFILL_BATCH
    max_running: int = MAX_RUNNING
    max_queued: int = MAX_QUEUED
    prefix_cache_bytes: int = PREFIX_CACHE_MB * 2**20  # spec N24; 0 turns the prefix cache off

    def __post_init__(self) -> None:
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--prefill-chunk", self.prefill_chunk, 1),
                                   ("--prefill-batch", self.prefill_batch, 1),
                                   ("--max-running", self.max_running, 1), ("--max-queued", self.max_queued, 0)):
            if type(value) is not int or value < least:
                raise ConfigError(f"{flag} must be an integer >= {least}, got {value!r}")
        if type(self.prefix_cache_bytes) is not int or self.prefix_cache_bytes < 0:
            raise ConfigError(f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), got "
                              f"{self.prefix_cache_bytes!r} bytes")


@dataclass(eq=False)
class _Job:
    """The steps one caller submitted: one item, or a prompt's chunks in order."""

    backend: Backend
    items: list[BatchItem]
    stages: int  # the request's pipeline depth (micro-batches in flight)
    future: asyncio.Future[tuple[list[StepOutput], float]] = field(repr=False)
    stop: Callable[[], bool] = field(repr=False, default=lambda: False)
    outputs: list[StepOutput] = field(default_factory=list)
    taken: int = 0  # items handed to batches so far
    seconds: float = 0.0  # compute seconds of the batches they ran in
    lane: bool = False  # whether the prefill lane runs it (spec N25), decided when it arrives

    @property
    def chunked(self) -> bool:
        """Whether its items are prompt positions (a prefill chunk, or several sub-steps)."""
        return len(self.items) > 1 or self.items[0].n_positions > 1


def prefill_chunks(start: int, end: int, chunk: int) -> list[int]:
    """The sizes of the prefill chunks of prompt positions ``[start, end)``: cut at the
    multiples of ``chunk`` (``--prefill-chunk``; spec N23). The cuts depend on the positions
    only, never on load: a prompt computes in the same shapes alone, beside other requests,
    when a failover replays it (FO9) and when the prefix cache resumes it at a cut (N24), so its
    reduced-precision results and greedy tokens do not depend on them (attention's results
    do depend on a chunk's shape: bf16 outputs move in their last bit between shapes). A
    stage packs as many chunks into one batch as its budget allows (``StepBatcher``)."""
    cuts = [start, *range((start // chunk + 1) * chunk, end, chunk), end]
    return [b - a for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


class StepBatcher:
    """See the module docstring.

    ``executor``: the compute thread; ``active(backend)``: how many requests hold a KV cache
    on that stage now; ``max_batch``: steps per batch at most; ``prefill_batch``: prompt
    positions per batch at most (``--prefill-batch``).
    """

    def __init__(self, executor: Executor, active: Callable[[Backend], int], *, max_batch: int = MAX_BATCH,
                 prefill_batch: int = PREFILL_BATCH) -> None:
        self.executor = executor
        self.active = active
        self.max_batch = max(1, max_batch)
        self.prefill_batch = max(1, prefill_batch)
        self._queue: list[_Job] = []
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._last_s = 0.0  # the last batch's compute seconds
        self._decode_s: deque[float] = deque(maxlen=RECENT)  # recent batches of decode steps only: seconds
        self._position_s: deque[float] = deque(maxlen=RECENT)  # ... and seconds per prompt position beside them
        self.batches = 0  # batches run, and steps in them (the mean batch size: steps / batches)
        self.steps = 0
        self._lane: ThreadPoolExecutor | None = None  # the prefill lane's thread (spec N25), made when first used
        self._lane_runner: asyncio.Task[None] | None = None
        self._busy = 0  # lanes computing now (Backend.share_threads)
        self._whole: asyncio.Future[tuple[list[StepOutput | BaseException], float]] | None = None  # a batch on every core now

    async def step(self, backend: Backend, item: BatchItem, *, stages: int = 1) -> tuple[StepOutput, float]:
        """Run ``item`` on ``backend`` in the next batch it fits: (its output, the batch's
        compute seconds). Raises the item's BackendError, or whatever the batch raised."""
        outputs, took = await self.submit(backend, [item], stages=stages)
        return outputs[0], took

    async def submit(self, backend: Backend, items: list[BatchItem], *, stages: int = 1,
                     stop: Callable[[], bool] = lambda: False) -> tuple[list[StepOutput], float]:
        """Run ``items`` (one request's steps, in order: a prompt's chunks) on ``backend``, as
        many of them per batch as the budget allows: (their outputs, the compute seconds of the
        batches they ran in). Stops early, with the outputs so far, once ``stop()`` is true
        between batches. Raises the first item's BackendError, or whatever a batch raised;
        its later items do not run."""
        if not items:
            raise ValueError("no steps to run")
        loop = asyncio.get_running_loop()
        job = _Job(backend, list(items), max(1, stages), loop.create_future(), stop)
        self._queue.append(job)
        job.lane = job.chunked and backend.concurrent_steps and self._beside(backend)
        self._arrived.set()
        if job.lane:
            if self._lane_runner is None or self._lane_runner.done():
                self._lane_runner = loop.create_task(self._run_lane(), name="stage prefill lane")
        else:
            self._start_batches()
        try:
            return await job.future
        except asyncio.CancelledError:
            if job in self._queue:  # its steps not yet run never run
                self._queue.remove(job)
            raise

    def _start_batches(self) -> None:
        """Start the task that runs the stage's batches (``_run``) unless it runs."""
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="stage batches")

    def _cap(self, job: _Job) -> int:
        return max(1, min(self.max_batch, math.ceil(self.active(job.backend) / job.stages) or self.max_batch))

    def _beside(self, backend: Backend) -> bool:
        """Whether other requests than the queued prompts run on ``backend``'s stage."""
        return self.active(backend) > sum(1 for j in self._queue if j.backend is backend and j.chunked)

    async def _gather(self) -> None:
        """Wait briefly for steps still coming (see the module docstring)."""
        head = next((j for j in self._queue if not j.lane), None)
        if head is None:  # its waiter was cancelled meanwhile
            return
        window = min(GATHER_MAX_S, GATHER_SHARE * self._last_s)
        deadline = time.monotonic() + window
        while True:
            waiting = sum(1 for j in self._queue if j.backend is head.backend and not j.lane)
            left = deadline - time.monotonic()
            if waiting >= min(self._cap(head), self.active(head.backend)) or left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _budget(self, backend: Backend) -> int:
        """Prompt positions the next batch may hold (see the module docstring): all of
        ``prefill_batch`` while no other request runs on the stage; beside running requests,
        what fits in ``STALL_LIMIT - 1`` decode batches' time (the median of the last
        ``RECENT``) at the median measured seconds per position (0, one chunk, until both are
        measured)."""
        if not self._beside(backend):
            return self.prefill_batch
        if not self._decode_s or not self._position_s:
            return 0
        decode_s, position_s = statistics.median(self._decode_s), statistics.median(self._position_s)
        return min(self.prefill_batch, int((STALL_LIMIT - 1) * decode_s / max(position_s, 1e-9)))

    def _take(self) -> list[tuple[_Job, int]]:
        """The next batch: (job, how many of its next items) each, first come first served."""
        head = next((j for j in self._queue if not j.lane), None)
        if head is None:  # cancelled while the batcher gathered: nothing to run
            return []
        cap, budget = self._cap(head), self._budget(head.backend)
        batch: list[tuple[_Job, int]] = []
        prompt = 0  # prompt positions taken
        for job in list(self._queue):
            if len(batch) >= cap:
                break
            if job.lane:  # the prefill lane's
                continue
            if job.future.done():  # resolved elsewhere: nothing of it is left to run
                self._queue.remove(job)
                continue
            if job.backend is not head.backend:
                continue
            k = 0
            for it in job.items[job.taken:]:
                n = it.n_positions if job.chunked else 0
                if n and prompt + n > budget and (prompt or k):
                    break  # at least one chunk per batch: a prompt always moves on
                k, prompt = k + 1, prompt + n
            if not k:
                continue
            batch.append((job, k))
            if job.taken + k == len(job.items):
                self._queue.remove(job)
        return batch

    def _measured(self, batch: list[tuple[_Job, int]], items: list[BatchItem], took: float) -> None:
        """Record a batch's seconds: a batch of decode steps only, or per prompt position beside
        the decode steps (their share taken as the recent decode batches' median)."""
        prompt = sum(it.n_positions for (job, _), it in zip(_owners(batch), items, strict=True) if job.chunked)
        if not prompt:
            self._decode_s.append(took)
            return
        decode = any(not job.chunked for job, _ in batch)
        beside = statistics.median(self._decode_s) if decode and self._decode_s else 0.0
        self._position_s.append(max(took - beside, 0.0) / prompt)

    async def _compute(self, executor: Executor, backend: Backend, items: list[BatchItem],
                       lanes: int = 1, lane: bool = False) -> tuple[list[StepOutput | BaseException], float]:
        """One ``forward_batch`` on ``executor`` (the prefill lane's: ``lane``), the cores shared
        among the lanes computing (``Backend.share_threads``; at least ``lanes``): (results,
        compute seconds)."""
        self._busy += 1
        lanes = max(lanes, self._busy)

        def run() -> tuple[list[StepOutput | BaseException], float]:
            backend.share_threads(lanes, lane=lane)
            started = time.perf_counter()
            return backend.forward_batch(items), time.perf_counter() - started  # type: ignore[return-value]

        computing = asyncio.get_running_loop().run_in_executor(executor, run)
        if not lane and lanes == 1:
            self._whole = computing
        try:
            return await computing
        finally:
            self._busy -= 1

    async def _run(self) -> None:
        while any(not j.lane for j in self._queue):
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            backend = batch[0][0].backend
            items = [it for job, k in batch for it in job.items[job.taken:job.taken + k]]
            # while a prompt waits on or computes on the prefill lane, the stage's batches keep to
            # their share of the cores, also between the lane's forwards
            lanes = 2 if any(j.lane for j in self._queue) else 1
            try:
                results, took = await self._compute(self.executor, backend, items, lanes)
            except asyncio.CancelledError:
                for job in [j for j, _ in batch] + [j for j in self._queue if not j.lane]:
                    job.future.cancel()
                raise
            except Exception as exc:  # a plugin may raise anything: each waiting step is told
                for job, _ in batch:
                    self._finish(job, exc)
                continue
            self._last_s = took
            self._measured(batch, items, took)
            self._deliver(batch, results, took)

    async def _run_lane(self) -> None:
        """The prefill lane (spec N25): the prompts that arrived beside running requests, one
        after another, up to ``prefill_batch`` positions per forward, on a thread of their own.
        A prompt with nothing running beside it any more goes back to the stage's batches, which
        compute on every core."""
        while (job := next((j for j in self._queue if j.lane), None)) is not None:
            if job.future.done():
                self._queue.remove(job)
                continue
            if not self._beside(job.backend):
                job.lane = False
                self._arrived.set()
                self._start_batches()
                continue
            k, positions = 0, 0
            for it in job.items[job.taken:]:
                if k and positions + it.n_positions > self.prefill_batch:
                    break
                k, positions = k + 1, positions + it.n_positions
            if self._lane is None:
                self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-prefill")
            # the lane keeps to its share of the cores (Backend.share_threads), also in the moments
            # between the decode batches: a lane that took every core then slowed the decode batch
            # that started meanwhile until its next forward (a first gap of 60-70 ms). It starts
            # once a batch computing on every core has ended: beside it, one core would run three
            # threads and that batch's parallel regions wait on a thread the OS has put aside
            # (its gap measured 80-250 ms against 23 ms)
            if self._whole is not None and not self._whole.done():
                await asyncio.wait({self._whole}, timeout=max(0.05, 2 * self._last_s))
            try:
                results, took = await self._compute(self._lane, job.backend, job.items[job.taken:job.taken + k], 2,
                                                    lane=True)
            except asyncio.CancelledError:
                for waiting in [j for j in self._queue if j.lane]:
                    waiting.future.cancel()
                raise
            except Exception as exc:  # a plugin may raise anything: the prompt's waiter is told
                self._finish(job, exc)
                continue
            self._deliver([(job, k)], results, took)

    def _deliver(self, batch: list[tuple[_Job, int]], results: list[StepOutput | BaseException], took: float) -> None:
        """Hand a batch's results to its jobs; resolve those done, failed or stopped."""
        self.batches += 1
        self.steps += len(results)
        at = 0
        for job, k in batch:
            got, at = results[at:at + k], at + k
            job.taken += k
            job.seconds += took
            failed = next((r for r in got if isinstance(r, BaseException)), None)
            if failed is not None:
                self._finish(job, failed)
                continue
            job.outputs += got  # type: ignore[arg-type]
            if job.taken == len(job.items) or job.stop():
                self._finish(job, None)

    def _finish(self, job: _Job, error: BaseException | None) -> None:
        """Resolve ``job`` (with its outputs, or ``error``); its steps not yet run never run."""
        if job in self._queue:
            self._queue.remove(job)
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result((job.outputs, job.seconds))


def _owners(batch: list[tuple[_Job, int]]) -> list[tuple[_Job, int]]:
    """``batch`` with each job repeated once per item it has in it (the items' owners, in order)."""
    return [(job, k) for job, k in batch for _ in range(k)]
