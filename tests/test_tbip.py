"""Tests of address choice (mesh/netif.py) and the Thunderbolt-IP transport (transports/tbip.py)
against specs/transport.md TB1-TB3.

Decisions are checked on fake interface tables. Real sockets go to 127.0.0.1 only: a fake
table puts 127.0.0.0/8 on a "thunderbolt0" interface, and the Thunderbolt and LAN paths
differ by port (one listening, one refusing), so preference and fallback both show.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from mesh import netif
from mesh.errors import ConfigError, TransportError
from mesh.netif import (
    KINDS,
    Address,
    IfAddress,
    Interface,
    advertise_address,
    classify,
    route_to_peer,
    thunderbolt_addresses,
    thunderbolt_interfaces,
)
from mesh.security import LinkSecurity
from mesh.testing.transport_harness import free_port, serving
from mesh.wire import Message
from transports.base import Connection
from transports.tbip import TbipTransport

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
T = 5.0  # bound on waits that should succeed quickly


def iface(name: str, *addresses: str, kind: str | None = None, up: bool = True, driver: str | None = None,
          port: str | None = None) -> Interface:
    """An interface from "address/prefix" strings; its kind from ``classify`` unless given."""
    parsed = tuple(IfAddress(address=a.split("/")[0], prefix_len=int(a.split("/")[1])) for a in addresses)
    return Interface(name=name, kind=kind or classify(name, driver=driver, hardware_port=port), up=up,
                     addresses=parsed)


LO = iface("lo", "127.0.0.1/8", "::1/128")
DOCKER = iface("docker0", "172.17.0.1/16")
TAILSCALE = iface("tailscale0", "100.64.3.4/10", "fd7a:115c:a1e0::4/48")

# Linux: a thunderbolt-net point-to-point link and the LAN.
LINUX = [LO, iface("eth0", "192.168.1.10/24", "fe80::a/64"),
         iface("thunderbolt0", "10.0.5.1/30", "fe80::b/64"), DOCKER, TAILSCALE]

# macOS: Thunderbolt Bridge with self-assigned link-local addresses, and Wi-Fi.
MAC = [iface("lo0", "127.0.0.1/8", "::1/128"),
       iface("en0", "192.168.1.20/24", "fe80::1/64", port="Wi-Fi"),
       iface("bridge0", "169.254.10.20/16", "fe80::2/64", port="Thunderbolt Bridge"),
       iface("utun3", "fd00:1::3/64"), iface("awdl0", "fe80::99/64")]

# Multi-homed: two wired LANs, Wi-Fi on the first one too, a global IPv6 address.
MULTI = [LO, iface("eth0", "192.168.1.10/24", "192.168.1.9/24", "2001:db8::10/64"),
         iface("eth1", "10.1.0.5/16"), iface("wlan0", "192.168.1.11/24"), DOCKER, TAILSCALE]


def shuffled(table: list[Interface], seed: int) -> list[Interface]:
    copy = list(table)
    random.Random(seed).shuffle(copy)
    return copy


# --- TB3: kinds ---------------------------------------------------------------------------


@pytest.mark.spec("TB3")
def test_interface_kinds_from_name_driver_and_hardware_port() -> None:
    assert classify("thunderbolt0") == "thunderbolt"
    assert classify("enp5s0", driver="thunderbolt-net") == "thunderbolt"
    # macOS: "bridge0" is no virtual prefix; the hardware port makes it Thunderbolt.
    assert classify("bridge0", hardware_port="Thunderbolt Bridge") == "thunderbolt"
    assert classify("bridge0") == "other"
    assert classify("en5", hardware_port="Thunderbolt 1") == "thunderbolt"
    assert classify("en0", hardware_port="Wi-Fi") == "wifi"
    assert classify("en0") == "ethernet"
    assert classify("wlan0") == "wifi"
    for name in ("docker0", "tailscale0", "utun3", "awdl0", "veth1234", "br-0a1b", "wg0"):
        assert classify(name) == "virtual", name
    assert classify("lo") == classify("lo0") == "loopback"


@pytest.mark.spec("TB3")
def test_thunderbolt_interfaces_are_the_up_thunderbolt_ones() -> None:
    assert [i.name for i in thunderbolt_interfaces(LINUX)] == ["thunderbolt0"]
    assert [i.name for i in thunderbolt_interfaces(MAC)] == ["bridge0"]
    assert thunderbolt_interfaces(MULTI) == []
    down = [iface("thunderbolt0", "10.0.5.1/30", up=False), iface("eth0", "192.168.1.10/24")]
    assert thunderbolt_interfaces(down) == []
    two = [iface("thunderbolt1", "10.0.6.1/30"), iface("en7", "169.254.1.1/16", port="Thunderbolt 2"),
           iface("thunderbolt0", "10.0.5.1/30")]
    assert [i.name for i in thunderbolt_interfaces(two)] == ["en7", "thunderbolt0", "thunderbolt1"]


@pytest.mark.spec("TB3")
def test_thunderbolt_link_local_addresses_are_advertised_and_routable() -> None:
    assert thunderbolt_addresses(MAC) == ["169.254.10.20", "fe80::2"]
    assert thunderbolt_addresses(LINUX) == ["10.0.5.1", "fe80::b"]
    assert TbipTransport(interfaces=lambda: MAC).local_addresses() == ["169.254.10.20", "fe80::2"]
    assert TbipTransport(interfaces=lambda: MULTI).local_addresses() == []
    # The peer's self-assigned address on the same Thunderbolt Bridge is the one to dial.
    assert route_to_peer(MAC, ["192.168.1.30", "169.254.7.8"]) == "169.254.7.8"
    assert advertise_address(MAC, "169.254.7.8") == "169.254.10.20"


def _fake_psutil(monkeypatch: pytest.MonkeyPatch, addrs: dict[str, list[tuple[int, str, str]]]) -> None:
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        name: [SimpleNamespace(family=f, address=a, netmask=m) for f, a, m in entries]
        for name, entries in addrs.items()})
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {
        name: SimpleNamespace(isup=True, flags="up,broadcast,running,multicast") for name in addrs})


@pytest.mark.spec("TB3")
def test_macos_table_reads_hardware_ports_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    listing = ("Hardware Port: Wi-Fi\nDevice: en0\nEthernet Address: aa:bb\n\n"
               "Hardware Port: Thunderbolt Bridge\nDevice: bridge0\nEthernet Address: N/A\n")

    def run(argv: list[str], **kwargs: Any) -> SimpleNamespace:
        commands.append(list(argv))
        return SimpleNamespace(stdout=listing, returncode=0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "platform", "darwin")
    _fake_psutil(monkeypatch, {
        "bridge0": [(socket.AF_INET, "169.254.10.20", "255.255.0.0"),
                    (socket.AF_INET6, "fe80::2%bridge0", "ffff:ffff:ffff:ffff::")],
        "en0": [(socket.AF_INET, "192.168.1.20", "255.255.255.0")],
        "lo0": [(socket.AF_INET, "127.0.0.1", "255.0.0.0")],
    })
    table = netif.local_interfaces()
    assert {i.name: i.kind for i in table} == {"bridge0": "thunderbolt", "en0": "wifi", "lo0": "loopback"}
    assert TbipTransport().local_addresses() == ["169.254.10.20", "fe80::2"]
    # Only the read-only listing ran: never a command that changes settings.
    assert commands and all(c == ["networksetup", "-listallhardwareports"] for c in commands)


@pytest.mark.spec("TB3")
def test_linux_table_finds_thunderbolt_net_by_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(netif, "_linux_driver", lambda name: "thunderbolt-net" if name == "enp9s0" else None)
    _fake_psutil(monkeypatch, {"enp9s0": [(socket.AF_INET, "10.0.5.1", "255.255.255.252")],
                               "eth0": [(socket.AF_INET, "192.168.1.10", "255.255.255.0")]})
    table = netif.local_interfaces()
    assert [(i.name, i.kind) for i in table] == [("enp9s0", "thunderbolt"), ("eth0", "ethernet")]
    assert table[0].addresses == (IfAddress(address="10.0.5.1", prefix_len=30),)


@pytest.mark.spec("TB3")
def test_the_real_table_reads_as_plain_data() -> None:
    table = netif.local_interfaces()  # read only; whatever this host has
    assert all(i.kind in KINDS for i in table)
    assert all(isinstance(a, IfAddress) for i in table for a in i.addresses)


# --- TB1: the advertised address ----------------------------------------------------------


@pytest.mark.spec("TB1")
def test_advertise_on_the_subnet_shared_with_the_peer() -> None:
    assert advertise_address(LINUX, "10.0.5.2") == "10.0.5.1"  # the Thunderbolt link
    assert advertise_address(LINUX, None) == "192.168.1.10"  # to every member: the LAN, not the cable
    assert advertise_address(MAC, None) == "192.168.1.20"
    assert advertise_address(LINUX, "192.168.1.30") == "192.168.1.10"
    assert advertise_address(MAC, "192.168.1.30") == "192.168.1.20"
    assert advertise_address(MAC, "169.254.200.1") == "169.254.10.20"
    # fe80::/64 is on both; Thunderbolt ranks first, unless the peer's zone names the link.
    assert advertise_address(MAC, "fe80::7") == "fe80::2"
    assert advertise_address(MAC, "fe80::7%en0") == "fe80::1"
    assert advertise_address(MULTI, "192.168.1.99") == "192.168.1.9"  # ethernet before wifi
    assert advertise_address(MULTI, "10.1.200.3") == "10.1.0.5"
    assert advertise_address(MULTI, "2001:db8::99") == "2001:db8::10"


@pytest.mark.spec("TB1")
def test_virtual_and_vpn_addresses_are_never_advertised_unless_pinned() -> None:
    virtual = {"172.17.0.1", "100.64.3.4", "fd7a:115c:a1e0::4", "fd00:1::3", "fe80::99"}
    for table in (LINUX, MAC, MULTI):
        for peer in (None, "172.17.0.2", "100.64.9.9", "fd7a:115c:a1e0::9", "fd00:1::7", "203.0.113.9"):
            chosen = advertise_address(table, peer)
            assert chosen is not None and chosen not in virtual, (peer, chosen)
            assert chosen not in ("127.0.0.1", "::1")
    only_virtual = [LO, DOCKER, TAILSCALE]
    assert advertise_address(only_virtual, "100.64.9.9") is None
    assert advertise_address(only_virtual, None) is None
    assert advertise_address(only_virtual, None, pinned_interface="tailscale0") == "100.64.3.4"
    assert advertise_address(LINUX, "192.168.1.30", pinned_interface="docker0") == "172.17.0.1"


@pytest.mark.spec("TB1")
def test_without_a_shared_subnet_the_best_interface_and_no_link_local() -> None:
    # the LAN before the Thunderbolt cable, which reaches one machine (the lab's two-subnet test
    # found a third node told a cable address it could not reach)
    assert advertise_address(LINUX, None) == "192.168.1.10"
    assert advertise_address(LINUX, "203.0.113.9") == "192.168.1.10"
    only_cable = [LO, iface("thunderbolt0", "10.0.5.1/30")]
    assert advertise_address(only_cable, None) == "10.0.5.1"
    # bridge0 holds only link-local addresses: the Wi-Fi address is advertised instead.
    assert advertise_address(MAC, None) == "192.168.1.20"
    assert advertise_address(MULTI, None) == "192.168.1.9"
    only_link_local = [LO, iface("eth0", "fe80::a/64")]
    assert advertise_address(only_link_local, None) == "fe80::a"  # nothing else
    v6_and_link_local = [iface("eth0", "fe80::a/64", "2001:db8::10/64")]
    assert advertise_address(v6_and_link_local, None) == "2001:db8::10"
    down = [iface("thunderbolt0", "10.0.5.1/30", up=False), iface("eth0", "192.168.1.10/24")]
    assert advertise_address(down, "10.0.5.2") == "192.168.1.10"
    assert advertise_address([LO], None) is None


@pytest.mark.spec("TB1")
def test_loopback_only_for_a_loopback_peer() -> None:
    assert advertise_address(LINUX, "127.0.0.1") == "127.0.0.1"
    assert advertise_address(LINUX, "::1") == "::1"
    assert advertise_address([LO], "127.0.0.5") == "127.0.0.1"


@pytest.mark.spec("TB1", "TB2")
def test_same_table_in_any_order_gives_the_same_answers() -> None:
    peers = [None, "10.0.5.2", "192.168.1.30", "169.254.7.8", "fe80::7", "172.17.0.2", "203.0.113.9",
             "10.1.2.3", "2001:db8::99"]
    advertised = [["192.168.1.30", "10.0.5.2"], ["169.254.7.8", "fe80::7", "192.168.1.31"],
                  ["fe80::7"], ["203.0.113.5", "10.1.9.9", "192.168.1.77"]]
    for table in (LINUX, MAC, MULTI):
        want = [advertise_address(table, p) for p in peers]
        want_routes = [route_to_peer(table, a) for a in advertised]
        for seed in range(20):
            mixed = shuffled(table, seed)
            assert [advertise_address(mixed, p) for p in peers] == want
            assert [route_to_peer(mixed, a) for a in advertised] == want_routes
            assert [route_to_peer(mixed, list(reversed(a))) for a in advertised] == want_routes


@pytest.mark.spec("TB1")
def test_pinned_interface() -> None:
    assert advertise_address(LINUX, None, pinned_interface="eth0") == "192.168.1.10"
    assert advertise_address(MULTI, "10.1.2.3", pinned_interface="eth0") == "192.168.1.9"  # IPv4 first
    assert advertise_address(MAC, None, pinned_interface="bridge0") == "169.254.10.20"
    v6 = [iface("eth0", "fe80::a/64", "2001:db8::10/64")]
    assert advertise_address(v6, None, pinned_interface="eth0") == "2001:db8::10"


@pytest.mark.spec("TB1")
def test_pinned_interface_errors_name_the_flag_and_valid_interfaces() -> None:
    with pytest.raises(ConfigError) as missing:
        advertise_address(LINUX, "192.168.1.30", pinned_interface="en9")
    text = str(missing.value)
    assert "--interface" in text and "'en9'" in text
    for name in ("docker0", "eth0", "lo", "tailscale0", "thunderbolt0"):
        assert name in text
    empty = [*LINUX, iface("thunderbolt1")]
    with pytest.raises(ConfigError) as no_address:
        advertise_address(empty, None, pinned_interface="thunderbolt1")
    text = str(no_address.value)
    assert "--interface" in text and "no usable IP address" in text and "eth0" in text
    assert "thunderbolt1" not in text.split("valid:")[1]


# --- TB2: which of a peer's addresses to dial ---------------------------------------------


@pytest.mark.spec("TB2")
def test_route_to_peer_prefers_a_shared_thunderbolt_subnet() -> None:
    assert route_to_peer(LINUX, ["192.168.1.30", "10.0.5.2"]) == "10.0.5.2"
    assert route_to_peer(LINUX, ["10.0.5.2", "192.168.1.30"]) == "10.0.5.2"
    assert route_to_peer(MAC, ["192.168.1.30", "169.254.7.8", "fe80::7"]) == "169.254.7.8"  # IPv4 first
    # A zone-less link-local IPv6 address gets the local Thunderbolt interface's zone.
    assert route_to_peer(MAC, ["fe80::7"]) == "fe80::7%bridge0"
    assert route_to_peer(MAC, ["fe80::7%en4"]) == "fe80::7%bridge0"  # the peer's zone is not ours
    assert route_to_peer(MULTI, ["192.168.1.77", "10.1.9.9"]) == "10.1.9.9"  # both ethernet: numeric
    wifi_only = [iface("wlan0", "192.168.1.11/24"), iface("eth1", "10.1.0.5/16")]
    assert route_to_peer(wifi_only, ["192.168.1.77", "10.1.9.9"]) == "10.1.9.9"  # ethernet before wifi


@pytest.mark.spec("TB2")
def test_route_to_peer_ignores_shared_virtual_subnets_and_falls_back() -> None:
    # Both hosts run docker: 172.17/16 looks shared but is two different networks.
    assert route_to_peer(LINUX, ["172.17.0.1", "192.168.1.30"]) == "192.168.1.30"
    assert route_to_peer(LINUX, ["100.64.1.1"]) == "100.64.1.1"  # no shared subnet: first usable
    lan = [iface("eth0", "192.168.1.10/24", "169.254.3.3/16", "fe80::a/64")]
    # Link-local matches on a LAN prove nothing (every host has fe80::/64); on Thunderbolt they do.
    assert route_to_peer(lan, ["169.254.1.1", "fe80::1", "203.0.113.5"]) == "203.0.113.5"
    assert route_to_peer(LINUX, ["fe80::1", "203.0.113.5"]) == "fe80::1%thunderbolt0"
    assert route_to_peer(LINUX, ["127.0.0.1", "203.0.113.5"]) == "203.0.113.5"
    assert route_to_peer(LINUX, ["169.254.1.1"]) is None  # link-local, no link shared
    assert route_to_peer(LINUX, []) is None
    assert route_to_peer([], ["peer.local"]) == "peer.local"


# --- TB2: the transport over real sockets on 127.0.0.1 -------------------------------------

# 127.0.0.0/8 on a Thunderbolt interface: a learned 127.0.0.1 route counts as a Thunderbolt one.
TB_LOOPBACK = [iface("thunderbolt0", "127.0.0.1/8", kind="thunderbolt"), iface("eth0", "192.168.1.10/24")]
NO_TB_LOOPBACK = [iface("eth0", "127.0.0.1/8", kind="ethernet")]


async def round_trip(conn: Connection) -> None:
    msg = Message(type="ping", body={"n": 1})
    await conn.send(msg, timeout_s=T, lane="data")
    assert await conn.recv(timeout_s=T) == msg


def table(value: list[Interface], calls: list[int] | None = None) -> Callable[[], list[Interface]]:
    def read() -> list[Interface]:
        if calls is not None:
            calls.append(1)
        return value
    return read


@pytest.mark.spec("TB2")
async def test_thunderbolt_path_is_preferred_when_shared() -> None:
    transport = TbipTransport(interfaces=table(TB_LOOPBACK))
    assert transport.name == "tbip" and transport.secure
    refused = free_port()  # the LAN path: nothing listens there
    async with serving(transport) as port:
        transport.learn_routes(f"{HOST}:{refused}", [f"{HOST}:{port}"])
        conn = await transport.connect(HOST, refused, timeout_s=T)
        try:
            assert transport.last_path(HOST, refused) == "thunderbolt"
            assert transport.path_of(conn) == "thunderbolt"
            assert conn.peer == f"{HOST}:{port}"
            await round_trip(conn)
        finally:
            await conn.close()


@pytest.mark.spec("TB2")
async def test_falls_back_to_the_lan_when_the_thunderbolt_path_fails(caplog: pytest.LogCaptureFixture) -> None:
    transport = TbipTransport(interfaces=table(TB_LOOPBACK))
    refused = free_port()  # the learned Thunderbolt address: refuses
    async with serving(transport) as port:
        transport.learn_routes(f"{HOST}:{port}", [f"{HOST}:{refused}"])
        with caplog.at_level(logging.INFO, logger="transports.tbip"):
            conn = await transport.connect(HOST, port, timeout_s=T)
        try:
            assert transport.last_path(HOST, port) == "lan"
            assert transport.path_of(conn) == "lan"
            assert conn.peer == f"{HOST}:{port}"
            await round_trip(conn)
        finally:
            await conn.close()
    fallbacks = [r for r in caplog.records if r.levelno == logging.INFO and "falling back" in r.getMessage()]
    assert fallbacks and str(refused) in fallbacks[0].getMessage()


@pytest.mark.spec("TB2")
async def test_lan_only_without_a_shared_thunderbolt_link() -> None:
    # The learned route would work, but no local Thunderbolt interface holds its subnet.
    for interfaces in (NO_TB_LOOPBACK, [iface("thunderbolt0", "127.0.0.1/8", kind="thunderbolt", up=False)],
                       [iface("thunderbolt0", "10.0.5.1/30")]):
        transport = TbipTransport(interfaces=table(interfaces))
        async with serving(transport) as lan, serving(transport) as other:
            transport.learn_routes(f"{HOST}:{lan}", [f"{HOST}:{other}"])
            conn = await transport.connect(HOST, lan, timeout_s=T)
            try:
                assert transport.last_path(HOST, lan) == "lan"
                assert conn.peer == f"{HOST}:{lan}"
            finally:
                await conn.close()


@pytest.mark.spec("TB2")
async def test_no_learned_route_means_no_table_read_and_the_lan_path() -> None:
    calls: list[int] = []
    transport = TbipTransport(interfaces=table(TB_LOOPBACK, calls))
    async with serving(transport) as port:
        conn = await transport.connect(HOST, port, timeout_s=T)
        await conn.close()
        assert transport.last_path(HOST, port) == "lan" and calls == []
        transport.learn_routes(f"{HOST}:{port}", [HOST])  # same host and port: learned, then forgotten
        transport.learn_routes(f"{HOST}:{port}", [])
        conn = await transport.connect(HOST, port, timeout_s=T)
        await conn.close()
        assert calls == []


@pytest.mark.spec("TB2")
async def test_an_unreadable_table_falls_back_to_the_lan() -> None:
    def broken() -> list[Interface]:
        raise OSError("no /sys")

    transport = TbipTransport(interfaces=broken)
    async with serving(transport) as port:
        transport.learn_routes(f"{HOST}:{port}", [f"{HOST}:{free_port()}"])
        conn = await transport.connect(HOST, port, timeout_s=T)
        await conn.close()
        assert transport.last_path(HOST, port) == "lan"


@pytest.mark.spec("TB2")
async def test_both_paths_failing_raise_transport_error() -> None:
    transport = TbipTransport(interfaces=table(TB_LOOPBACK))
    lan, tb = free_port(), free_port()
    transport.learn_routes(f"{HOST}:{lan}", [f"{HOST}:{tb}"])
    with pytest.raises(TransportError, match=f"{HOST}:{lan}"):
        await transport.connect(HOST, lan, timeout_s=T)
    with pytest.raises(KeyError):
        transport.last_path(HOST, lan)


def _security(tmp_path: Path, name: str, cluster_key: bytes) -> LinkSecurity:
    return LinkSecurity(ed25519.Ed25519PrivateKey.generate(), cluster_key, tmp_path / name)


@pytest.mark.spec("TB2")
async def test_tls_on_both_paths_and_a_stalled_thunderbolt_peer_costs_only_its_share(tmp_path: Path) -> None:
    cluster_key = bytes(range(32))
    server_security = _security(tmp_path, "server", cluster_key)
    server = TbipTransport(security=server_security, interfaces=table([]))
    client = TbipTransport(security=_security(tmp_path, "client", cluster_key),
                           interfaces=table(TB_LOOPBACK))
    stalled: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # accepts, then never speaks TLS

    silent = await asyncio.start_server(never_answer, HOST, 0)
    silent_port = silent.sockets[0].getsockname()[1]
    try:
        async with serving(server) as port:
            refused = free_port()
            client.learn_routes(f"{HOST}:{refused}", [f"{HOST}:{port}"])
            conn = await client.connect(HOST, refused, timeout_s=T)
            try:
                assert client.last_path(HOST, refused) == "thunderbolt"
                assert conn.peer_identity is not None
                assert conn.peer_identity.node_id == server_security.node_id
                await round_trip(conn)
            finally:
                await conn.close()

            client.learn_routes(f"{HOST}:{port}", [f"{HOST}:{silent_port}"])
            loop = asyncio.get_running_loop()
            started = loop.time()
            conn = await client.connect(HOST, port, timeout_s=2.0)
            elapsed = loop.time() - started
            try:
                assert client.last_path(HOST, port) == "lan"
                assert conn.peer_identity is not None
                await round_trip(conn)
            finally:
                await conn.close()
            assert elapsed < 2.0
    finally:
        for writer in stalled:
            writer.close()
        silent.close()
        await silent.wait_closed()


@pytest.mark.spec("TB2")
def test_learn_routes_parses_addresses() -> None:
    assert Address.parse("10.0.5.2:7000") == Address("10.0.5.2", 7000)
    assert Address.parse("[fe80::2]:7001") == Address("fe80::2", 7001)
    assert Address.parse("fe80::2%bridge0", default_port=7000) == Address("fe80::2%bridge0", 7000)
    assert Address.parse("169.254.1.2", default_port=7000) == Address("169.254.1.2", 7000)
    transport = TbipTransport(interfaces=table(LINUX))
    for bad in ("10.0.5.2", "10.0.5.2:x", "10.0.5.2:0", "[fe80::2", ":7000"):
        with pytest.raises(ConfigError, match="valid"):
            transport.learn_routes(bad, ["10.0.5.1"])
    with pytest.raises(ConfigError):
        transport.learn_routes("192.168.1.30:7000", ["10.0.5.2:99999"])


@pytest.mark.spec("TB2")
def test_registered_as_an_entry_point() -> None:
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group="mesh.transports")}
    assert "tbip" in found and found["tbip"].load() is TbipTransport


@pytest.mark.spec("TB2")
def test_links_teach_the_transport_a_members_alternative_addresses() -> None:
    from mesh.kernel.records import MemberInfo
    from mesh.node.links import Links

    learned: list[tuple[str, list[str]]] = []

    class Recording(TbipTransport):
        def learn_routes(self, lan_address: str, addresses: list[str]) -> None:
            learned.append((lan_address, addresses))

    me = MemberInfo(member_id="a" * 32, address="127.0.0.1:1", api_address="127.0.0.1:2", backend="torch",
                    memory_bytes=1)
    peer = MemberInfo.from_wire({**MemberInfo(member_id="b" * 32, address="192.168.1.20:7600",
                                              api_address="127.0.0.1:3", backend="torch",
                                              memory_bytes=1, alt_addresses=("10.0.5.2",)).to_wire()})
    assert peer.alt_addresses == ("10.0.5.2",)

    async def ignore(*args: object) -> None:
        return None

    links = Links(Recording(), me=lambda: me, model_id="m", started_ms=0, on_message=ignore, on_up=ignore,
                  on_down=lambda m: None, on_fatal=lambda e: None, dead_after_s=5, send_timeout_s=5)
    links._learn_routes(peer)
    assert learned == [("192.168.1.20:7600", ["10.0.5.2"])]


@pytest.mark.spec("TB4")
def test_messages_take_the_connection_that_reaches_a_preferred_address() -> None:
    """Two connections to one member, the LAN one dialled first: sends go over the one whose
    peer is a Thunderbolt address the member's hello named, whichever end dialled it; with it
    closed, over the LAN one."""
    from mesh.kernel.records import MemberInfo
    from mesh.node.links import Links

    sent: list[str] = []

    class Conn:
        def __init__(self, peer: str) -> None:
            self.peer, self.closed = peer, False

        async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
            sent.append(self.peer)

    async def ignore(*_: Any) -> None:
        return None

    links = Links(TbipTransport(), me=lambda: MemberInfo(member_id="a", address="10.0.0.1:7600", api_address="", backend="torch",
                                                           memory_bytes=1), model_id="m",
                  started_ms=0, on_message=ignore, on_up=ignore, on_down=lambda m: None, on_fatal=lambda e: None,
                  dead_after_s=3.0, send_timeout_s=1.0)
    info = MemberInfo(member_id="b", address="192.168.1.20:7600", api_address="", backend="torch",
                      memory_bytes=1, alt_addresses=("10.0.5.2", "[fd00::2]:7601", "fe80::2"))
    lan, cable = Conn("192.168.1.20:7600"), Conn("10.0.5.2:51234")  # the cable's: accepted, an ephemeral port
    assert Links._preferred(info, cable) and not Links._preferred(info, lan)
    assert Links._preferred(info, Conn("[fd00::2]:40000"))  # an alt address given with its port
    links.infos["b"], links.conns["b"] = info, {lan, cable}
    links._preferred_conns = {cable}  # as the handshake records it
    asyncio.run(links.send("b", Message(type="ping")))
    cable.closed = True
    asyncio.run(links.send("b", Message(type="ping")))
    assert sent == ["10.0.5.2:51234", "192.168.1.20:7600"]
