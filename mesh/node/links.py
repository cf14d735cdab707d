"""Links to peers: hello handshake, identity checks, reader loops, dialing and heartbeats.

Every link starts with a hello each way (member record with a per-process incarnation,
model, layer count). A peer claiming this node's id with another incarnation, or the id of
a member this node already has a live link to under another incarnation, is a second
process with a copied identity: it gets a ``reject`` naming the id and the live process's
address, and closes its own node (spec K9). Any frame counts as a heartbeat; a link silent
for ``dead_after_s`` is closed. Messages go to ``on_message``; a malformed one closes that
link only (spec N10). Spec: specs/node.md (N2, N9, N10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mesh import __version__
from mesh.errors import (
    AuthenticationError,
    ConfigError,
    FrameError,
    KernelError,
    MeshError,
    PeerTimeout,
    RequestFailed,
    TransportError,
)
from mesh.kernel.records import MemberInfo
from mesh.netif import Address, AddressError, host_key
from mesh.node.linkstats import PROBE_BYTES, LinkMeter
from mesh.wire import Message, WireTensor
from transports.base import Connection, Transport, connect_with_backoff

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
UPGRADE_RETRY_S = 10.0  # a link without its preferred path tries it again this often (spec TB4)
AUTH_RETRY_S = 30.0  # a --peer that fails authentication is retried this often
WILDCARDS = ("0.0.0.0", "::", "")


class IdentityCollision(ConfigError):
    """Another live process already uses this node's id (e.g. a copied data dir)."""


def member_address(address: str) -> Address:
    """A member's ``host:port`` (``Address.parse``; an empty host means this machine,
    127.0.0.1). Raises AddressError (a MeshError)."""
    return Address.parse(address, empty_host="127.0.0.1")


def _peer_host(peer: str) -> str:
    """The host of a connection's ``peer`` label (``host:port`` or ``[v6]:port``)."""
    return peer.rpartition(":")[0].strip("[]")


class Links:
    """The links of one node, keyed by peer member id (a peer may have several at once)."""

    def __init__(self, transport: Transport, *, me: Callable[[], MemberInfo], model_id: str, started_ms: int,
                 on_message: Callable[[str, Message], Awaitable[None]],
                 on_up: Callable[[MemberInfo], Awaitable[None]], on_down: Callable[[str], None],
                 on_fatal: Callable[[MeshError], None], dead_after_s: float, send_timeout_s: float) -> None:
        self.transport = transport
        self.me = me
        self.model_id = model_id
        self.started_ms = started_ms
        self.on_message = on_message
        self.on_up = on_up
        self.on_down = on_down
        self.on_fatal = on_fatal
        self.dead_after_s = dead_after_s
        self.send_timeout_s = send_timeout_s
        self.conns: dict[str, set[Connection]] = {}
        self.infos: dict[str, MemberInfo] = {}  # the hello of each linked member
        self.meters: dict[str, LinkMeter] = {}  # RTT and throughput per linked member (spec L1)
        self._dialing: set[str] = set()
        self._preferred_conns: set[Connection] = set()  # connections reaching a peer's preferred address (TB4)
        self._upgrade_tried: dict[str, float] = {}  # member -> when a preferred path was last tried
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        # peer host -> the address of ours to put in the hello (None: our listen address)
        self.advertise: Callable[[str], str | None] | None = None

    def linked(self) -> list[str]:
        return sorted(m for m, conns in self.conns.items() if any(not c.closed for c in conns))

    # -- sending -----------------------------------------------------------------------
    async def send(self, member_id: str, msg: Message, lane: str = "control") -> None:
        """Send on a live link, on ``lane`` (see ``transports.base.LANES``). Raises
        RequestFailed (no link) or TransportError/PeerTimeout."""
        conns = sorted((c for c in self.conns.get(member_id, ()) if not c.closed),
                       key=lambda c: c not in self._preferred_conns)
        if not conns:
            raise RequestFailed(f"no link to member {member_id}")
        await conns[0].send(msg, timeout_s=self.send_timeout_s, lane=lane)

    @staticmethod
    def _preferred(info: MemberInfo, conn: Connection) -> bool:
        """Spec TB4: whether ``conn`` reaches the member at one of the hosts its hello named
        as preferred (``alt_addresses``: its Thunderbolt links), whichever end dialled."""
        host = host_key(_peer_host(conn.peer))
        for alt in info.alt_addresses:
            try:
                if host_key(Address.parse(alt, default_port=1).host) == host:
                    return True
            except AddressError:
                continue
        return False

    def _meter(self, member_id: str) -> LinkMeter:
        meter = self.meters.get(member_id)
        if meter is None or meter.transport != self.transport.name:
            meter = self.meters[member_id] = LinkMeter(self.transport.name)
        return meter

    async def ping_all(self, timeout_s: float) -> None:
        """A heartbeat on every link at once, each bounded by ``timeout_s``; each ping carries
        a sequence number its pong echoes, for the RTT (spec L1). A ping that cannot go out
        in time (the link is busy with a large frame, or stuck) is skipped, not fatal: the
        reader's silence deadline decides when a link is dead."""
        loop = asyncio.get_running_loop()

        async def one(member_id: str, conn: Connection) -> None:
            seq = self._meter(member_id).ping_sent(loop.time())
            try:
                await conn.send(Message(type="ping", body={"t": seq}), timeout_s=timeout_s)
            except MeshError as exc:
                log.debug("ping to %s skipped: %s", conn.peer, exc)

        await asyncio.gather(*(one(m, c) for m, conns in list(self.conns.items()) for c in list(conns)))
        for member_id in list(self.conns):  # a cable plugged back in (spec TB4)
            if member_id in self.infos:
                self._maybe_upgrade(self.infos[member_id])

    async def probe_all(self, interval_s: float, timeout_s: float) -> None:
        """Send a throughput probe (``PROBE_BYTES`` on the bulk lane) to each linked member
        whose last probe is ``interval_s`` old; the ``probe.ack`` completes it (spec L1)."""
        loop = asyncio.get_running_loop()

        async def one(member_id: str) -> None:
            meter = self._meter(member_id)
            if not meter.probe_due(loop.time(), interval_s):
                return
            seq = meter.probe_sent(PROBE_BYTES, loop.time())
            probe = Message(type="probe", body={"t": seq},
                            tensor=WireTensor(dtype="u8", shape=(PROBE_BYTES,), data=bytes(PROBE_BYTES)))
            try:
                await self.send(member_id, probe, lane="bulk")
            except MeshError as exc:
                log.debug("probe to %s skipped: %s", member_id, exc)

        await asyncio.gather(*(one(m) for m in self.linked()))

    async def _measurement(self, member_id: str, conn: Connection, msg: Message) -> bool:
        """Answer or record ping/pong/probe messages; True when ``msg`` was one of them."""
        now = asyncio.get_running_loop().time()
        seq = msg.body.get("t")
        reply = {"ping": "pong", "probe": "probe.ack"}.get(msg.type)
        if reply is not None:
            if isinstance(seq, int):
                try:
                    await conn.send(Message(type=reply, body={"t": seq}), timeout_s=self.send_timeout_s)
                except PeerTimeout as exc:
                    log.debug("%s to %s skipped: %s", reply, conn.peer, exc)
            return True
        if msg.type == "pong":
            self._meter(member_id).pong_received(seq, now)
            return True
        if msg.type == "probe.ack":
            self._meter(member_id).probe_acked(seq, now)
            return True
        return False

    # -- handshake and reader ----------------------------------------------------------
    def _hello(self, conn: Connection) -> Message:
        record = self.me().to_wire()
        try:
            own: Address | None = Address.parse(record["address"], empty_host="")
        except AddressError:
            own = None
        if own is not None and own.host in WILDCARDS and self.advertise is not None:
            # spec TB1: tell this peer an address on a subnet we share with it
            mine = self.advertise(_peer_host(conn.peer))
            if mine is not None:
                record["address"] = str(Address(mine, own.port))
        return Message(type="hello", body={"member": record, "model": self.model_id, "started_ms": self.started_ms,
                                           "version": __version__})  # named when the protocols differ (T10)

    async def _handshake(self, conn: Connection) -> MemberInfo | None:
        me = self.me()
        await conn.send(self._hello(conn), timeout_s=HANDSHAKE_TIMEOUT_S)
        msg = await conn.recv(timeout_s=HANDSHAKE_TIMEOUT_S)
        if msg.type == "reject":
            self._rejected(msg, conn)
            return None
        if msg.type != "hello":
            raise FrameError(f"expected hello, got {msg.type!r}")
        record = msg.body.get("member")
        if not isinstance(record, dict):
            raise FrameError("hello without a member record")
        info = MemberInfo.from_wire(record)
        proven = conn.peer_identity
        if proven is not None and proven.node_id != info.member_id:
            # spec S5: the TLS handshake proved one node key; the hello claims another id
            raise AuthenticationError(f"peer at {conn.peer} proved node id {proven.node_id} but claims "
                                      f"{info.member_id}; rejecting it")
        if info.member_id == me.member_id and info.incarnation == me.incarnation:
            log.warning("link to %s reaches this node itself; dropping it", conn.peer)
            await conn.close()
            return None
        if info.member_id == me.member_id:
            # Two live processes with one id: the later-started one is the newcomer (spec K9).
            theirs = msg.body.get("started_ms")
            if isinstance(theirs, int) and (theirs, info.incarnation) < (self.started_ms, me.incarnation):
                await conn.close()
                self.on_fatal(self._collision(info.member_id, info.address, me.address))
                return None
        known = self.infos.get(info.member_id) if info.member_id in self.linked() else None
        holder = me.address if info.member_id == me.member_id else (
            known.address if known is not None and known.incarnation != info.incarnation else None)
        if holder is not None:
            log.error("identity collision: a second process at %s claims node id %s, live at %s; rejecting it",
                      info.address, info.member_id, holder)
            reject = Message(type="reject", body={"reason": "identity", "id": info.member_id, "address": holder})
            try:
                await conn.send(reject, timeout_s=HANDSHAKE_TIMEOUT_S)
            finally:
                await conn.close()
            return None
        if msg.body.get("model") != self.model_id:
            log.error("peer %s serves model %r, this node %r; rejecting it",
                      info.member_id, msg.body.get("model"), self.model_id)
            await conn.close()
            return None
        self._learn_routes(info)
        listen = member_address(info.address)
        if listen.host in WILDCARDS:  # the peer listens everywhere: use the address we see it on
            fields = {k: getattr(info, k) for k in info.__dataclass_fields__}
            info = MemberInfo(**{**fields, "address": str(Address(_peer_host(conn.peer), listen.port))})
        self.conns.setdefault(info.member_id, set()).add(conn)
        self.infos[info.member_id] = info
        if self._preferred(info, conn):
            self._preferred_conns.add(conn)
        log.info("link up: %s at %s (%s)", info.member_id, info.address, conn.peer)
        await self.on_up(info)
        self._maybe_upgrade(info)
        return info

    def _maybe_upgrade(self, info: MemberInfo) -> None:
        """Spec TB4: a link that came up over the LAN (dialled from a discovery announcement or
        the state before the peer's hello named its Thunderbolt addresses) is joined by one
        dialled through the transport's preferred path, when the transport has a route there
        (tbip: a local Thunderbolt interface shares a subnet with one of them) and this node
        has the lower id (one dial per pair). Sends then go over it; the LAN link stays as the
        spare. Tried again at most every ``UPGRADE_RETRY_S`` (the heartbeat round asks), so a
        cable plugged back in is used again."""
        key = f"upgrade {info.member_id}"
        route = getattr(self.transport, "preferred_route", None)
        conns = self.conns.get(info.member_id, set())
        now = asyncio.get_running_loop().time()
        if (not info.alt_addresses or route is None or self.me().member_id > info.member_id or self.stopping
                or not conns or any(c in self._preferred_conns for c in conns) or key in self._dialing
                or now - self._upgrade_tried.get(info.member_id, -UPGRADE_RETRY_S) < UPGRADE_RETRY_S):
            return
        try:
            listen = member_address(info.address)
        except MeshError:
            return
        self._dialing.add(key)
        self._upgrade_tried[info.member_id] = now

        async def dial() -> None:
            try:
                if await route(listen.host, listen.port, timeout_s=HANDSHAKE_TIMEOUT_S) is None:
                    return  # no local interface reaches those addresses
                conn = await self.transport.connect(listen.host, listen.port, timeout_s=HANDSHAKE_TIMEOUT_S)
                if not self._preferred(info, conn):
                    await conn.close()  # the transport found no better path than the LAN link's
                    return
                log.info("link to %s: adding the preferred path %s", info.member_id, conn.peer)
            except (MeshError, TimeoutError) as exc:
                log.info("no preferred path to %s: %s", info.member_id, exc)
                return
            finally:
                self._dialing.discard(key)
            await self.accept(conn)

        self.spawn(dial(), key)

    @staticmethod
    def _collision(member_id: object, holder: object, mine: str) -> IdentityCollision:
        return IdentityCollision(
            f"node id {member_id} is already used by a live process at {holder} (this process: {mine}); "
            f"two machines must not share a data dir: start this one with another --data-dir"
        )

    def _rejected(self, msg: Message, conn: Connection) -> None:
        error = self._collision(msg.body.get("id"), msg.body.get("address"), self.me().address)
        log.error("%s (reported by %s)", error, conn.peer)
        self.on_fatal(error)

    async def serve(self, conn: Connection) -> None:
        """Run one link to its end: handshake, then read until it closes or goes silent."""
        info = await self._handshake(conn)
        if info is None:
            return
        first = True
        try:
            while not conn.closed:
                try:
                    msg = await conn.recv(timeout_s=self.dead_after_s)
                except PeerTimeout:
                    log.warning("no heartbeat from %s in %.1f s: declaring the link dead",
                                info.member_id, self.dead_after_s)
                    break
                if msg.type == "reject":
                    # spec K9, N10: a peer answers a hello claiming a live id with a reject as
                    # its first message after its own hello, naming our id; anything else is
                    # a malformed message that closes this link only
                    if not first or msg.body.get("id") != self.me().member_id:
                        raise FrameError("a reject that is not the answer to our hello")
                    self._rejected(msg, conn)
                    break
                first = False
                if not await self._measurement(info.member_id, conn, msg):
                    await self.on_message(info.member_id, msg)
        except (FrameError, KernelError) as exc:
            log.warning("malformed message from %s: %s; closing that link", info.member_id, exc)
        except TransportError as exc:
            log.info("link to %s closed: %s", info.member_id, exc)
        except Exception:  # whatever a peer sends must not take the node down (spec N10)
            log.exception("message from %s could not be handled; closing that link", info.member_id)
        finally:
            await conn.close()
            self._down(info.member_id, conn)

    def _down(self, member_id: str, conn: Connection) -> None:
        self._preferred_conns.discard(conn)
        conns = self.conns.get(member_id)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self.conns[member_id]
            self.meters.pop(member_id, None)
            if not self.stopping:
                self.on_down(member_id)

    async def accept(self, conn: Connection) -> None:
        """The transport's handler for incoming connections (and for links we dialled once)."""
        try:
            await self.serve(conn)
        except AuthenticationError as exc:  # spec S4: logged, this link dropped, the node serves on
            log.warning("rejected a link from %s: %s", conn.peer, exc)
            await conn.close()
        except (MeshError, TimeoutError) as exc:
            log.warning("link with %s failed: %s", conn.peer, exc)
            await conn.close()
        except Exception:  # a malformed hello must not take the node down (spec N10)
            log.exception("link with %s failed", conn.peer)
            await conn.close()

    # -- dialing -----------------------------------------------------------------------
    async def dial_forever(self, address: str, stop: asyncio.Event) -> None:
        """Keep a link to a ``--peer`` address for the life of the node (re-dial with backoff)."""
        peer = member_address(address)
        host, port = peer.host, peer.port
        last_warned = -AUTH_RETRY_S
        while not stop.is_set():
            pause_s = 1.0  # a pause between rounds; each round backs off itself
            try:
                conn = await connect_with_backoff(self.transport, host, port, attempt_timeout_s=3.0, deadline_s=30.0)
            except AuthenticationError as exc:
                # the peer is there but not of this cluster (or plaintext): say so, once a while
                now = asyncio.get_running_loop().time()
                if now - last_warned >= AUTH_RETRY_S:
                    log.warning("peer %s refused: %s; retrying every %.0f s", address, exc, AUTH_RETRY_S)
                    last_warned = now
                pause_s = AUTH_RETRY_S
            except (MeshError, TimeoutError) as exc:
                hint = "" if self.transport.name == "tcp" else f" (does the peer use --transport {self.transport.name} too?)"
                log.info("peer %s unreachable: %s%s; retrying", address, exc, hint)
            else:
                await self.accept(conn)
            try:
                await asyncio.wait_for(stop.wait(), pause_s)
            except TimeoutError:
                pass

    def _learn_routes(self, info: MemberInfo) -> None:
        """Tell a transport that prefers some paths (tbip) the other hosts a member listens on."""
        learn = getattr(self.transport, "learn_routes", None)
        if learn is not None and info.alt_addresses:
            try:
                learn(info.address, list(info.alt_addresses))
            except MeshError as exc:
                log.debug("ignoring the alternative addresses of %s: %s", info.member_id, exc)

    def dial(self, info: MemberInfo) -> None:
        """Dial a member learned from the cluster state once, unless already linked or dialing."""
        self._learn_routes(info)
        self.dial_address(info.member_id, info.address)

    def dial_address(self, member_id: str, address: str) -> None:
        """Dial ``address`` (a member learned from the state or from discovery) once, unless
        that member is linked or this address is being dialled."""
        if member_id in self.conns or address in self._dialing or member_id == self.me().member_id:
            return
        try:
            parsed = member_address(address)
            host, port = parsed.host, parsed.port
        except MeshError:
            return
        if host in WILDCARDS:
            return

        self._dialing.add(address)  # before the task starts: one dial per address at a time

        async def dial() -> None:
            try:
                conn = await self.transport.connect(host, port, timeout_s=HANDSHAKE_TIMEOUT_S)
            except (MeshError, TimeoutError) as exc:
                log.info("cannot reach member %s at %s: %s", member_id, address, exc)
                return
            finally:
                self._dialing.discard(address)
            await self.accept(conn)

        self.spawn(dial(), f"dial {address}")

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a tracked background task; its error is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s failed: %r", name, t.exception())

        task.add_done_callback(done)

    async def close(self) -> None:
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        for conns in list(self.conns.values()):
            for conn in list(conns):
                await conn.close()
