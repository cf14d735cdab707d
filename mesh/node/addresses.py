"""The network side of a node: the address it advertises, the other addresses a transport
prefers (Thunderbolt), and LAN discovery. Functions of what they are given; nothing here
holds the node. Spec: specs/transport.md TB1, TB2; specs/discovery.md D10-D14.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mesh.netif import Address, advertise_address, local_interfaces
from mesh.node.discovery import Discovery, DiscoveryService
from mesh.node.links import member_address
from mesh.security import LinkSecurity, discovery_key

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


async def advertised_address(host: str, port: int, interface: str | None) -> tuple[str, Callable[[str], str | None] | None]:
    """(host:port others should dial, a per-peer chooser for the hello or None). The listen
    host, or when it is a wildcard an address on the best interface (``--interface`` pins
    it; spec TB1); the chooser then names, per peer host, one on a subnet shared with it."""
    if host not in WILDCARD_HOSTS:
        return str(Address(host, port)), None
    table = await asyncio.to_thread(local_interfaces)
    chosen = advertise_address(table, None, pinned_interface=interface)

    def per_peer(peer: str) -> str | None:
        return advertise_address(table, peer, pinned_interface=interface)

    return str(Address(chosen if chosen is not None else host or "0.0.0.0", port)), per_peer


async def alt_addresses(transport: Any, host: str) -> tuple[str, ...]:
    """Other hosts this node's link listens on that a transport prefers (the tbip transport:
    Thunderbolt interfaces), when listening on a wildcard (spec TB2)."""
    local = getattr(transport, "local_addresses", None)
    if local is None or host not in WILDCARD_HOSTS:
        return ()
    try:
        return tuple(await asyncio.to_thread(local))[:16]
    except Exception as exc:  # a plugin's interface probe failing costs only the preference
        log.warning("could not list this host's preferred link addresses: %s", exc)
        return ()


async def start_discovery(*, enabled: bool, host: str, discovery_port: int, member_id: str,
                          security: LinkSecurity | None, address: str, api_address: str, incarnation: str,
                          dial: Callable[[str, str], None]) -> DiscoveryService | None:
    """Announce this node on the LAN and dial peers heard from (``dial(member_id, address)``,
    spec D10-D14); None when off, or when the mesh link listens on loopback only (no peer
    could reach it), or when the UDP port cannot be used (static ``--peer`` still works)."""
    if not enabled:
        return None
    if host.startswith("127.") or host in ("::1", "localhost"):
        log.info("discovery off: the mesh link listens on %s only (use --host 0.0.0.0 to join a LAN)", host)
        return None
    key = security.discovery_key if security is not None else discovery_key(bytes(32))
    port = member_address(address).port
    core = Discovery(member_id, key)
    service = DiscoveryService(
        core, port=discovery_port, on_peer=dial,
        announcement=lambda: {"address": f"0.0.0.0:{port}", "api_address": api_address, "incarnation": incarnation})
    try:
        await service.start()
    except OSError as exc:
        log.warning("discovery off: UDP port %d cannot be used (%s); static --peer still works", discovery_port, exc)
        return None
    log.info("discovery: announcing on UDP port %d every %.0f s", discovery_port, core.interval_s)
    return service
