"""A tensor-parallel torch stage run by a group of member processes (spec B19), on
``torch.distributed`` (gloo on a CPU); what every group shares is ``backends.group``'s.

Each member process (``GroupMember``, running ``_member_main``) loads the stage from its own
copy of the model, joins the group's gloo group (``backends.torch_tp``) and splits the stage
with torch's tensor parallelism. The leader's process broadcasts each of its node's calls to
the other members (``broadcast``: one collective when it fits a header) and every member runs
it on its slice.

What bounds every wait: each collective times out after ``timeout_s`` (gloo's own timeout);
while idle the leader broadcasts a ping every ``timeout_s / 3``, so a member whose leader is
gone or frozen fails its wait within ``timeout_s`` and exits, and the leader finds a member
gone at its next ping or step; a member whose parent (its node) is gone exits at once.

Rendezvous: the leader listens on ``address`` (a port the system picks), on that address only
(torch's ``TCPStore`` on a socket mesh binds, ``master_listen_fd``), and gloo's own
connections use the interface holding ``address`` (``GLOO_SOCKET_IFNAME``); the node publishes
the port to the other members over the authenticated mesh link (specs/security.md).
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import threading
import time
from typing import Any

from backends.group import (  # noqa: F401  (this module's surface: the torch group and what it shares)
    FAILED_EXIT,
    GroupBackend,
    GroupSpec,
    exit_with_parent,
    interface_of,
    run_command,
    send_quiet,
)
from backends.group import GroupMember as _Member
from backends.group_wire import MAX_MESSAGE_BYTES, heads_of, join_heads, mac, parse_rendezvous, unpickle  # noqa: F401
from backends.torch_tp import COLLECTIVE_FAILURES, COLLECTIVE_TIME
from mesh.errors import BackendError
from mesh.models import Model


# -- one member's process -----------------------------------------------------------------
def _member_main(conn: Any, spec: GroupSpec, model_ref: Any, layer_start: int, layer_end: int, dtype: str) -> None:
    """The member process: load, rendezvous, split, then run what the leader broadcasts until
    told to stop; reports ``("port", n)`` (leader), ``("ready", n_split)`` or ``("error", text)``
    on ``conn``, then (leader) one answer per command."""
    listener = None
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        ifname = interface_of(spec.bind or spec.address)
        if ifname is None:  # else gloo would pick an interface of its own choosing
            raise BackendError(f"no network interface of this machine holds {spec.bind or spec.address}")
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        if spec.rank == 0:
            listener = socket.create_server((spec.address, spec.port), backlog=64)
            conn.send(("port", listener.getsockname()[1]))
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        from backends.torch import TorchBackend
        from backends.torch_tp import join_group, shard_stage

        backend = TorchBackend(device="cpu", dtype=dtype, quantize="none")
        backend.load(Model(model_ref), layer_start, layer_end)
        store = _rendezvous(spec, listener)
        mesh = join_group(spec.rank, spec.world, spec.address, spec.port, timeout_s=spec.timeout_s, store=store)
        split = shard_stage(backend, mesh)
        _barrier(store, "split", spec)  # the first broadcast's timeout starts when every member is split
    except Exception as exc:  # noqa: BLE001 - whatever failed is the node's to report
        send_quiet(conn, ("error", f"{type(exc).__name__}: {exc}"))
        return
    send_quiet(conn, ("ready", split))
    code = 0
    try:
        _serve(conn, spec, backend, torch)
    except Exception as exc:  # noqa: BLE001 - a collective failed or timed out: the group is over
        send_quiet(conn, ("fatal", f"{type(exc).__name__}: {exc}"))
        code = FAILED_EXIT
    finally:
        os._exit(code)  # never wait on gloo's teardown: a peer may be gone


def _rendezvous(spec: GroupSpec, listener: socket.socket | None) -> Any:
    """torch's TCPStore (the leader's on ``listener``), once every member has loaded: each
    adds one to ``loaded``, the last one sets ``go``, all wait for it (``load_timeout_s``)."""
    import torch.distributed as dist

    wait = datetime.timedelta(seconds=spec.load_timeout_s)
    if listener is not None:
        store = dist.TCPStore(spec.address, listener.getsockname()[1], spec.world, is_master=True, timeout=wait,
                              wait_for_workers=False, master_listen_fd=listener.fileno())
    else:
        store = dist.TCPStore(spec.address, spec.port, spec.world, is_master=False, timeout=wait)
    _barrier(store, "loaded", spec)
    return store


def _barrier(store: Any, name: str, spec: GroupSpec) -> None:
    """Every member reaches ``name``: each adds one, the last one sets ``name``-go, all wait for
    it (``load_timeout_s``: members load and split at their own speed)."""
    if store.add(name, 1) == spec.world:
        store.set(f"{name}-go", "1")
    store.wait([f"{name}-go"], datetime.timedelta(seconds=spec.load_timeout_s))


def _serve(conn: Any, spec: GroupSpec, backend: Any, torch: Any) -> None:
    import torch.distributed as dist

    caches: dict[int, Any] = {}
    ping_s = spec.timeout_s / 3
    while True:
        command: Any = None
        if spec.rank == 0:
            try:
                command = conn.recv() if conn.poll(ping_s) else ("ping",)
            except (EOFError, OSError):
                command = ("stop",)  # the node is gone: stop the others too
        command = broadcast(command, spec, torch, dist)
        if command[0] == "stop":
            return
        if command[0] == "ping":
            continue
        for cid in command[1]:  # caches the node dropped since the last command
            caches.pop(cid, None)
        with torch.inference_mode():
            answer = _run(command, caches, backend, spec, dist)
        if spec.rank == 0:
            conn.send(("ok", answer))


def _run(command: tuple[Any, ...], caches: dict[int, Any], backend: Any, spec: GroupSpec, dist: Any) -> Any:
    import torch

    if command[0] == "probe":  # the group's own all-reduce, timed (the cost model's all-reduce term, spec P10)
        _, _, width, count = command
        in_steps = COLLECTIVE_TIME[0] / COLLECTIVE_TIME[1] if COLLECTIVE_TIME[1] else None
        COLLECTIVE_TIME[:] = [0.0, 0]
        values = torch_zeros(width, backend)
        times = []
        for i in range(count + 3):
            started = time.perf_counter()
            dist.all_reduce(values)
            if i >= 3:  # the first ones pay for buffers and connections
                times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2], in_steps
    return run_command(command, caches, backend, spec, lambda mine: gather(mine, spec, torch, dist), COLLECTIVE_FAILURES)


def torch_zeros(width: int, backend: Any) -> Any:
    """A ``[1, width]`` tensor of zeros in the stage's compute dtype (one token's hidden state)."""
    import torch

    return torch.zeros((1, width), dtype=backend.dtype)



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


class GroupMember(_Member):
    """A torch group member's process (``_member_main``); see ``backends.group.GroupMember``."""

    main = staticmethod(_member_main)


class TorchGroupBackend(GroupBackend):
    """A stage computed by a torch tensor-parallel group (spec B19), driven from the leader's
    node: ``backends.group.GroupBackend`` over torch members (``GroupMember``)."""

    name = "torch-tp"
    member = GroupMember
