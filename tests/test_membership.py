"""Member records from peers are validated; the table and node ids behave."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import ConfigError, FrameError
from mesh.identity import load_or_create_node_id
from mesh.membership import MemberInfo, Membership, MemberStatus

ME = MemberInfo(member_id="a" * 32, address="127.0.0.1:7600", api_address="127.0.0.1:8000", backend="torch",
                memory_bytes=1 << 30)


@pytest.mark.spec("N1")
def test_node_id_persists(tmp_path: Path) -> None:
    first = load_or_create_node_id(tmp_path / "data")
    assert first == load_or_create_node_id(tmp_path / "data") and len(first) == 32
    (tmp_path / "data" / "node_id").write_text("not-hex")
    with pytest.raises(ConfigError, match="corrupt"):
        load_or_create_node_id(tmp_path / "data")


@pytest.mark.spec("N2", "N10")
@pytest.mark.parametrize("record", [
    {},
    {"id": 5, "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": 1},
    {"id": "b", "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": "big"},
    {"id": "b", "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": True},
    {"id": "b", "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": -1},
    {"id": "", "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": 1},
    {"id": "b" * 200, "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": 1},
])
def test_bad_peer_records_raise_frame_error(record: dict) -> None:
    with pytest.raises(FrameError):
        MemberInfo.from_wire(record)


@pytest.mark.spec("N2")
def test_records_round_trip_and_status_validation() -> None:
    assert MemberInfo.from_wire(ME.to_wire()) == ME
    status = MemberStatus(plan_id="p", layer_start=0, layer_end=3, state="ready")
    assert MemberStatus.from_wire(status.to_wire()) == status
    with pytest.raises(FrameError):
        MemberStatus.from_wire({"plan_id": "p", "layer_start": 0, "layer_end": 3, "state": "dancing"})


@pytest.mark.spec("N3")
def test_membership_table() -> None:
    table = Membership(ME)
    peer = MemberInfo(member_id="0" * 32, address="127.0.0.1:7601", api_address="127.0.0.1:8001", backend="torch",
                      memory_bytes=1 << 30)
    assert table.upsert(peer) is True
    assert table.upsert(peer) is False  # same record: placement sees no change
    assert [m.member_id for m in table.members()] == ["0" * 32, "a" * 32]  # ordered by id
    assert table.remove(ME.member_id) is False  # never removes itself
    assert table.remove(peer.member_id) is True and table.peers() == []
