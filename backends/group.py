"""A tensor-parallel stage run by a group of member processes (spec B19), whatever library
computes it: what the torch groups (``backends.torch_group``: gloo / NCCL) and the MLX groups
(``backends.mlx_group``: MLX's ring) share.

Each member of a group is a process of its own (``GroupMember``), started by the node that
takes that place in the plan: it loads the stage from its own copy of the model, meets the
other members, splits the stage with its library's own tensor parallelism and then runs what
the leader sends it. Member 0, the group's leader, is driven by its node through a
``GroupBackend``, an ordinary ``Backend``: each call goes to the leader process over a pipe,
the leader hands it to the other members and every member runs it on its slice, so the
members run the same steps in the same order, which the collectives need. Why processes and
not threads of the node: a library holds one default group per process, and a member stuck in
a collective can then be killed without the node.

The node waits for each answer at most ``step_timeout_s``. A group that failed once stays
failed (``GroupBackend.failure``): every later call raises ``StageFailed``, and its processes
are killed; the node replaces the stage (a new plan, a new group, spec N26). A member whose
parent (its node) is gone exits within 0.2 s (``exit_with_parent``).

KV caches: each member holds its share of every layer's KV heads. ``export_kv`` gathers the
shares into whole ``[1, kv_heads, n, head_dim]`` tensors (``group_wire.join_heads``), so a
replica or a move holds what a single-device stage holds; ``import_kv`` gives each member its
share (``group_wire.heads_of``).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from backends.base import Backend, BatchItem, StepOutput, check_range
from backends.group_wire import heads_of, join_heads
from mesh.errors import BackendError, StageFailed
from mesh.models import Model
from mesh.wire import WireTensor

FAILED_EXIT = 3  # a member's exit code when its group failed (0: the leader told it to stop)
PORT_WAIT_S = 60.0  # a member process starts and reports its port (a spawned interpreter imports its library)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """One member's place in a group: ``rank`` of ``world`` members, the leader's rendezvous
    ``address`` (an IP address of a trusted link, spec B19) and ``port`` (0 for the leader: the
    system picks it), ``timeout_s`` bounding every collective (seconds), ``load_timeout_s``
    bounding the load and the wait for every member to have loaded, ``threads``: torch's
    intra-op threads in the member's process (None: torch's default; MLX has no such setting),
    ``bind``: this member's own address on the group's link (default ``address``), ``secret``:
    the hex key (16 bytes or more) authenticating the members' messages (HMAC), and ``device``:
    the member's compute device for backends that choose one (MLX: ``cpu`` or ``gpu``; None:
    the library's default). Raises BackendError for a place that is not one."""

    rank: int
    world: int
    address: str
    port: int = 0
    timeout_s: float = 10.0
    load_timeout_s: float = 600.0
    threads: int | None = None
    bind: str = ""
    secret: str = ""
    device: str | None = None

    def __post_init__(self) -> None:
        if self.world < 2 or not 0 <= self.rank < self.world:
            raise BackendError(f"member {self.rank} of a group of {self.world}: need 2 or more members, 0 <= rank < world")
        if self.timeout_s <= 0 or self.load_timeout_s <= 0:
            raise BackendError("a group's timeouts must be positive seconds")
        try:
            key = bytes.fromhex(self.secret)
        except ValueError:
            key = b""
        if len(key) < 16:
            raise BackendError("a group needs a secret of at least 16 bytes, in hex (secrets.token_hex(16))")


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface holding IP ``address`` (psutil), or None;
    gloo's connections then use that interface only (``GLOO_SOCKET_IFNAME``)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == address for a in addrs):
            return name
    return None


def exit_with_parent(parent: int) -> None:
    """A member ends when its node does, loading or serving: the node's process is gone once
    this one has another parent (polled every 0.2 s). Run it on a daemon thread."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(FAILED_EXIT)


_SENDING = threading.Lock()  # a member's pipe to its node is written from more than one thread


def send_quiet(conn: Any, message: Any) -> None:
    """``message`` to the node on ``conn``, unless the node is gone (the process ends anyway)."""
    try:
        with _SENDING:
            conn.send(message)
    except (OSError, ValueError):
        pass


def run_command(command: tuple[Any, ...], caches: dict[int, Any], backend: Any, spec: GroupSpec,
                gather: Callable[[Any], list[Any] | None], failures: list[BaseException] | None = None) -> Any:
    """Run the leader's ``batch``, ``export`` or ``import`` command on this member's ``backend``
    (a single-device backend whose stage is split), ``caches`` mapping the group's cache ids to
    this member's caches. ``gather(value)`` collects every member's value in rank order on the
    leader (None elsewhere); ``failures``: collectives that failed inside a step (they fail the
    group, never one request). Returns the leader's answer. Raises whatever fails the group."""
    kind = command[0]
    if kind == "batch":
        items = []
        for cid, start_pos, token_ids, hidden in command[2]:
            cache = caches.get(cid)
            if cache is None:
                cache = caches[cid] = backend.new_cache()
            items.append(BatchItem(cache=cache, start_pos=start_pos, token_ids=token_ids, hidden=hidden))
        out = backend.forward_batch(items)
        if failures:  # the step's error is the group's: never answer as if one request failed
            raise failures[0]
        failed = next((o for o in out if isinstance(o, BackendError) and o.__cause__ is not None), None)
        if failed is not None:  # the batched call itself failed here (not a check every member makes
            raise failed  # alike): the others may be inside its collectives, the group cannot go on
        return out
    if kind == "export":
        _, _, cid, start_pos, end_pos = command
        try:
            mine: Any = backend.export_kv(caches[cid], start_pos=start_pos, end_pos=end_pos)
        except (BackendError, KeyError) as exc:
            mine = BackendError(str(exc))
        shares = gather(mine)  # every member takes part, also after an error
        if shares is None:
            return None
        bad = next((s for s in shares if isinstance(s, BackendError)), None)
        if bad is not None:
            return bad
        return [(layer[0], join_heads([s[i][1] for s in shares]), join_heads([s[i][2] for s in shares]))
                for i, layer in enumerate(shares[0])]
    if kind == "import":
        _, _, cid, layers = command
        cache = caches.get(cid)
        if cache is None:
            cache = caches[cid] = backend.new_cache()
        try:
            backend._import_kv(cache, [(g, heads_of(k, spec.rank, spec.world), heads_of(v, spec.rank, spec.world))
                                       for g, k, v in layers])
        except BackendError as exc:
            return exc
        return None
    raise BackendError(f"unknown group command {kind!r}")


class GroupMember:
    """One member's process, started by ``start`` (spawned: a fresh interpreter, never a fork
    of the node's threads), running ``main`` (the library's member process: a module-level
    function of ``(conn, spec, model_ref, layer_start, layer_end, dtype)``). ``ready(timeout_s)``
    waits until it has loaded, joined and split its stage; ``stop()`` ends it (killed when it
    does not end within a second).

    Raises BackendError from ``start`` (the leader's port did not come) and ``ready``."""

    main: ClassVar[Callable[..., None]]

    def __init__(self, spec: GroupSpec, model: Model, layer_start: int, layer_end: int, dtype: str) -> None:
        check_range(layer_start, layer_end, model.num_layers)
        self.spec = spec
        self.port = spec.port
        self.failure: str | None = None
        self._cancelled = threading.Event()
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=type(self).main, args=(child, spec, model.ref, layer_start, layer_end, dtype),
                                   name=f"mesh-tp-{spec.rank}", daemon=True)
        self._child = child

    def start(self) -> int:
        """Start the process; the rendezvous port (the leader waits until its process says)."""
        self.process.start()
        self._child.close()
        if self.spec.rank == 0:
            kind, value = self._recv(PORT_WAIT_S, "report its rendezvous port")
            if kind != "port":
                raise self._fail(f"the group leader's process did not start: {value}")
            self.port = int(value)
        return self.port

    def ready(self, timeout_s: float | None = None) -> int:
        """Wait until the member has loaded and split its stage (every member must have joined);
        the number of modules split. Raises BackendError when it failed, did not come within
        ``timeout_s`` (default: the load timeout) or ``cancel`` was called meanwhile."""
        deadline = time.monotonic() + (timeout_s or self.spec.load_timeout_s + PORT_WAIT_S)
        while not self._cancelled.is_set() and time.monotonic() < deadline:
            try:
                if self.conn.poll(0.2):
                    break
            except (EOFError, OSError):
                break
        if self._cancelled.is_set():
            raise self._fail(f"joining the tensor-parallel group as member {self.spec.rank} was cancelled")
        kind, value = self._recv(max(0.0, deadline - time.monotonic()), "load and join its group")
        if kind != "ready":
            raise self._fail(f"tensor-parallel member {self.spec.rank} of {self.spec.world} failed: {value}")
        return int(value)

    def cancel(self) -> None:
        """Make a ``ready`` under way (on another thread) give up and end the process."""
        self._cancelled.set()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def _recv(self, timeout_s: float, what: str) -> tuple[str, Any]:
        try:
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode
            raise self._fail(f"tensor-parallel member {self.spec.rank} ended (exit code {code})") from None
        raise self._fail(f"tensor-parallel member {self.spec.rank} did not {what} within {timeout_s:g} s")

    def _fail(self, why: str) -> BackendError:
        self.failure = self.failure or why
        self.stop()
        return BackendError(self.failure)

    def stop(self, wait_s: float = 1.0) -> None:
        """End the process: ``stop`` asked of the leader (the others stop with it), else killed."""
        if self.process.pid is None:
            return
        if self.spec.rank == 0 and self.process.is_alive():
            try:
                self.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        self.process.join(wait_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.conn.close()


class _GroupCache:
    """A request's KV cache on the group: an id every member maps to its own share."""

    __slots__ = ("cid", "held", "__weakref__")

    def __init__(self, cid: int) -> None:
        self.cid, self.held = cid, 0


class GroupBackend(Backend):
    """A stage computed by a tensor-parallel group (spec B19), driven from the leader's node;
    ``member`` is the library's ``GroupMember`` class.

    ``group``: member 0's ``GroupSpec``; ``rendezvous(address:port/secret)`` is called (from
    the loading thread) once the leader's process listens, for the node to tell the other
    members; ``step_timeout_s`` bounds each call's answer (a long prefill included). Steps are
    the members' single-device steps, so the checks and errors are theirs; a failure of the
    group itself (a member gone, a collective timed out) makes this and every later call raise
    ``StageFailed`` (a BackendError: the stage is gone, the request fails over), sets
    ``failure`` and calls ``on_failure`` first.
    """

    member: ClassVar[type[GroupMember]]
    logit_tolerance = 1e-3  # the split sums the attention output and MLP in another order

    def __init__(self, *, group: GroupSpec, dtype: str = "f32", rendezvous: Callable[[str], None] | None = None,
                 step_timeout_s: float = 300.0) -> None:
        super().__init__()
        if group.rank != 0:
            raise BackendError("the group's backend runs on its leader, member 0")
        self.group, self.dtype_name = group, dtype
        self.compute_dtype = dtype
        self.rendezvous, self.step_timeout_s = rendezvous, step_timeout_s
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None  # called (from the calling thread) once it fails
        self.modules_split = 0
        self._member: GroupMember | None = None
        self._loading: GroupMember | None = None
        self._cancelled = False
        self._next_cid = 0
        self._dropped: collections.deque[int] = collections.deque()  # appended by finalizers on any thread
        self._call = threading.Lock()  # one command at a time on the pipe

    def load(self, model: Model, layer_start: int, layer_end: int, progress: Any = None) -> None:
        """Start the leader's process and wait until every member has loaded and joined.
        Raises BackendError (a member failed, or did not come within ``load_timeout_s``)."""
        check_range(layer_start, layer_end, model.num_layers)
        member = self._loading = type(self).member(self.group, model, layer_start, layer_end, self.dtype_name)
        if self._cancelled:
            member.cancel()
        port = member.start()
        if self.rendezvous is not None:
            self.rendezvous(f"{self.group.address}:{port}/{self.group.secret}")
        self.modules_split = member.ready()
        self._member = member
        self.num_layers = model.num_layers
        self.set_dimensions(model.config)
        self.layer_start, self.layer_end = layer_start, layer_end

    def check(self) -> str | None:
        """``failure``, also found between steps: the leader's process ended by itself (a member
        gone while idle). None while the group works."""
        member = self._member
        if self.failure is None and member is not None and not member.alive:
            self.failure = (f"the tensor-parallel group failed between steps: its leader's process ended "
                            f"(exit code {member.process.exitcode})")
            member.stop()
        return self.failure

    def cancel(self) -> None:
        """Make a ``load`` under way (on another thread) give up: it raises BackendError and the
        leader's process ends (the others then end by themselves)."""
        self._cancelled = True
        if self._loading is not None:
            self._loading.cancel()

    def new_cache(self) -> Any:
        if not self.loaded:
            raise BackendError("no layers loaded")
        self._next_cid += 1
        cache = _GroupCache(self._next_cid)
        weakref.finalize(cache, self._dropped.append, cache.cid)
        return cache

    def _cached_positions(self, cache: Any) -> int:
        if not isinstance(cache, _GroupCache):
            raise BackendError("not a KV cache of this tensor-parallel stage")
        return cache.held

    def _command(self, kind: str, *args: Any) -> Any:
        with self._call:
            member = self._member
            if self.failure is not None:
                raise StageFailed(self.failure)
            if member is None:
                raise BackendError("no layers loaded")
            dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
            started = time.monotonic()
            try:
                member.conn.send((kind, dropped, *args))
                reply = member._recv(self.step_timeout_s, "answer")
            except (OSError, ValueError) as exc:
                reply = ("fatal", f"the group leader's pipe failed: {exc}")
            except BackendError as exc:
                reply = ("fatal", str(exc))
            if reply[0] != "ok":
                self.failure = f"the tensor-parallel group failed after {time.monotonic() - started:.1f} s: {reply[1]}"
                member.stop()
                if self.on_failure is not None:
                    self.on_failure()  # before the step's error reaches anyone
                raise StageFailed(self.failure)
            return reply[1]

    def _forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                 hidden: WireTensor | None = None) -> StepOutput:
        out = self._forward_batch([BatchItem(cache=cache, start_pos=start_pos, token_ids=token_ids, hidden=hidden)])[0]
        if isinstance(out, BackendError):
            raise out
        return out

    def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        outs = self._command("batch", [(i.cache.cid, i.start_pos, i.token_ids, i.hidden) for i in items])
        failed: set[int] = set()
        for item, out in zip(items, outs, strict=True):
            if isinstance(out, BackendError) or item.cache.cid in failed:
                failed.add(item.cache.cid)
            else:
                item.cache.held = item.start_pos + item.n_positions
        return outs

    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        out = self._command("export", cache.cid, start_pos, end_pos)
        if isinstance(out, BackendError):
            raise out
        return out

    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        if self.kv_heads is not None and self.kv_heads % self.group.world:
            raise BackendError(f"{self.kv_heads} KV heads do not split among {self.group.world} members")
        out = self._command("import", cache.cid, layers)
        if isinstance(out, BackendError):
            raise out
        cache.held += layers[0][1].shape[2] if layers else 0

    def allreduce_s(self, count: int = 50) -> tuple[float, float | None]:
        """(the median seconds of one all-reduce of a token's hidden state, ``[1, hidden_size]``
        in the compute dtype, across the group, over ``count`` run back to back; the mean
        seconds of the collectives the leader's steps ran since the last call, waiting for the
        slowest member included, or None when the library does not say): the collective a
        tensor-parallel layer runs twice per token (spec P10), alone and where the steps run it."""
        alone, in_steps = self._command("probe", int(self.hidden_size or 1), count)
        return float(alone), in_steps

    def _drop_layers(self) -> None:
        if self._member is not None:
            self._member.stop()
            self._member = None
