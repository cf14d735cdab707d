"""Simulated time of a training run on modelled devices and links (computed, never slept).

The cluster is a placement ``Topology`` (``python -m mesh plan``'s topology files, or a live
cluster's measured profiles): node i runs on the i-th device. Each node has a clock:

- a local step adds ``flops / (device FLOP/s x mfu)`` seconds, the FLOPs of the step's tokens
  (``mesh.gym.model.train_flops_per_token``; ``mfu``: the share of its matmul rate a device
  reaches in training, 0.5 by default, as large-model training reports 40-60 %);
- a sync starts when the slowest live node gets there (the others wait: ``waited_s``) and takes
  the collective's time over a ring of the live nodes in node order, bounded by the ring's
  slowest link (its lowest bandwidth and highest latency): all-reduce 2 (k-1)/k B / bw +
  2 (k-1) lat, all-gather (k-1) B / bw + (k-1) lat for a payload of B bytes per node (Patarasuk
  & Yuan 2009; the same formula as the placement cost model's ``allreduce_s``); every live
  clock then reads the sync's end.
- Bytes on the wire per node: all-reduce 2 (k-1)/k B, all-gather (k-1) B.

A node that rejoins takes the parameters and state from a live node: its clock becomes the
donor's plus the transfer of ``state_bytes`` over their link. Errors: ``ConfigError`` when the
topology has fewer devices than nodes or two ring neighbours have no link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import ConfigError
from mesh.placement.costmodel import Topology, allreduce_s

MFU = 0.5


@dataclass(frozen=True, slots=True)
class SyncCost:
    seconds: float
    wire_bytes_per_node: float


class SimClock:
    """Clocks of ``nodes`` nodes on the first ``nodes`` devices of ``topology``."""

    def __init__(self, topology: Topology, nodes: int, *, mfu: float = MFU) -> None:
        if len(topology.devices) < nodes:
            raise ConfigError(f"--nodes {nodes}: the topology has {len(topology.devices)} devices")
        if not 0 < mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
        self.topology, self.mfu = topology, mfu
        self.devices = [d.id for d in topology.devices[:nodes]]
        self.clock = [0.0] * nodes
        self.waited_s = [0.0] * nodes
        self.comm_s = 0.0
        for a, b in zip(self.devices, self.devices[1:] + self.devices[:1]):
            if a != b and topology.link(a, b) is None:
                raise ConfigError(f"topology: devices {a} and {b} are ring neighbours but have no link")
        for device in (topology.device(i) for i in self.devices):
            if not device.flops > 0:
                raise ConfigError(f"topology: device {device.id} has no FLOP/s")

    def compute(self, node: int, flops: float) -> None:
        self.clock[node] += flops / (self.topology.device(self.devices[node]).flops * self.mfu)

    def ring(self, live: list[int]) -> tuple[float, float]:
        """(slowest bandwidth bytes/s, highest latency s) of the ring over ``live`` nodes."""
        if len(live) < 2:
            return math.inf, 0.0
        ids = [self.devices[i] for i in live]
        links = [self.topology.link(a, b) for a, b in zip(ids, ids[1:] + ids[:1])]
        if any(link is None or not link.bandwidth_bytes_per_s > 0 for link in links):
            raise ConfigError(f"topology: the ring of nodes {live} crosses a missing link or one without bandwidth")
        return (min(link.bandwidth_bytes_per_s for link in links if link is not None),
                max(link.latency_s for link in links if link is not None))

    def cost(self, collective: str, nbytes: float, live: list[int]) -> SyncCost:
        """Time and wire bytes per node of a ``collective`` of ``nbytes`` per node."""
        k = len(live)
        if k < 2:
            return SyncCost(0.0, 0.0)
        bandwidth, latency = self.ring(live)
        if collective == "all-reduce":
            return SyncCost(allreduce_s(k, nbytes, bandwidth, latency), 2 * (k - 1) / k * nbytes)
        return SyncCost((k - 1) * nbytes / bandwidth + (k - 1) * latency, (k - 1) * nbytes)

    def sync(self, collective: str, nbytes: float, live: list[int]) -> SyncCost:
        """Advance the live clocks through a sync; returns its cost."""
        start = max(self.clock[i] for i in live)
        for i in live:
            self.waited_s[i] += start - self.clock[i]
        cost = self.cost(collective, nbytes, live)
        self.comm_s += cost.seconds
        for i in live:
            self.clock[i] = start + cost.seconds
        return cost

    def rejoin(self, node: int, donor: int, nbytes: float) -> float:
        """The node's clock after taking ``nbytes`` of state from ``donor``; returns the
        transfer's seconds."""
        seconds = self.topology.transfer_s(self.devices[donor], self.devices[node], nbytes)
        if math.isinf(seconds):
            raise ConfigError(f"topology: devices {self.devices[donor]} and {self.devices[node]} have no link "
                              "for a rejoining node's state")
        self.clock[node] = max(self.clock[node], self.clock[donor]) + seconds
        return seconds

    def now(self, live: list[int]) -> float:
        return max(self.clock[i] for i in live) if live else max(self.clock)
