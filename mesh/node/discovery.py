"""LAN discovery: authenticated UDP announcements, a sans-IO core and a thin asyncio shell.

Every node announces ``{node_id, address, api_address, protocol_major, incarnation, sent_ms}``
to a multicast group and its subnets' broadcast addresses, for as long as it runs; nodes of
the same cluster that hear it report the peer once so the node can dial it. The datagram is
authenticated with HMAC-SHA256 (RFC 2104, from ``cryptography``) under the discovery key
derived from the cluster key (``mesh.security.discovery_key``); its body is CBOR (RFC 8949),
checked for well-formedness and bounded sizes before ``cbor2`` decodes it.

``encode``/``decode`` and ``Discovery`` know no sockets, clocks or randomness (time comes
in as ``now_s``, randomness as an injected ``rng``). ``DiscoveryService`` is the shell:
sockets, multicast membership, the announcement timer. Nothing here knows about links,
events or models. IPv4 only. Spec: specs/discovery.md D1-D14.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from mesh import PROTOCOL_MAJOR
from mesh.errors import ConfigError, FrameError
from mesh.netif import Address, AddressError, Interface, local_interfaces
from transports.framing import check_cbor_safe

log = logging.getLogger(__name__)

MAGIC = b"MSD1"
TAG_BYTES = 32  # HMAC-SHA256
MAX_DATAGRAM_BYTES = 1200  # one UDP datagram on any LAN path without fragmentation
MIN_DATAGRAM_BYTES = len(MAGIC) + 1 + TAG_BYTES
MAX_CBOR_DEPTH = 4
WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::"})
DIAL_KINDS = frozenset({"new", "address", "restarted"})
_FIELDS = {"node_id": str, "address": str, "api_address": str, "protocol_major": int,
           "incarnation": str, "sent_ms": int}


class AnnouncementError(FrameError):
    """A discovery datagram is malformed, of another cluster or of another protocol major;
    ``reason`` is one of size, magic, tag, cbor, fields, protocol."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_address(text: str) -> Address:
    """An announced ``host:port`` or ``[v6]:port`` (``Address.parse``: at most 300
    characters, the host an IP, a name or a wildcard, an empty host kept as the wildcard);
    raises AnnouncementError (reason ``fields``)."""
    try:
        return Address.parse(text, empty_host="")
    except AddressError as exc:
        raise AnnouncementError("fields", str(exc)) from None


def resolve_address(address: str, source_ip: str) -> str:
    """``address`` with a wildcard host (``0.0.0.0``, ``::``, ``*`` or empty) replaced by the
    IP the datagram came from (spec D6)."""
    parsed = parse_address(address)
    if parsed.host not in WILDCARD_HOSTS:
        return address
    return str(Address(source_ip, parsed.port))


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """One node's announcement; ``sent_ms`` orders announcements of one incarnation."""

    node_id: str
    address: str
    api_address: str
    protocol_major: int
    incarnation: str
    sent_ms: int

    def __post_init__(self) -> None:
        for name, kind in _FIELDS.items():
            if type(getattr(self, name)) is not kind:
                raise AnnouncementError("fields", f"{name} must be a {kind.__name__}")
        if len(self.node_id) != 32 or any(c not in "0123456789abcdef" for c in self.node_id):
            raise AnnouncementError("fields", f"node_id {self.node_id[:40]!r} is not 32 lowercase hex digits")
        parse_address(self.address)
        if self.api_address:
            parse_address(self.api_address)
        if not 0 < len(self.incarnation) <= 64 or not self.incarnation.isascii() \
                or not self.incarnation.isprintable():
            raise AnnouncementError("fields", "incarnation must be 1-64 printable ASCII characters")
        if not 0 <= self.sent_ms < 1 << 63 or not 0 <= self.protocol_major < 1 << 16:
            raise AnnouncementError("fields", "sent_ms or protocol_major out of range")


def _tag(key: bytes, signed: bytes) -> hmac.HMAC:
    if len(key) < 16:
        raise ConfigError(f"a discovery key is at least 16 bytes (use mesh.security.discovery_key), got {len(key)}")
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(signed)
    return h


def encode(ann: Announcement, key: bytes) -> bytes:
    """``MAGIC`` + CBOR map of the fields + HMAC-SHA256 over both (spec D1)."""
    signed = MAGIC + cbor2.dumps({name: getattr(ann, name) for name in _FIELDS})
    data = signed + _tag(key, signed).finalize()
    if len(data) > MAX_DATAGRAM_BYTES:
        raise AnnouncementError("size", f"announcement of {len(data)} bytes exceeds {MAX_DATAGRAM_BYTES}")
    return data


def _check_well_formed(raw: bytes) -> None:
    """RFC 8949 Appendix C well-formedness, narrowed: definite lengths only, no tags, no
    simple values but false/true/null, depth <= MAX_CBOR_DEPTH, and every declared length
    or item count within the bytes left, so decoding allocates at most O(len(raw)) (D2)."""
    pos, end, stack = 0, len(raw), [1]  # items still to read at each open level
    while stack:
        if stack[-1] == 0:
            stack.pop()
            continue
        stack[-1] -= 1
        if pos >= end:
            raise AnnouncementError("cbor", "CBOR ends inside an item")
        major, info = raw[pos] >> 5, raw[pos] & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info <= 27 and pos + (1 << (info - 24)) <= end:
            size = 1 << (info - 24)
            arg, pos = int.from_bytes(raw[pos:pos + size], "big"), pos + size
        else:
            raise AnnouncementError("cbor", "CBOR has an indefinite length, reserved value or truncated head")
        if major in (2, 3):
            if arg > end - pos:
                raise AnnouncementError("cbor", f"CBOR string of {arg} bytes exceeds the datagram")
            pos += arg
        elif major in (4, 5):
            items = arg * (2 if major == 5 else 1)
            if items > end - pos or len(stack) > MAX_CBOR_DEPTH:
                raise AnnouncementError("cbor", "CBOR container larger than the datagram or nested too deep")
            stack.append(items)
        elif major == 6:
            raise AnnouncementError("cbor", f"CBOR tag {arg} is not allowed in an announcement")
        elif major == 7 and info not in (20, 21, 22, 25, 26, 27):
            raise AnnouncementError("cbor", "CBOR simple value other than false/true/null")
    if pos != end:
        raise AnnouncementError("cbor", f"{end - pos} bytes of trailing garbage after the CBOR map")


def decode(data: bytes, key: bytes) -> Announcement:
    """Check and decode one datagram; raises AnnouncementError (a FrameError) and nothing
    else for any input (spec D2-D4). The tag is verified before any CBOR is read."""
    if not MIN_DATAGRAM_BYTES <= len(data) <= MAX_DATAGRAM_BYTES:
        raise AnnouncementError("size", f"datagram of {len(data)} bytes; valid: "
                                        f"{MIN_DATAGRAM_BYTES}-{MAX_DATAGRAM_BYTES}")
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC:
        raise AnnouncementError("magic", f"bad magic {data[:len(MAGIC)]!r}; announcements start with {MAGIC!r}")
    signed, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    try:
        _tag(key, signed).verify(tag)  # constant-time compare (spec D3)
    except InvalidSignature:
        raise AnnouncementError("tag", "bad tag: another cluster's key, or corrupted") from None
    raw = signed[len(MAGIC):]
    _check_well_formed(raw)
    try:
        body = cbor2.loads(raw, max_depth=MAX_CBOR_DEPTH + 1, allow_indefinite=False,
                           allow_duplicate_keys=False, strict_hashable_types=True)
        check_cbor_safe(body, where="announcement")
    except FrameError as exc:
        raise AnnouncementError("cbor", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types on bad input
        raise AnnouncementError("cbor", f"announcement is not valid CBOR: {exc}") from None
    if not isinstance(body, dict):
        raise AnnouncementError("fields", f"announcement is a {type(body).__name__}; it must be a map")
    major = body.get("protocol_major")
    if type(major) is int and major != PROTOCOL_MAJOR:  # spec D4: major only
        raise AnnouncementError("protocol", f"peer speaks protocol major {major}; this node {PROTOCOL_MAJOR}")
    missing = [name for name in _FIELDS if name not in body]
    if missing:
        raise AnnouncementError("fields", f"announcement lacks {missing}")
    return Announcement(**{name: body[name] for name in _FIELDS})  # unknown keys ignored


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEvent:
    """``kind``: new, address (changed), restarted (new incarnation) or expired."""

    kind: str
    node_id: str
    address: str
    announcement: Announcement


class DiscoveryStats(TypedDict):
    received: int
    accepted: int
    rejected_by_reason: dict[str, int]


class RandomSource(Protocol):
    def random(self) -> float: ...


class _Peer:
    __slots__ = ("address", "announcement", "heard_at", "heard_s")

    def __init__(self, ann: Announcement, address: str, now_s: float) -> None:
        self.announcement, self.address, self.heard_s = ann, address, now_s
        self.heard_at = {address: now_s}  # resolved address -> last heard


class Discovery:
    """The discovery state machine: when to announce, which datagrams to accept, which
    peers are live (spec D5-D10). ``rng`` jitters intervals by +-``jitter``; None: none."""

    def __init__(self, node_id: str, key: bytes, *, interval_s: float = 2.0, expire_after_s: float = 10.0,
                 jitter: float = 0.2, rng: RandomSource | None = None) -> None:
        if not 0 < interval_s * (1 + jitter) < expire_after_s or not 0 <= jitter < 1:
            raise ConfigError(f"discovery needs 0 < interval_s*(1+jitter) < expire_after_s and 0 <= jitter < 1; "
                              f"got {interval_s}, {jitter}, {expire_after_s}")
        _tag(key, b"")  # checks the key
        if len(node_id) != 32 or any(c not in "0123456789abcdef" for c in node_id):
            raise ConfigError(f"node_id {node_id[:40]!r} is not 32 lowercase hex digits")
        self.node_id, self.interval_s, self.expire_after_s, self.jitter = node_id, interval_s, expire_after_s, jitter
        self.rng = rng
        self.events: list[PeerEvent] = []
        self.next_due_s = float("-inf")
        self._key = key
        self._last_sent_ms = -1
        self._received = self._accepted = 0
        self._rejected: dict[str, int] = {}
        self._latest: dict[str, tuple[str, int]] = {}  # node -> (incarnation, sent_ms), kept past expiry
        self._peers: dict[str, _Peer] = {}

    @property
    def stats(self) -> DiscoveryStats:
        return {"received": self._received, "accepted": self._accepted, "rejected_by_reason": dict(self._rejected)}

    def take_events(self) -> list[PeerEvent]:
        events, self.events = self.events, []
        return events

    def announcement_due(self, now_s: float) -> bool:
        return now_s >= self.next_due_s

    def make(self, *, address: str, api_address: str, incarnation: str, now_s: float,
             sent_ms: int | None = None) -> bytes:
        """This node's announcement, and the next one scheduled (spec D10). ``sent_ms``
        defaults to ``now_s`` in ms; the shell passes wall-clock ms so a restarted node's
        announcements are later than its previous incarnation's (spec D9)."""
        self._last_sent_ms = max(int(now_s * 1000) if sent_ms is None else sent_ms, self._last_sent_ms + 1)
        ann = Announcement(node_id=self.node_id, address=address, api_address=api_address,
                           protocol_major=PROTOCOL_MAJOR, incarnation=incarnation, sent_ms=self._last_sent_ms)
        factor = 1.0 if self.rng is None else 1 + self.jitter * (2 * self.rng.random() - 1)
        self.next_due_s = now_s + self.interval_s * factor
        return encode(ann, self._key)

    def _reject(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def receive(self, data: bytes, source: tuple[str, int], now_s: float) -> Announcement | None:
        """Take one datagram from ``source``; the announcement if accepted, else None.
        Never raises (spec D5)."""
        self._received += 1
        try:
            ann = decode(data, self._key)
            address = resolve_address(ann.address, str(source[0]))
        except FrameError as exc:
            self._reject(getattr(exc, "reason", "fields"))
            return None
        if ann.node_id == self.node_id:
            self._reject("own")
            return None
        self._expire(now_s)
        peer, latest = self._peers.get(ann.node_id), self._latest.get(ann.node_id)
        # spec D9: same incarnation must move forward; another one must be later, unless
        # the peer is not live (so a node whose clock stepped back rejoins after expiry).
        if latest is not None and ann.sent_ms <= latest[1] and (ann.incarnation == latest[0] or peer is not None):
            self._reject("replay")
            return None
        self._latest[ann.node_id] = (ann.incarnation, ann.sent_ms)
        self._accepted += 1
        kind = None
        if peer is None:
            peer, kind = _Peer(ann, address, now_s), "new"
        elif peer.announcement.incarnation != ann.incarnation or peer.announcement.address != ann.address:
            kind = "restarted" if peer.announcement.incarnation != ann.incarnation else "address"
            peer = _Peer(ann, address, now_s)
        else:
            # Same announced address heard from several sources (one per interface): keep
            # the one in use while it is heard, so the reported address never flaps (D7).
            peer.heard_at[address] = now_s
            peer.heard_at = {a: t for a, t in peer.heard_at.items()
                             if now_s - t <= self.expire_after_s or a == address}
            if peer.address not in peer.heard_at:
                peer.address, kind = address, "address"
        peer.announcement, peer.heard_s = ann, now_s
        self._peers[ann.node_id] = peer
        if kind is not None:
            self.events.append(PeerEvent(kind=kind, node_id=ann.node_id, address=peer.address, announcement=ann))
        return ann

    def _expire(self, now_s: float) -> None:
        for node_id, peer in list(self._peers.items()):
            if now_s - peer.heard_s > self.expire_after_s:  # spec D8
                del self._peers[node_id]
                self.events.append(PeerEvent(kind="expired", node_id=node_id, address=peer.address,
                                             announcement=peer.announcement))

    def peers(self, now_s: float) -> dict[str, tuple[Announcement, str]]:
        """Live peers: node id -> (announcement, resolved address)."""
        self._expire(now_s)
        return {n: (p.announcement, p.address) for n, p in self._peers.items()}


# --- asyncio shell -------------------------------------------------------------------------

Target = tuple[str, int, str | None]  # host, port, local interface address for multicast


class _Sock(Protocol):
    def setsockopt(self, level: int, optname: int, value: bytes, /) -> None: ...
    def sendto(self, data: bytes, address: tuple[str, int], /) -> int: ...


def _ipv4_addresses(table: Iterable[Interface]) -> list[str]:
    """IPv4 addresses of up, multicast-capable, non-loopback interfaces."""
    return [a.address for i in table if i.up and i.multicast and i.kind != "loopback"
            for a in i.addresses if a.version == 4 and not ipaddress.ip_address(a.address).is_loopback]


def default_targets(table: Iterable[Interface], group: str, port: int) -> list[Target]:
    """The group through each interface address, and each subnet's broadcast (spec D11)."""
    out: list[Target] = []
    for iface in table:
        usable = _ipv4_addresses([iface])
        for a in iface.addresses:
            if a.address in usable:
                out.append((group, port, a.address))
                if a.prefix_len <= 30:
                    out.append((str(a.network.broadcast_address), port, None))
    return list(dict.fromkeys(out))


def join_group(sock: _Sock, group: str, interface_address: str) -> bool:
    """Join ``group`` on an interface; True when joined or already joined (spec D12)."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + socket.inet_aton(interface_address))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return True
        log.debug("joining %s on %s failed (%s); retrying at the next refresh", group, interface_address, exc)
        return False
    return True


def send_datagram(sock: _Sock, data: bytes, target: Target) -> bool:
    """Send one datagram; an OSError is logged at debug and reported as False (spec D13)."""
    host, port, interface_address = target
    try:
        if interface_address is not None and ipaddress.ip_address(host).is_multicast:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface_address))
        sock.sendto(data, (host, port))
    except OSError as exc:
        log.debug("announcement to %s:%s failed (%s); sending again next round", host, port, exc)
        return False
    return True


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, service: DiscoveryService) -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.service._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors from earlier sends
        log.debug("discovery socket: %s", exc)


class DiscoveryService:
    """Announce every ``core.interval_s`` (jittered) for the node's life; report peers to
    ``on_peer(node_id, address)`` once each (spec D10-D14). ``announcement()`` gives
    address, api_address and incarnation. ``targets`` overrides ``default_targets``."""

    def __init__(self, core: Discovery, *, on_peer: Callable[[str, str], Awaitable[None] | None],
                 announcement: Callable[[], Mapping[str, str]], port: int = 7601, group: str = "239.255.77.77",
                 bind_host: str = "", targets: Callable[[], list[Target]] | None = None,
                 interfaces: Callable[[], list[Interface]] = local_interfaces, refresh_every: int = 5,
                 rng: random.Random | None = None, timeout_s: float = 5.0) -> None:
        if refresh_every < 1 or timeout_s <= 0:
            raise ConfigError(f"refresh_every must be >= 1 and timeout_s > 0; got {refresh_every}, {timeout_s}")
        self.core, self.group, self.bind_host = core, group, bind_host
        if rng is not None or core.rng is None:
            core.rng = rng if rng is not None else random.Random()
        self._on_peer, self._announcement, self._targets, self._interfaces = on_peer, announcement, targets, interfaces
        self._port, self.refresh_every, self.timeout_s = port, refresh_every, timeout_s
        self.joined: set[str] = set()
        self.rounds = 0
        self.sent: dict[tuple[str, int], int] = {}
        self.send_errors: dict[tuple[str, int], int] = {}
        self._table: list[Interface] = []
        self._sock: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._events: asyncio.Queue[PeerEvent] = asyncio.Queue(maxsize=1024)

    @property
    def port(self) -> int:
        """The UDP port bound (the one asked for until started)."""
        return int(self._sock.getsockname()[1]) if self._sock is not None else self._port

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    async def start(self) -> None:
        """Bind the socket and start announcing; raises OSError when the port cannot be bound."""
        if self._sock is not None:
            raise ConfigError("this DiscoveryService is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):  # several nodes on one host (macOS needs it)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                except OSError:
                    pass
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.bind((self.bind_host, self._port))
            sock.setblocking(False)
            async with asyncio.timeout(self.timeout_s):
                self._transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: _Receiver(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.create_task(self._run(), name=f"discovery {self.core.node_id[:8]}")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            self._failed = exc
            log.error("discovery stopped: %r", exc, exc_info=exc)

    def _datagram(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.core.receive(data, (str(addr[0]), int(addr[1])), asyncio.get_running_loop().time())
        self._queue_events()

    def _queue_events(self) -> None:
        for event in self.core.take_events():
            try:
                self._events.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("discovery: dropped %s event for %s (queue full)", event.kind, event.node_id[:8])

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._announce_loop())
            group.create_task(self._dispatch_loop())

    async def _announce_loop(self) -> None:
        loop, sock = asyncio.get_running_loop(), self._sock
        assert sock is not None  # set by start() before this task exists
        while True:
            if self.rounds % self.refresh_every == 0:
                await self._refresh()
            now = loop.time()
            fields = self._announcement()
            data = self.core.make(address=fields["address"], api_address=fields["api_address"],
                                  incarnation=fields["incarnation"], now_s=now, sent_ms=int(time.time() * 1000))
            targets = self._targets() if self._targets is not None else \
                default_targets(self._table, self.group, self._port)
            for target in targets:
                counts = self.sent if send_datagram(sock, data, target) else self.send_errors
                counts[target[:2]] = counts.get(target[:2], 0) + 1
            self.rounds += 1
            self.core.peers(loop.time())  # expire silent peers
            self._queue_events()
            await asyncio.sleep(max(0.0, self.core.next_due_s - loop.time()))

    async def _refresh(self) -> None:
        """Re-read the interface table (off the loop) and join the group where not yet."""
        try:
            async with asyncio.timeout(self.timeout_s):
                self._table = list(await asyncio.get_running_loop().run_in_executor(None, self._interfaces))
        except Exception as exc:  # noqa: BLE001 - psutil may raise anything; keep the old table
            log.debug("reading the interface table failed: %r", exc)
        wanted = set(_ipv4_addresses(self._table))
        self.joined &= wanted  # a vanished address is joined again if it comes back
        if self._sock is not None:
            self.joined |= {a for a in sorted(wanted - self.joined) if join_group(self._sock, self.group, a)}

    async def _dispatch_loop(self) -> None:
        while True:
            event = await self._events.get()
            if event.kind not in DIAL_KINDS:
                log.info("discovery: peer %s (%s) %s", event.node_id[:8], event.address, event.kind)
                continue
            log.info("discovery: peer %s at %s (%s)", event.node_id[:8], event.address, event.kind)
            try:
                result = self._on_peer(event.node_id, event.address)
                if inspect.isawaitable(result):
                    async with asyncio.timeout(self.timeout_s):
                        await result
            except Exception as exc:  # noqa: BLE001 - the callback's failure; discovery goes on (D14)
                log.warning("discovery: on_peer for %s failed: %r", event.node_id[:8], exc)

    async def close(self) -> None:
        """Stop announcing and close the socket, within ``timeout_s``; raise the error that
        stopped the background task, if one did."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=self.timeout_s)
        if self._transport is not None:
            self._transport.close()  # closes the socket too
            self._transport, self._sock = None, None
        if self._failed is not None:
            raise self._failed

