"""Who is in the cluster, what each member offers, and what each has loaded: records and a
read-only view over the replicated cluster state (sans-IO).

Keys in the state (spec kernel.md): ``member/<id>`` (address, API address, incarnation;
removed when the member leaves or is declared dead), ``resources/<id>`` (backend, memory),
``status/<id>`` (what it has loaded), ``placement`` (the serving plan last recorded, spec N21), and
``request/<id>`` / ``kv/<id>`` (request lifecycle and where its KV caches live). Values were
written by peers, so every record is validated when read; a bad one is skipped.
Spec: specs/node.md (N1-N4).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from mesh.errors import FrameError
from mesh.kernel.crdt import ClusterState

log = logging.getLogger(__name__)
REQUEST_STATES = ("running", "finished", "cancelled", "failed")  # monotone order (lifecycle view)

STATES = ("idle", "loading", "ready", "failed", "leaving")
MAX_HELD = 8  # layer ranges one status may list (two while a plan changes)


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise FrameError(f"field {name!r} missing or of the wrong type in a peer record")
    return value


MAX_ALT_ADDRESSES = 16


def _alt_addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ALT_ADDRESSES or not all(
            isinstance(a, str) and 0 < len(a) <= 64 for a in value):
        raise FrameError(f"field 'alt' must be a list of at most {MAX_ALT_ADDRESSES} short addresses")
    return tuple(value)


ROLES = ("any", "prefill", "decode")


def _tp_address(value: Any) -> str:
    """A peer's tensor-parallel address: an IP address, else FrameError."""
    if value == "":
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise FrameError(f"field 'tp' must be an IP address, got {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberInfo:
    """A member as others see it.

    ``address``: host:port of its mesh link; ``api_address``: host:port of its HTTP API;
    ``memory_bytes``: usable memory it offers (bytes); ``backend``: compute backend name;
    ``incarnation``: random per process start, so two live processes with one id are told apart.
    """

    member_id: str
    address: str
    api_address: str
    backend: str
    memory_bytes: int
    incarnation: str = ""
    alt_addresses: tuple[str, ...] = ()  # other hosts it listens on, e.g. Thunderbolt links (spec TB2)
    role: str = "any"  # what it asks to run: prefill, decode or any (spec N13)
    # the IP address of a link its owner trusts, where it may join tensor-parallel groups
    # (``--tp-address``; their collectives are plaintext, spec N26 and specs/security.md S7-S8); "": none
    tp_address: str = ""

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.member_id,
            "address": self.address,
            "api": self.api_address,
            "backend": self.backend,
            "memory_bytes": self.memory_bytes,
            "incarnation": self.incarnation,
        }
        if self.alt_addresses:
            body["alt"] = list(self.alt_addresses)
        if self.role != "any":
            body["role"] = self.role
        if self.tp_address:
            body["tp"] = self.tp_address
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> MemberInfo:
        """Parse a peer's record. Raises FrameError on a missing or mistyped field."""
        info = cls(
            member_id=_field(body, "id", str),
            address=_field(body, "address", str),
            api_address=_field(body, "api", str),
            backend=_field(body, "backend", str),
            memory_bytes=_field(body, "memory_bytes", int),
            incarnation=_field(body, "incarnation", str),
            alt_addresses=_alt_addresses(body.get("alt", [])),
            role=body.get("role", "any") if body.get("role") in ROLES else "any",
            tp_address=_tp_address(body.get("tp", "")),
        )
        if not info.member_id or len(info.member_id) > 128 or info.memory_bytes < 0:
            raise FrameError("peer record has an empty or oversized id, or negative memory")
        return info


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberStatus:
    """What a member loads for plan ``plan_id``: layers [layer_start, layer_end), ``state``
    (one of ``STATES``: ``leaving`` is a member stopping gracefully, left out of placement,
    spec N20); and ``held``, the layer ranges it holds loaded and computes now: the current
    plan's, and the previous plan's while a plan change is under way (spec N21)."""

    plan_id: str = ""
    layer_start: int = 0
    layer_end: int = 0
    state: str = "idle"
    error: str | None = None
    held: tuple[tuple[int, int], ...] = ()
    # a tensor-parallel group's leader: ``host:port`` where its group meets for plan ``plan_id``
    # (spec N26); written once its process listens, read by the group's other members
    rendezvous: str = ""
    # its last tensor-parallel group failed a short while ago (spec N26): placement leaves it out
    # of groups meanwhile, so a link that broke under a group does not make the group form again
    ungrouped: bool = False

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise FrameError(f"unknown member state {self.state!r}; valid: {STATES}")

    def holds(self, layer_start: int, layer_end: int) -> bool:
        return (layer_start, layer_end) in self.held

    def to_wire(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "layer_start": self.layer_start,
            "layer_end": self.layer_end,
            "state": self.state,
            "error": self.error,
            "held": [list(r) for r in self.held],
            **({"rendezvous": self.rendezvous} if self.rendezvous else {}),
            **({"ungrouped": True} if self.ungrouped else {}),
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> MemberStatus:
        error = body.get("error")
        state = _field(body, "state", str)
        start, end = _field(body, "layer_start", int), _field(body, "layer_end", int)
        held = body.get("held")
        if held is None:  # a member of an older version: what it reports ready is what it holds
            held = [[start, end]] if state == "ready" else []
        if not isinstance(held, list) or len(held) > MAX_HELD or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                for r in held):
            raise FrameError("field 'held' of a status record is not a short list of [start, end] ranges")
        rendezvous = body.get("rendezvous", "")
        if not isinstance(rendezvous, str) or len(rendezvous) > 128:
            raise FrameError("field 'rendezvous' of a status record is not a short host:port")
        return cls(plan_id=_field(body, "plan_id", str), layer_start=start, layer_end=end, state=state,
                   error=error if isinstance(error, str) else None, held=tuple((a, b) for a, b in held),
                   rendezvous=rendezvous, ungrouped=body.get("ungrouped") is True)


# -- the state's keys and event types: one table (every writer and reader uses these) ----------
# Writers return ``(event type, key, value)`` records for ``Replication.emit``; the node is the
# only writer. Spec: specs/kernel.md, specs/node.md N1-N4, specs/linkstats.md L2-L3,
# specs/placement.md P16.

Record = tuple[str, str, Any]

EVENT_TYPES = ("member.join", "member.leave", "resources.set", "status.set", "placement.set",
               *(f"request.{state}" for state in REQUEST_STATES), "request.retired", "kv.placed", "kv.freed",
               "link.measured", "link.down", "profile.set")
PLACEMENT_KEY = "placement"


def member_key(member_id: str) -> str:
    return f"member/{member_id}"


def status_key(member_id: str) -> str:
    return f"status/{member_id}"


def resources_key(member_id: str) -> str:
    return f"resources/{member_id}"


def request_key(req: str) -> str:
    return f"request/{req}"


def kv_key(req: str) -> str:
    return f"kv/{req}"


def link_key(src: str, dst: str) -> str:
    """The key of the measurements of the link from ``src`` to ``dst`` (spec L2)."""
    return f"link/{src}/{dst}"


def profile_key(member_id: str) -> str:
    """The key of a member's device profile and stage calibration (spec P16, P19)."""
    return f"profile/{member_id}"


def join(me: MemberInfo) -> list[Record]:
    """A member's resources, then its membership record: a member without resources is not
    placed, so writing them first never shows a transient plan (spec N1)."""
    resources: dict[str, Any] = {"backend": me.backend, "memory_bytes": me.memory_bytes}
    if me.role != "any":
        resources["role"] = me.role  # spec N13: read by every node's placement
    if me.tp_address:
        resources["tp"] = me.tp_address  # spec N26: read by every node's placement
    record: dict[str, Any] = {"address": me.address, "api": me.api_address, "incarnation": me.incarnation}
    if me.alt_addresses:
        record["alt"] = list(me.alt_addresses)
    return [("resources.set", resources_key(me.member_id), resources),
            ("member.join", member_key(me.member_id), record)]


def leave(member_id: str, keys: list[str]) -> list[Record]:
    """Remove a member declared dead, and the figures of its links (stale from now; spec L3).
    ``keys``: the ``link/`` keys the state holds now."""
    return [("member.leave", member_key(member_id), None),
            *(("link.down", key, None) for key in keys if member_id in key.split("/")[1:])]


def status(member_id: str, value: MemberStatus) -> Record:
    return ("status.set", status_key(member_id), value.to_wire())


def request(req: str, state: str) -> Record:
    """A request's lifecycle state (one of ``REQUEST_STATES``, monotone)."""
    if state not in REQUEST_STATES:
        raise ValueError(f"request state {state!r} unknown; valid: {', '.join(REQUEST_STATES)}")
    return (f"request.{state}", request_key(req), state)


def request_retired(req: str) -> Record:
    return ("request.retired", request_key(req), None)


def kv_placed(req: str, members: list[str]) -> Record:
    """Where a request's KV caches live now (the members of the route that holds them)."""
    return ("kv.placed", kv_key(req), list(members))


def kv_freed(req: str) -> Record:
    return ("kv.freed", kv_key(req), None)


def placement(plan_id: str, stages: list[list[Any]], prefill_stages: list[list[Any]],
              members: list[str] | None = None) -> Record:
    """The serving plan, recorded by one member: ``[member, layer_start, layer_end]`` per stage,
    and the members it was made for (spec P21)."""
    value: dict[str, Any] = {"plan_id": plan_id, "stages": stages}
    if prefill_stages:
        value["prefill_stages"] = prefill_stages
    if members:
        value["members"] = members
    return ("placement.set", PLACEMENT_KEY, value)


def link_measured(src: str, dst: str, summary: dict[str, Any]) -> Record:
    return ("link.measured", link_key(src, dst), summary)


def profile(member_id: str, record: dict[str, Any]) -> Record:
    return ("profile.set", profile_key(member_id), record)


class ClusterView:
    """Members and statuses as the replicated state says, validated."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def members(self) -> list[MemberInfo]:
        """Every member present in the state, ordered by id (the order placement uses)."""
        out = []
        for key in self.state.keys("member/"):
            member_id = key[len("member/"):]
            record = self.state.get(key)
            resources = self.state.get(resources_key(member_id))
            if not isinstance(record, dict) or not isinstance(resources, dict):
                continue  # joined but resources not in yet (or removed): not placeable
            try:
                info = MemberInfo.from_wire({**record, **resources, "id": member_id})
            except FrameError as exc:
                log.warning("ignoring a malformed record of member %s: %s", member_id, exc)
                continue
            out.append(info)
        return out

    def get(self, member_id: str) -> MemberInfo | None:
        return next((m for m in self.members() if m.member_id == member_id), None)

    def status(self, member_id: str) -> MemberStatus:
        value = self.state.get(status_key(member_id))
        if not isinstance(value, dict):
            return MemberStatus()
        try:
            return MemberStatus.from_wire(value)
        except FrameError:
            return MemberStatus()

    def links(self) -> list[dict[str, Any]]:
        """Published link measurements (``link/<from>/<to>``, spec L2): from, to, transport,
        rtt_p50_s, rtt_p99_s (seconds), throughput_bytes_per_s, samples. Malformed ones are
        skipped."""
        rows = []
        for key in self.state.keys("link/"):
            parts = key.split("/")
            value = self.state.get(key)
            if len(parts) != 3 or not isinstance(value, dict) or not isinstance(value.get("transport"), str):
                continue
            figures = {k: value.get(k) for k in ("rtt_p50_s", "rtt_p99_s", "throughput_bytes_per_s")}
            if not all(v is None or isinstance(v, int | float) and not isinstance(v, bool) for v in figures.values()):
                continue
            samples = value.get("samples")
            rows.append({"from": parts[1], "to": parts[2], "transport": value["transport"], **figures,
                         "samples": samples if isinstance(samples, int) and not isinstance(samples, bool) else 0})
        return rows

    def requests(self) -> dict[str, int]:
        """How many requests the state holds in each lifecycle state."""
        counts = {name: 0 for name in REQUEST_STATES}
        for key in self.state.keys("request/"):
            name = self.state.lifecycle(key, REQUEST_STATES)
            if name is not None:
                counts[name] += 1
        return counts
