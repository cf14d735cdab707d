"""Failure detection of a node: a sans-IO core (who was seen when, whether this process was
just frozen, which peers to tell that their clock is refused) and its asyncio shell (the
heartbeat round, the freeze watch). Spec: specs/node.md N9, specs/faults.md FO5-FO7.

The core takes ``now`` (monotonic seconds) and returns decisions; the shell reads the clock,
sends pings and probes through the links and hands decisions to the node's callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from mesh.errors import MeshError
from mesh.wire import Message

log = logging.getLogger(__name__)

CLOCK_TELL_EVERY_S = 10.0  # a peer with a refused clock is told at most this often
FREEZE_TICK_S = 0.1
FREEZE_GAP_S = 1.5  # a tick this late means the process was frozen, not busy


class Liveness:
    """Who was last seen when, and whether this process was just frozen (sans-IO).

    ``dead_after_s``: silence of a link after which its member is declared dead; a member in
    the state that no link reaches for twice that long is declared dead too (it died while
    this node was down, say), so the plan does not wait for it forever.
    """

    def __init__(self, member_id: str, *, dead_after_s: float) -> None:
        self.member_id = member_id
        self.dead_after_s = dead_after_s
        self.last_seen: dict[str, float] = {}
        self.resumed_at = -1e9  # when this process last came back from a freeze
        self._last_tick = 0.0
        self._told: dict[str, float] = {}

    def seen(self, member_id: str, now: float) -> None:
        self.last_seen[member_id] = now

    def known(self, member_id: str, now: float) -> None:
        """A member appeared in the state: its silence counts from now."""
        self.last_seen.setdefault(member_id, now)

    def tick(self, now: float) -> float | None:
        """The freeze watch's tick: the gap (s) when the previous tick is over ``FREEZE_GAP_S``
        old (the event loop did not run: SIGSTOP, a suspended laptop), else None."""
        gap = now - self._last_tick if self._last_tick else 0.0
        self._last_tick = now
        if gap > FREEZE_GAP_S:
            self.resumed_at = now
            return gap
        return None

    def just_resumed(self, now: float) -> bool:
        """True for ``dead_after_s`` after a freeze: then silence of the links is this
        process's own fault, and removing its peers would evict healthy members (spec FO6)."""
        return now - self.resumed_at < self.dead_after_s

    def unreachable(self, now: float, members: Iterable[str], linked: Iterable[str]) -> list[str]:
        """Members of the state that no link has reached for ``2 x dead_after_s``."""
        reached = set(linked) | {self.member_id}
        out = []
        for member_id in members:
            if member_id in reached:
                self.last_seen[member_id] = now
            elif now - self.last_seen.get(member_id, now) > 2 * self.dead_after_s:
                out.append(member_id)
        return out

    def tell_clock(self, member_id: str, now: float) -> bool:
        """Whether to tell ``member_id`` now that its events are refused for its clock (spec
        K4): at most every ``CLOCK_TELL_EVERY_S``."""
        if now - self._told.get(member_id, -1e9) < CLOCK_TELL_EVERY_S:
            return False
        self._told[member_id] = now
        return True


def clock_fault(sender: str, ahead_ms: object) -> str | None:
    """What a ``clock.refused`` from ``sender`` means for this node (spec FO7), or None for a
    malformed one."""
    if type(ahead_ms) is not int or ahead_ms <= 0:
        return None
    return (f"this node's clock is {ahead_ms / 3.6e6:.1f} h ahead of member {sender}'s, which "
            f"refuses its events: fix the system clock (NTP) and restart")


class LinkPort(Protocol):
    """What the heartbeat round needs of the node's links."""

    def linked(self) -> list[str]: ...

    async def ping_all(self, timeout_s: float) -> None: ...

    async def probe_all(self, interval_s: float, timeout_s: float) -> None: ...


class Monitor:
    """The shell: heartbeats every ``heartbeat_s``, throughput probes, the freeze watch, and
    what follows from them.

    Each round pings every link, then calls ``on_round()`` (the node publishes link figures,
    expires idle KV caches, logs readiness changes), then declares dead the members
    ``members()`` lists that no link reaches. Declaring a member dead fails its requests'
    attempts at once (``lost``, spec FO6) and removes it from the state (``remove``) when the
    state holds it (``present``), this node is not stopping and was not just frozen; then
    ``changed()``. ``run()`` returns only with an error or when cancelled.
    """

    def __init__(self, core: Liveness, links: LinkPort, *, heartbeat_s: float, probe_interval_s: float,
                 send_timeout_s: float, members: Callable[[], list[str]], on_round: Callable[[], None],
                 lost: Callable[[str], None], present: Callable[[str], bool], remove: Callable[[str], None],
                 changed: Callable[[], None], stopping: Callable[[], bool],
                 leaving: Callable[[str], bool] = lambda member_id: False,
                 send: Callable[[str, Message], Awaitable[None]], clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.links = links
        self.heartbeat_s = heartbeat_s
        self.probe_interval_s = probe_interval_s
        self.send_timeout_s = send_timeout_s
        self.members = members
        self.on_round = on_round
        self.lost, self.present, self.remove, self.changed = lost, present, remove, changed
        self.stopping = stopping
        self.leaving = leaving
        self.send = send
        self.clock = clock
        self._tasks: asyncio.TaskGroup | None = None
        self.clock_fault: str | None = None  # set when a peer refuses this node's clock (spec FO7)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            tasks.create_task(self._every(self.heartbeat_s, self._heartbeat), name="heartbeats")
            tasks.create_task(self._every(self.heartbeat_s, self._probes), name="probes")
            tasks.create_task(self._every(FREEZE_TICK_S, self._freeze_tick), name="freezes")

    def link_up(self, member_id: str) -> None:
        self.core.seen(member_id, self.clock())

    def link_down(self, member_id: str) -> None:
        self.core.seen(member_id, self.clock())
        self.declare_dead(member_id, "its last link closed")

    def declare_dead(self, member_id: str, why: str) -> None:
        self.lost(member_id)
        if self.present(member_id) and not self.stopping():
            if self.core.just_resumed(self.clock()):
                # This process was frozen (SIGSTOP, a suspended laptop): its peers were not
                # silent, it was. Removing them would evict healthy members; links redial.
                log.warning("not declaring member %s dead (%s): this node was just frozen", member_id, why)
            else:  # a member that announced its leave (N20) going is expected: no warning
                level = logging.INFO if self.leaving(member_id) else logging.WARNING
                log.log(level, "member %s left%s: %s", member_id, " as announced" if level == logging.INFO else "",
                        why)
                self.remove(member_id)
        self.changed()

    def clock_refused(self, sender: str, msg: Message) -> None:
        """A peer refuses this node's events: its clock is ahead by ``ahead_ms`` (spec FO7)."""
        fault = clock_fault(sender, msg.body.get("ahead_ms"))
        if fault is not None:
            self.clock_fault = fault
            log.error("%s", fault)
            self.changed()

    def peer_clock_refused(self, member_id: str, ahead_ms: int) -> None:
        """A peer's event was refused for a clock too far ahead (spec K4): tell it, at most
        every ``CLOCK_TELL_EVERY_S``, so it reports the fault instead of waiting for a plan."""
        if self._tasks is not None and self.core.tell_clock(member_id, self.clock()):
            msg = Message(type="clock.refused", body={"ahead_ms": int(ahead_ms)})
            self._tasks.create_task(self._tell(member_id, msg), name="clock.refused")

    async def _tell(self, member_id: str, msg: Message) -> None:
        try:
            await self.send(member_id, msg)
        except MeshError as exc:
            log.debug("cannot send %s to %s: %s", msg.type, member_id, exc)

    async def _every(self, period_s: float, round: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await round()
            except Exception:  # one bad round must not stop heartbeats for good
                log.exception("%s failed", getattr(round, "__name__", "round"))

    async def _heartbeat(self) -> None:
        await self.links.ping_all(timeout_s=self.heartbeat_s)
        self.on_round()
        now = self.clock()
        lost = self.core.unreachable(now, self.members(), self.links.linked())
        for member_id in lost:
            self.declare_dead(member_id, f"unreachable for {2 * self.core.dead_after_s:.0f} s")

    async def _probes(self) -> None:
        await self.links.probe_all(self.probe_interval_s, self.send_timeout_s)

    async def _freeze_tick(self) -> None:
        gap = self.core.tick(self.clock())
        if gap is not None:
            log.warning("this node did not run for %.1f s (frozen or suspended)", gap)
