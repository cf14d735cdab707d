"""Link measurement: round-trip time and throughput per peer and transport (sans-IO).

The node's heartbeat pings carry a sequence number and are answered by a ``pong`` on the
control lane; every RTT sample goes to the peer's ``LinkMeter``. Throughput comes from a
periodic probe: ``PROBE_BYTES`` on the bulk lane, answered by ``probe.ack``; throughput =
bytes / (ack time - send time - median RTT). Overhead is bounded: one ping per heartbeat
and one probe per ``probe_interval_s`` per link. What is measured is published as
``link/<from>/<to>`` values in the cluster state (spec L1-L3 in specs/linkstats.md) and shown
in ``/v1/cluster`` (nodes still place over nominal links, spec P17). No asyncio, sockets or clocks here: times
are passed in as ``now_s``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from mesh.errors import ConfigError

PROBE_BYTES = 1 << 20
RTT_WINDOW = 512  # samples kept per link
PROBE_WINDOW = 5  # probes the throughput is the best of
FIRST_PROBE_S = 10.0  # the first probe of a link waits this long after the link is first seen
PUBLISH_CHANGE = 0.25  # publish again when a figure moved by more than this fraction
PUBLISH_MAX_AGE_S = 60.0
PUBLISH_HOLD_S = 30.0  # a figure that moved is published once it stayed moved this long (placement follows it, P21)
FIGURES = ("rtt_p50_s", "rtt_p99_s", "throughput_bytes_per_s")



def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list; NIST/Hyndman-Fan type 1."""
    if not samples or not 0 <= q <= 100:
        raise ConfigError(f"percentile needs samples and q in [0, 100]; got {len(samples)} samples, q={q}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class LinkMeter:
    """RTT and throughput of one link; ``pending`` pings and probes by sequence number."""

    def __init__(self, transport: str, *, max_pending: int = 64) -> None:
        self.transport = transport
        self.rtts_s: deque[float] = deque(maxlen=RTT_WINDOW)
        self.throughputs: deque[float] = deque(maxlen=PROBE_WINDOW)
        self._first_seen_s: float | None = None
        self._pings: dict[int, float] = {}
        self._probes: dict[int, tuple[float, int]] = {}
        self._seq = 0
        self._max_pending = max_pending
        self.last_probe_s: float | None = None
        self._published: dict[str, Any] | None = None
        self._published_at_s = -math.inf
        self._moved_since_s: float | None = None  # when the figures last moved off the published ones

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def ping_sent(self, now_s: float) -> int:
        """Record a ping going out; returns its sequence number (the ``t`` of its body)."""
        seq = self._next()
        self._pings[seq] = now_s
        while len(self._pings) > self._max_pending:  # unanswered pings are forgotten, oldest first
            del self._pings[next(iter(self._pings))]
        return seq

    def pong_received(self, seq: Any, now_s: float) -> float | None:
        """Record the answer to ping ``seq``; returns the RTT in seconds, None if unknown."""
        sent = self._pings.pop(seq, None) if isinstance(seq, int) else None
        if sent is None or now_s < sent:
            return None
        rtt = now_s - sent
        self.rtts_s.append(rtt)
        return rtt

    def probe_due(self, now_s: float, interval_s: float) -> bool:
        """A probe is due ``interval_s`` after the last one; the first waits ``FIRST_PROBE_S``
        after the link was first seen (a node starting up, loading a model, would measure
        its own busy CPU instead of the link)."""
        if self._first_seen_s is None:
            self._first_seen_s = now_s
        if self.last_probe_s is None:
            return now_s - self._first_seen_s >= FIRST_PROBE_S
        return now_s - self.last_probe_s >= interval_s

    @property
    def throughput_bytes_per_s(self) -> float | None:
        """The best of the last ``PROBE_WINDOW`` probes (bytes/s): a link's capacity; a busy
        moment on either end only lowers one sample."""
        return max(self.throughputs) if self.throughputs else None

    def probe_sent(self, size_bytes: int, now_s: float) -> int:
        seq = self._next()
        self._probes[seq] = (now_s, size_bytes)
        self.last_probe_s = now_s
        while len(self._probes) > self._max_pending:
            del self._probes[next(iter(self._probes))]
        return seq

    def probe_acked(self, seq: Any, now_s: float) -> float | None:
        """Record a probe's acknowledgement; returns the throughput in bytes/s, None if unknown."""
        entry = self._probes.pop(seq, None) if isinstance(seq, int) else None
        if entry is None:
            return None
        sent, size = entry
        transfer_s = now_s - sent - (self.rtt_p50_s or 0.0)
        if transfer_s <= 0:  # too fast to tell from the RTT: bound it by the whole round trip
            transfer_s = max(now_s - sent, 1e-6)
        self.throughputs.append(size / transfer_s)
        return size / transfer_s

    @property
    def rtt_p50_s(self) -> float | None:
        return percentile(list(self.rtts_s), 50) if self.rtts_s else None

    @property
    def rtt_p99_s(self) -> float | None:
        return percentile(list(self.rtts_s), 99) if self.rtts_s else None

    def summary(self) -> dict[str, Any]:
        """The published value: transport, RTT p50/p99 (s), throughput (bytes/s), samples."""
        return {"transport": self.transport, "rtt_p50_s": self.rtt_p50_s, "rtt_p99_s": self.rtt_p99_s,
                "throughput_bytes_per_s": self.throughput_bytes_per_s, "samples": len(self.rtts_s)}

    def publish_due(self, now_s: float) -> dict[str, Any] | None:
        """The summary when it should be published now, else None (spec L2): the first time, a
        figure measured for the first time, a figure that moved by more than ``PUBLISH_CHANGE``
        and stayed moved for ``PUBLISH_HOLD_S`` (a moment's wobble never reaches placement), or
        ``PUBLISH_MAX_AGE_S`` after the last (the figures published before while a move has not
        held yet)."""
        current = self.summary()
        if current["rtt_p50_s"] is None:
            return None
        old = self._published
        if old is None or old["transport"] != current["transport"] or any(
                old[k] is None and current[k] is not None for k in FIGURES):
            return self._publish(current, now_s)
        if any(_moved(old[k], current[k]) for k in FIGURES):
            if self._moved_since_s is None:
                self._moved_since_s = now_s
            if now_s - self._moved_since_s >= PUBLISH_HOLD_S:
                return self._publish(current, now_s)
        else:
            self._moved_since_s = None
        if now_s - self._published_at_s >= PUBLISH_MAX_AGE_S:
            held = current if self._moved_since_s is None else {**old, "samples": current["samples"]}
            self._published, self._published_at_s = held, now_s
            return held
        return None

    def _publish(self, current: dict[str, Any], now_s: float) -> dict[str, Any]:
        self._published, self._published_at_s, self._moved_since_s = current, now_s, None
        return current


def _moved(old: float | None, new: float | None) -> bool:
    if old is None or new is None:
        return old is not new
    return abs(new - old) > PUBLISH_CHANGE * max(abs(old), 1e-9)
