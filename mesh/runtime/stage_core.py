"""The stage worker's protocol state, sans-IO: which steps of which requests this stage has
answered, is computing, or must drop, whose coordinator each request has, and which
requests were released. It takes steps and ``now`` (monotonic s) and returns decisions; the
worker (``mesh.runtime.stage``) computes, sends and keeps the KV caches.

Rules: a repeated step is answered from the output it sent, never computed twice (specs/
faults.md FO2); a repeat of the step being computed is dropped (its reply is on the way); a
step of a released request is dropped (spec N8); a cache unused for a while, or whose
coordinator was lost, is freed (spec FO5, FO6).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

RELEASED_MEMORY = 4096  # how many released request ids a stage remembers to drop late steps


@dataclass(frozen=True, slots=True)
class Replay:
    """Send ``message`` to ``member`` again: the answer to a repeated step."""

    member: str
    message: Any


COMPUTE = "compute"
DROP = "drop"


class StageLedger:
    """See the module docstring. Request ids are attempt ids (``<request>.<attempt>``)."""

    def __init__(self, released_memory: int = RELEASED_MEMORY) -> None:
        self.released_memory = released_memory
        self.owner: dict[str, tuple[str, float]] = {}  # req -> (coordinator, last use)
        self.released: OrderedDict[str, None] = OrderedDict()
        self.done: dict[str, tuple[int, str, Any]] = {}  # req -> (last step answered, sent to, message)
        self.busy: dict[str, int] = {}  # req -> step being computed

    def step(self, req: str, step: int) -> str | Replay:
        """What to do with step ``step`` of ``req``: ``COMPUTE`` it (it is then marked busy),
        ``DROP`` it, or ``Replay`` the answer already sent."""
        if req in self.released:
            return DROP
        done = self.done.get(req)
        if done is not None and step <= done[0]:
            # the coordinator sent the last step again: its reply was lost downstream
            return Replay(done[1], done[2]) if step == done[0] else DROP
        if self.busy.get(req, -1) >= step:
            return DROP
        self.busy[req] = step
        return COMPUTE

    def computed(self, req: str, step: int, member: str | None, message: Any) -> bool:
        """Step ``step`` of ``req`` finished computing with ``message`` for ``member`` (None:
        no output); True when it is to be sent (the request was not released meanwhile)."""
        if self.busy.get(req) == step:
            del self.busy[req]
        if member is None or req in self.released:
            return False
        self.done[req] = (step, member, message)
        return True

    def failed(self, req: str, step: int) -> None:
        """A step failed: its request starts over if the coordinator retries (not a release)."""
        if self.busy.get(req) == step:
            del self.busy[req]
        self.forget(req)

    def touch(self, req: str, coordinator: str, now: float) -> None:
        self.owner[req] = (coordinator, now)

    def started(self, req: str) -> bool:
        """Whether ``req`` has computed, is computing or was released here: a KV load or push
        for it comes too late."""
        return req in self.busy or req in self.done or req in self.released

    def is_released(self, req: str) -> bool:
        return req in self.released

    def forget(self, req: str) -> None:
        """Drop what this stage knows of ``req`` (not remembering it as released)."""
        self.owner.pop(req, None)
        self.done.pop(req, None)
        self.busy.pop(req, None)

    def release(self, req: str) -> None:
        """``req`` ended (spec N8): forget it, and drop its late steps from now on."""
        self.forget(req)
        self.released[req] = None
        while len(self.released) > self.released_memory:
            self.released.popitem(last=False)

    def reset(self) -> None:
        """A new layer range was loaded: nothing computed before can be replayed."""
        self.done.clear()
        self.busy.clear()

    def coordinated_by(self, member_id: str) -> list[str]:
        """Requests whose coordinator is ``member_id``."""
        return [r for r, (coord, _) in self.owner.items() if coord == member_id]

    def idle(self, now: float, idle_s: float) -> list[str]:
        """Requests unused for over ``idle_s`` seconds (a coordinator that never released)."""
        return [r for r, (_, used) in self.owner.items() if used < now - idle_s]
