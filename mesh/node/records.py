"""What this node writes to the replicated cluster state, and when: its membership and
resources, its load status, the lifecycle of the requests it coordinates (and where their KV
caches live), the serving plan (when it is the member that records it), link figures, its profile,
and the removal of members it declared dead. Records are built by ``mesh.kernel.records``;
this class keeps the little state that decides when to write them.
Spec: specs/node.md N1-N4, N9, N13; specs/kernel.md K5; specs/linkstats.md L2-L3.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from mesh.kernel import records
from mesh.kernel.records import MemberInfo, MemberStatus

log = logging.getLogger(__name__)

RETAINED_REQUESTS = 256  # finished requests of this node kept in the state before retiring


class StateReader(Protocol):
    """The replicated state as this writer reads it (``mesh.kernel.crdt.ClusterState``)."""

    def get(self, key: str) -> Any: ...

    def keys(self, prefix: str = "") -> list[str]: ...


class SelfRecords:
    """This node's writes to the cluster state: ``emit(type, key, value)`` issues an event
    (``Replication.emit``), ``state()`` is the state now, ``me()`` this node's record."""

    def __init__(self, emit: Callable[[str, str, Any], Any], state: Callable[[], StateReader],
                 me: Callable[[], MemberInfo]) -> None:
        self.emit = emit
        self.state = state
        self.me = me
        self.joined = asyncio.Event()  # set once this node wrote its membership record
        self._status = MemberStatus()
        self._finished: deque[str] = deque()

    @property
    def member_id(self) -> str:
        return self.me().member_id

    def _emit(self, record: records.Record) -> None:
        self.emit(*record)

    def join(self) -> None:
        """Write this node's resources and membership record (again after being removed), and
        its load status as this process has it: a status left by an earlier process under
        this id (a restart) would claim layers nobody holds now (spec N21)."""
        for record in records.join(self.me()):
            self._emit(record)
        if self.state().get(records.status_key(self.member_id)) != self._status.to_wire():
            self._emit(records.status(self.member_id, self._status))
        self.joined.set()

    def rejoin_if_removed(self) -> bool:
        """After a change of the state: write the membership record again when it is missing or
        of another incarnation (a peer removed this node while it was alive). True if it did."""
        if not self.joined.is_set():
            return False
        me = self.me()
        record = self.state().get(records.member_key(me.member_id))
        if isinstance(record, dict) and record.get("incarnation") == me.incarnation:
            return False
        log.info("this node's membership record is missing or stale: writing it again")
        self.join()
        return True

    def set_status(self, status: MemberStatus) -> None:
        """This node's load status (what it has loaded for which plan), when it changed."""
        if status != self._status or self.state().get(records.status_key(self.member_id)) is None:
            self._status = status
            self._emit(records.status(self.member_id, status))

    def request_event(self, req: str, state: str, stages: list[str] | None = None) -> None:
        """A request's lifecycle (and where its KV caches live) in the cluster state; finished
        requests are retired after ``RETAINED_REQUESTS`` (spec K5: retire, do not accumulate)."""
        self._emit(records.request(req, state))
        if stages is not None:
            self._emit(records.kv_placed(req, stages))
        if state != "running":
            if self.state().get(records.kv_key(req)) is not None:
                self._emit(records.kv_freed(req))
            self._finished.append(req)
            while len(self._finished) > RETAINED_REQUESTS:
                self._emit(records.request_retired(self._finished.popleft()))

    def placement(self, plan: Any, first_member: str | None = None) -> None:
        """Record the serving plan (a ``Plan``, spec N21) when this node is the member with the
        lowest id (``first_member``, else read from the state; the others serve the same plan,
        one records it) and the state holds another, or the same for other members (spec P21)."""
        recorded = self.state().get(records.PLACEMENT_KEY)
        if first_member is None:
            members = sorted(key[len("member/"):] for key in self.state().keys("member/"))
            first_member = members[0] if members else None
        members = sorted(plan.considered)
        if first_member == self.member_id and (not isinstance(recorded, dict) or recorded.get("plan_id") != plan.plan_id
                                               or recorded.get("members", []) != members):
            self._emit(records.placement(plan.plan_id, [s.wire() for s in plan.stages],
                                         [s.wire() for s in plan.prefill_stages], members))

    def link_figures(self, meters: dict[str, Any], now: float) -> None:
        """Publish each link's RTT and throughput when they moved (spec L2, L3): ``meters`` are
        the links' ``LinkMeter``s by peer, ``now`` the loop's clock (s)."""
        for peer, meter in list(meters.items()):
            summary = meter.publish_due(now)
            if summary is not None:
                self._emit(records.link_measured(self.member_id, peer, summary))

    def profile(self, record: dict[str, Any]) -> None:
        if self.joined.is_set():
            self._emit(records.profile(self.member_id, record))

    def peer_profiles(self) -> list[dict[str, Any]]:
        """The profile records the other members published (spec P7: checked against)."""
        out = []
        for key in self.state().keys("profile/"):
            value = self.state().get(key)
            if key != records.profile_key(self.member_id) and isinstance(value, dict):
                out.append(value)
        return out

    def leave(self, member_id: str) -> bool:
        """Remove a member declared dead (and its links' figures); False when the state does
        not hold it."""
        if self.state().get(records.member_key(member_id)) is None:
            return False
        for record in records.leave(member_id, self.state().keys("link/")):
            self._emit(record)
        return True
