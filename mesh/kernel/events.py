"""The event envelope and version vectors.

An ``Event`` is one change to the cluster state, written by one node (its *origin*) and
numbered by that node's sequence ``seq`` (1, 2, 3, ... with no gaps). Its ``deps`` version
vector is its causal past: every event ``(o, s)`` with ``s <= deps[o]`` happened before it,
and in particular ``deps[origin] == seq - 1`` (spec K2). Causal delivery
(``mesh/kernel/causal.py``) applies an event only once its whole causal past has been applied.

Everything here crosses the network, so ``from_wire`` validates every field and raises
``KernelError`` on anything malformed: wrong types, missing or unknown keys, seqs below 1,
``deps[origin] != seq - 1``, a payload that is not CBOR-safe, an over-long origin or type, a
version vector of more than ``MAX_VV_ENTRIES`` entries. It never lets KeyError, TypeError or
IndexError escape.

Must not know: the CRDT, the clock's rules, transports, IO. Implements the envelope side of
specs K2 (causal past) and K4 (absurd timestamps are refused).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from mesh import wire
from mesh.errors import KernelError
from mesh.kernel.hlc import Timestamp, check_int

MAX_ORIGIN_LEN = 128  # characters of an origin (a node id)
MAX_SEQ = 2**63 - 1  # a node would need 10^9 events a second for 292 years to reach it
MAX_VV_ENTRIES = 10_000  # origins in one version vector
MAX_TYPE_LEN = 64  # characters of an event type such as "member.join"
MAX_VERSION = 2**31 - 1  # payload schema version
MAX_PAYLOAD_DEPTH = 32  # nesting of lists/maps inside a payload
WIRE_KEYS = frozenset({"origin", "seq", "hlc", "deps", "type", "version", "payload"})


def _check_origin(origin: object) -> str:
    if not isinstance(origin, str) or not 1 <= len(origin) <= MAX_ORIGIN_LEN:
        raise KernelError(f"an origin must be a string of 1..{MAX_ORIGIN_LEN} characters, got {origin!r:.60}")
    return origin


def check_cbor_safe(value: object, where: str = "payload") -> None:
    """Raise KernelError unless ``value`` is CBOR-safe by ``mesh.wire.check_cbor_safe``'s rules,
    strict: no tuples, no bignums (ints in [-2**63, 2**64 - 1]), finite floats only, nested at
    most ``MAX_PAYLOAD_DEPTH`` deep.

    The kernel is stricter than framing so that a value survives a CBOR round trip unchanged
    and compares equal to itself (state hashes depend on it).
    """
    try:
        wire.check_cbor_safe(value, max_depth=MAX_PAYLOAD_DEPTH, where=where)
    except wire.UnsafeValueError as exc:
        raise KernelError(str(exc)) from None


class VersionVector:
    """An immutable map origin -> highest contiguous seq delivered (an int >= 1; absent = 0).

    Entries with seq 0 given to the constructor are dropped (0 is the same as absent), so equal
    vectors have equal entries. At most ``MAX_VV_ENTRIES`` origins.

    Raises:
        KernelError: on a non-string or over-long origin, a seq that is not an int in
            ``[0, MAX_SEQ]``, or too many entries.
    """

    __slots__ = ("_entries", "_hash")

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        clean: dict[str, int] = {}
        if entries is not None:
            if not isinstance(entries, Mapping):
                raise KernelError(f"a version vector needs a mapping origin -> seq, got {type(entries).__name__}")
            for origin, seq in entries.items():
                _check_origin(origin)
                if check_int(f"seq of {origin!r:.60}", seq, 0, MAX_SEQ):
                    clean[origin] = seq
        if len(clean) > MAX_VV_ENTRIES:
            raise KernelError(f"a version vector has at most {MAX_VV_ENTRIES} entries, got {len(clean)}")
        self._entries = dict(sorted(clean.items()))
        self._hash: int | None = None

    def get(self, origin: str) -> int:
        """Highest contiguous seq of ``origin`` (0 when absent)."""
        return self._entries.get(origin, 0)

    def covers(self, origin: str, seq: int) -> bool:
        """Whether event ``(origin, seq)`` is within this vector."""
        return seq <= self._entries.get(origin, 0)

    def dominates(self, other: VersionVector) -> bool:
        """``self >= other`` pointwise."""
        mine = self._entries
        return all(mine.get(origin, 0) >= seq for origin, seq in other._entries.items())

    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise maximum."""
        merged = dict(self._entries)
        for origin, seq in other._entries.items():
            if seq > merged.get(origin, 0):
                merged[origin] = seq
        if len(merged) > MAX_VV_ENTRIES:
            raise KernelError(f"a version vector has at most {MAX_VV_ENTRIES} entries, got {len(merged)}")
        return VersionVector._trusted(merged)

    def advanced(self, origin: str, seq: int) -> VersionVector:
        """A copy with ``origin`` set to ``seq`` (0 removes it)."""
        _check_origin(origin)
        check_int(f"seq of {origin!r:.60}", seq, 0, MAX_SEQ)
        entries = dict(self._entries)
        if seq:
            entries[origin] = seq
        else:
            entries.pop(origin, None)
        if len(entries) > MAX_VV_ENTRIES:
            raise KernelError(f"a version vector has at most {MAX_VV_ENTRIES} entries, got {len(entries)}")
        return VersionVector._trusted(entries)

    @classmethod
    def _trusted(cls, entries: dict[str, int]) -> VersionVector:
        """Build from entries already validated (positive seqs, valid origins); no checks."""
        vv = cls.__new__(cls)
        vv._entries = dict(sorted(entries.items()))
        vv._hash = None
        return vv

    def items(self) -> list[tuple[str, int]]:
        """``(origin, seq)`` pairs sorted by origin."""
        return list(self._entries.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VersionVector):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._entries.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"VersionVector({self._entries!r})"

    def to_wire(self) -> dict[str, int]:
        """``{origin: seq}`` with only positive seqs, sorted by origin."""
        return dict(self._entries)

    @classmethod
    def from_wire(cls, d: Any) -> VersionVector:
        """Parse ``{origin: seq}``; every seq must be an int >= 1 (0 is never sent).

        Raises:
            KernelError: on a non-map, more than ``MAX_VV_ENTRIES`` entries, a bad origin or seq.
        """
        if not isinstance(d, dict):
            raise KernelError(f"a version vector must be a map origin -> seq, got {type(d).__name__}")
        if len(d) > MAX_VV_ENTRIES:
            raise KernelError(f"a version vector has at most {MAX_VV_ENTRIES} entries, got {len(d)}")
        for origin, seq in d.items():
            _check_origin(origin)
            check_int(f"seq of {origin!r:.60}", seq, 1, MAX_SEQ)
        return cls(d)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventId:
    """Names one event: its origin (a node id, 1..128 characters) and seq (1..MAX_SEQ).

    Raises:
        KernelError: on a bad origin or seq.
    """

    origin: str
    seq: int

    def __post_init__(self) -> None:
        _check_origin(self.origin)
        check_int("event seq", self.seq, 1, MAX_SEQ)

    def __str__(self) -> str:
        return f"{self.origin}:{self.seq}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One change to the cluster state.

    ``deps`` is the causal past (``deps[id.origin] == id.seq - 1``, spec K2); ``type`` names
    the change (1..64 printable characters, e.g. ``"member.join"``); ``version`` is the payload
    schema version (>= 1); ``payload`` is a CBOR-safe str-keyed dict, to be treated as
    read-only.

    Raises:
        KernelError: on any field of the wrong type or out of range.
    """

    id: EventId
    hlc: Timestamp
    deps: VersionVector
    type: str
    version: int
    payload: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.id, EventId):
            raise KernelError(f"event id must be an EventId, got {type(self.id).__name__}")
        if not isinstance(self.hlc, Timestamp):
            raise KernelError(f"event hlc must be a Timestamp, got {type(self.hlc).__name__}")
        if not isinstance(self.deps, VersionVector):
            raise KernelError(f"event deps must be a VersionVector, got {type(self.deps).__name__}")
        if self.deps.get(self.id.origin) != self.id.seq - 1:
            # spec K2: an origin's events form a chain; each depends on its predecessor.
            raise KernelError(
                f"event {self.id} must have deps[{self.id.origin!r}] == {self.id.seq - 1}, "
                f"got {self.deps.get(self.id.origin)}"
            )
        if not isinstance(self.type, str) or not 1 <= len(self.type) <= MAX_TYPE_LEN or not self.type.isprintable():
            raise KernelError(f"event type must be 1..{MAX_TYPE_LEN} printable characters, got {self.type!r:.80}")
        check_int("event version", self.version, 1, MAX_VERSION)
        if not isinstance(self.payload, dict):
            raise KernelError(f"event payload must be a map, got {type(self.payload).__name__}")
        check_cbor_safe(self.payload)

    def to_wire(self) -> dict[str, Any]:
        """A CBOR-safe map with the keys ``WIRE_KEYS``."""
        return {
            "origin": self.id.origin,
            "seq": self.id.seq,
            "hlc": self.hlc.to_wire(),
            "deps": self.deps.to_wire(),
            "type": self.type,
            "version": self.version,
            "payload": self.payload,
        }

    @classmethod
    def from_wire(cls, d: Any) -> Event:
        """Parse and validate ``to_wire``'s map.

        Raises:
            KernelError: on a missing or unknown key or any malformed field.
        """
        if not isinstance(d, dict):
            raise KernelError(f"an event must be a map, got {type(d).__name__}")
        keys = set(d)
        if keys != WIRE_KEYS:
            missing, unknown = sorted(WIRE_KEYS - keys), sorted(f"{k!r:.40}" for k in keys - WIRE_KEYS)
            raise KernelError(f"event map has missing keys {missing} and unknown keys {unknown[:10]}")
        return cls(
            id=EventId(origin=d["origin"], seq=d["seq"]),
            hlc=Timestamp.from_wire(d["hlc"]),
            deps=VersionVector.from_wire(d["deps"]),
            type=d["type"],
            version=d["version"],
            payload=d["payload"],
        )

    def encoded_size(self) -> int:
        """Bytes of the canonical CBOR encoding of ``to_wire()``."""
        return len(cbor2.dumps(self.to_wire(), canonical=True))
