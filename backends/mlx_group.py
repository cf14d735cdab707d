"""A tensor-parallel MLX stage run by a group of member processes (spec B19), on
``mlx.distributed``'s ring backend; what every group shares is ``backends.group``'s.

Each member process (``MlxGroupMember``, running ``_member_main``) loads the stage with the MLX
backend (``MlxBackend``: mlx-lm's classes) from its own copy of the model, meets the others,
joins MLX's ring (``mx.distributed.init(backend="ring")``) and splits the stage with mlx-lm's
own ``Model.shard(group)`` (attention heads and MLP columns, or experts, with the all-sums the
split needs; quantized layers split as they are). MLX's ring carries only the collectives
inside a step: it has no broadcast of bytes and no timeout, so the members also hold a TCP
connection to the leader (``group_wire.FrameLink``: the leader's commands, the KV shares,
heartbeats; each frame with an HMAC under the group's secret).

Rendezvous: the leader listens on ``address`` (a port the system picks) on that address only;
each member connects there once it has loaded and says its rank and the address and port its
ring will listen on (its own ``bind`` address); when every member has come the leader sends
everyone the ring's host list (what MLX reads from ``MLX_HOSTFILE``), each member joins the
ring (MLX's listener binds that address only), splits its stage and says so; the leader then
reports the group ready. A ring port is one the system gave a probe socket, closed before MLX
binds it (MLX takes no listening socket), so another program could take it in between: the
member then fails to join and the group forms anew.

What bounds every wait, MLX's collectives having no timeout of their own: from the moment a
member's link to the leader exists, both ends send a heartbeat every ``timeout_s / 6`` from a
thread of their own (MLX releases the interpreter while it computes) and end their process
when a link closes or has been silent for ``timeout_s`` (``_supervise``): a member that dies
closes its link (found at once), one that froze or lost its link goes silent (found within
``timeout_s``); a member that loses its leader ends, and the leader's node finds the leader's
process ended (``StageFailed``), so no process is left inside a collective. A peer lost inside
a ring collective also makes MLX raise in that step. The loading before the link exists is
bounded by ``load_timeout_s``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from typing import Any

from backends.group import (
    FAILED_EXIT,
    GroupBackend,
    GroupMember,
    GroupSpec,
    exit_with_parent,
    interface_of,
    run_command,
    send_quiet,
)
from backends.group_wire import BEAT, FrameLink
from mesh.errors import BackendError
from mesh.models import Model

STEP_WAIT_S = 300.0  # the longest a leader waits for a member's KV share (the node's own step bound)
STOP_WAIT_S = 0.5  # a stopping leader waits this long for its members to end (within GroupMember.stop's 1 s)
COLLECTIVE_TIME = [0.0, 0]  # seconds this member's steps spent in all-sums (waiting included), and how many


def _timed(all_sum: Any) -> Any:
    """``all_sum`` timed into ``COLLECTIVE_TIME``: the member's own share is evaluated first, so
    the time is the collective's, waiting for the slowest member included (the cost model's
    all-reduce term as the steps run it, spec P10). MLX evaluates lazily: without this the
    collectives' time cannot be told apart from the step's."""
    def timed_all_sum(x: Any, *args: Any, **kwargs: Any) -> Any:
        import mlx.core as mx

        mx.eval(x)
        started = time.perf_counter()
        out = all_sum(x, *args, **kwargs)
        mx.eval(out)
        COLLECTIVE_TIME[0] += time.perf_counter() - started
        COLLECTIVE_TIME[1] += 1
        return out
    return timed_all_sum


def _member_main(conn: Any, spec: GroupSpec, model_ref: Any, layer_start: int, layer_end: int, dtype: str) -> None:
    """The member process: load, meet, join the ring, split, then run the leader's commands until
    told to stop; reports ``("port", n)`` (leader), ``("ready", n_split)`` or ``("error", text)``
    on ``conn``, then (leader) one answer per command."""
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        bind = spec.bind or spec.address
        if interface_of(bind) is None:
            raise BackendError(f"no network interface of this machine holds {bind}")
        listener = None
        if spec.rank == 0:
            listener = socket.create_server((spec.address, spec.port), backlog=spec.world)
            send_quiet(conn, ("port", listener.getsockname()[1]))
        from backends.mlx import MlxBackend

        backend = MlxBackend(device=spec.device, dtype=dtype)
        backend.load(Model(model_ref), layer_start, layer_end)
        ring = f"{_bracket(bind)}:{_free_port(bind)}"
        links, rings = _meet(spec, listener, ring)
        _supervise(conn, links, spec.timeout_s)
        hosts = _hosts(spec, links, [ring, *rings])
        group = _join_ring(spec, hosts)
        split = _shard(backend, group)
        _barrier(spec, links, "split")
    except Exception as exc:  # noqa: BLE001 - whatever failed is the node's to report
        send_quiet(conn, ("error", f"{type(exc).__name__}: {exc}"))
        os._exit(FAILED_EXIT)  # never wait on MLX's ring teardown: a peer may be gone
    send_quiet(conn, ("ready", split))
    code = 0
    try:
        _serve(conn, spec, backend, links, group)
    except Exception as exc:  # noqa: BLE001 - a collective or a link failed: the group is over
        send_quiet(conn, ("fatal", f"{type(exc).__name__}: {exc}"))
        code = FAILED_EXIT
    os._exit(code)


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _free_port(address: str) -> int:
    """A port the system gives a probe socket on ``address`` (closed again: MLX binds it)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _meet(spec: GroupSpec, listener: socket.socket | None, ring: str) -> tuple[dict[int, FrameLink], list[str]]:
    """The links to the other members by rank (a member: its leader's only) and, on the leader,
    the ring addresses the members said, in rank order from 1. The leader accepts
    connections until every member said a well-formed hello (others are closed unread: their
    frames fail the HMAC); each member connects to the leader and says ``("hello", rank,
    ring)``. Bounded by ``load_timeout_s``."""
    deadline = time.monotonic() + spec.load_timeout_s
    if listener is None:
        sock = socket.create_connection((spec.address, spec.port), timeout=spec.load_timeout_s)
        link = FrameLink(sock, spec, "the group's leader").start()
        link.send(("hello", spec.rank, ring))
        return {0: link}, []
    links: dict[int, FrameLink] = {}
    rings: dict[int, str] = {}
    while len(links) < spec.world - 1:
        listener.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            raise BackendError(f"{spec.world - 1 - len(links)} members did not join within "
                               f"{spec.load_timeout_s:g} s") from None
        link = FrameLink(sock, spec, "a member").start()
        try:
            hello = link.recv(max(0.01, min(10.0, deadline - time.monotonic())), "hello")
            kind, rank, where = hello
            if kind != "hello" or not isinstance(rank, int) or not 0 < rank < spec.world or rank in links:
                raise BackendError(f"a malformed hello {hello!r:.80}")
        except (BackendError, TypeError, ValueError):
            link.close("no well-formed hello")
            continue
        link.peer, links[rank], rings[rank] = f"member {rank}", link, str(where)
    listener.close()  # the group is complete: nothing else may join
    return links, [rings[r] for r in range(1, spec.world)]


def _hosts(spec: GroupSpec, links: dict[int, FrameLink], rings: list[str]) -> list[str]:
    """The ring's ``host:port`` per rank: the leader's list (``rings``), sent to every member."""
    if spec.rank:
        kind, hosts = links[0].recv(spec.load_timeout_s, "the ring's hosts")
        if kind != "ring" or len(hosts) != spec.world:
            raise BackendError("the leader sent no ring host list for this group")
        return list(hosts)
    hosts = rings
    for link in links.values():
        link.send(("ring", hosts))
    return hosts


def _join_ring(spec: GroupSpec, hosts: list[str]) -> Any:
    """MLX's ring group of ``hosts`` as rank ``spec.rank`` (MLX reads ``MLX_RANK`` and the
    ``MLX_HOSTFILE`` JSON: one list of addresses per rank)."""
    import mlx.core as mx

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mesh-ring-", delete=False) as hostfile:
        json.dump([[h] for h in hosts], hostfile)
    os.environ["MLX_RANK"], os.environ["MLX_HOSTFILE"] = str(spec.rank), hostfile.name
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    finally:
        os.unlink(hostfile.name)
    if group.size() != spec.world or group.rank() != spec.rank:
        raise BackendError(f"MLX's ring made member {group.rank()} of {group.size()}, not {spec.rank} of {spec.world}")
    return group


def _shard(backend: Any, group: Any) -> int:
    """Split the loaded stage across ``group`` with mlx-lm's ``Model.shard``; the number of
    linear modules split. Raises BackendError for a model class mlx-lm cannot shard."""
    import mlx.core as mx

    stage = backend._model
    if not hasattr(stage, "shard"):
        raise BackendError(f"mlx-lm's {type(stage).__module__} model has no tensor-parallel split (Model.shard)")
    with backend._lock:
        stage.shard(group)
        mx.eval(stage.parameters())
    # mlx.nn's sharded linears call mx.distributed.all_sum at each step: timed from here on
    mx.distributed.all_sum = _timed(mx.distributed.all_sum)
    return sum(1 for m in stage.modules() if "Sharded" in type(m).__name__)  # mlx.nn's *Sharded*Linear


def _barrier(spec: GroupSpec, links: dict[int, FrameLink], name: str) -> None:
    """Every member has reached ``name``: members tell the leader, the leader answers ``go``."""
    if spec.rank:
        links[0].send((name,))
        if links[0].recv(spec.load_timeout_s, f"the leader's go after {name}") != ("go",):
            raise BackendError(f"the leader did not say go after {name}")
        return
    for rank, link in links.items():
        if link.recv(spec.load_timeout_s, name) != (name,):
            raise BackendError(f"member {rank} did not reach {name}")
    for link in links.values():
        link.send(("go",))


def _supervise(conn: Any, links: dict[int, FrameLink], timeout_s: float) -> None:
    """Start the threads that send a heartbeat on every link each ``timeout_s / 6`` (one per
    link: a send to a frozen peer may block) and the one that ends the process (exit code 3,
    saying why to the node) once a link closed or was silent for ``timeout_s``."""
    for link in links.values():
        threading.Thread(target=_beat, args=(link, timeout_s / 6), daemon=True).start()
    threading.Thread(target=_watch, args=(conn, links, timeout_s), daemon=True).start()


def _beat(link: FrameLink, every_s: float) -> None:
    while link.closed is None:
        try:
            link.send(BEAT)
        except OSError:
            return
        time.sleep(every_s)


def _watch(conn: Any, links: dict[int, FrameLink], timeout_s: float) -> None:
    while True:
        now = time.monotonic()
        for link in links.values():
            silent = now - link.last_seen
            why = link.closed or (f"silent for {silent:.1f} s" if silent > timeout_s else None)
            if why is not None:
                send_quiet(conn, ("fatal", f"the link to {link.peer} failed: {why}"))
                os._exit(FAILED_EXIT)
        time.sleep(min(0.2, timeout_s / 6))


def _serve(conn: Any, spec: GroupSpec, backend: Any, links: dict[int, FrameLink], group: Any) -> None:
    caches: dict[int, Any] = {}
    while True:
        if spec.rank == 0:
            try:
                if not conn.poll(1.0):
                    continue
                command = conn.recv()
            except (EOFError, OSError):
                command = ("stop",)  # the node is gone: stop the others too
            for link in links.values():
                link.send(command)
        else:
            command = links[0].recv(float("inf"), "a command")
        if command[0] == "stop":
            if spec.rank == 0:  # the members end first (exit 0): were the leader's links to close
                _closed(links, STOP_WAIT_S)  # before they read "stop", their watchdog would call it a failure
            return
        for cid in command[1]:  # caches the node dropped since the last command
            caches.pop(cid, None)
        answer = _run(command, caches, backend, spec, links, group)
        if spec.rank == 0:
            send_quiet(conn, ("ok", answer))


def _closed(links: dict[int, FrameLink], within_s: float) -> None:
    """Wait until every link has closed, at most ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while any(link.closed is None for link in links.values()) and time.monotonic() < deadline:
        time.sleep(0.01)


def _run(command: tuple[Any, ...], caches: dict[int, Any], backend: Any, spec: GroupSpec,
         links: dict[int, FrameLink], group: Any) -> Any:
    if command[0] == "probe":  # the group's own all-sum, timed (the cost model's all-reduce term, spec P10)
        import mlx.core as mx

        _, _, width, count = command
        in_steps = COLLECTIVE_TIME[0] / COLLECTIVE_TIME[1] if COLLECTIVE_TIME[1] else None
        values = mx.zeros((1, width), dtype=backend.dtype)
        times = []
        for i in range(count + 3):
            started = time.perf_counter()
            mx.eval(mx.distributed.all_sum(values, group=group))
            if i >= 3:  # the first ones pay for buffers
                times.append(time.perf_counter() - started)
        COLLECTIVE_TIME[:] = [0.0, 0]  # the probe's own are not the steps'
        return sorted(times)[len(times) // 2], in_steps

    def gather(mine: Any) -> list[Any] | None:
        if spec.rank:
            links[0].send(("share", mine))
            return None
        shares = [mine]
        for rank in range(1, spec.world):
            kind, share = links[rank].recv(STEP_WAIT_S, "its KV share")
            shares.append(share)
        return shares

    return run_command(command, caches, backend, spec, gather)


class MlxGroupMember(GroupMember):
    """An MLX group member's process (``_member_main``); see ``backends.group.GroupMember``."""

    main = staticmethod(_member_main)


class MlxGroupBackend(GroupBackend):
    """A stage computed by an MLX tensor-parallel group (spec B19), driven from the leader's
    node: ``backends.group.GroupBackend`` over MLX members (``MlxGroupMember``)."""

    name = "mlx-tp"
    member = MlxGroupMember
