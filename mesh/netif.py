"""The host's network interfaces, as plain data, and the subnet arithmetic over them.

Discovery (``mesh/discovery.py``) and the Thunderbolt-IP transport (``transports/tbip.py``)
decide from an interface table; this module only reads it (psutil, and on Linux the
driver name under /sys/class/net) and never changes host settings. Decisions take a
table as input, so tests pass fake ones.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
                    prefix = bin(int(ipaddress.ip_address(a.netmask))).count("1")
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
