"""A copy of each request's KV cache on its coordinator, so a failover can resume instead of
re-prefilling (specs/faults.md FO8).

Every stage, after computing a step of a request that asks for it, exports the keys and
values it just appended (``Backend.export_kv``, spec B10) and sends them to the request's
coordinator as a ``kv.replica`` message. The coordinator keeps them here, per layer and
position. When a stage is lost, the new attempt sends each stage of the new plan the KV of
its layers for positions [0, R) (``kv.load``), where R is the longest prefix every layer
holds, and prefills only the tokens from R on. Any missing piece (a lost replica message, a
layer never exported, a budget overflow, a load that fails or is late) falls back to the
re-prefill from position 0 of spec FO3, which gives the same tokens.

Why the coordinator holds the replica: a request dies with its coordinator anyway (the
client's connection is there), so the coordinator is the one neighbour whose failure never
costs a replica that could still have been used.

Wire format (also in specs/backend.md B10): a KV block is one tensor
``[n_layers, 2, kv_heads, n_tokens, head_dim]`` (keys then values per layer, the backend's
compute dtype, little-endian) with the global layer indices in the message body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mesh.errors import BackendError
from mesh.wire import DTYPES, WireTensor

log = logging.getLogger(__name__)

COMPACT_AFTER = 32  # chunks of one layer joined into one array past this count


def pack_kv(layers: list[tuple[int, WireTensor, WireTensor]]) -> tuple[list[int], WireTensor]:
    """``Backend.export_kv`` output as (global layer ids, one ``[L, 2, heads, n, head_dim]``
    tensor). Raises BackendError when the layers' shapes or dtypes differ, or none is given."""
    if not layers:
        raise BackendError("no layers to pack")
    first = layers[0][1]
    parts = []
    for g, keys, values in layers:
        for t in (keys, values):
            if t.dtype != first.dtype or t.shape != first.shape or len(t.shape) != 4 or t.shape[0] != 1:
                raise BackendError(f"layer {g}: KV {t.dtype}{list(t.shape)} does not match "
                                   f"{first.dtype}{list(first.shape)} [1, heads, n, head_dim]")
            parts.append(t.data)
    _, heads, n, dim = first.shape
    return [g for g, _, _ in layers], WireTensor(dtype=first.dtype, shape=(len(layers), 2, heads, n, dim),
                                                 data=b"".join(parts))


def unpack_kv(layer_ids: list[int], tensor: WireTensor) -> list[tuple[int, WireTensor, WireTensor]]:
    """The inverse of ``pack_kv``. Raises BackendError when the ids do not match the tensor."""
    if len(tensor.shape) != 5 or tensor.shape[1] != 2 or tensor.shape[0] != len(layer_ids):
        raise BackendError(f"a KV block of shape {list(tensor.shape)} does not fit {len(layer_ids)} layers "
                           "as [layers, 2, heads, n, head_dim]")
    _, _, heads, n, dim = tensor.shape
    size = heads * n * dim * DTYPES[tensor.dtype][1]
    out = []
    for i, g in enumerate(layer_ids):
        k = tensor.data[(2 * i) * size:(2 * i + 1) * size]
        v = tensor.data[(2 * i + 1) * size:(2 * i + 2) * size]
        shape = (1, heads, n, dim)
        out.append((int(g), WireTensor(dtype=tensor.dtype, shape=shape, data=k),
                    WireTensor(dtype=tensor.dtype, shape=shape, data=v)))
    return out


@dataclass
class _Layer:
    """One layer's replica: chunks of ``[2, heads, n, head_dim x itemsize]`` bytes (uint8) that
    cover positions [0, end) without a gap."""

    dtype: str
    heads: int
    dim: int
    end: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)
    early: dict[int, np.ndarray] = field(default_factory=dict)  # start -> a block that came before its turn

    def joined(self) -> np.ndarray:
        if len(self.chunks) != 1:
            self.chunks = [np.concatenate(self.chunks, axis=2)]
        return self.chunks[0]


class RequestReplica:
    """The replica of one request's KV cache (all layers), fed by ``kv.replica`` messages of
    its current attempt."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.attempt = ""  # the attempt whose chunks are taken
        self.layers: dict[int, _Layer] = {}
        self.nbytes = 0
        self.broken = ""  # why this replica can no longer be used (it stays dropped)

    def restart(self, attempt: str, keep: int) -> None:
        """Take chunks of ``attempt`` only, from position ``keep`` on; drop what lies beyond."""
        self.attempt = attempt
        for g in list(self.layers):
            layer = self.layers[g]
            self.nbytes -= sum(c.nbytes for c in layer.early.values())
            layer.early.clear()
            if keep <= 0 or layer.end < keep:
                self.nbytes -= sum(c.nbytes for c in layer.chunks)
                del self.layers[g]
            elif layer.end > keep:
                self.nbytes -= sum(c.nbytes for c in layer.chunks)
                layer.chunks = [np.ascontiguousarray(layer.joined()[:, :, :keep])]
                layer.end = keep
                self.nbytes += layer.chunks[0].nbytes

    def add(self, layer_ids: list[int], start: int, tensor: WireTensor) -> int:
        """Take one exported block starting at position ``start``; returns the bytes added.
        A block that comes before its turn waits for the ones before it (a lost one leaves a
        gap: the layer's replica stops there, and only a re-prefill fills it); a repeat is
        ignored. Raises BackendError for a malformed block."""
        if len(tensor.shape) != 5 or tensor.shape[1] != 2 or tensor.shape[0] != len(layer_ids):
            raise BackendError(f"a KV block of shape {list(tensor.shape)} does not fit {len(layer_ids)} layers")
        _, _, heads, n, dim = tensor.shape
        itemsize = DTYPES[tensor.dtype][1]
        block = np.frombuffer(tensor.data, dtype=np.uint8).reshape(len(layer_ids), 2, heads, n, dim * itemsize)
        added = 0
        for i, g in enumerate(layer_ids):
            if not 0 <= g < self.num_layers:
                raise BackendError(f"layer {g} is not a layer of the model (0..{self.num_layers - 1})")
            layer = self.layers.get(g)
            if layer is None:
                layer = self.layers[g] = _Layer(dtype=tensor.dtype, heads=heads, dim=dim)
            if (layer.dtype, layer.heads, layer.dim) != (tensor.dtype, heads, dim) or start < layer.end \
                    or start in layer.early:
                continue  # another shape, or a repeat
            chunk = block[i]
            added += chunk.nbytes
            if start > layer.end:  # an earlier step's block is still on its way
                layer.early[start] = chunk
                continue
            layer.chunks.append(chunk)
            layer.end += n
            while layer.end in layer.early:
                follow = layer.early.pop(layer.end)
                layer.chunks.append(follow)
                layer.end += follow.shape[2]
            if len(layer.chunks) > COMPACT_AFTER:
                layer.joined()
        self.nbytes += added
        return added

    def covered(self) -> int:
        """The longest prefix of positions that every layer of the model holds (0 if any layer
        has none, or the replica is broken)."""
        if self.broken or len(self.layers) != self.num_layers:
            return 0
        return min(layer.end for layer in self.layers.values())

    def block(self, layer_start: int, layer_end: int, end: int) -> tuple[list[int], WireTensor]:
        """Layers [layer_start, layer_end) for positions [0, end), packed as ``pack_kv`` does.
        Raises BackendError when a layer does not cover ``end`` positions."""
        ids = list(range(layer_start, layer_end))
        parts = []
        for g in ids:
            layer = self.layers.get(g)
            if layer is None or layer.end < end:
                raise BackendError(f"the replica of layer {g} does not cover {end} positions")
            parts.append(layer.joined()[:, :, :end])
        first = self.layers[ids[0]]
        data = np.ascontiguousarray(np.stack(parts)).tobytes()
        return ids, WireTensor(dtype=first.dtype, shape=(len(ids), 2, first.heads, end, first.dim), data=data)


class ReplicaStore:
    """The replicas of requests this node coordinates, within ``budget_bytes`` in all.

    A chunk that would take the store past its budget breaks that request's replica (it is
    dropped and the request falls back to re-prefill if it fails); ``budget_bytes == 0``
    turns replicas off.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"a replica budget of {budget_bytes} bytes; it must be >= 0")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._by_rid: dict[str, RequestReplica] = {}
        self._by_attempt: dict[str, RequestReplica] = {}

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def open(self, rid: str, num_layers: int) -> RequestReplica | None:
        """Start keeping a replica for request ``rid`` (None when replicas are off)."""
        if not self.enabled:
            return None
        replica = self._by_rid[rid] = RequestReplica(num_layers)
        return replica

    def start_attempt(self, replica: RequestReplica, attempt: str, keep: int) -> None:
        """Chunks of ``attempt`` feed ``replica`` from now on, from position ``keep``."""
        self._by_attempt = {a: r for a, r in self._by_attempt.items() if r is not replica}
        before = replica.nbytes
        replica.restart(attempt, keep)
        self.nbytes += replica.nbytes - before
        if not replica.broken:
            self._by_attempt[attempt] = replica

    def add(self, attempt: str, layer_ids: list[int], start: int, tensor: WireTensor) -> None:
        """Take a ``kv.replica`` block; unknown attempts are dropped, malformed ones logged."""
        replica = self._by_attempt.get(attempt)
        if replica is None:
            return
        if self.nbytes + tensor.nbytes > self.budget_bytes:
            self._break(replica, f"the replica budget of {self.budget_bytes} bytes is full")
            return
        try:
            self.nbytes += replica.add(layer_ids, start, tensor)
        except BackendError as exc:
            self._break(replica, str(exc))

    def close(self, rid: str) -> None:
        """Free request ``rid``'s replica."""
        replica = self._by_rid.pop(rid, None)
        if replica is not None:
            self._by_attempt = {a: r for a, r in self._by_attempt.items() if r is not replica}
            self.nbytes -= replica.nbytes

    def _break(self, replica: RequestReplica, why: str) -> None:
        log.info("dropping a KV replica: %s", why)
        replica.broken = why
        self.nbytes -= replica.nbytes
        replica.layers.clear()
        replica.nbytes = 0
        self._by_attempt = {a: r for a, r in self._by_attempt.items() if r is not replica}
