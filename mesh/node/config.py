"""The node's configuration: every flag of ``python -m mesh node``, checked when built (a bad
value names the flag and the valid choices), and the small helpers that turn it into
sockets and backend options. Spec: specs/node.md.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import registry
from mesh.errors import ConfigError, MeshError
from mesh.kernel.records import ROLES
from mesh.netif import check_port, local_interfaces
from mesh.node.links import member_address
from mesh.placement.planner import OBJECTIVES, PLACEMENTS
from mesh.runtime.batcher import Batching
from mesh.runtime.request_core import Timeouts
from mesh.security import LinkSecurity
from transports.base import Transport

log = logging.getLogger(__name__)


def bind_tcp(host: str, port: int, flag: str) -> socket.socket:
    """A listening TCP socket on (host, port). Raises ConfigError naming ``flag`` when taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock
    except OSError as exc:
        raise ConfigError(f"{flag} {port} on {host} cannot be used: {exc.strerror or exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything ``python -m mesh node`` takes (see ``mesh/cli.py`` for flags and units)."""

    host: str = "0.0.0.0"
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
    heartbeat_s: float = 0.5
    dead_after_s: float = 3.0
    api_key: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # none, int8, int4; None: keep what the model files hold
    cluster_key: str | None = None
    insecure: bool = False
    discovery: bool = True
    discovery_port: int = 7601
    interface: str | None = None
    probe_interval_s: float = 30.0
    placement: str = "solver"
    objective: str = "goodput"
    replan_margin: float = 0.15  # placement hysteresis (spec P21; mesh.placement.planner.REPLAN_MARGIN)
    timeouts: Timeouts = field(default_factory=Timeouts)
    batching: Batching = field(default_factory=Batching)  # --max-batch, --prefill-chunk, --prefill-batch, --max-running, --max-queued
    kv_replica_bytes: int = 512 * 2**20  # spec FO8; 0 turns the KV replica off
    role: str = "any"  # prefill, decode or any (spec N13)
    fault_plan: Path | None = None  # fault injection, for tests only (mesh/node/fault_hooks.py)
    fault_label: str | None = None
    clock_offset_s: float = 0.0  # fault injection: the kernel's wall clock runs this far ahead
    drain_s: float = 30.0  # a graceful stop lets running requests finish for this long (spec N20)
    remeasure: bool = False  # measure the device profile again, replacing the cached one (spec P7)
    tp_address: str | None = None  # a trusted link's IP address of this host: tensor-parallel groups (N26)

    def check_backend(self, backend_cls: Any) -> None:
        """``check_backend_options`` for this configuration."""
        check_backend_options(backend_cls, self)

    def __post_init__(self) -> None:
        for flag, port in (("--port", self.port), ("--api-port", self.api_port),
                           ("--discovery-port", self.discovery_port)):
            check_port(port, flag)
        for address in self.peers:
            try:
                member_address(address)
            except MeshError as exc:
                raise ConfigError(f"--peer: {exc}") from exc
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"--memory-fraction must be in (0, 1], got {self.memory_fraction}")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise ConfigError(f"--memory-bytes must be >= 0, got {self.memory_bytes}")
        if self.role not in ROLES:
            raise ConfigError(f"--role {self.role!r} unknown; valid: {', '.join(ROLES)}")
        if self.kv_replica_bytes < 0:
            raise ConfigError(f"--kv-replica-mb must be >= 0 (0 turns the replica off), got {self.kv_replica_bytes}")
        if self.context is not None and self.context < 1:
            raise ConfigError(f"--context must be >= 1 token, got {self.context}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--placement {self.placement!r} unknown; valid: {', '.join(PLACEMENTS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective {self.objective!r} unknown; valid: {', '.join(OBJECTIVES)}")
        if not 0 <= self.replan_margin <= 10:
            raise ConfigError(f"--replan-margin must be a fraction between 0 and 10, got {self.replan_margin}")
        if not self.drain_s >= 0:
            raise ConfigError(f"--drain-s must be >= 0 seconds, got {self.drain_s}")
        if self.tp_address is not None:
            check_tp_address(self.tp_address)
        if self.dead_after_s <= self.heartbeat_s:
            raise ConfigError(f"--dead-after-s ({self.dead_after_s}) must exceed --heartbeat-s ({self.heartbeat_s})")


def check_backend_options(backend_cls: Any, config: NodeConfig) -> None:
    """Build ``backend_cls`` once with the node's options, so a bad ``--device``, ``--dtype`` or
    ``--quantize`` fails at start (the backend's BackendError names the valid values). Raises
    ConfigError when the backend takes no such option at all (a plugin without ``quantize``)."""
    import inspect

    options = backend_options(config)
    accepted = inspect.signature(backend_cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        for name in options:
            if name not in accepted:
                raise ConfigError(f"--{name}: the {config.backend!r} backend takes no {name} option")
    backend_cls(**options)


def backend_options(config: NodeConfig, dtype: str | None = None) -> dict[str, Any]:
    """The keyword arguments a node builds its backend with: what the user set, and ``dtype``
    when the node chose one by measurement (``planner.compute_dtype``); a plugin backend is
    given only the options the user set, so it need not know the others."""
    options: dict[str, Any] = {}
    if config.device:
        options["device"] = config.device
    if config.dtype or dtype:
        options["dtype"] = config.dtype or dtype
    if config.quantize:  # only when asked: a plugin backend need not know the option
        options["quantize"] = config.quantize
    return options


def link_security(config: NodeConfig, data_dir: Path, member_id: str) -> LinkSecurity | None:
    """The links' authentication (spec S1-S6): the cluster key and this node's identity key
    in ``data_dir``; None with ``--insecure``, after a loud warning. Raises ConfigError when
    the identity key does not match ``member_id``."""
    if config.insecure:
        banner = ("--insecure: links are PLAINTEXT and UNAUTHENTICATED. Anyone who can reach "
                  f"port {config.port} can join this cluster, read prompts and completions, and "
                  "inject traffic. Use it for debugging on a trusted machine only.")
        log.warning("*" * 78)
        log.warning(banner)
        log.warning("*" * 78)
        return None
    security = LinkSecurity.for_data_dir(data_dir, config.cluster_key)
    if member_id != security.node_id:
        raise ConfigError(f"--data-dir {data_dir}: node id {member_id} does not match its identity key")
    log.info("links authenticated for cluster %s (node %s)", security.cluster_fingerprint, security.node_id)
    return security


def build_transport(config: NodeConfig, security: LinkSecurity | None, label: str) -> Transport:
    """The ``--transport`` plugin, built with ``security``; wrapped for fault injection when
    ``--fault-plan`` is given (tests only). Raises ConfigError for a transport that does not
    authenticate links unless ``--insecure``, or one that cannot be built."""
    transport_cls = registry.load("transport", config.transport, expected=Transport)
    if security is not None and not getattr(transport_cls, "secure", False):
        raise ConfigError(f"--transport {config.transport} does not authenticate or encrypt links; "
                          f"use one that does ({', '.join(_secure_transports())}) or --insecure")
    try:
        transport = transport_cls(security=security)
    except TypeError as exc:
        raise ConfigError(f"--transport {config.transport}: its plugin cannot be built with security=...: {exc}") from exc
    if config.fault_plan is not None:
        from mesh.node import (
            fault_hooks,  # test-only code stays unimported in production
        )

        transport = fault_hooks.wrap(transport, label=config.fault_label or label, path=config.fault_plan)
    return transport


def _secure_transports() -> list[str]:
    secure = []
    for name in registry.names("transport"):
        try:
            if getattr(registry.load("transport", name), "secure", False):
                secure.append(name)
        except MeshError:
            continue
    return secure


def check_tp_address(address: str) -> str:
    """``--tp-address``: an IP address one of this host's interfaces holds (tensor-parallel
    collectives listen there and only there, spec N26). Raises ConfigError naming the flag and
    the addresses this host holds."""
    held = sorted({a.address for i in local_interfaces() for a in i.addresses})
    try:
        ip = str(ipaddress.ip_address(address))
    except ValueError:
        raise ConfigError(f"--tp-address {address!r} is not an IP address; this host holds {', '.join(held)}") from None
    if ip not in held:
        raise ConfigError(f"--tp-address {address}: no interface of this host holds it; valid: {', '.join(held)}")
    return ip
