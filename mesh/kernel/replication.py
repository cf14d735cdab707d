"""The asyncio shell around the kernel: persistence, broadcast of new events, anti-entropy.

Owns one ``Replica`` and its ``EventLog``. Own events are appended, fsynced (one fsync for
every event issued since the last, off the event loop) and only then broadcast (spec K8).
Received events and sync pages are applied, appended without fsync, and reported to the
node through ``on_change``. Every ``interval`` it sends its digest to each linked peer; an
unanswered digest is retried with backoff (``AntiEntropy``). Messages:
``ev`` {e: [event...]}, ``sync`` {n: nonce, vv: version vector}, ``sync.page`` (SyncPage).
Spec: specs/kernel.md (K5, K7, K8, K10).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.errors import ClockDriftError, KernelError, MeshError
from mesh.kernel.eventlog import EventLog
from mesh.kernel.events import Event, VersionVector
from mesh.kernel.replica import AntiEntropy, Replica, SyncPage
from mesh.wire import Message

log = logging.getLogger(__name__)

SendFn = Callable[[str, Message], Awaitable[None]]
EV_BATCH = 500  # events per ``ev`` message


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Replication:
    """Replicated cluster state of one node.

    Args:
        node_id: this node's id (the origin of its events).
        folder: where the snapshot and event log live.
        send: coroutine sending a message to a linked peer (raises MeshError on failure).
        peers: the ids of peers with a live link now.
        on_change: called (on the event loop) after events were applied.
    """

    def __init__(self, node_id: str, folder: Path, *, send: SendFn, peers: Callable[[], list[str]],
                 on_change: Callable[[], None], interval_s: float = 1.0, compact_after: int = 2000,
                 clock: Callable[[], int] = now_ms,
                 on_drift: Callable[[str, int], None] | None = None) -> None:
        self.node_id = node_id
        self.now_ms = clock  # wall clock in ms (injectable: fault tests run one node's clock ahead)
        self.on_drift = on_drift  # (peer, ms its event was ahead): told when a peer's clock is refused
        self.log = EventLog(folder)
        snapshot, events = self.log.open()
        self.replica = Replica(node_id, state=snapshot, compact_after=compact_after)
        restored = self.replica.restore(events)
        self._snapshots_written = self.replica.snapshots
        if snapshot is not None or restored:
            log.info("kernel: restored a snapshot of %d entries and %d events from %s",
                     self.replica.state.live_entries(), restored, folder)
        self.send = send
        self.peers = peers
        self.on_change = on_change
        self.anti_entropy = AntiEntropy(interval_ms=int(interval_s * 1000), rng=random.Random())
        self._unsent: list[Event] = []
        self._flush_wanted = asyncio.Event()

    async def run(self) -> None:
        """Flush own events to disk and peers, and run anti-entropy rounds, until cancelled;
        the event log is closed when it ends. An error of either loop ends both and is raised."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._flusher(), name="kernel flush")
                tasks.create_task(self._rounds(), name="anti-entropy")
        finally:
            self.log.close()

    @property
    def state(self) -> Any:
        return self.replica.state

    # -- own events --------------------------------------------------------------------
    def emit(self, type: str, key: str, value: Any) -> Event:
        """Issue an event; it is applied now, and sent once it is on disk."""
        event = self.replica.emit(type, key, value, now_ms=self.now_ms())
        self.log.append(event, sync=False)
        self._unsent.append(event)
        self._flush_wanted.set()
        self._after_apply()
        return event

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            batch, self._unsent = self._unsent, []
            if not batch:
                continue
            await self._fsync()
            for i in range(0, len(batch), EV_BATCH):  # keeps each envelope far below the 1 MiB cap
                msg = Message(type="ev", body={"e": [e.to_wire() for e in batch[i:i + EV_BATCH]]})
                await asyncio.gather(*(self._send_quietly(p, msg) for p in self.peers()))

    async def _fsync(self) -> None:
        fd = self.log.flush()  # on the loop thread, like every write to this file
        if fd is None:
            return
        await asyncio.to_thread(os.fsync, fd)

    async def _send_quietly(self, peer: str, msg: Message) -> None:
        try:
            await self.send(peer, msg)
        except MeshError as exc:  # a lost event is repaired by anti-entropy (spec K7)
            log.debug("sending %s to %s failed: %s", msg.type, peer, exc)

    # -- from peers ----------------------------------------------------------------------
    async def on_message(self, peer: str, msg: Message) -> None:
        """Handle ``ev``, ``sync`` and ``sync.page``. Raises KernelError on a malformed
        message (the caller closes that link); a clock too far ahead is logged and dropped."""
        body = msg.body
        if msg.type == "ev":
            events = body.get("e")
            if not isinstance(events, list) or len(events) > 100_000:
                raise KernelError("malformed ev message")
            applied: list[Event] = []
            for wire in events:
                applied += self._receive(peer, Event.from_wire(wire))
            self._applied(applied)
            if self.replica.buffer.buffered():
                await self._start_sync(peer)
        elif msg.type == "sync":
            nonce, vv = body.get("n"), VersionVector.from_wire(body.get("vv"))
            if not isinstance(nonce, int) or isinstance(nonce, bool):
                raise KernelError("malformed sync message")
            for page in self.replica.answer_sync(vv, nonce):
                await self.send(peer, Message(type="sync.page", body=page.to_wire()))
            if not self.replica.digest().dominates(vv):
                await self._start_sync(peer)  # push-pull: the peer has what we lack too
        elif msg.type == "sync.page":
            page = SyncPage.from_wire(body)
            applied = []
            for event in page.events:
                applied += self._receive(peer, event)
            # events one by one above (a clock too far ahead drops one event, not the page)
            applied += self.replica.take_page(peer, replace(page, events=()), now_ms=self.now_ms())
            self._applied(applied)
            if page.last:
                self.anti_entropy.answered(peer, page.nonce, self.now_ms())

    def _receive(self, peer: str, event: Event) -> list[Event]:
        try:
            return self.replica.receive(event, now_ms=self.now_ms())
        except ClockDriftError as exc:
            log.warning("dropping event %s from %s: %s", event.id, peer, exc)
            if self.on_drift is not None:
                self.on_drift(peer, event.hlc.physical_ms - self.now_ms())
            return []

    def _applied(self, events: list[Event]) -> None:
        for event in events:
            self.log.append(event, sync=False)
        if events:
            self._after_apply()

    def _after_apply(self) -> None:
        if self.replica.needs_compaction():
            self.replica.compact()
        if self.replica.snapshots != self._snapshots_written:
            self.log.write_snapshot(self.replica.state)  # spec K5: the log restarts from the state
            self._snapshots_written = self.replica.snapshots
        self.on_change()

    # -- anti-entropy rounds -----------------------------------------------------------
    async def _start_sync(self, peer: str) -> None:
        nonce = self.anti_entropy.sync_now(peer, self.now_ms())
        await self._send_quietly(peer, Message(type="sync", body={"n": nonce, "vv": self.replica.digest().to_wire()}))

    async def sync_with(self, peer: str) -> None:
        """Start a round with a peer at once (it just linked)."""
        await self._start_sync(peer)

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(self.anti_entropy.interval_ms / 4000)
            digest = self.replica.digest().to_wire()
            for peer, nonce in self.anti_entropy.due(self.peers(), self.now_ms()):
                await self._send_quietly(peer, Message(type="sync", body={"n": nonce, "vv": digest}))
