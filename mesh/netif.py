"""The host's network interfaces, as plain data, and the subnet arithmetic over them.

Discovery (``mesh/node/discovery.py``) and the Thunderbolt-IP transport (``transports/tbip.py``)
decide from an interface table; this module only reads it (psutil, and on Linux the
driver name under /sys/class/net) and never changes host settings. Decisions
(``advertise_address``, ``route_to_peer``, ``thunderbolt_interfaces``) are pure functions
of a table, so tests pass fake ones; they know nothing of sockets, peers or messages.
Spec: specs/transport.md TB1, TB2, TB3.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mesh.errors import ConfigError

# Interface kinds. "thunderbolt": Thunderbolt/USB4 networking (Linux thunderbolt-net,
# macOS Thunderbolt Bridge or ports); "virtual": container, VPN and bridge devices that a
# peer on the LAN cannot reach; "loopback"; "ethernet"/"wifi"/"other" for the rest.
KINDS = ("thunderbolt", "ethernet", "wifi", "virtual", "loopback", "other")


@dataclass(frozen=True, slots=True, kw_only=True)
class IfAddress:
    """One address on an interface: ``address`` (no zone), ``prefix_len`` in bits."""

    address: str
    prefix_len: int

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_interface(f"{self.address}/{self.prefix_len}").network

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True, slots=True, kw_only=True)
class Interface:
    """One network interface: its name, kind (one of ``KINDS``), whether it is up and
    carries multicast, and its addresses."""

    name: str
    kind: str
    up: bool = True
    multicast: bool = True
    addresses: tuple[IfAddress, ...] = field(default_factory=tuple)


_VIRTUAL_PREFIXES = ("docker", "br-", "veth", "virbr", "vmnet", "vboxnet", "tun", "tap", "wg", "utun",
                     "zt", "tailscale", "cni", "flannel", "cali", "lxc", "lxd", "podman", "awdl", "llw",
                     "anpi", "ipsec", "gif", "stf", "ap")


def classify(name: str, *, driver: str | None = None, hardware_port: str | None = None) -> str:
    """The kind of an interface from its name and, when known, its Linux driver name
    (/sys/class/net/NAME/device/driver) or macOS hardware port name (``networksetup
    -listallhardwareports``)."""
    lowered = name.lower()
    port = (hardware_port or "").lower()
    if lowered in ("lo", "lo0") or lowered.startswith("loopback"):
        return "loopback"
    if (driver or "") in ("thunderbolt-net", "thunderbolt_net") or lowered.startswith("thunderbolt") \
            or "thunderbolt" in port:
        return "thunderbolt"
    if lowered.startswith(_VIRTUAL_PREFIXES):
        return "virtual"
    if lowered.startswith(("wl", "wifi")) or "wi-fi" in port or "airport" in port:
        return "wifi"
    if lowered.startswith(("en", "eth", "em")) or "ethernet" in port:
        return "ethernet"
    return "other"


def _linux_driver(name: str) -> str | None:
    try:
        return Path(f"/sys/class/net/{name}/device/driver").resolve().name
    except OSError:
        return None


def _macos_hardware_ports() -> dict[str, str]:
    """Device -> hardware port name, read (never changed) with ``networksetup``."""
    import subprocess

    try:
        out = subprocess.run(["networksetup", "-listallhardwareports"], capture_output=True, text=True,
                             timeout=5.0, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    ports: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("Hardware Port:"):
            current = line.partition(":")[2].strip()
        elif line.startswith("Device:") and current:
            ports[line.partition(":")[2].strip()] = current
    return ports


def local_interfaces() -> list[Interface]:
    """This host's interfaces (psutil), sorted by name, with IPv4 and IPv6 addresses."""
    import psutil

    stats = psutil.net_if_stats()
    ports = _macos_hardware_ports() if sys.platform == "darwin" else {}
    table = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        found = []
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.address or not a.netmask:
                continue
            address = a.address.split("%", 1)[0]
            try:
                prefix = ipaddress.ip_network(f"{address}/{a.netmask}", strict=False).prefixlen
            except ValueError:
                try:  # psutil may give an IPv6 netmask as a prefix-length-free mask string
                    prefix = int(ipaddress.ip_address(a.netmask)).bit_count()
                except ValueError:
                    continue
            found.append(IfAddress(address=address, prefix_len=prefix))
        st = stats.get(name)
        flags = getattr(st, "flags", "") or ""
        driver = _linux_driver(name) if sys.platform.startswith("linux") else None
        table.append(Interface(name=name, kind=classify(name, driver=driver, hardware_port=ports.get(name)),
                               up=bool(st.isup) if st is not None else False,
                               multicast="multicast" in flags if flags else True,
                               addresses=tuple(found)))
    return table


def shares_subnet(a: IfAddress, peer_address: str) -> bool:
    """Whether ``peer_address`` lies in the subnet of ``a``."""
    try:
        return ipaddress.ip_address(peer_address.split("%", 1)[0]) in a.network
    except ValueError:
        return False


# --- Address choice (spec TB1-TB3). Pure functions of a table: no I/O, same answer for the
# same table in any order (every sort key below is total).

# Rank of a kind when choosing among interfaces; "virtual" and "loopback" are never chosen
# unless pinned (or, for loopback, unless the peer is loopback itself).
_KIND_RANK = {"thunderbolt": 0, "ethernet": 1, "wifi": 2, "other": 3}
# For any peer (the address every member is told): a LAN before a Thunderbolt cable, which
# reaches only the machine at its other end (its address is offered to that one as the
# per-peer choice and as a tbip route)
_ANY_PEER_RANK = {"ethernet": 0, "wifi": 1, "other": 2, "thunderbolt": 3}


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _is_link_local(text: str) -> bool:
    ip = _ip(text)
    return ip is not None and ip.is_link_local  # 169.254/16 and fe80::/10


def _usable(a: IfAddress) -> bool:
    ip = _ip(a.address)
    return ip is not None and not (ip.is_unspecified or ip.is_multicast)


def _address_key(a: IfAddress) -> tuple[int, int, int, int]:
    """IPv4 before IPv6, routable before link-local, then numeric order."""
    ip = ipaddress.ip_address(a.address)
    return (ip.version, int(ip.is_link_local), int(ip), a.prefix_len)


def _routable(iface: Interface) -> bool:
    return iface.up and iface.kind in _KIND_RANK


def host_key(host: str) -> str:
    """A host in one spelling: an IP address normalised (brackets and zone dropped), a name
    lower-cased; for comparing the hosts of addresses written in different ways."""
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return host.lower()


def _zone(peer_address: str) -> str | None:
    _, sep, zone = peer_address.partition("%")
    return zone if sep and zone else None


def advertise_address(table: list[Interface], peer_address: str | None, *,
                      pinned_interface: str | None = None) -> str | None:
    """The local address to advertise to a peer at ``peer_address`` (an IP, optionally with
    a ``%zone``), or to any peer when None; None when nothing qualifies (spec TB1).

    ``pinned_interface`` (``--interface``) wins: its first usable address, whatever its kind.
    Otherwise an address of an up interface whose subnet holds the peer, by kind
    (thunderbolt, ethernet, wifi, other), never a virtual or loopback one (127.0.0.1 or
    ::1 when the peer is loopback itself); else (and for any peer) the best address of any up
    non-virtual non-loopback interface by how widely it reaches (ethernet, wifi, other,
    thunderbolt), link-local addresses only when nothing else.

    Raises ConfigError when the pinned interface does not exist or has no usable address.
    """
    if pinned_interface is not None:
        return _pinned_address(table, pinned_interface)
    if peer_address is not None:
        peer_ip = _ip(peer_address)
        if peer_ip is not None and peer_ip.is_loopback:
            return "127.0.0.1" if peer_ip.version == 4 else "::1"
        zone = _zone(peer_address)
        shared = [(_KIND_RANK[i.kind], i.name, _address_key(a), a.address)
                  for i in table if _routable(i) and (zone is None or i.name == zone)
                  for a in i.addresses if _usable(a) and shares_subnet(a, peer_address)]
        if shared:
            return min(shared)[3]
    # No shared subnet, or any peer: the address of the most widely reachable interface
    # (LAN before Thunderbolt), link-local ones (reachable on one link only) last.
    fallback = [(int(ipaddress.ip_address(a.address).is_link_local), _ANY_PEER_RANK[i.kind], i.name,
                 _address_key(a), a.address)
                for i in table if _routable(i) for a in i.addresses if _usable(a)]
    return min(fallback)[4] if fallback else None


def _pinned_address(table: list[Interface], name: str) -> str:
    names = sorted({i.name for i in table})
    valid = ", ".join(names) if names else "(none found)"
    found = [i for i in table if i.name == name]
    if not found:
        raise ConfigError(f"--interface {name!r}: no such interface; valid: {valid}")
    addresses = sorted((a for i in found for a in i.addresses if _usable(a)), key=_address_key)
    if not addresses:
        with_address = ", ".join(sorted({i.name for i in table if any(_usable(a) for a in i.addresses)}))
        raise ConfigError(f"--interface {name!r} has no usable IP address; valid: "
                          f"{with_address or '(none found)'}")
    return addresses[0].address


def route_to_peer(table: list[Interface], peer_addresses: list[str]) -> str | None:
    """Which of the addresses a peer advertised to dial (spec TB2).

    First one on a subnet shared with a local up interface, by the local interface's kind
    (thunderbolt, ethernet, wifi, other; never virtual or loopback: a peer's docker or VPN
    subnet looks shared but is not the same network), IPv4 before IPv6, then numeric
    order; an IPv6 link-local answer carries the local interface's zone
    (``fe80::1%bridge0``) so it can be dialed. Link-local addresses (169.254/16, fe80::/10)
    count on Thunderbolt interfaces only: Thunderbolt links self-assign them, while on a LAN
    every host has fe80::/64 so a match proves nothing. Else the first advertised address that is
    neither link-local nor loopback, then the first not link-local; None when none.
    """
    shared = []
    for peer in peer_addresses:
        peer_ip = _ip(peer)  # a zone the peer sent names its interface, not ours: dropped
        if peer_ip is None:
            continue
        for i in table:
            if not _routable(i):
                continue
            if peer_ip.is_link_local and i.kind != "thunderbolt":
                continue  # fe80::/64 is on every link: a match on a LAN proves nothing
            for a in i.addresses:
                if _usable(a) and shares_subnet(a, str(peer_ip)):
                    dial = peer
                    if peer_ip.version == 6 and peer_ip.is_link_local:
                        dial = f"{peer_ip}%{i.name}"
                    shared.append((_KIND_RANK[i.kind], peer_ip.version, int(peer_ip), i.name, dial))
    if shared:
        return min(shared)[4]
    not_link_local = [p for p in peer_addresses if not _is_link_local(p)]
    for peer in not_link_local:
        ip = _ip(peer)
        if ip is None or not ip.is_loopback:
            return peer
    return not_link_local[0] if not_link_local else None


def thunderbolt_interfaces(table: list[Interface]) -> list[Interface]:
    """The up Thunderbolt/USB4 networking interfaces, by name (spec TB3). Their kind comes
    from ``classify``: Linux thunderbolt-net (``thunderbolt0``, or driver
    ``thunderbolt-net``), macOS Thunderbolt Bridge (``bridge0``) or Thunderbolt ports."""
    return sorted((i for i in table if i.up and i.kind == "thunderbolt"), key=lambda i: i.name)


def thunderbolt_addresses(table: list[Interface]) -> list[str]:
    """The usable addresses of up Thunderbolt interfaces, link-local ones included (macOS
    self-assigns 169.254/16 and fe80::/10 on Thunderbolt Bridge); IPv4 first, deterministic."""
    return [a.address for i in thunderbolt_interfaces(table)
            for a in sorted((a for a in i.addresses if _usable(a)), key=_address_key)]


# -- host:port text ---------------------------------------------------------------------------

MAX_ADDRESS_CHARS = 300  # a DNS name is at most 253; also bounds what a datagram may make us parse
MAX_PORT = 65535
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


class AddressError(ConfigError):
    """A ``host:port`` text or a port number that is not valid; the message says what was
    wrong and what would be valid."""


def check_port(port: object, what: str = "port", *, allow_zero: bool = True) -> int:
    """``port`` when it is an integer 0..65535 (1..65535 with ``allow_zero=False``; 0 asks the
    OS for a free port when listening); raises AddressError naming ``what`` (e.g.
    ``"--api-port"``) otherwise. A bool is not a port."""
    low = 0 if allow_zero else 1
    if type(port) is not int or not low <= port <= MAX_PORT:
        raise AddressError(f"{what} {port!r} invalid; valid: an integer {low}..{MAX_PORT}")
    return port


def _is_ip(host: str) -> bool:
    """An IP address; an IPv6 one may carry a ``%zone`` (an interface name or number)."""
    ip = _ip(host)
    if ip is None:
        return False
    _, sep, zone = host.partition("%")
    return not sep or (ip.version == 6 and bool(zone) and all(c in _NAME_CHARS for c in zone))


def _valid_host(host: str) -> bool:
    """An IP address (IPv6 with an optional ``%zone``), ``*``, or a host name of ASCII letters,
    digits, ``-``, ``.`` and ``_``."""
    return host == "*" or _is_ip(host) or (bool(host) and all(c in _NAME_CHARS for c in host))


@dataclass(frozen=True, slots=True)
class Address:
    """A transport address: ``host`` (an IP, IPv6 possibly with ``%zone``, a host name, or a
    wildcard ``""`` / ``*`` / ``0.0.0.0`` / ``::``) and ``port`` (0..65535). ``str()`` gives
    ``host:port``, an IPv6 host in brackets (``[fe80::1%en0]:7600``), which ``parse`` reads
    back.

    Raises:
        AddressError: a port outside 0..65535 or not an int, a host that is not a str.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str):
            raise AddressError(f"host {self.host!r} is not a string")
        check_port(self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None, empty_host: str | None = None) -> Address:
        """Read ``host:port``, ``[ipv6]:port``, or, when ``default_port`` is given, a bare host,
        ``[ipv6]`` or unbracketed IPv6 address that takes that port.

        One rule set for every caller: at most ``MAX_ADDRESS_CHARS`` characters, surrounding
        whitespace ignored; the port is ASCII digits, 1..65535; brackets hold an IPv6
        address only; the host is an IP address, ``*`` or a name of ASCII letters, digits,
        ``-``, ``.`` and ``_``. Text with several colons and no brackets is a bare IPv6
        address when it is one as a whole and ``default_port`` is given; otherwise its port
        is after the last colon (``:::7600`` is ``::`` port 7600, the form some peers
        send). An empty host (``:7600``) becomes ``empty_host`` (``""`` keeps it: a
        wildcard; ``"127.0.0.1"`` dials this machine); with ``empty_host=None`` it is an
        error.

        Raises:
            AddressError: naming what was wrong and the valid forms.
        """
        if not isinstance(text, str):
            raise AddressError(f"address {text!r} is not a string; valid: host:port, [ipv6]:port")
        shown = repr(text[:80]) + ("..." if len(text) > 80 else "")
        if len(text) > MAX_ADDRESS_CHARS:
            raise AddressError(f"address {shown} is {len(text)} characters long; at most {MAX_ADDRESS_CHARS}")
        body = text.strip()
        forms = "host:port, [ipv6]:port" + (", or a bare host (port {default_port})".format(
            default_port=default_port) if default_port is not None else "")
        if body.startswith("["):
            host, sep, rest = body[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise AddressError(f"address {shown}: unbalanced brackets; valid: {forms}")
            if ":" not in host or not _is_ip(host):
                raise AddressError(f"address {shown}: brackets hold an IPv6 address only; valid: {forms}")
            port_text: str | None = rest[1:] if rest else None
        elif default_port is not None and (":" not in body or (body.count(":") > 1 and _is_ip(body))):
            host, port_text = body, None  # a bare host or an unbracketed IPv6 address
        else:
            host, sep, port_text = body.rpartition(":")
            if not sep:
                raise AddressError(f"address {shown} has no port; valid: {forms}")
        if port_text is None:
            if default_port is None:
                raise AddressError(f"address {shown} has no port; valid: {forms}")
            port = check_port(default_port, "default port", allow_zero=False)
        elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= MAX_PORT:
            port = int(port_text)
        else:
            raise AddressError(f"address {shown}: port {port_text[:20]!r} is not 1..{MAX_PORT}; valid: {forms}")
        if not host:
            if empty_host is None:
                raise AddressError(f"address {shown} has no host; valid: {forms}")
            host = empty_host
        elif not _valid_host(host):
            raise AddressError(f"address {shown}: host {host[:80]!r} is neither an IP address nor a host name "
                               f"(ASCII letters, digits, '-', '.', '_'); valid: {forms}")
        return cls(host, port)
