"""The network side of a node: the address it advertises, the other addresses a transport
prefers (Thunderbolt), and LAN discovery. A mixin of ``mesh.node.node.Node``; it reads the node's
config, links, identity and state. Spec: specs/transport.md TB1, TB2; specs/discovery.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from mesh.node.links import split_address

if TYPE_CHECKING:
    from mesh.kernel.records import MemberInfo
    from mesh.node.config import NodeConfig
    from mesh.node.links import Links
    from mesh.security import LinkSecurity

log = logging.getLogger("mesh.node.node")


class NodeNetworking:
    """Addresses and discovery of a node (mixed into ``Node``)."""

    config: NodeConfig
    links: Links
    me: MemberInfo
    member_id: str
    incarnation: str
    security: LinkSecurity | None

    async def _advertised_address(self, port: int) -> str:
        """host:port others should dial: the listen host, or when it is a wildcard an address
        on the best interface (``--interface`` pins it; spec TB1); each hello then names one
        on a subnet shared with that peer."""
        from mesh.netif import advertise_address, local_interfaces

        host = self.config.host
        if host not in ("0.0.0.0", "::", ""):
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        table = await asyncio.to_thread(local_interfaces)
        chosen = advertise_address(table, None, pinned_interface=self.config.interface)
        self.links.advertise = lambda peer: advertise_address(table, peer, pinned_interface=self.config.interface)
        if chosen is None:
            return f"{host or '0.0.0.0'}:{port}"
        return f"[{chosen}]:{port}" if ":" in chosen else f"{chosen}:{port}"

    async def _alt_addresses(self) -> tuple[str, ...]:
        """Other hosts this node's link listens on that a transport prefers (the tbip
        transport: Thunderbolt interfaces), when listening on a wildcard (spec TB2)."""
        local = getattr(self.links.transport, "local_addresses", None)
        if local is None or self.config.host not in ("0.0.0.0", "::", ""):
            return ()
        try:
            return tuple(await asyncio.to_thread(local))[:16]
        except Exception as exc:  # a plugin's interface probe failing costs only the preference
            log.warning("could not list this host's preferred link addresses: %s", exc)
            return ()

    async def _start_discovery(self) -> Any:
        """Announce this node on the LAN and dial peers heard from (spec D10-D14); None when
        off, or when the mesh link listens on loopback only (no peer could reach it)."""
        from mesh.node.discovery import Discovery, DiscoveryService
        from mesh.security import discovery_key

        cfg = self.config
        if not cfg.discovery:
            return None
        if cfg.host.startswith("127.") or cfg.host in ("::1", "localhost"):
            log.info("discovery off: the mesh link listens on %s only (use --host 0.0.0.0 to join a LAN)", cfg.host)
            return None
        key = self.security.discovery_key if self.security is not None else discovery_key(bytes(32))
        _, port = split_address(self.me.address)
        core = Discovery(self.member_id, key)
        service = DiscoveryService(
            core, port=cfg.discovery_port,
            on_peer=lambda member_id, address: self.links.dial_address(member_id, address),
            announcement=lambda: {"address": f"0.0.0.0:{port}", "api_address": self.me.api_address,
                                  "incarnation": self.incarnation})
        try:
            await service.start()
        except OSError as exc:
            log.warning("discovery off: UDP port %d cannot be used (%s); static --peer still works",
                        cfg.discovery_port, exc)
            return None
        log.info("discovery: announcing on UDP port %d every %.0f s", cfg.discovery_port, core.interval_s)
        return service
