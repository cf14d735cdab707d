"""Hybrid logical clocks (Kulkarni, Demirbas, Madappa, Avva, Leone: "Logical Physical Clocks
and Consistent Snapshots in Globally Distributed Databases", 2014).

A ``Timestamp`` is ``(physical_ms, counter)``, ordered lexicographically. A ``HybridClock``
issues timestamps for local events (``now``) and folds in the timestamps of received events
(``observe``) so that every timestamp it returns is strictly greater than every timestamp it
issued or accepted before (spec K4), while staying close to physical time.

Max-drift policy (spec K4). A remote timestamp whose ``physical_ms`` is more than
``max_drift_ms`` ahead of the local physical time ``now_ms`` is rejected: ``observe`` raises
``ClockDriftError`` and the clock is left exactly as it was. One peer with a broken (or
hostile) clock therefore cannot drag every other clock into the future. The caller logs the
error, drops that message, and keeps running; the sender's event arrives again later through
anti-entropy, by which time it may be within the drift bound.

Counter overflow. The counter holds at most ``MAX_COUNTER``. When it would pass that (more
than 65,536 timestamps within one millisecond, or a remote timestamp with a saturated
counter), the clock advances ``physical_ms`` by one and resets the counter to 0. It never
advances past the drift ceiling ``now_ms + max_drift_ms`` (nor past ``MAX_PHYSICAL_MS``): if
it would, ``now``/``observe`` raise ``ClockDriftError`` and leave the clock unchanged; the
caller retries once physical time has moved on. This can only happen right after accepting a
remote timestamp at the very edge of the drift bound with a counter near ``MAX_COUNTER``.

Absurd timestamps (negative, beyond ``MAX_PHYSICAL_MS``, counter out of range, bools, floats,
strings) are rejected by ``Timestamp`` itself with ``KernelError``; Python ints never
overflow, so even ``2**200`` is simply out of range.

Must not know: events, transports, asyncio, the ``time`` module. Physical time is passed in as
``now_ms`` (milliseconds since the Unix epoch, from the node's wall clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.errors import ClockDriftError, KernelError

MAX_PHYSICAL_MS = 2**47  # ~year 6429; anything above is "absurd" and rejected
MAX_COUNTER = 2**16 - 1
DEFAULT_MAX_DRIFT_MS = 60_000


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; else KernelError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KernelError(f"{name} must be an integer in [{low}, {high}], got {type(value).__name__} {value!r:.40}")
    if not low <= value <= high:
        shown = str(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
        raise KernelError(f"{name} must be in [{low}, {high}], got {shown}")
    return value


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A hybrid logical timestamp, ordered by ``(physical_ms, counter)``.

    ``physical_ms`` is in ``[0, MAX_PHYSICAL_MS]``, ``counter`` in ``[0, MAX_COUNTER]``;
    both are ints (bools are refused).

    Raises:
        KernelError: on a field of the wrong type or out of range.
    """

    physical_ms: int
    counter: int

    def __post_init__(self) -> None:
        check_int("timestamp physical_ms", self.physical_ms, 0, MAX_PHYSICAL_MS)
        check_int("timestamp counter", self.counter, 0, MAX_COUNTER)

    def __str__(self) -> str:
        return f"{self.physical_ms}.{self.counter}"

    def to_wire(self) -> list[int]:
        """``[physical_ms, counter]``."""
        return [self.physical_ms, self.counter]

    @classmethod
    def from_wire(cls, v: Any) -> Timestamp:
        """Parse ``[physical_ms, counter]``.

        Raises:
            KernelError: unless ``v`` is a 2-element list of in-range ints.
        """
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise KernelError(f"a timestamp must be a list [physical_ms, counter], got {type(v).__name__} {v!r:.60}")
        return cls(v[0], v[1])


ZERO = Timestamp(0, 0)


class HybridClock:
    """One node's hybrid logical clock (sans-IO: physical time is passed in).

    ``last`` is the last timestamp issued or accepted; a node restoring from disk may set it
    to the greatest timestamp it had persisted (it only ever matters that it never goes back).
    ``max_drift_ms`` is how far ahead of ``now_ms`` a remote timestamp may be (spec K4).
    """

    __slots__ = ("last", "max_drift_ms")

    def __init__(self, *, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> None:
        check_int("max_drift_ms", max_drift_ms, 0, MAX_PHYSICAL_MS)
        self.max_drift_ms = max_drift_ms
        self.last: Timestamp = ZERO

    def __repr__(self) -> str:
        return f"HybridClock(last={self.last}, max_drift_ms={self.max_drift_ms})"

    def now(self, now_ms: int) -> Timestamp:
        """Timestamp a local or send event: strictly greater than every earlier one (K4).

        Raises:
            KernelError: when ``now_ms`` is not an int in ``[0, MAX_PHYSICAL_MS]``.
            ClockDriftError: when the counter is exhausted at the drift ceiling (see the
                module docstring); the clock is unchanged.
        """
        check_int("now_ms", now_ms, 0, MAX_PHYSICAL_MS)
        last = self.last
        if now_ms > last.physical_ms:
            result = Timestamp(now_ms, 0)
        else:
            # Physical time has not moved past the clock (same ms, or the wall clock went
            # backwards): keep the logical physical part and count up.
            result = self._bump(last.physical_ms, last.counter + 1, now_ms)
        self.last = result
        return result

    def observe(self, remote: Timestamp, now_ms: int) -> Timestamp:
        """Fold in a received timestamp (the HLC receive rule).

        The result is strictly greater than ``last`` and than ``remote``, and becomes ``last``.

        Raises:
            KernelError: when ``remote`` is not a Timestamp or ``now_ms`` is out of range.
            ClockDriftError: when ``remote.physical_ms > now_ms + max_drift_ms``, or when a
                counter overflow would pass the drift ceiling; the clock is unchanged.
        """
        if not isinstance(remote, Timestamp):
            raise KernelError(f"observe needs a Timestamp, got {type(remote).__name__}")
        check_int("now_ms", now_ms, 0, MAX_PHYSICAL_MS)
        if remote.physical_ms > now_ms + self.max_drift_ms:
            # spec K4: a far-future peer clock must not drag ours along.
            raise ClockDriftError(
                f"remote timestamp {remote} is {remote.physical_ms - now_ms} ms ahead of local "
                f"physical time {now_ms}; at most {self.max_drift_ms} ms is accepted"
            )
        last = self.last
        physical = max(last.physical_ms, remote.physical_ms, now_ms)
        if physical == last.physical_ms == remote.physical_ms:
            counter = max(last.counter, remote.counter) + 1
        elif physical == last.physical_ms:
            counter = last.counter + 1
        elif physical == remote.physical_ms:
            counter = remote.counter + 1
        else:
            counter = 0
        result = self._bump(physical, counter, now_ms)
        self.last = result
        return result

    def _bump(self, physical: int, counter: int, now_ms: int) -> Timestamp:
        """``Timestamp(physical, counter)``, carrying a counter overflow into physical_ms
        without passing the drift ceiling; raises ClockDriftError instead of passing it."""
        if counter <= MAX_COUNTER:
            return Timestamp(physical, counter)
        ceiling = min(now_ms + self.max_drift_ms, MAX_PHYSICAL_MS)
        if physical + 1 > ceiling:
            raise ClockDriftError(
                f"HLC counter exhausted at {physical}.{MAX_COUNTER} and advancing to {physical + 1} ms "
                f"would pass the drift ceiling {ceiling} ms (local physical time {now_ms} + "
                f"max_drift_ms {self.max_drift_ms}); retry when physical time has advanced"
            )
        return Timestamp(physical + 1, 0)
