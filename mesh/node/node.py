"""The node: the composition root. It builds the pieces, hands each the narrow ports it needs,
runs them in one task group, and reacts to changes of the replicated cluster state.

Every node writes its own records (``records.py``) to the kernel's CRDT state; anti-entropy brings
every node the same events, so all compute the same plan (``placement/planner.py``, no master). A
member whose links are gone is removed by whoever notices (``liveness.py``); a member removed while
alive writes itself back. Requests run on ``runtime/plane.py``; this node's stage is loaded by
``loader.py``. Spec: specs/node.md (N1-N5, N9-N15), specs/kernel.md (K9, K10), specs/architecture.md AR4.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from backends.base import Backend
from mesh import registry
from mesh.api.app import create_app
from mesh.errors import MeshError
from mesh.identity import load_or_create_node_id, lock_data_dir, register_on_host, usable_memory_bytes
from mesh.kernel.records import ClusterView, MemberInfo, member_key
from mesh.kernel.replication import Replication
from mesh.models import Model, resolve_model
from mesh.netif import advertise_address, local_interfaces
from mesh.node import addresses, groups, report
from mesh.node.config import NodeConfig, backend_options, bind_tcp, build_transport, link_security
from mesh.node.links import Links
from mesh.node.liveness import Liveness, Monitor
from mesh.node.loader import StageLoader, fits_in, measure_profile
from mesh.node.placing import Placement
from mesh.node.records import SelfRecords
from mesh.node.server import Starting, api_server, first_of, install_signal_handlers, serve_api
from mesh.node.serving import Serving
from mesh.placement import planner
from mesh.runtime.metrics import NodeMetrics
from mesh.runtime.plane import PlanBoard, RequestPlane
from mesh.wire import Message

log = logging.getLogger(__name__)

KERNEL_MESSAGES = ("ev", "sync", "sync.page")
JOIN_WAIT_S = 15.0  # how long a node with --peer waits to meet one before joining alone


class Node:
    """One member of the cluster. ``await Node(config).run()`` serves until stopped."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        if config.interface is not None:  # a bad --interface fails before anything is written
            advertise_address(local_interfaces(), None, pinned_interface=config.interface)
        self.data_dir = config.data_dir.expanduser()
        self._data_dir_lock = lock_data_dir(self.data_dir)
        self._host_entry, _ = register_on_host()  # before the backend loads torch (spec N18)
        self.member_id = load_or_create_node_id(self.data_dir)
        self.model = Model(resolve_model(config.model))
        self.backend_cls = registry.load("backend", config.backend, expected=Backend)
        config.check_backend(self.backend_cls)  # a bad --device, --dtype or --quantize fails now
        self.security = link_security(config, self.data_dir, self.member_id)
        self._stop, self._first_link = asyncio.Event(), asyncio.Event()
        self.plans = PlanBoard()  # requests through a leaving member move once the plan without it serves (N20)
        self.serving = Serving(self.member_id, move_off=lambda m: self.plane and self.plane.coordinator.member_lost(m))
        self.dtype = planner.compute_dtype(config.dtype, config.device)
        self.me = MemberInfo(member_id=self.member_id, address="", api_address="", backend=config.backend,
                             memory_bytes=0, incarnation=secrets.token_hex(8))
        self.links = Links(build_transport(config, self.security, self.member_id), me=lambda: self.me,
                           model_id=self.model.model_id, started_ms=time.time_ns() // 1_000_000,
                           on_message=self._on_message, on_up=self._link_up, on_down=lambda m: self.monitor.link_down(m),
                           on_fatal=self._fatal, dead_after_s=config.dead_after_s, send_timeout_s=config.timeouts.send_s)
        offset_ms = int(config.clock_offset_s * 1000)
        self.replication = Replication(self.member_id, self.data_dir / "kernel", send=self.links.send,
                                       peers=self.links.linked, on_change=self._state_changed,
                                       clock=lambda: time.time_ns() // 1_000_000 + offset_ms,
                                       on_drift=lambda m, ahead_ms: self.monitor.peer_clock_refused(m, ahead_ms))
        self.records = SelfRecords(self.replication.emit, lambda: self.replication.state, lambda: self.me)
        self.monitor = Monitor(
            Liveness(self.member_id, dead_after_s=config.dead_after_s), self.links, heartbeat_s=config.heartbeat_s,
            probe_interval_s=config.probe_interval_s, send_timeout_s=config.timeouts.send_s,
            members=lambda: [m.member_id for m in self.view().members()], on_round=self._heartbeat_round,
            lost=lambda m: self.plane.member_lost(m) if self.plane is not None else None,
            present=lambda m: self.replication.state.get(member_key(m)) is not None, remove=self.records.leave,
            leaving=lambda m: self.view().status(m).state == "leaving",
            changed=self._refresh, stopping=self._stop.is_set, send=self.links.send)
        self.status = report.NodeStatus(
            member_id=self.member_id, model_id=self.model.model_id, num_layers=self.model.num_layers,
            replication=self.replication, linked=self.links.linked, placement=lambda: (self.placement.plan, self.placement.error),
            serving=self.plans.state, stats=lambda: self.plane and self.plane.statistics(), leaving=self._stop.is_set,
            metrics_text=lambda: self.metrics.text(), spec=lambda: self.inputs and self.inputs.spec, dtype=self.dtype,
            security={"authenticated": self.security is not None, "transport": config.transport,
                      "cluster": self.security.cluster_fingerprint if self.security is not None else None})
        self.metrics = NodeMetrics(self.status.metrics_sample)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-compute")
        self.placement = Placement(view=self.view, inputs=lambda: self.inputs,
                                   want=lambda plan: self.loader.want(plan) if self.loader is not None else None,
                                   changed=lambda: self.metrics.placement_changes.inc())
        self.plane: RequestPlane | None = None  # built once the model's config and tokenizer are read
        self.loader: StageLoader | None = None
        self.inputs: planner.PlanInputs | None = None
        self._fatal_error: MeshError | None = None
        self._reaction_pending = False

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Start everything and serve until SIGINT/SIGTERM or ``stop()``. Raises
        IdentityCollision when another live process holds this node's id, and the error of any
        part that fails."""
        cfg = self.config
        install_signal_handlers(self._stop)
        api_socket = bind_tcp(cfg.api_host, cfg.api_port, "--api-port")  # fail early; 503 until the model is ready
        server = api_server(shell := Starting(), cfg.api_host, cfg.api_port)
        api = asyncio.create_task(serve_api(server, api_socket, f"{cfg.api_host}:{cfg.api_port}", self.stop), name="api")
        if cfg.port:
            bind_tcp(cfg.host, cfg.port, "--port").close()  # only a check: the transport binds it below
        log.info("node %s starting: model %s, backend %s", self.member_id, cfg.model, cfg.backend)
        profile = await measure_profile(self.data_dir, cfg, executor=self.compute)
        self.dtype = self.status.dtype = planner.compute_dtype(cfg.dtype, cfg.device, profile, cfg.backend)
        options = backend_options(cfg, dtype=self.dtype if self.dtype == "bf16" else None)  # bf16: chosen or measured
        await asyncio.to_thread(lambda: (self.model.config, self.model.tokenizer))
        size, spec = await asyncio.to_thread(planner.sizes, self.model, cfg.quantize, self.backend_cls, self.dtype, cfg.device)
        self.inputs = planner.PlanInputs(size=size, context_tokens=cfg.context or self.model.context_length, spec=spec,
                                         placement=cfg.placement, objective=cfg.objective, dtype=self.dtype, margin=cfg.replan_margin)
        plane = self.plane = RequestPlane(self.member_id, model=self.model, timeouts=cfg.timeouts, executor=self.compute,
                                          send_remote=lambda member, msg: self.links.send(member, msg, lane="data"),
                                          plans=self.plans, on_request_event=self.records.request_event,
                                          kv_replica_bytes=cfg.kv_replica_bytes, metrics=self.metrics, batching=cfg.batching)
        memory = max(0, (cfg.memory_bytes if cfg.memory_bytes is not None else usable_memory_bytes(cfg.memory_fraction)) - cfg.batching.prefix_cache_bytes)  # spec N24
        self.loader = StageLoader(self.member_id, self.model, new_backend=lambda: self.backend_cls(**options),
                                  holder=plane.worker, changed=self._refresh, serving=lambda: self.serving.plan,
                                  fits=fits_in(size, self.inputs.context_tokens, memory, self.backend_cls),
                                  set_status=self.records.set_status, publish=self.records.profile, drain_s=cfg.drain_s,
                                  loaded=lambda layers, reused: self.metrics.stage_loaded(layers=layers, reused=reused),
                                  profile=profile, spec=spec, dtype=self.dtype, executor=self.compute,
                                  peers=self.records.peer_profiles, remeasure=lambda: measure_profile(
                                      self.data_dir, cfg, executor=self.compute, refresh=True), groups=groups.Groups.of(cfg, self.member_id, self.model, self.dtype, self.view))
        listener = await self.links.transport.listen(cfg.host, cfg.port, self.links.accept)
        address, self.links.advertise = await addresses.advertised_address(cfg.host, listener.port, cfg.interface)
        self.me = MemberInfo(member_id=self.member_id, address=address, api_address=f"{cfg.api_host}:{cfg.api_port}",
                             backend=cfg.backend, memory_bytes=memory, incarnation=self.me.incarnation, role=cfg.role,
                             alt_addresses=await addresses.alt_addresses(self.links.transport, cfg.host), tp_address=cfg.tp_address or "")
        shell.app = create_app(plane.coordinator, self.status, api_key=cfg.api_key)
        discovery = await addresses.start_discovery(
            enabled=cfg.discovery, host=cfg.host, discovery_port=cfg.discovery_port, member_id=self.member_id,
            security=self.security, address=address, api_address=self.me.api_address,
            incarnation=self.me.incarnation, dial=self.links.dial_address)
        log.info("serving the OpenAI API on http://%s:%d/v1 (mesh link on %s)", cfg.api_host, cfg.api_port, address)
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                parts = [tasks.create_task(part, name=name) for part, name in (
                    (self.replication.run(), "kernel"), (plane.run(), "request plane"), (self.monitor.run(), "liveness"),
                    (self.loader.run(joined=self.records.joined), "loader"),
                    *((self.links.dial_forever(a, self._stop), f"peer {a}") for a in cfg.peers))]
                if cfg.fault_plan is not None:  # fault injection, for tests only
                    from mesh.node.fault_hooks import watch

                    parts.append(tasks.create_task(watch(self.links.transport, cfg.fault_plan, self._stop)))
                tasks.create_task(asyncio.wait_for(api, None), name="api")  # its failure stops the node
                if cfg.peers:  # meet a peer before writing anything under this id: a second process
                    with contextlib.suppress(TimeoutError):  # with a copied identity is refused first (K9)
                        await asyncio.wait_for(first_of(self._first_link, self._stop), JOIN_WAIT_S)
                if not self._stop.is_set():
                    self.records.join()
                await self._stop.wait()
                self.loader.leave()  # the others place around this node while its streams finish (N20)
                if not await plane.leave(cfg.drain_s, handed_over=lambda: self.serving.handed_over(  # then HTTP stops
                        self.placement.plan, busy=bool(plane.worker.caches))):
                    log.warning("stopped with requests still running after --drain-s %g s", cfg.drain_s)
                server.should_exit = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(api), 5.0)
                api.cancel()  # the streams end before the kernel's log closes
                await asyncio.wait([api])
                for part in parts:
                    part.cancel()
        except* Exception as group:  # a part failed: the node stops, and run() raises its error
            failure = group.exceptions[0]
        finally:
            if discovery is not None:
                await discovery.close()
            await self.links.close()
            await listener.close()
            self.compute.shutdown(wait=False, cancel_futures=True)
            log.info("node %s stopped", self.member_id)
        if (error := self._fatal_error or failure) is not None:
            raise error

    def stop(self) -> None:
        self._stop.set()

    def _fatal(self, error: MeshError) -> None:
        self._fatal_error = error
        self._stop.set()

    # -- cluster state, placement and readiness ------------------------------------------
    def view(self) -> ClusterView:
        return ClusterView(self.replication.state)

    def _state_changed(self) -> None:
        """After any applied event: react once, soon (events applied together are folded first,
        and a reaction that emits events does not re-enter itself)."""
        if not self._reaction_pending:
            self._reaction_pending = True
            asyncio.get_running_loop().call_soon(self._react)

    def _react(self) -> None:
        """Rejoin if removed, dial new members, re-place."""
        self._reaction_pending = False
        if not self.records.joined.is_set():
            return
        self.records.rejoin_if_removed()
        now = time.monotonic()
        for member in self.view().members():
            self.monitor.core.known(member.member_id, now)
            self.links.dial(member)
        self.placement.replan()
        self._refresh()

    def _refresh(self) -> None:
        """Tell the request plane the plan requests start on now (spec N21: the old plan while
        the target loads; FO3: a recovering request waits for one whose stages are all held
        and linked), recorded by the lowest member (``SelfRecords.placement``)."""
        state = self.serving.choose(self.placement.plan, self.placement.error, view=self.view(),
                                    linked=set(self.links.linked()), clock_fault=self.monitor.clock_fault,
                                    held=self.plane.worker.held() if self.plane else [], num_layers=self.model.num_layers)
        self.plans.update(state)
        if state.ready and state.plan is not None:
            self.records.placement(state.plan)

    # -- links and liveness ------------------------------------------------------------
    async def _on_message(self, sender: str, msg: Message) -> None:
        if msg.type in KERNEL_MESSAGES:
            await self.replication.on_message(sender, msg)
        elif self.plane is not None and msg.type in self.plane.MESSAGE_TYPES:
            await self.plane.receive(sender, msg)
        elif msg.type == "clock.refused":
            self.monitor.clock_refused(sender, msg)
        elif msg.type != "ping":
            log.debug("ignoring unknown message type %r from %s", msg.type, sender)

    async def _link_up(self, info: MemberInfo) -> None:
        self.monitor.link_up(info.member_id)
        self._first_link.set()
        await self.replication.sync_with(info.member_id)
        self._refresh()

    def _heartbeat_round(self) -> None:
        self.records.link_figures(self.links.meters, asyncio.get_running_loop().time())
        if self.plane is not None:
            self.plane.expire(idle_s=2 * max(self.config.timeouts.prefill_s, self.config.timeouts.decode_s))
        self._refresh()

