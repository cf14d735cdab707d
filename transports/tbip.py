"""Thunderbolt-IP transport: TCP (same frames, same TLS) that dials a peer over a
Thunderbolt/USB4 IP link when both ends share one, and over the LAN otherwise.

A peer advertises the addresses of its Thunderbolt interfaces (``local_addresses``); the
node hands them over with ``learn_routes``. ``connect(host, port)`` then tries the learned
address that shares a subnet with a local up Thunderbolt interface first, within a short
share of the timeout, and falls back to ``host:port`` (the LAN path). It only reads the
interface table (``mesh.netif``); it never changes host network settings, and knows
nothing of what messages mean. Registered as the ``tbip`` entry point of
``mesh.transports``. Spec: specs/transport.md TB2, TB3 (and T3-T8, S3 through TCP).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

from mesh.errors import PeerTimeout, TransportError
from mesh.netif import (
    Address,
    Interface,
    check_port,
    host_key,
    local_interfaces,
    route_to_peer,
    shares_subnet,
    thunderbolt_addresses,
    thunderbolt_interfaces,
)
from mesh.security import LinkSecurity
from transports.tcp import TcpConnection, TcpTransport

logger = logging.getLogger(__name__)

# The share of a connect's timeout given to the Thunderbolt attempt; the rest (at least) is
# left for the LAN fallback, so a dead Thunderbolt link costs little.
THUNDERBOLT_TIMEOUT_SHARE = 0.3
PATHS = ("thunderbolt", "lan")


def _format(host: str, port: int) -> str:
    return str(Address(host, port))


class TbipTransport(TcpTransport):
    """TCP that prefers a shared Thunderbolt/USB4 IP link (spec TB2).

    ``interfaces`` returns the interface table (``mesh.netif.local_interfaces`` by
    default; tests pass a fake one). Other keyword arguments go to ``TcpTransport``.
    """

    name = "tbip"
    secure = True

    def __init__(self, *, security: LinkSecurity | None = None,
                 interfaces: Callable[[], list[Interface]] = local_interfaces,
                 **tcp_kwargs: Any) -> None:
        super().__init__(security=security, **tcp_kwargs)
        self._interfaces = interfaces
        # LAN "host:port" -> the peer's other addresses, as (host, port).
        self._routes: dict[str, list[tuple[str, int]]] = {}
        self._last_path: dict[str, str] = {}
        self._paths: weakref.WeakKeyDictionary[TcpConnection, str] = weakref.WeakKeyDictionary()

    def learn_routes(self, lan_address: str, addresses: list[str]) -> None:
        """Record that the peer reachable at ``lan_address`` (``"host:port"``) also listens on
        ``addresses`` (hosts, on the same port unless given as ``"host:port"``). Replaces
        what was learned before for that peer; an empty list forgets it.

        Raises AddressError (a ConfigError) for a malformed address (``Address.parse``).
        """
        lan = Address.parse(lan_address)
        routes = [(a.host, a.port) for a in (Address.parse(text, default_port=lan.port) for text in addresses)]
        key = _format(host_key(lan.host), lan.port)
        if routes:
            self._routes[key] = routes
        else:
            self._routes.pop(key, None)

    def local_addresses(self) -> list[str]:
        """The addresses of this host's up Thunderbolt interfaces, for the node to advertise
        (link-local ones included). Reads the interface table; changes nothing."""
        return thunderbolt_addresses(self._interfaces())

    def last_path(self, host: str, port: int) -> str:
        """The path (one of ``PATHS``) of the last connection opened to ``host:port``.

        Raises KeyError when no connection to it was opened.
        """
        key = _format(host_key(host), port)
        try:
            return self._last_path[key]
        except KeyError:
            raise KeyError(f"no connection to {key} was opened by this transport") from None

    def path_of(self, conn: TcpConnection) -> str | None:
        """The path (one of ``PATHS``) a connection opened by ``connect`` took; None for
        others (accepted ones)."""
        return self._paths.get(conn)

    async def preferred_route(self, host: str, port: int, *, timeout_s: float) -> tuple[str, int] | None:
        """The learned address of the peer at ``host:port`` to try first: one sharing a subnet
        with a local up Thunderbolt interface (spec TB2, TB4), or None. The table is read off the event loop
        (on macOS it runs ``networksetup``), within ``timeout_s``."""
        learned = self._routes.get(_format(host_key(host), port))
        if not learned:
            return None
        try:
            table = await asyncio.wait_for(asyncio.to_thread(self._interfaces), timeout_s)
        except Exception as exc:  # noqa: BLE001 - psutil or a given table may raise anything;
            # an unreadable table must not stop the LAN path
            logger.info("tbip: cannot read the interface table (%r); using the LAN path", exc)
            return None
        links = thunderbolt_interfaces(table)
        chosen = route_to_peer(links, [h for h, _ in learned])
        if chosen is None or not any(shares_subnet(a, chosen) for i in links for a in i.addresses):
            return None  # route_to_peer's fallback is not a Thunderbolt path
        want = host_key(chosen)
        for learned_host, learned_port in learned:
            if host_key(learned_host) == want:
                return chosen, learned_port
        return None

    async def connect(self, host: str, port: int, *, timeout_s: float) -> TcpConnection:
        """Open a connection to the peer at ``host:port`` within ``timeout_s`` seconds: over
        a learned Thunderbolt address first when one shares a local Thunderbolt subnet
        (within ``THUNDERBOLT_TIMEOUT_SHARE`` of the timeout), else or on failure over
        ``host:port``. Raises as ``TcpTransport.connect`` does for the LAN attempt."""
        check_port(port)
        key = _format(host_key(host), port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        share_s = timeout_s * THUNDERBOLT_TIMEOUT_SHARE
        route = await self.preferred_route(host, port, timeout_s=share_s) if share_s > 0 else None
        if route is not None:
            tb_host, tb_port = route
            try:
                conn = await super().connect(tb_host, tb_port,
                                             timeout_s=max(share_s - (loop.time() - start), 0.0))
            except TransportError as exc:  # refused, timed out, or TLS failed: try the LAN
                logger.info("tbip: Thunderbolt path %s to %s failed (%s); falling back to the LAN",
                            _format(tb_host, tb_port), key, exc)
            else:
                return self._opened(conn, key, "thunderbolt")
        remaining_s = timeout_s - (loop.time() - start)
        if remaining_s <= 0:
            raise PeerTimeout(f"connect to {key} did not finish within {timeout_s}s")
        conn = await super().connect(host, port, timeout_s=remaining_s)
        return self._opened(conn, key, "lan")

    def _opened(self, conn: TcpConnection, key: str, path: str) -> TcpConnection:
        self._last_path[key] = path
        self._paths[conn] = path
        logger.debug("tbip: connected to %s over the %s path (%s)", key, path, conn.peer)
        return conn
