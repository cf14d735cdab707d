"""The node: the asyncio shell that wires links, the replicated cluster state, placement,
the stage worker, the coordinator and the HTTP API together.

Cluster state is a CRDT replicated by the kernel (``mesh/kernel/replication.py``): this node writes
its own membership record, resources and load status as events; anti-entropy brings every
node the same events, so every node folds the same state and computes the same plan from it
(no master). A member whose links are gone (or that stays unreachable) is removed by
whoever notices; a member that finds itself removed while alive writes itself back.
Spec: specs/node.md (N1-N5, N9-N13), specs/kernel.md (K9, K10).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn

from mesh import registry
from mesh.errors import ConfigError, MeshError, PlacementError
from mesh.identity import load_or_create_node_id, lock_data_dir, usable_memory_bytes
from mesh.kernel.records import (
    ClusterView,
    MemberInfo,
    MemberStatus,
    member_key,
    resources_key,
    status_key,
)
from mesh.kernel.replication import Replication
from mesh.loading import LoadProgress
from mesh.models import Model, resolve_model
from mesh.node.addresses import NodeNetworking
from mesh.node.config import NodeConfig, backend_options, bind_tcp
from mesh.node.health import NodeHealth
from mesh.node.links import Links
from mesh.node.linkstats import link_key
from mesh.node.perf import NodePerformance
from mesh.node.report import NodeReport
from mesh.placement.pipeline import (
    Capacity,
    ModelSize,
    Plan,
    model_size,
    place_by_roles,
    place_pipeline,
)
from mesh.runtime.coordinator import Coordinator, StageWorker
from mesh.runtime.metrics import NodeMetrics
from mesh.security import LinkSecurity
from mesh.wire import Message

log = logging.getLogger(__name__)

KERNEL_MESSAGES = ("ev", "sync", "sync.page")
JOIN_WAIT_S = 15.0  # how long a node with --peer waits to meet one before joining alone
RETAINED_REQUESTS = 256  # finished requests of this node kept in the state before retiring


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal capture: the node handles SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class Node(NodeNetworking, NodePerformance, NodeReport, NodeHealth):
    """One member of the cluster. ``await Node(config).run()`` serves until stopped."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        if config.interface is not None:  # a bad --interface fails before anything is written
            from mesh.netif import advertise_address, local_interfaces

            advertise_address(local_interfaces(), None, pinned_interface=config.interface)
        self.data_dir = config.data_dir.expanduser()
        self._data_dir_lock = lock_data_dir(self.data_dir)
        self.member_id = load_or_create_node_id(self.data_dir)
        self.incarnation = secrets.token_hex(8)
        self.model = Model(resolve_model(config.model))
        self.backend_cls = registry.load("backend", config.backend)
        self.backend_cls(**backend_options(config))  # a bad --device or --dtype fails now, not after loading
        self.security = self._security(config)
        self.member_id = self.security.node_id if self.security is not None else self.member_id
        transport_cls = registry.load("transport", config.transport)
        if self.security is not None and not getattr(transport_cls, "secure", False):
            raise ConfigError(f"--transport {config.transport} does not authenticate or encrypt links; "
                              f"use one that does ({', '.join(_secure_transports())}) or --insecure")
        try:
            transport = transport_cls(security=self.security)
        except TypeError as exc:
            raise ConfigError(f"--transport {config.transport}: its plugin cannot be built with security=...: {exc}") from exc
        if config.fault_plan is not None:
            from mesh.node import fault_hooks

            transport = fault_hooks.wrap(transport, label=config.fault_label or self.member_id, path=config.fault_plan)
        self.links = Links(transport, me=lambda: self.me, model_id=self.model.model_id,
                           started_ms=time.time_ns() // 1_000_000, on_message=self._on_message,
                           on_up=self._link_up, on_down=self._link_down, on_fatal=self._fatal,
                           dead_after_s=config.dead_after_s, send_timeout_s=config.timeouts.send_s)
        self.me = MemberInfo(member_id=self.member_id, address="", api_address="", backend=config.backend,
                             memory_bytes=0, incarnation=self.incarnation)
        self.plan: Plan | None = None
        self.plan_error = "no placement yet"
        self.size: ModelSize | None = None
        self.replication: Replication | None = None
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-compute")
        self.worker = StageWorker(self, self.compute)
        self.metrics = NodeMetrics(self._metrics_sample)
        self.coordinator: Coordinator | None = None
        self._status = MemberStatus()
        self._load_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self._fatal_error: MeshError | None = None
        self._last_seen: dict[str, float] = {}
        self._finished: deque[str] = deque()
        self._reaction_pending = False
        self._first_link = asyncio.Event()
        self._joined = False
        self._signalled = False
        self._last_health: tuple[bool, str] = (False, "")
        self.api_port = config.api_port
        self.listen_port = config.port
        self.profile: Any = None
        self.calibration: Any = None  # per-layer step times of the loaded stage (spec P19)
        self.clock_fault: str | None = None  # set when peers refuse this node's clock
        self._drift_told: dict[str, float] = {}
        self._resumed_at = -1e9  # when this process last came back from a freeze (monotonic s)
        self._stage_times: Any = None  # the fastest timings of the loaded stage so far
        self._calibrating: Any = None  # the backend those timings are of

    def _security(self, config: NodeConfig) -> LinkSecurity | None:
        if config.insecure:
            banner = ("--insecure: links are PLAINTEXT and UNAUTHENTICATED. Anyone who can reach "
                      f"port {config.port} can join this cluster, read prompts and completions, and "
                      "inject traffic. Use it for debugging on a trusted machine only.")
            log.warning("*" * 78)
            log.warning(banner)
            log.warning("*" * 78)
            return None
        security = LinkSecurity.for_data_dir(self.data_dir, config.cluster_key)
        if self.member_id != security.node_id:
            raise ConfigError(f"--data-dir {self.data_dir}: node id {self.member_id} does not match its identity key")
        log.info("links authenticated for cluster %s (node %s)", security.cluster_fingerprint, security.node_id)
        return security

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Start everything and serve until SIGINT/SIGTERM or ``stop()``.

        Raises IdentityCollision when another live process holds this node's id.
        """
        from mesh.api.app import create_app

        cfg = self.config
        self._install_signal_handlers()
        api_socket = bind_tcp(cfg.api_host, cfg.api_port, "--api-port")  # fail early, before the model
        if cfg.port:
            bind_tcp(cfg.host, cfg.port, "--port").close()  # only a check: the transport binds it below
        log.info("node %s starting: model %s, backend %s", self.member_id, cfg.model, cfg.backend)
        await self._measure_profile()
        await asyncio.to_thread(lambda: (self.model.config, self.model.tokenizer))
        self.size = await asyncio.to_thread(model_size, self.model)
        self.coordinator = Coordinator(self, self.model, cfg.timeouts, kv_replica_bytes=cfg.kv_replica_bytes)
        self.coordinator.metrics = self.metrics
        listener = await self.links.transport.listen(cfg.host, cfg.port, self.links.accept)
        self.listen_port = listener.port
        memory = cfg.memory_bytes if cfg.memory_bytes is not None else usable_memory_bytes(cfg.memory_fraction)
        self.me = MemberInfo(member_id=self.member_id, address=await self._advertised_address(listener.port),
                             api_address=f"{cfg.api_host}:{cfg.api_port}", backend=cfg.backend,
                             memory_bytes=memory, incarnation=self.incarnation,
                             alt_addresses=await self._alt_addresses(), role=cfg.role)
        offset_ms = int(cfg.clock_offset_s * 1000)
        self.replication = Replication(self.member_id, self.data_dir / "kernel", send=self.links.send,
                                       peers=self.links.linked, on_change=self._state_changed,
                                       clock=lambda: time.time_ns() // 1_000_000 + offset_ms,
                                       on_drift=self._peer_clock_refused)
        self.replication.start()
        app = create_app(self.coordinator, api_key=cfg.api_key)
        server = _ApiServer(
            uvicorn.Config(app, host=cfg.api_host, port=cfg.api_port, log_level="warning",
                           lifespan="off", timeout_graceful_shutdown=2)
        )
        loop = asyncio.get_running_loop()
        api_task = loop.create_task(self._serve_api(server, api_socket), name="api")
        log.info("serving the OpenAI API on http://%s:%d/v1 (mesh link on %s)", cfg.api_host, cfg.api_port, self.me.address)
        tasks = [api_task, loop.create_task(self._heartbeats(), name="heartbeats"),
                 loop.create_task(self._watch_freezes(), name="freezes"),
                 loop.create_task(self._loader(), name="loader")]
        self.links.spawn(self._publish_profile(), "profile")
        if cfg.fault_plan is not None:
            from mesh.node import fault_hooks

            self.links.spawn(fault_hooks.watch(self.links.transport, cfg.fault_plan, self._stop),  # type: ignore[arg-type]
                             "fault plan")
        tasks += [loop.create_task(self.links.dial_forever(a, self._stop), name=f"peer {a}") for a in cfg.peers]
        discovery = await self._start_discovery()
        stop_task = loop.create_task(self._stop.wait(), name="stop")
        failed: list[BaseException] = []
        try:
            if cfg.peers:
                # Meet a peer before writing anything under this id: a second process with a
                # copied identity is then refused before it issues an event (spec K9).
                first_link = loop.create_task(self._first_link.wait())
                await asyncio.wait([first_link, stop_task], timeout=JOIN_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
                first_link.cancel()
            if not self._stop.is_set():
                self._join()
            done, _ = await asyncio.wait([*tasks, stop_task], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is stop_task or (task is api_task and not task.cancelled() and task.exception() is None):
                    continue
                # a main task must run until the node stops: ending any other way is a failure
                error = None if task.cancelled() else task.exception()
                failed.append(error or MeshError(f"internal task {task.get_name()!r} ended unexpectedly"))
        finally:
            # End the streams in flight with an error event (not a cut), then stop HTTP.
            self.coordinator.shutdown("the node is shutting down")
            deadline = loop.time() + 2.0
            while self.coordinator.active and loop.time() < deadline:
                await asyncio.sleep(0.05)
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(api_task), 5.0)
            except (Exception, asyncio.CancelledError):
                pass
            for task in [*tasks, stop_task]:
                task.cancel()
            if discovery is not None:
                try:
                    await discovery.close()
                except Exception as exc:  # its failure was logged when it happened
                    log.debug("discovery closed with %r", exc)
            await self.links.close()
            await listener.close()
            await self.replication.stop()
            self.compute.shutdown(wait=False, cancel_futures=True)
            log.info("node %s stopped", self.member_id)
        if self._fatal_error is not None:
            raise self._fatal_error
        if failed:
            raise failed[0]

    def stop(self) -> None:
        self._stop.set()

    def _fatal(self, error: MeshError) -> None:
        self._fatal_error = error
        self.stop()

    def _install_signal_handlers(self) -> None:
        # The node owns SIGINT/SIGTERM (uvicorn's own capture is switched off in _ApiServer):
        # a graceful stop first ends streams in flight; a second signal exits at once.
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            was_signalled, self._signalled = self._signalled, True
            if was_signalled:
                log.warning("second interrupt: exiting at once")
                os._exit(130)
            else:
                log.info("stopping (press Ctrl-C again to exit at once)")
                self._stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

    async def _serve_api(self, server: Any, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except (OSError, SystemExit) as exc:
            raise MeshError(f"HTTP API cannot serve on {self.config.api_host}:{self.config.api_port}: {exc}") from exc
        if not server.started:
            raise MeshError(f"HTTP API failed to start on {self.config.api_host}:{self.config.api_port}")
        self.stop()  # the API exits only on a signal: stop the node with it

    # -- cluster state -----------------------------------------------------------------
    def _join(self) -> None:
        """Write this node's membership record and resources (again after being removed)."""
        assert self.replication is not None
        self._joined = True
        me = self.me
        # resources first: a member without them is not placed, so no transient plan appears
        resources: dict[str, Any] = {"backend": me.backend, "memory_bytes": me.memory_bytes}
        if me.role != "any":
            resources["role"] = me.role  # spec N13: read by every node's placement
        self.replication.emit("resources.set", resources_key(me.member_id), resources)
        record: dict[str, Any] = {"address": me.address, "api": me.api_address, "incarnation": me.incarnation}
        if me.alt_addresses:
            record["alt"] = list(me.alt_addresses)
        self.replication.emit("member.join", member_key(me.member_id), record)

    def view(self) -> ClusterView:
        assert self.replication is not None
        return ClusterView(self.replication.state)

    def _state_changed(self) -> None:
        """After any applied event: react once, soon (events applied together are folded
        first, and a reaction that emits events does not re-enter itself)."""
        if not self._reaction_pending:
            self._reaction_pending = True
            asyncio.get_running_loop().call_soon(self._react)

    def _react(self) -> None:
        """Rejoin if removed, dial new members, re-place."""
        self._reaction_pending = False
        assert self.replication is not None
        record = self.replication.state.get(member_key(self.member_id))
        if not self._joined:
            return
        if not isinstance(record, dict) or record.get("incarnation") != self.incarnation:
            log.info("this node's membership record is missing or stale: writing it again")
            self._join()
        for member in self.view().members():
            if member.member_id not in self._last_seen:
                self._last_seen[member.member_id] = time.monotonic()
            self.links.dial(member)
        self._replan()

    async def _on_message(self, sender: str, msg: Message) -> None:
        assert self.coordinator is not None and self.replication is not None
        kind = msg.type
        if kind in KERNEL_MESSAGES:
            await self.replication.on_message(sender, msg)
        elif kind == "forward":
            self.links.spawn(self.worker.on_forward(msg), f"forward {msg.body.get('req')}")
        elif kind in ("token", "error", "released", "kv.replica", "kv.loaded"):
            self.coordinator.deliver(msg, sender)
        elif kind == "kv.load":
            self.links.spawn(self.worker.on_kv_load(sender, msg), f"kv.load {msg.body.get('req')}")
        elif kind == "kv.push":
            self.links.spawn(self.worker.on_kv_push(sender, msg), f"kv.push {msg.body.get('req')}")
        elif kind == "clock.refused":
            self._clock_refused(sender, msg)
        elif kind == "release":
            req = str(msg.body.get("req", ""))
            self.worker.release(req)
            if 0 < len(req) <= 64:
                self.links.spawn(self._ack_release(sender, req), "released")
        elif kind != "ping":
            log.debug("ignoring unknown message type %r from %s", kind, sender)

    async def _link_up(self, info: MemberInfo) -> None:
        assert self.replication is not None
        self._last_seen[info.member_id] = time.monotonic()
        self._first_link.set()
        await self.replication.sync_with(info.member_id)

    def _publish_link_stats(self) -> None:
        """Publish each link's RTT and throughput when they moved (spec L2, L3)."""
        assert self.replication is not None
        now = asyncio.get_running_loop().time()
        for member_id, meter in list(self.links.meters.items()):
            summary = meter.publish_due(now)
            if summary is not None:
                self.replication.emit("link.measured", link_key(self.member_id, member_id), summary)

    # -- requests (called by the coordinator) ------------------------------------------
    def linked(self, member_id: str) -> bool:
        """Whether a request can reach ``member_id`` now (this node, or a live link)."""
        return member_id == self.member_id or member_id in self.links.linked()

    async def send(self, member_id: str, msg: Message) -> None:
        """Send to a member (delivered in-process when it is this node)."""
        if member_id == self.member_id:
            await self._on_message(member_id, msg)
            return
        await self.links.send(member_id, msg, lane="data")  # request traffic keeps its order on one lane

    def request_event(self, req: str, state: str, stages: list[str] | None = None) -> None:
        """Record a request's lifecycle (and where its KV caches live) in the cluster state."""
        assert self.replication is not None
        self.replication.emit(f"request.{state}", f"request/{req}", state)
        if stages is not None:
            self.replication.emit("kv.placed", f"kv/{req}", stages)
        if state != "running":
            if self.replication.state.get(f"kv/{req}") is not None:
                self.replication.emit("kv.freed", f"kv/{req}", None)
            self._finished.append(req)
            while len(self._finished) > RETAINED_REQUESTS:  # spec K5: retire, do not accumulate
                self.replication.emit("request.retired", f"request/{self._finished.popleft()}", None)

    # -- placement and loading ---------------------------------------------------------
    def _replan(self) -> None:
        assert self.size is not None and self.replication is not None
        members = self.view().members()
        capacities = [Capacity(member_id=m.member_id, usable_bytes=m.memory_bytes) for m in members]
        context = self.config.context or self.model.context_length
        try:
            plan = place_by_roles(members, self.size, context_tokens=context)
            if plan is None and self.config.placement == "solver":
                plan = self._solver_plan(context)
            if plan is None:
                plan = place_pipeline(capacities, self.size, context_tokens=context)
        except PlacementError as exc:
            if self.plan is not None or self.plan_error != f"placement failed: {exc}":
                log.error("placement failed: %s", exc)
            self.plan, self.plan_error = None, f"placement failed: {exc}"
            self._load_wanted.set()
            return
        if self.plan is None or plan.plan_id != self.plan.plan_id:
            self.plan = plan
            self.metrics.placement_changes.inc()
            log.info("plan %s: %s", plan.plan_id,
                     ", ".join(f"{s.member_id}[{s.layer_start},{s.layer_end})" for s in plan.stages)
                     + (" (prefill on " + ", ".join(f"{s.member_id}[{s.layer_start},{s.layer_end})"
                                                   for s in plan.prefill_stages) + ")" if plan.prefill_stages else ""))
            self._load_wanted.set()
        recorded = self.replication.state.get("placement")
        first = members[0].member_id if members else None
        if first == self.member_id and (not isinstance(recorded, dict) or recorded.get("plan_id") != plan.plan_id):
            # Every node computes the same plan; the member with the lowest id records it.
            self.replication.emit("placement.set", "placement", {
                "plan_id": plan.plan_id,
                "stages": [[s.member_id, s.layer_start, s.layer_end] for s in plan.stages],
                **({"prefill_stages": [[s.member_id, s.layer_start, s.layer_end] for s in plan.prefill_stages]}
                   if plan.prefill_stages else {}),
            })

    def _metrics_sample(self) -> dict[str, Any]:
        """The gauges of ``GET /metrics``, read at scrape time."""
        links = []
        if self.replication is not None:
            links = [(row["to"], row["rtt_p50_s"]) for row in self.view().links()
                     if row["from"] == self.member_id and isinstance(row.get("rtt_p50_s"), int | float)]
        return {"kv_caches": len(self.worker.caches),
                "kv_replica_bytes": self.coordinator.replicas.nbytes if self.coordinator else 0,
                "active_requests": self.coordinator.active if self.coordinator else 0, "links": links}

    def _set_status(self, status: MemberStatus) -> None:
        assert self.replication is not None
        if status != self._status or self.replication.state.get(status_key(self.member_id)) is None:
            self._status = status
            self.replication.emit("status.set", status_key(self.member_id), status.to_wire())

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
                self._set_status(MemberStatus(plan_id=plan_id, state="idle"))
                continue
            status = MemberStatus(plan_id=plan_id, layer_start=stage.layer_start, layer_end=stage.layer_end,
                                  state="ready")
            current = self.worker.backend
            if current is not None and (current.layer_start, current.layer_end) == (stage.layer_start, stage.layer_end):
                self._set_status(status)
                continue
            self._set_status(MemberStatus(**{**status.to_wire(), "state": "loading"}))
            backend = self.backend_cls(**backend_options(self.config))
            progress = LoadProgress(f"layers [{stage.layer_start},{stage.layer_end})", tty=sys.stderr.isatty())
            if current is not None:  # reuse the layers both ranges share (spec B9); the old range
                self.worker.swap_backend(None)  # is unusable from here, and its requests fail anyway
                backend.adopt_from(current)
            try:
                await asyncio.to_thread(backend.load, self.model, stage.layer_start, stage.layer_end, progress)
            except Exception as exc:  # a backend plugin may raise anything: report it, keep serving
                if not isinstance(exc, MeshError):
                    log.exception("backend %s failed to load layers", self.config.backend)
                log.error("loading layers [%d, %d) failed: %s", stage.layer_start, stage.layer_end, exc)
                self._set_status(MemberStatus(**{**status.to_wire(), "state": "failed", "error": str(exc)}))
                continue
            finally:
                progress.close()
            # spec N14: what the load took from the stage it replaced; a backend that does not
            # say (no ``reused_layers``) read every layer
            self.metrics.stage_loaded(layers=stage.layer_end - stage.layer_start,
                                      reused=int(getattr(backend, "reused_layers", 0) or 0))
            await self._calibrate(backend)
            self.worker.swap_backend(backend)
            self._set_status(status)


def _secure_transports() -> list[str]:
    secure = []
    for name in registry.names("transport"):
        try:
            if getattr(registry.load("transport", name), "secure", False):
                secure.append(name)
        except MeshError:
            continue
    return secure
