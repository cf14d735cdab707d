"""What the members of a tensor-parallel group send each other (spec B19), apart from the
collectives inside a step, whatever library computes it: messages pickled with an HMAC-SHA256
under the group's secret, checked before anything is unpickled (``mac``, ``unpickle``; over a
TCP connection: ``FrameLink``), the split of KV heads between members (``heads_of``,
``join_heads``) and the rendezvous text a leader publishes (``parse_rendezvous``). ``spec``
arguments are a ``backends.group.GroupSpec`` (its ``rank``, ``world`` and ``secret``)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import pickle
import queue
import socket
import threading
import time
from typing import Any

import numpy as np

from mesh.errors import BackendError
from mesh.wire import DTYPES, WireTensor

MAX_MESSAGE_BYTES = 1 << 30  # a larger size in a command's header is refused before anything is allocated
_ITEM = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}

def mac(spec: Any, data: bytes) -> bytes:
    """The HMAC-SHA256 (RFC 2104) of ``data`` under the group's secret: 32 bytes."""
    return hmac.new(bytes.fromhex(spec.secret), data, hashlib.sha256).digest()


def unpickle(spec: Any, data: bytes, digest: bytes, what: str) -> Any:
    """``data`` unpickled once ``digest`` is its ``mac``; else BackendError naming ``what``."""
    if not hmac.compare_digest(digest, mac(spec, data)):
        raise BackendError(f"{what} failed its authentication (not from this group's members)")
    return pickle.loads(data)


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


# -- messages over a TCP connection between two members (groups whose library has no broadcast
# of bytes: MLX) ----------------------------------------------------------------------------------
BEAT = ("beat",)  # a heartbeat: refreshes ``last_seen``, never reaches ``inbox``


class FrameLink:
    """One member's TCP connection to another member of its group.

    A frame is the length of its bytes (8 bytes, little-endian), the HMAC-SHA256 under the
    group's secret of its sequence number (8 bytes, little-endian) followed by the bytes, then
    the bytes (a pickled message). Each direction numbers its frames from 0, so a frame that
    is replayed, dropped or reordered fails its HMAC like a forged one; a frame that fails, or a
    size beyond ``MAX_MESSAGE_BYTES``, closes the link unread. A reader thread (``start``) takes
    every frame: a heartbeat (``BEAT``) only refreshes ``last_seen`` (``time.monotonic`` seconds);
    any other message goes to ``recv``. ``closed`` says why once the link is over (the peer
    closed it, or sent what failed its check); ``send`` raises OSError then."""

    def __init__(self, sock: Any, spec: Any, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.sock, self.spec, self.peer = sock, spec, peer
        self.last_seen = time.monotonic()
        self.closed: str | None = None
        self._sent = self._taken = 0
        self._lock = threading.Lock()
        self._inbox: queue.Queue[Any] = queue.Queue()

    def start(self) -> FrameLink:
        threading.Thread(target=self._read, name=f"mesh-tp-link-{self.peer}", daemon=True).start()
        return self

    def send(self, message: Any) -> None:
        """Send ``message`` (pickled). Raises OSError when the link is closed or fails."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if self.closed is not None:
                raise OSError(f"the link to {self.peer} is closed: {self.closed}")
            digest = mac(self.spec, self._sent.to_bytes(8, "little") + data)
            self._sent += 1
            self.sock.sendall(len(data).to_bytes(8, "little") + digest + data)

    def recv(self, timeout_s: float, what: str) -> Any:
        """The next message (not a heartbeat). Raises BackendError when the link closed or none
        came within ``timeout_s`` seconds (``what`` names the wait)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._inbox.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.closed is not None:
                    raise BackendError(f"the link to {self.peer} closed while waiting for {what}: {self.closed}") from None
                if time.monotonic() >= deadline:
                    raise BackendError(f"{self.peer} sent no {what} within {timeout_s:g} s") from None

    def close(self, why: str) -> None:
        self.closed = self.closed or why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _exact(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the connection closed")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _read(self) -> None:
        try:
            while True:
                head = self._exact(40)
                size = int.from_bytes(head[:8], "little")
                if size > MAX_MESSAGE_BYTES:
                    raise BackendError(f"a frame of {size} bytes is beyond {MAX_MESSAGE_BYTES}")
                data = self._exact(size)
                if not hmac.compare_digest(head[8:], mac(self.spec, self._taken.to_bytes(8, "little") + data)):
                    raise BackendError("a frame failed its authentication (not this group's member, or out of order)")
                self._taken += 1
                message = pickle.loads(data)
                self.last_seen = time.monotonic()
                if message != BEAT:
                    self._inbox.put(message)
        except (OSError, EOFError, BackendError, pickle.UnpicklingError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
