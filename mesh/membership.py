"""Who is in the cluster, what each member offers, and what each has loaded (sans-IO).

Members learn of each other through hellos and gossip of member lists; every node holds
the same records once links settle, so every node computes the same plan from them. This
module validates records received from peers and never touches the network.
Spec: specs/node.md (N1-N4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mesh.errors import FrameError

STATES = ("idle", "loading", "ready", "failed")


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise FrameError(f"field {name!r} missing or of the wrong type in a peer record")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberInfo:
    """A member as others see it.

    ``address``: host:port of its mesh link; ``api_address``: host:port of its HTTP API;
    ``memory_bytes``: usable memory it offers (bytes); ``backend``: compute backend name.
    """

    member_id: str
    address: str
    api_address: str
    backend: str
    memory_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.member_id,
            "address": self.address,
            "api": self.api_address,
            "backend": self.backend,
            "memory_bytes": self.memory_bytes,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> MemberInfo:
        """Parse a peer's record. Raises FrameError on a missing or mistyped field."""
        info = cls(
            member_id=_field(body, "id", str),
            address=_field(body, "address", str),
            api_address=_field(body, "api", str),
            backend=_field(body, "backend", str),
            memory_bytes=_field(body, "memory_bytes", int),
        )
        if not info.member_id or len(info.member_id) > 128 or info.memory_bytes < 0:
            raise FrameError("peer record has an empty or oversized id, or negative memory")
        return info


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberStatus:
    """What a member has loaded: layers [layer_start, layer_end) for plan ``plan_id``."""

    plan_id: str = ""
    layer_start: int = 0
    layer_end: int = 0
    state: str = "idle"
    error: str | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise FrameError(f"unknown member state {self.state!r}; valid: {STATES}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "layer_start": self.layer_start,
            "layer_end": self.layer_end,
            "state": self.state,
            "error": self.error,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> MemberStatus:
        error = body.get("error")
        return cls(
            plan_id=_field(body, "plan_id", str),
            layer_start=_field(body, "layer_start", int),
            layer_end=_field(body, "layer_end", int),
            state=_field(body, "state", str),
            error=error if isinstance(error, str) else None,
        )


class Membership:
    """The member table of one node: ``me`` plus every peer it has a live link to or
    heard of through gossip, with each member's last reported status."""

    def __init__(self, me: MemberInfo) -> None:
        self.me = me
        self._members: dict[str, MemberInfo] = {me.member_id: me}
        self._status: dict[str, MemberStatus] = {me.member_id: MemberStatus()}

    def upsert(self, info: MemberInfo) -> bool:
        """Add or update a member; True when the table changed in a way placement sees."""
        old = self._members.get(info.member_id)
        self._members[info.member_id] = info
        self._status.setdefault(info.member_id, MemberStatus())
        return old is None or old.memory_bytes != info.memory_bytes

    def remove(self, member_id: str) -> bool:
        if member_id == self.me.member_id or member_id not in self._members:
            return False
        del self._members[member_id]
        self._status.pop(member_id, None)
        return True

    def set_status(self, member_id: str, status: MemberStatus) -> None:
        if member_id in self._members:
            self._status[member_id] = status

    def status(self, member_id: str) -> MemberStatus:
        return self._status.get(member_id, MemberStatus())

    def get(self, member_id: str) -> MemberInfo | None:
        return self._members.get(member_id)

    def members(self) -> list[MemberInfo]:
        """Every member, ordered by id (the order placement uses)."""
        return [self._members[k] for k in sorted(self._members)]

    def peers(self) -> list[MemberInfo]:
        return [m for m in self.members() if m.member_id != self.me.member_id]

    def set_me(self, **changes: Any) -> None:
        self.me = replace(self.me, **changes)
        self._members[self.me.member_id] = self.me
