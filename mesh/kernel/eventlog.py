"""Persistence of a replica in the data dir: a snapshot plus an append-only event log.

Layout (spec K8): ``kernel/snapshot.cbor`` holds the last compacted state, written to a
temporary file, fsynced and renamed over the old one (atomic on POSIX). ``kernel/events.log``
holds the events applied since, each record ``u32 length | u32 crc32 | CBOR event`` (both
big-endian). fsync policy: the caller passes ``sync=True`` for the node's own events, which
must be durable before they are sent (a crash can then never take back an event a peer has
seen); received events are appended without fsync, since peers can send them again.

On open, records are read up to the last complete one with a good checksum; a torn or
corrupt tail is cut off (with a warning) so later appends start from a clean end.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import cbor2

from mesh.errors import KernelError
from mesh.kernel.crdt import ClusterState
from mesh.kernel.events import Event

log = logging.getLogger(__name__)

RECORD_HEADER = struct.Struct(">II")
MAX_RECORD_BYTES = 16 << 20


class EventLog:
    """A snapshot file and an append-only log of events in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.snapshot_path = folder / "snapshot.cbor"
        self.log_path = folder / "events.log"
        self._file: BinaryIO | None = None
        self.records = 0
        self.dropped_bytes = 0

    def open(self) -> tuple[ClusterState | None, list[Event]]:
        """Read the snapshot and the complete records after it; cut a torn tail.

        Raises KernelError when the snapshot itself is unreadable (it is only ever replaced
        atomically, so that means outside damage: the message says which file).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        snapshot = None
        if self.snapshot_path.exists():
            try:
                snapshot = ClusterState.from_wire(cbor2.loads(self.snapshot_path.read_bytes()))
            except (cbor2.CBORDecodeError, ValueError, KernelError) as exc:
                raise KernelError(f"{self.snapshot_path} is unreadable ({exc}); move it away to start empty") from exc
        events, good_end = self._read_records()
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        if good_end < size:
            self.dropped_bytes = size - good_end
            log.warning("%s: dropping a torn or corrupt tail of %d bytes after %d good records",
                        self.log_path, self.dropped_bytes, len(events))
            with open(self.log_path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())
        self.records = len(events)
        self._file = open(self.log_path, "ab")
        return snapshot, events

    def _read_records(self) -> tuple[list[Event], int]:
        if not self.log_path.exists():
            return [], 0
        data = self.log_path.read_bytes()
        events: list[Event] = []
        offset = 0
        while offset + RECORD_HEADER.size <= len(data):
            length, crc = RECORD_HEADER.unpack_from(data, offset)
            start, end = offset + RECORD_HEADER.size, offset + RECORD_HEADER.size + length
            if length > MAX_RECORD_BYTES or end > len(data) or zlib.crc32(data[start:end]) != crc:
                break
            try:
                events.append(Event.from_wire(cbor2.loads(data[start:end])))
            except (cbor2.CBORDecodeError, ValueError, KernelError):
                break
            offset = end
        return events, offset

    def append(self, event: Event, *, sync: bool) -> None:
        """Append one record; with ``sync`` the record is on disk when this returns."""
        if self._file is None:
            raise KernelError("the event log is not open")
        body = cbor2.dumps(event.to_wire())
        self._file.write(RECORD_HEADER.pack(len(body), zlib.crc32(body)) + body)
        self.records += 1
        if sync:
            self.sync()

    def flush(self) -> int | None:
        """Hand everything appended so far to the operating system (no fsync) and return the
        log file's descriptor, or None when the log is not open. For a caller that keeps every
        write on one thread but runs the slow ``os.fsync(fd)`` on another (the replication
        shell, off its event loop); ``sync`` does both here."""
        if self._file is None:
            return None
        self._file.flush()
        return self._file.fileno()

    def sync(self) -> None:
        """Flush and fsync everything appended so far (nothing when the log is not open)."""
        fd = self.flush()
        if fd is not None:
            os.fsync(fd)

    def write_snapshot(self, state: ClusterState) -> None:
        """Make ``state`` the durable snapshot and start an empty log (spec K5).

        Crash-safe in every order: the new snapshot is complete before it replaces the old
        one, and a log not yet emptied only holds events the snapshot already covers, which
        replay ignores.
        """
        tmp = self.snapshot_path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write(cbor2.dumps(state.to_wire()))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.snapshot_path)
        _fsync_dir(self.folder)
        if self._file is not None:
            self._file.close()
        self._file = open(self.log_path, "wb")
        self.sync()
        self.records = 0

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
