"""Failure detection of a node: heartbeats, declaring members dead, and the messages that
keep failover honest (release acknowledgements, refused clocks). A mixin of
``mesh.node.node.Node``. Spec: specs/node.md N9, specs/faults.md FO5-FO7.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from mesh.errors import MeshError
from mesh.kernel.records import member_key
from mesh.wire import Message

if TYPE_CHECKING:
    from mesh.kernel.replication import Replication
    from mesh.node.config import NodeConfig
    from mesh.node.links import Links
    from mesh.placement.pipeline import Plan
    from mesh.runtime.coordinator import Coordinator, StageWorker

log = logging.getLogger("mesh.node.node")

CLOCK_TELL_EVERY_S = 10.0  # a peer with a refused clock is told at most this often
FREEZE_TICK_S = 0.1
FREEZE_GAP_S = 1.5  # a tick this late means the process was frozen, not busy


class NodeHealth:
    """Heartbeats and failure handling of a node (mixed into ``Node``)."""

    config: NodeConfig
    member_id: str
    plan: Plan | None
    replication: Replication | None
    links: Links
    worker: StageWorker
    coordinator: Coordinator | None
    clock_fault: str | None
    _drift_told: dict[str, float]
    _last_seen: dict[str, float]
    _last_health: tuple[bool, str]
    _resumed_at: float
    _stop: asyncio.Event

    def view(self) -> Any:
        raise NotImplementedError

    def ready(self) -> tuple[bool, str]:
        raise NotImplementedError

    def _publish_link_stats(self) -> None:
        raise NotImplementedError

    async def send(self, member_id: str, msg: Message) -> None:
        raise NotImplementedError

    def _clock_refused(self, sender: str, msg: Message) -> None:
        """A peer refuses this node's events: its clock is ahead by ``ahead_ms`` (spec FO7)."""
        ahead = msg.body.get("ahead_ms")
        if type(ahead) is int and ahead > 0:
            self.clock_fault = (f"this node's clock is {ahead / 3.6e6:.1f} h ahead of member {sender}'s, which "
                                f"refuses its events: fix the system clock (NTP) and restart")
            log.error("%s", self.clock_fault)

    def _peer_clock_refused(self, member_id: str, ahead_ms: int) -> None:
        """A peer's event was refused for a clock too far ahead (spec K4): tell it, at
        most every 10 s, so it reports the fault instead of waiting for a plan forever."""
        now = time.monotonic()
        if now - self._drift_told.get(member_id, -1e9) < CLOCK_TELL_EVERY_S:
            return
        self._drift_told[member_id] = now
        body = {"ahead_ms": int(ahead_ms)}
        self.links.spawn(self._tell(member_id, Message(type="clock.refused", body=body)), "clock.refused")

    async def _tell(self, member_id: str, msg: Message) -> None:
        try:
            await self.send(member_id, msg)
        except MeshError as exc:
            log.debug("cannot send %s to %s: %s", msg.type, member_id, exc)

    async def _ack_release(self, member_id: str, req: str) -> None:
        try:
            await self.send(member_id, Message(type="released", body={"req": req}))
        except MeshError as exc:  # the coordinator sends the release again, or is gone
            log.debug("cannot acknowledge the release of req=%s to %s: %s", req, member_id, exc)

    def _link_down(self, member_id: str) -> None:
        assert self.coordinator is not None
        self._last_seen[member_id] = time.monotonic()
        self._declare_dead(member_id, "its last link closed")

    def _declare_dead(self, member_id: str, why: str) -> None:
        assert self.replication is not None and self.coordinator is not None
        self.coordinator.member_lost(member_id)  # spec FO6: its requests' attempts fail at once
        self.worker.release_coordinated_by(member_id)
        if self.replication.state.get(member_key(member_id)) is None or self._stop.is_set():
            return
        if time.monotonic() - self._resumed_at < self.config.dead_after_s:
            # This process was frozen (SIGSTOP, a suspended laptop): its peers were not
            # silent, it was. Removing them would evict healthy members; links redial.
            log.warning("not declaring member %s dead (%s): this node was just frozen", member_id, why)
            return
        log.warning("member %s left: %s", member_id, why)
        self.replication.emit("member.leave", member_key(member_id), None)
        for key in self.replication.state.keys("link/"):  # spec L3: its links' figures are stale
            if member_id in key.split("/")[1:]:
                self.replication.emit("link.down", key, None)

    async def _watch_freezes(self) -> None:
        """Notice when this process did not run for a while (its event loop was frozen):
        then, for ``--dead-after-s``, silence of its links is its own fault (spec FO6)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(FREEZE_TICK_S)
            now = time.monotonic()
            if now - last > FREEZE_GAP_S:
                log.warning("this node did not run for %.1f s (frozen or suspended)", now - last)
                self._resumed_at = now
            last = now

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self._heartbeat_round()
            except Exception:  # one bad round must not stop heartbeats for good
                log.exception("heartbeat round failed")

    async def _heartbeat_round(self) -> None:
        await self.links.ping_all(timeout_s=self.config.heartbeat_s)
        self.links.spawn(self.links.probe_all(self.config.probe_interval_s, self.config.timeouts.send_s), "probes")
        self._publish_link_stats()
        timeouts = self.config.timeouts
        self.worker.expire(idle_s=2 * max(timeouts.prefill_s, timeouts.decode_s))
        ready, reason = self.ready()
        if (ready, reason) != self._last_health:
            if ready:
                log.info("ready: the model is placed and loaded on %d member(s)", len(self.plan.all_stages) if self.plan else 0)
            else:
                log.info("not ready: %s", reason)
            self._last_health = (ready, reason)
        # A member in the state we cannot reach for a while (e.g. it died while this node
        # was down) is declared dead too, so the plan does not wait for it forever.
        linked = set(self.links.linked())
        now = time.monotonic()
        for member in self.view().members():
            if member.member_id == self.member_id or member.member_id in linked:
                self._last_seen[member.member_id] = now
            elif now - self._last_seen.get(member.member_id, now) > 2 * self.config.dead_after_s:
                self._declare_dead(member.member_id, f"unreachable for {2 * self.config.dead_after_s:.0f} s")
