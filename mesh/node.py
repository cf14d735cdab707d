"""The node: the asyncio shell that wires transport, membership, placement, the stage
worker, the coordinator and the HTTP API together.

Links: every node listens; ``--peer`` addresses are dialled and re-dialled with backoff for
the life of the node; members learned through gossip are dialled once. A link starts with a
hello exchange (identity, model, addresses, memory, status). Any frame counts as a
heartbeat; a link silent for ``dead_after_s`` is closed and, when a member has no link left,
it leaves the membership and the model is placed again. Spec: specs/node.md (N1-N4, N11).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import registry
from mesh.errors import FrameError, MeshError, PeerTimeout, PlacementError, RequestFailed, TransportError
from mesh.identity import load_or_create_node_id, usable_memory_bytes
from mesh.loading import LoadProgress
from mesh.membership import MemberInfo, Membership, MemberStatus
from mesh.models import Model, model_size, resolve_model
from mesh.placement import Capacity, ModelSize, Plan, place_pipeline
from mesh.runtime import Coordinator, StageWorker, Timeouts
from mesh.wire import Message
from transports.base import Connection, Transport, connect_with_backoff

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything ``python -m mesh node`` takes (see ``mesh/cli.py`` for flags and units)."""

    host: str = "127.0.0.1"
    port: int = 7600
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    peers: tuple[str, ...] = ()
    model: str = "smollm2-135m"
    backend: str = "torch"
    transport: str = "tcp"
    data_dir: Path = Path("~/.mesh")
    memory_bytes: int | None = None
    memory_fraction: float = 0.8
    context: int | None = None
    heartbeat_s: float = 1.0
    dead_after_s: float = 5.0
    api_key: str | None = None
    device: str | None = None
    dtype: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); IPv6 hosts may be bracketed. Raises MeshError."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshError(f"address {address!r} is not HOST:PORT with a port in 1..65535")
    return host.strip("[]") or "127.0.0.1", int(port)


class Node:
    """One member of the cluster. ``await Node(config).run()`` serves until stopped."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.expanduser()
        self.member_id = load_or_create_node_id(self.data_dir)
        self.model = Model(resolve_model(config.model))
        self.backend_cls = registry.load("backend", config.backend)
        transport_cls = registry.load("transport", config.transport)
        self.transport: Transport = transport_cls()
        self.links: dict[str, set[Connection]] = {}
        self.plan: Plan | None = None
        self.plan_error = "no placement yet"
        self.size: ModelSize | None = None
        self.membership: Membership | None = None
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-compute")
        self.worker = StageWorker(self, self.compute)
        self.coordinator: Coordinator | None = None
        self._status = MemberStatus()
        self._load_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialing: set[str] = set()
        self.api_port = config.api_port
        self.listen_port = config.port

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Start everything and serve until SIGINT/SIGTERM or ``stop()``."""
        import uvicorn

        from mesh.api import create_app

        cfg = self.config
        log.info("node %s starting: model %s, backend %s", self.member_id, cfg.model, cfg.backend)
        await asyncio.to_thread(lambda: (self.model.config, self.model.tokenizer))
        self.size = await asyncio.to_thread(model_size, self.model)
        self.coordinator = Coordinator(self, self.model, cfg.timeouts)
        listener = await self.transport.listen(cfg.host, cfg.port, self._on_accept)
        self.listen_port = listener.port
        memory = cfg.memory_bytes if cfg.memory_bytes is not None else usable_memory_bytes(cfg.memory_fraction)
        self.membership = Membership(
            MemberInfo(
                member_id=self.member_id,
                address=f"{cfg.host}:{listener.port}",
                api_address=f"{cfg.api_host}:{cfg.api_port}",
                backend=cfg.backend,
                memory_bytes=memory,
            )
        )
        app = create_app(self.coordinator, api_key=cfg.api_key)
        server = uvicorn.Server(
            uvicorn.Config(app, host=cfg.api_host, port=cfg.api_port, log_level="warning",
                           lifespan="off", timeout_graceful_shutdown=2)
        )
        self._install_signal_handlers()
        self._replan()
        loop = asyncio.get_running_loop()
        api_task = loop.create_task(self._serve_api(server), name="api")
        tasks = [api_task, loop.create_task(self._heartbeats(), name="heartbeats"),
                 loop.create_task(self._loader(), name="loader")]
        tasks += [loop.create_task(self._dial_forever(a), name=f"peer {a}") for a in cfg.peers]
        stop_task = loop.create_task(self._stop.wait(), name="stop")
        failed: list[BaseException] = []
        try:
            done, _ = await asyncio.wait([*tasks, stop_task], return_when=asyncio.FIRST_COMPLETED)
            failed = [e for t in done if t is not stop_task and not t.cancelled() and (e := t.exception()) is not None]
        finally:
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(api_task), 5.0)
            except (Exception, asyncio.CancelledError):
                pass
            for task in [*tasks, stop_task, *self._tasks]:
                task.cancel()
            for conns in list(self.links.values()):
                for conn in list(conns):
                    await conn.close()
            await listener.close()
            self.compute.shutdown(wait=False, cancel_futures=True)
            log.info("node %s stopped", self.member_id)
        if failed:
            raise failed[0]

    def stop(self) -> None:
        self._stop.set()

    def _install_signal_handlers(self) -> None:
        # uvicorn swaps in its own handlers while serving and re-raises the signal after it
        # exits; these plain handlers then stop the node.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.stop))

    async def _serve_api(self, server: Any) -> None:
        try:
            await server.serve()
        except (OSError, SystemExit) as exc:
            raise MeshError(f"HTTP API cannot serve on {self.config.api_host}:{self.config.api_port}: {exc}") from exc
        if not server.started:
            raise MeshError(f"HTTP API failed to start on {self.config.api_host}:{self.config.api_port}")
        self.stop()  # the API exits only on a signal: stop the node with it

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s failed: %r", name, t.exception())

        task.add_done_callback(done)

    # -- links -------------------------------------------------------------------------
    def _hello(self) -> Message:
        assert self.membership is not None and self.size is not None
        return Message(
            type="hello",
            body={
                "member": self.membership.me.to_wire(),
                "model": self.model.model_id,
                "num_layers": self.size.num_layers,
                "members": [m.to_wire() for m in self.membership.peers()],
                "status": self._status.to_wire(),
            },
        )

    async def _handshake(self, conn: Connection) -> MemberInfo | None:
        """Exchange hellos; None (link closed) for a peer of another model or ourselves."""
        await conn.send(self._hello(), timeout_s=HANDSHAKE_TIMEOUT_S)
        msg = await conn.recv(timeout_s=HANDSHAKE_TIMEOUT_S)
        if msg.type != "hello":
            raise FrameError(f"expected hello, got {msg.type!r}")
        info = MemberInfo.from_wire(msg.body.get("member") or {})
        if info.member_id == self.member_id:
            log.warning("link to %s reaches this node itself; dropping it", conn.peer)
            await conn.close()
            return None
        if msg.body.get("model") != self.model.model_id:
            log.error("peer %s serves model %r, this node %r; rejecting it",
                      info.member_id, msg.body.get("model"), self.model.model_id)
            await conn.close()
            return None
        host, port = split_address(info.address)
        if host in WILDCARDS:  # the peer listens everywhere: use the address we see it on
            info = MemberInfo(**{**_fields(info), "address": f"{conn.peer.rpartition(':')[0]}:{port}"})
        assert self.membership is not None
        changed = self.membership.upsert(info)
        self.membership.set_status(info.member_id, MemberStatus.from_wire(msg.body.get("status") or {}))
        self.links.setdefault(info.member_id, set()).add(conn)
        log.info("link up: %s at %s (%s)", info.member_id, info.address, conn.peer)
        for record in msg.body.get("members") or []:
            self._maybe_dial(record)
        if changed:
            self._membership_changed()
        return info

    async def _serve_link(self, conn: Connection) -> None:
        info = await self._handshake(conn)
        if info is None:
            return
        try:
            while not conn.closed:
                try:
                    msg = await conn.recv(timeout_s=self.config.dead_after_s)
                except PeerTimeout:
                    log.warning("no heartbeat from %s in %.1f s: declaring the link dead",
                                info.member_id, self.config.dead_after_s)
                    break
                self._dispatch(info.member_id, msg)
        except FrameError as exc:
            log.warning("malformed frame from %s: %s; closing that link", info.member_id, exc)
        except TransportError as exc:
            log.info("link to %s closed: %s", info.member_id, exc)
        finally:
            await conn.close()
            self._link_down(info.member_id, conn)

    async def _on_accept(self, conn: Connection) -> None:
        try:
            await self._serve_link(conn)
        except (MeshError, TimeoutError) as exc:
            log.warning("incoming link from %s failed: %s", conn.peer, exc)
            await conn.close()

    async def _dial_forever(self, address: str) -> None:
        host, port = split_address(address)
        while not self._stop.is_set():
            try:
                conn = await connect_with_backoff(self.transport, host, port, attempt_timeout_s=3.0,
                                                  deadline_s=30.0)
                await self._serve_link(conn)
            except (MeshError, TimeoutError) as exc:
                log.info("peer %s unreachable: %s; retrying", address, exc)
            await asyncio.sleep(1.0)  # a pause between reconnect rounds; each round backs off itself

    def _maybe_dial(self, record: Any) -> None:
        try:
            info = MemberInfo.from_wire(record)
        except FrameError:
            return
        if info.member_id == self.member_id or info.member_id in self.links or info.address in self._dialing:
            return
        host, port = split_address(info.address)
        if host in WILDCARDS:
            return

        async def dial() -> None:
            self._dialing.add(info.address)
            try:
                conn = await self.transport.connect(host, port, timeout_s=HANDSHAKE_TIMEOUT_S)
            except (MeshError, TimeoutError) as exc:
                log.info("cannot reach gossiped member %s at %s: %s", info.member_id, info.address, exc)
                return
            finally:
                self._dialing.discard(info.address)
            await self._on_accept(conn)

        self._spawn(dial(), f"dial {info.address}")

    def _link_down(self, member_id: str, conn: Connection) -> None:
        conns = self.links.get(member_id)
        if conns is None:
            return
        conns.discard(conn)
        if conns:
            return
        del self.links[member_id]
        assert self.membership is not None and self.coordinator is not None
        if self.membership.remove(member_id):
            log.warning("member %s left", member_id)
            self.coordinator.member_lost(member_id)
            self._membership_changed()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            await self._broadcast(Message(type="ping"))

    async def _broadcast(self, msg: Message) -> None:
        async def one(conn: Connection) -> None:
            try:
                await conn.send(msg, timeout_s=self.config.timeouts.send_s)
            except (MeshError, TimeoutError) as exc:
                log.info("send to %s failed: %s; closing the link", conn.peer, exc)
                await conn.close()

        await asyncio.gather(*(one(c) for conns in list(self.links.values()) for c in list(conns)))

    async def send(self, member_id: str, msg: Message) -> None:
        """Send to a member (delivered in-process when it is this node).

        Raises RequestFailed when there is no link, TransportError/PeerTimeout when the send fails.
        """
        if member_id == self.member_id:
            self._dispatch(member_id, msg)
            return
        conns = [c for c in self.links.get(member_id, ()) if not c.closed]
        if not conns:
            raise RequestFailed(f"no link to member {member_id}")
        await conns[0].send(msg, timeout_s=self.config.timeouts.send_s)

    def _dispatch(self, sender: str, msg: Message) -> None:
        assert self.membership is not None and self.coordinator is not None
        kind = msg.type
        if kind == "forward":
            self._spawn(self.worker.on_forward(msg), f"forward {msg.body.get('req')}")
        elif kind in ("token", "error"):
            self.coordinator.deliver(msg)
        elif kind == "release":
            self.worker.release(str(msg.body.get("req", "")))
        elif kind == "status":
            self.membership.set_status(sender, MemberStatus.from_wire(msg.body))
        elif kind == "members":
            for record in msg.body.get("members") or []:
                self._maybe_dial(record)
        elif kind != "ping":
            log.debug("ignoring unknown message type %r from %s", kind, sender)

    # -- placement and loading ---------------------------------------------------------
    def _membership_changed(self) -> None:
        assert self.membership is not None
        self._replan()
        members = [self.membership.me.to_wire()] + [m.to_wire() for m in self.membership.peers()]
        self._spawn(self._broadcast(Message(type="members", body={"members": members})), "gossip")

    def _replan(self) -> None:
        assert self.membership is not None and self.size is not None
        capacities = [Capacity(member_id=m.member_id, usable_bytes=m.memory_bytes) for m in self.membership.members()]
        context = self.config.context or self.model.context_length
        try:
            plan = place_pipeline(capacities, self.size, context_tokens=context)
        except PlacementError as exc:
            self.plan, self.plan_error = None, f"placement failed: {exc}"
            log.error("%s", self.plan_error)
            self._load_wanted.set()
            return
        if self.plan is None or plan.plan_id != self.plan.plan_id:
            self.plan = plan
            log.info("plan %s: %s", plan.plan_id,
                     ", ".join(f"{s.member_id}[{s.layer_start},{s.layer_end})" for s in plan.stages))
            self._load_wanted.set()

    async def _set_status(self, status: MemberStatus) -> None:
        assert self.membership is not None
        self._status = status
        self.membership.set_status(self.member_id, status)
        await self._broadcast(Message(type="status", body=status.to_wire()))

    async def _loader(self) -> None:
        while True:
            await self._load_wanted.wait()
            await asyncio.sleep(0.3)  # let a burst of joins settle before loading
            self._load_wanted.clear()
            plan = self.plan
            stage = plan.stage_of(self.member_id) if plan else None
            plan_id = plan.plan_id if plan else ""
            if stage is None:
                self.worker.swap_backend(None)
                await self._set_status(MemberStatus(plan_id=plan_id, state="idle"))
                continue
            current = self.worker.backend
            if current is not None and (current.layer_start, current.layer_end) == (stage.layer_start, stage.layer_end):
                await self._set_status(MemberStatus(plan_id=plan_id, layer_start=stage.layer_start,
                                                    layer_end=stage.layer_end, state="ready"))
                continue
            await self._set_status(MemberStatus(plan_id=plan_id, layer_start=stage.layer_start,
                                                layer_end=stage.layer_end, state="loading"))
            backend = self.backend_cls(**_backend_options(self.config))
            progress = LoadProgress(f"layers [{stage.layer_start},{stage.layer_end})", tty=sys.stderr.isatty())
            try:
                await asyncio.to_thread(backend.load, self.model, stage.layer_start, stage.layer_end, progress)
            except MeshError as exc:
                log.error("loading layers [%d, %d) failed: %s", stage.layer_start, stage.layer_end, exc)
                await self._set_status(MemberStatus(plan_id=plan_id, layer_start=stage.layer_start,
                                                    layer_end=stage.layer_end, state="failed", error=str(exc)))
                continue
            finally:
                progress.close()
            self.worker.swap_backend(backend)
            await self._set_status(MemberStatus(plan_id=plan_id, layer_start=stage.layer_start,
                                                layer_end=stage.layer_end, state="ready"))

    # -- what the API shows ------------------------------------------------------------
    def current_plan(self) -> Plan | None:
        return self.plan

    def ready(self) -> tuple[bool, str]:
        """True only when every stage of the current plan reports its layers loaded."""
        if self.plan is None or self.membership is None:
            return False, self.plan_error
        for stage in self.plan.stages:
            status = self.membership.status(stage.member_id)
            want = (self.plan.plan_id, stage.layer_start, stage.layer_end, "ready")
            if (status.plan_id, status.layer_start, status.layer_end, status.state) != want:
                detail = f": {status.error}" if status.error else ""
                return False, (f"member {stage.member_id} has not loaded layers "
                               f"[{stage.layer_start}, {stage.layer_end}) yet (state {status.state}{detail})")
        return True, "ok"

    def cluster_info(self) -> dict[str, Any]:
        assert self.membership is not None
        ready, reason = self.ready()
        members = []
        for m in self.membership.members():
            stage = self.plan.stage_of(m.member_id) if self.plan else None
            members.append({
                "id": m.member_id,
                "address": m.address,
                "api_address": m.api_address,
                "backend": m.backend,
                "memory_bytes": m.memory_bytes,
                "layer_start": stage.layer_start if stage else None,
                "layer_end": stage.layer_end if stage else None,
                "state": self.membership.status(m.member_id).state,
                "self": m.member_id == self.member_id,
            })
        return {
            "model": self.model.model_id,
            "num_layers": self.model.num_layers,
            "plan_id": self.plan.plan_id if self.plan else None,
            "ready": ready,
            "reason": reason,
            "members": members,
            "local": {"id": self.member_id, "kv_caches": len(self.worker.caches)},
        }


def _fields(info: MemberInfo) -> dict[str, Any]:
    return {k: getattr(info, k) for k in info.__dataclass_fields__}


def _backend_options(config: NodeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if config.device:
        options["device"] = config.device
    if config.dtype:
        options["dtype"] = config.dtype
    return options
