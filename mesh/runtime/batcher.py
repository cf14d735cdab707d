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
- **Token budget.** Beside its decode steps a batch holds prefill positions up to
  ``prefill_chunk`` (at least one prefill step): prompts go in chunks (``Forward.split``,
  spec N23) that mix with the running decode steps, so a long prompt delays them by about one
  chunk's time (chunked prefill, Agrawal et al., Sarathi-Serve, OSDI 2024).
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
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from backends.base import Backend, BatchItem, StepOutput
from mesh.errors import ConfigError
from mesh.runtime.admission import MAX_QUEUED, MAX_RUNNING
from mesh.runtime.prefix import PREFIX_CACHE_MB

MAX_BATCH = 32  # steps in one batch at a stage (--max-batch)
# prompt positions per step, and positions per batch (--prefill-chunk): a 4096-token prompt on
# the default model (bf16, int4, this project's 2-core EPYC) prefills in 10.6 s in chunks of 256
# and 11.9 s in chunks of 128, and its last chunk holds the running streams for 0.97 s and
# 0.57 s (0.36 s at 64, for 12.9 s)
PREFILL_CHUNK = 128
GATHER_MAX_S = 0.004  # the longest wait for steps still coming
GATHER_SHARE = 0.25  # ... and at most this share of the last batch's time


@dataclass(frozen=True, slots=True, kw_only=True)
class Batching:
    """How a node shares its compute among requests: ``max_batch`` steps and ``prefill_chunk``
    positions per batch at a stage (a prompt is prefilled in chunks of that many positions),
    ``max_running`` requests coordinated at once and ``max_queued`` waiting;
    ``prefix_cache_bytes``: the stage's prefix cache (spec N24; 0: off). Raises
    ConfigError naming the flag for a value below 1 (0 for ``max_queued``)."""

    max_batch: int = MAX_BATCH
    prefill_chunk: int = PREFILL_CHUNK
    max_running: int = MAX_RUNNING
    max_queued: int = MAX_QUEUED
    prefix_cache_bytes: int = PREFIX_CACHE_MB * 2**20  # spec N24; 0 turns the prefix cache off

    def __post_init__(self) -> None:
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--prefill-chunk", self.prefill_chunk, 1),
                                   ("--max-running", self.max_running, 1), ("--max-queued", self.max_queued, 0)):
            if type(value) is not int or value < least:
                raise ConfigError(f"{flag} must be an integer >= {least}, got {value!r}")
        if type(self.prefix_cache_bytes) is not int or self.prefix_cache_bytes < 0:
            raise ConfigError(f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), got "
                              f"{self.prefix_cache_bytes!r} bytes")


@dataclass(eq=False)
class _Job:
    backend: Backend
    item: BatchItem
    stages: int  # the request's pipeline depth (micro-batches in flight)
    future: asyncio.Future[tuple[StepOutput, float]] = field(repr=False)


class StepBatcher:
    """See the module docstring.

    ``executor``: the compute thread; ``active(backend)``: how many requests hold a KV cache
    on that stage now; ``max_batch``: steps per batch at most; ``prefill_chunk``: positions
    per batch (the prefill chunk size, ``--prefill-chunk``).
    """

    def __init__(self, executor: Executor, active: Callable[[Backend], int], *, max_batch: int = MAX_BATCH,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.executor = executor
        self.active = active
        self.max_batch = max(1, max_batch)
        self.prefill_chunk = max(1, prefill_chunk)
        self._queue: list[_Job] = []
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._last_s = 0.0  # the last batch's compute seconds
        self.batches = 0  # batches run, and steps in them (the mean batch size: steps / batches)
        self.steps = 0

    async def step(self, backend: Backend, item: BatchItem, *, stages: int = 1) -> tuple[StepOutput, float]:
        """Run ``item`` on ``backend`` in the next batch it fits: (its output, the batch's
        compute seconds). Raises the item's BackendError, or whatever the batch raised."""
        loop = asyncio.get_running_loop()
        job = _Job(backend, item, max(1, stages), loop.create_future())
        self._queue.append(job)
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="stage batches")
        try:
            return await job.future
        except asyncio.CancelledError:
            if job in self._queue:  # not started: nothing of it runs
                self._queue.remove(job)
            raise

    def _cap(self, job: _Job) -> int:
        return max(1, min(self.max_batch, math.ceil(self.active(job.backend) / job.stages) or self.max_batch))

    async def _gather(self) -> None:
        """Wait briefly for steps still coming (see the module docstring)."""
        head = self._queue[0]
        window = min(GATHER_MAX_S, GATHER_SHARE * self._last_s)
        deadline = time.monotonic() + window
        while True:
            waiting = sum(1 for j in self._queue if j.backend is head.backend)
            left = deadline - time.monotonic()
            if waiting >= min(self._cap(head), self.active(head.backend)) or left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Job]:
        head = self._queue[0]
        cap = self._cap(head)
        batch, prefill = [], 0
        for job in list(self._queue):
            if len(batch) >= cap:
                break
            n = job.item.n_positions
            if job.backend is not head.backend or (n > 1 and prefill and prefill + n > self.prefill_chunk):
                continue
            batch.append(job)
            prefill += n if n > 1 else 0
            self._queue.remove(job)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            await self._gather()
            batch = [j for j in self._take() if not j.future.done()]
            if not batch:
                continue
            backend = batch[0].backend
            items = [j.item for j in batch]

            def run(backend: Backend = backend, items: list[BatchItem] = items) -> tuple[list, float]:
                started = time.perf_counter()
                return backend.forward_batch(items), time.perf_counter() - started

            try:
                results, took = await loop.run_in_executor(self.executor, run)
            except asyncio.CancelledError:
                for job in batch + self._queue:
                    job.future.cancel()
                raise
            except Exception as exc:  # a plugin may raise anything: each waiting step is told
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._last_s = took
            self.batches += 1
            self.steps += len(batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result((result, took))
