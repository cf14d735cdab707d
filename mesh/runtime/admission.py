"""Admission control: a bound on the requests a node coordinates at once and on those waiting
for a turn (specs/api.md A19).

A request runs when fewer than ``max_running`` run; else it waits in a first-come,
first-served queue of at most ``max_queued``; beyond that it is refused at once with HTTP 429
and a ``Retry-After`` estimated from how long recent requests ran. A waiting request whose
client leaves (its task is cancelled) leaves the queue and holds nothing; a turn handed to it
as it left passes to the next in line. A request waits at most ``wait_s`` before it is refused
(429) too, so no client hangs behind a queue that does not move.

Beyond a few concurrent decode steps a 2-core CPU gains little from a larger batch (the
torch backend's step over 16 requests gives 1.05x the tokens/s of 8, ``python -m mesh
bench --concurrency``), while every running request holds a KV cache and slows the others'
tokens; waiting in order is the better deal for the waiting client as well.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

from mesh.errors import ApiError

MAX_RUNNING = 16  # requests coordinated at once (--max-running)
MAX_QUEUED = 64  # requests waiting for a turn (--max-queued)
WAIT_S = 300.0  # the longest wait in the queue


class Admission:
    """See the module docstring. ``clock``: monotonic seconds."""

    def __init__(self, max_running: int = MAX_RUNNING, max_queued: int = MAX_QUEUED, *, wait_s: float = WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.wait_s = wait_s
        self.clock = clock
        self.running = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._durations: deque[float] = deque(maxlen=32)  # seconds of recent requests, for Retry-After
        self.refused = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: the queue ahead, times a recent request's
        median run time, shared by the running places; 1 to 60."""
        typical = statistics.median(self._durations) if self._durations else 1.0
        return max(1, min(60, math.ceil((self.queued + 1) * typical / self.max_running)))

    def _busy(self, why: str) -> ApiError:
        self.refused += 1
        retry = self.retry_after_s()
        return ApiError(f"This node is busy: {why}. Retry after {retry} s.", status=429,
                        type="rate_limit_error", code="server_busy", retry_after_s=retry)

    async def acquire(self) -> float:
        """Wait for a turn (first come, first served); returns when it started (``clock``).
        Raises ApiError 429 when the queue is full or the wait passes ``wait_s``."""
        if self.running < self.max_running and not self._queue:
            self.running += 1
            return self.clock()
        if len(self._queue) >= self.max_queued:
            raise self._busy(f"{self.running} requests run and {len(self._queue)} wait")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_s)
        except TimeoutError:
            self._leave(turn)
            raise self._busy(f"no turn came within {self.wait_s:.0f} s") from None
        except asyncio.CancelledError:
            self._leave(turn)
            raise
        return self.clock()

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if turn in self._queue:
            self._queue.remove(turn)
            turn.cancel()
        elif turn.done() and not turn.cancelled():  # handed a turn as it left: pass it on
            self.release()

    def release(self, started: float | None = None) -> None:
        """A request that held a turn ended (``started``: when its turn began, for the
        Retry-After estimate); the next in line gets the turn."""
        if started is not None:
            self._durations.append(max(0.0, self.clock() - started))
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)  # the turn passes: running stays the same
                return
        self.running = max(0, self.running - 1)
