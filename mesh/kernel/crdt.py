"""The cluster state: one causal dot store, replicated as a state-based CRDT.

Model. This follows the delta-state CRDT framework (Almeida, Shoker, Baquero, "Delta state
replicated data types", JPDC 2018) with the optimized OR-set join of Bieniusa et al. ("An
optimized conflict-free replicated set", 2012). The state is a *dot store* plus a *causal
context*:

- a **dot** ``(origin, seq)`` is the ``EventId`` of the event that wrote an entry;
- ``entries`` maps a key (str) to ``{dot: (hlc, value)}`` -- the concurrent writes that are live;
- ``context`` is a ``VersionVector`` of every dot this replica has seen, live or removed.

An event carries one op: write ``value`` under ``key`` (or remove it when ``value is None``),
replacing the dots the writer had observed under that key (``replaces=observed(key)`` at the
issuer). Concurrent writes that did not observe each other both stay live; views resolve them.

Key conventions (spec: specs/kernel.md): ``member/<node_id>`` (join = write, leave = remove),
``resources/<node_id>`` and ``status/<node_id>`` (LWW registers written only by that node),
``placement`` (LWW: the current plan), ``request/<req_id>`` (lifecycle: created < running <
finished|cancelled|failed), ``kv/<req_id>`` (where the KV cache lives).

Views. ``get`` is last-writer-wins: the value of the entry with the greatest ``(hlc, dot)``;
the dot breaks HLC ties, so every replica picks the same winner. ``lifecycle`` is a monotone
view: among concurrent values it returns the highest-ranked state name, so a late concurrent
"running" never hides a "finished". Writers themselves must not move a lifecycle backwards.

Deletion without tombstones. A remove deletes the observed dots and keeps nothing under the
key, but the context still covers those dots. So a duplicate of the old write is a no-op (its
dot is covered: spec K3), and when merging with a stale replica that still holds the entry, the
join drops it because our context covers a dot we do not hold (spec K6). A write concurrent
with the remove (not observed by the remover) has a dot the remover never covered, so it
survives: add wins.

Must not know: events, transports, time, IO. Implements specs K1 (convergence), K3
(idempotence), K6 (no resurrection) together with causal delivery (mesh/kernel/causal.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import cbor2

from mesh.errors import KernelError
from mesh.kernel.events import MAX_ORIGIN_LEN, MAX_SEQ, VersionVector, check_cbor_safe
from mesh.kernel.hlc import Timestamp

Dot = tuple[str, int]
Entry = tuple[Timestamp, Any]

MAX_ENTRIES = 1_000_000  # live (key, dot) entries a wire state may carry
MAX_KEYS = 1_000_000
MAX_KEY_CHARS = 256


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise KernelError(f"state key must be a non-empty str of at most {MAX_KEY_CHARS} chars, got {key!r:.80}")
    return key


def _check_dot(origin: object, seq: object) -> Dot:
    if not isinstance(origin, str) or not origin or len(origin) > MAX_ORIGIN_LEN:
        raise KernelError(f"dot origin must be a non-empty str of at most {MAX_ORIGIN_LEN} chars, got {origin!r:.80}")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
        raise KernelError(f"dot seq must be an int in [1, {MAX_SEQ}], got {seq!r:.80}")
    return (origin, seq)


def _as_dot(dot: object) -> Dot:
    if not isinstance(dot, tuple) or len(dot) != 2:
        raise KernelError(f"a dot must be a tuple (origin, seq), got {dot!r:.80}")
    return _check_dot(dot[0], dot[1])


class ClusterState:
    """A dot store (key -> {dot: (hlc, value)}) with its causal context (a version vector)."""

    __slots__ = ("_entries", "_size", "context")

    def __init__(self) -> None:
        self._entries: dict[str, dict[Dot, Entry]] = {}  # never holds an empty inner dict
        self._size = 0
        self.context: VersionVector = VersionVector()

    # -- ops -------------------------------------------------------------------------------

    def apply(self, *, dot: Dot, hlc: Timestamp, key: str, value: Any | None, replaces: Iterable[Dot]) -> None:
        """Apply the op of one event, delivered in causal order.

        A dot already covered by the context is a no-op (spec K3). Otherwise the ``replaces``
        dots (what the writer observed under ``key``) are removed from ``key``, ``dot`` is
        added unless ``value is None`` (a remove), and the context advances to ``dot``.

        Causal delivery guarantees every ``replaces`` dot is already covered; one that is not
        means the caller broke causal order and raises ``KernelError`` (nothing is changed).
        The context is set to ``dot.seq`` for its origin: under causal delivery every lower seq
        of that origin has been delivered, so a gap only means those events changed no state.
        ``value`` is not re-checked here: it comes from an event payload that mesh/kernel/events.py
        already found CBOR-safe (``from_wire`` does check every stored value).
        """
        origin, seq = _as_dot(dot)
        _check_key(key)
        if not isinstance(hlc, Timestamp):
            raise KernelError(f"hlc must be a Timestamp, got {type(hlc).__name__}")
        if self.context.covers(origin, seq):
            return
        replaced = list(replaces)
        for r in replaced:
            r_origin, r_seq = _as_dot(r)
            if not self.context.covers(r_origin, r_seq):
                raise KernelError(
                    f"event {origin}:{seq} replaces {r_origin}:{r_seq}, which this replica has not "
                    "seen; events must be applied in causal order"
                )
        context = self.context.advanced(origin, seq)  # may raise: do it before any change
        live = self._entries.get(key)
        if live is not None:
            for r in replaced:
                if live.pop(r, None) is not None:
                    self._size -= 1
        if value is not None:
            if live is None:
                live = self._entries[key] = {}
            live[(origin, seq)] = (hlc, value)
            self._size += 1
        if live is not None and not live:
            del self._entries[key]
        self.context = context

    def merge(self, other: ClusterState) -> ClusterState:
        """The join of two states (Bieniusa et al.): a dot held by both stays; a dot held by
        one side stays iff the other side's context has not seen it (else it was removed
        there). Contexts join by pointwise max. Commutative, associative, idempotent (K1, K3)."""
        out = ClusterState()
        mine, theirs = self._entries, other._entries
        for key in mine.keys() | theirs.keys():
            a = mine.get(key, {})
            b = theirs.get(key, {})
            kept: dict[Dot, Entry] = {}
            for d, entry in a.items():
                other_entry = b.get(d)
                if other_entry is not None:
                    if other_entry[0] != entry[0]:
                        raise KernelError(f"dot {d[0]}:{d[1]} has different hlcs in the two states")
                    kept[d] = entry
                elif not other.context.covers(*d):
                    kept[d] = entry
            for d, entry in b.items():
                if d not in a and not self.context.covers(*d):
                    kept[d] = entry
            if kept:
                out._entries[key] = kept
                out._size += len(kept)
        out.context = self.context.merge(other.context)
        return out

    # -- views -----------------------------------------------------------------------------

    def observed(self, key: str) -> list[Dot]:
        """The dots live under ``key``, sorted: what a writer passes as ``replaces``."""
        return sorted(self._entries.get(key, {}))

    def get(self, key: str) -> Any | None:
        """LWW view: the value with the greatest ``(hlc, dot)``, or None if the key has no entry."""
        live = self._entries.get(key)
        if not live:
            return None
        best = max(live, key=lambda d: (live[d][0], d))
        return live[best][1]

    def values(self, key: str) -> list[Any]:
        """Every concurrent value under ``key``, sorted by ``(hlc, dot)``."""
        live = self._entries.get(key, {})
        return [live[d][1] for d in sorted(live, key=lambda d: (live[d][0], d))]

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted keys with at least one live entry, optionally only those starting with ``prefix``."""
        return sorted(k for k in self._entries if k.startswith(prefix))

    def lifecycle(self, key: str, order: Sequence[str]) -> str | None:
        """Monotone view: the highest-ranked (latest in ``order``) state among the concurrent
        values. Values that are not state names in ``order`` are ignored; None if none is."""
        rank = {name: i for i, name in enumerate(order)}
        best: str | None = None
        for value in self._entries.get(key, {}).values():
            name = value[1]
            if isinstance(name, str) and name in rank and (best is None or rank[name] > rank[best]):
                best = name
        return best

    def live_entries(self) -> int:
        """How many (key, dot) entries are live."""
        return self._size

    # -- encoding --------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """CBOR-safe form with everything sorted, so equal states encode to equal bytes:
        ``{"entries": [[key, [[origin, seq, [ms, counter], value], ...]], ...], "context": {...}}``."""
        entries = [
            [key, [[d[0], d[1], live[d][0].to_wire(), live[d][1]] for d in sorted(live)]]
            for key, live in sorted(self._entries.items())
        ]
        return {"entries": entries, "context": self.context.to_wire()}

    def content_hash(self) -> str:
        """sha256 hex of the canonical CBOR of ``to_wire()``: equal states hash equal,
        whatever order their events arrived in (spec K1)."""
        return hashlib.sha256(cbor2.dumps(self.to_wire(), canonical=True)).hexdigest()

    @classmethod
    def from_wire(cls, d: object) -> ClusterState:
        """Rebuild a state from ``to_wire()`` output, validating every field (KernelError)."""
        if not isinstance(d, dict) or set(d) != {"entries", "context"}:
            raise KernelError("cluster state must be a map with exactly the fields 'entries' and 'context'")
        try:
            context = VersionVector.from_wire(d["context"])
        except KernelError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise KernelError(f"cluster state context is malformed: {exc}") from exc
        entries = d["entries"]
        if not isinstance(entries, list) or len(entries) > MAX_KEYS:
            raise KernelError(f"cluster state entries must be a list of at most {MAX_KEYS} keys")
        out = cls()
        out.context = context
        seen: set[Dot] = set()
        for item in entries:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list) or not item[1]:
                raise KernelError("each state key must be [key, [entry, ...]] with at least one entry")
            key = _check_key(item[0])
            if key in out._entries:
                raise KernelError(f"state key {key!r} appears twice")
            if out._size + len(item[1]) > MAX_ENTRIES:
                raise KernelError(f"cluster state holds more than {MAX_ENTRIES} entries")
            live: dict[Dot, Entry] = {}
            for raw in item[1]:
                if not isinstance(raw, list) or len(raw) != 4:
                    raise KernelError(f"each entry under {key!r} must be [origin, seq, hlc, value]")
                dot = _check_dot(raw[0], raw[1])
                if dot in seen:
                    raise KernelError(f"dot {dot[0]}:{dot[1]} appears twice")
                if not context.covers(*dot):
                    raise KernelError(f"dot {dot[0]}:{dot[1]} is not covered by the state's context")
                try:
                    hlc = Timestamp.from_wire(raw[2])
                except KernelError:
                    raise
                except (TypeError, ValueError, IndexError) as exc:
                    raise KernelError(f"entry hlc under {key!r} is malformed: {exc}") from exc
                if raw[3] is None:
                    raise KernelError(f"entry value under {key!r} is None; removes are not stored")
                check_cbor_safe(raw[3], f"value of {key!r:.60}")
                seen.add(dot)
                live[dot] = (hlc, raw[3])
            out._entries[key] = live
            out._size += len(live)
        return out

    def __repr__(self) -> str:
        return f"ClusterState(keys={len(self._entries)}, entries={self._size}, context={self.context.items()})"
