"""Persistence: checksummed records, torn-tail recovery, atomic snapshots (spec K8, K5, K6)."""

from __future__ import annotations

import logging
from pathlib import Path

import cbor2
import pytest

from mesh.kernel.eventlog import RECORD_HEADER, EventLog
from mesh.kernel.replica import Replica


def _history(n: int) -> Replica:
    replica = Replica("a")
    for i in range(n):
        replica.emit("status.set", f"status/{i % 3}", {"i": i}, now_ms=10**6 + i)
    return replica


@pytest.mark.spec("K8")
@pytest.mark.parametrize("cut", [1, RECORD_HEADER.size - 1, RECORD_HEADER.size + 3, -1])
def test_torn_tail_is_dropped_and_the_log_stays_appendable(tmp_path: Path, cut: int,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    source = _history(6)
    log = EventLog(tmp_path)
    log.open()
    for event in source.tail:
        log.append(event, sync=True)
    log.close()
    data = (tmp_path / "events.log").read_bytes()
    sizes = []
    offset = 0
    while offset < len(data):
        length, _ = RECORD_HEADER.unpack_from(data, offset)
        sizes.append(RECORD_HEADER.size + length)
        offset += sizes[-1]
    keep = sum(sizes[:5])
    torn = data[: keep + (cut if cut > 0 else sizes[5] - 1)]  # SIGKILL in the middle of record 6
    (tmp_path / "events.log").write_bytes(torn)
    with caplog.at_level(logging.WARNING):
        reopened = EventLog(tmp_path)
        snapshot, events = reopened.open()
    assert snapshot is None and [e.id.seq for e in events] == [1, 2, 3, 4, 5]
    assert "torn or corrupt tail" in caplog.text and reopened.dropped_bytes == len(torn) - keep
    assert (tmp_path / "events.log").stat().st_size == keep
    replica = Replica("a")
    replica.restore(events)
    nxt = replica.emit("status.set", "status/0", {"i": 99}, now_ms=10**6 + 100)
    assert nxt.id.seq == 6  # the torn event was never sent (own events are synced first)
    reopened.append(nxt, sync=True)
    reopened.close()
    _, again = EventLog(tmp_path).open()
    assert [e.id.seq for e in again] == [1, 2, 3, 4, 5, 6]


@pytest.mark.spec("K8")
def test_corrupt_record_checksum_ends_the_log(tmp_path: Path) -> None:
    source = _history(4)
    log = EventLog(tmp_path)
    log.open()
    for event in source.tail:
        log.append(event, sync=False)
    log.close()
    data = bytearray((tmp_path / "events.log").read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the last record's body
    (tmp_path / "events.log").write_bytes(bytes(data))
    _, events = EventLog(tmp_path).open()
    assert [e.id.seq for e in events] == [1, 2, 3]


@pytest.mark.spec("K5", "K6", "K8")
def test_snapshot_then_new_log_and_deleted_state_stays_deleted(tmp_path: Path) -> None:
    replica = Replica("a")
    log = EventLog(tmp_path)
    log.open()
    for i in range(50):
        log.append(replica.emit("status.set", "status/a", {"beat": i}, now_ms=10**6 + i), sync=False)
    log.append(replica.emit("member.join", "member/x", {"address": "h:1"}, now_ms=10**6 + 60), sync=False)
    log.append(replica.emit("member.leave", "member/x", None, now_ms=10**6 + 61), sync=True)
    log.write_snapshot(replica.compact())
    assert log.records == 0 and (tmp_path / "events.log").stat().st_size == 0
    log.append(replica.emit("status.set", "status/a", {"beat": 99}, now_ms=10**6 + 70), sync=True)
    log.close()
    snapshot, events = EventLog(tmp_path).open()
    assert snapshot is not None and len(events) == 1  # history of 53 events -> snapshot + 1
    restored = Replica("a", state=snapshot)
    restored.restore(events)
    assert restored.state.content_hash() == replica.state.content_hash()
    assert restored.state.get("member/x") is None  # deleted before the restart stays deleted
    assert restored.state.live_entries() == 1
    assert restored.emit("t", "k", 1, now_ms=10**6 + 80).id.seq == 54  # 53 events before it


@pytest.mark.spec("K8")
def test_crash_between_snapshot_and_log_reset_replays_idempotently(tmp_path: Path) -> None:
    replica = _history(10)
    log = EventLog(tmp_path)
    log.open()
    for event in replica.tail:
        log.append(event, sync=True)
    log.close()
    # the snapshot was renamed into place but the crash came before the log was emptied
    (tmp_path / "snapshot.cbor").write_bytes(cbor2.dumps(replica.state.to_wire()))
    snapshot, events = EventLog(tmp_path).open()
    assert len(events) == 10
    restored = Replica("a", state=snapshot)
    assert restored.restore(events) == 0
    assert restored.state.content_hash() == replica.state.content_hash()


@pytest.mark.spec("K8")
def test_flush_hands_the_records_to_the_os_and_gives_the_descriptor_to_fsync(tmp_path: Path) -> None:
    import os

    log = EventLog(tmp_path)
    assert log.flush() is None  # not open yet
    log.open()
    event = Replica("a").emit("t", "k", 1, now_ms=10**6)
    log.append(event, sync=False)
    fd = log.flush()
    assert fd is not None
    os.fsync(fd)  # what the replication shell runs off its event loop
    reader = EventLog(tmp_path)
    assert reader.open()[1] == [event]
    log.close()
    reader.close()
    assert log.flush() is None
