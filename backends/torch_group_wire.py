"""What the members of a tensor-parallel group send each other (spec B19), apart from the
collectives inside a step: the leader's commands and the members' KV shares (pickled, with an
HMAC-SHA256 under the group's secret, checked before anything is unpickled), the split of KV
heads between members, and the rendezvous text a leader publishes. ``spec`` arguments are a
``backends.torch_group.GroupSpec`` (its ``rank``, ``world`` and ``secret``)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import pickle
from typing import Any

import numpy as np

from mesh.errors import BackendError
from mesh.wire import DTYPES, WireTensor

MAX_MESSAGE_BYTES = 1 << 30  # a larger size in a command's header is refused before anything is allocated
_ITEM = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}

HEADER_BYTES = 4096  # a command that fits (a decode step's) goes to the members in one collective


def broadcast(command: Any, spec: Any, torch: Any, dist: Any) -> Any:
    """The leader's ``command`` on every member: pickled, with its HMAC-SHA256 under the group's
    secret, into a fixed header (its length, the HMAC, then the bytes when they fit), broadcast;
    a larger one (a prompt chunk's hidden states) follows in a second broadcast. Why not
    ``broadcast_object_list``: it always runs two collectives, a decode step pays each one's
    latency, and it unpickles whatever arrives. Raises BackendError when the HMAC does not match
    (gloo's connections are plaintext: bytes from anyone else are never unpickled) or the size
    is beyond ``MAX_MESSAGE_BYTES``."""
    head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    data = b""
    if spec.rank == 0:
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        prefix = len(data).to_bytes(8, "little") + mac(spec, data)
        head[:40] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        if len(data) <= HEADER_BYTES - 40:
            head[40:40 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(head, src=0)
    raw = head.numpy().tobytes()
    size, digest = int.from_bytes(raw[:8], "little"), raw[8:40]
    if size > MAX_MESSAGE_BYTES:
        raise BackendError(f"a group command of {size} bytes is beyond {MAX_MESSAGE_BYTES}")
    if size <= HEADER_BYTES - 40:
        body = raw[40:40 + size]
    else:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if spec.rank == 0 else torch.empty(
            size, dtype=torch.uint8)
        dist.broadcast(buffer, src=0)
        body = buffer.numpy().tobytes()
    return unpickle(spec, body, digest, "the leader's command")


def mac(spec: Any, data: bytes) -> bytes:
    """The HMAC-SHA256 (RFC 2104) of ``data`` under the group's secret: 32 bytes."""
    return hmac.new(bytes.fromhex(spec.secret), data, hashlib.sha256).digest()


def unpickle(spec: Any, data: bytes, digest: bytes, what: str) -> Any:
    """``data`` unpickled once ``digest`` is its ``mac``; else BackendError naming ``what``."""
    if not hmac.compare_digest(digest, mac(spec, data)):
        raise BackendError(f"{what} failed its authentication (not from this group's members)")
    return pickle.loads(data)


def gather(value: Any, spec: Any, torch: Any, dist: Any) -> list[Any]:
    """Every member's ``value`` on every member, in rank order: pickled with its HMAC (as
    ``_broadcast``), sizes gathered, then the bytes (padded to the largest)."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    data = mac(spec, data) + data
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(spec.world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
    longest = max(int(t.item()) for t in sizes)
    if longest > MAX_MESSAGE_BYTES:
        raise BackendError(f"a member's share of {longest} bytes is beyond {MAX_MESSAGE_BYTES}")
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(spec.world)]
    dist.all_gather(parts, mine)
    out = []
    for size, part in zip(sizes, parts, strict=True):
        raw = part[:int(size.item())].numpy().tobytes()
        out.append(unpickle(spec, raw[32:], raw[:32], "a member's KV share"))
    return out


def heads_of(tensor: WireTensor, rank: int, world: int) -> WireTensor:
    """Member ``rank``'s share of a ``[1, heads, n, head_dim]`` KV tensor: heads
    ``[rank * heads / world, (rank + 1) * heads / world)``, the split torch's
    ``ColwiseParallel`` gives the key and value projections."""
    values = _array(tensor)
    share = values.shape[1] // world
    part = np.ascontiguousarray(values[:, rank * share:(rank + 1) * share])
    return WireTensor(dtype=tensor.dtype, shape=part.shape, data=part.tobytes())


def join_heads(parts: list[WireTensor]) -> WireTensor:
    """The members' shares (``heads_of``), in rank order, as one ``[1, heads, n, head_dim]``."""
    whole = np.concatenate([_array(p) for p in parts], axis=1)
    return WireTensor(dtype=parts[0].dtype, shape=whole.shape, data=whole.tobytes())


def _array(tensor: WireTensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=_ITEM[DTYPES[tensor.dtype][1]]).reshape(tensor.shape)


# -- the node's side ------------------------------------------------------------------------
def parse_rendezvous(text: str) -> tuple[str, int, str] | None:
    """``host:port/secret`` of a leader's status record as (IP address, port, hex secret), or
    None when malformed (a peer's record is never trusted to be well formed)."""
    where, _, secret = text.partition("/")
    host, _, port = where.rpartition(":")
    try:
        address = str(ipaddress.ip_address(host.strip("[]")))
        number = int(port)
        bytes.fromhex(secret)
    except ValueError:
        return None
    if not 0 < number < 65536 or len(secret) < 32:
        return None
    return address, number, secret
