"""Member records from peers are validated; the table and node ids behave."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import ConfigError, FrameError
from mesh.identity import load_or_create_node_id
from mesh.kernel.crdt import ClusterState
from mesh.kernel.hlc import Timestamp
from mesh.kernel.records import ClusterView, MemberInfo, MemberStatus

ME = MemberInfo(member_id="a" * 32, address="127.0.0.1:7600", api_address="127.0.0.1:8000", backend="torch",
                memory_bytes=1 << 30, incarnation="i1")


@pytest.mark.spec("N1")
def test_node_id_persists(tmp_path: Path) -> None:
    first = load_or_create_node_id(tmp_path / "data")
    assert first == load_or_create_node_id(tmp_path / "data") and len(first) == 32
    (tmp_path / "data" / "identity.key").write_text("not a key")
    with pytest.raises(ConfigError, match="corrupt"):
        load_or_create_node_id(tmp_path / "data")


@pytest.mark.spec("N2", "N10")
@pytest.mark.parametrize("record", [
    {},
    {"id": 5, "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": 1, "incarnation": "i"},
    {"id": "b", "address": "x:1", "api": "x:2", "backend": "torch", "memory_bytes": 1},
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
def test_cluster_view_reads_members_from_the_state() -> None:
    state = ClusterState()
    seq = 0

    def write(key: str, value: object) -> None:
        nonlocal seq
        seq += 1
        state.apply(dot=("w", seq), hlc=Timestamp(physical_ms=seq, counter=0), key=key, value=value,
                    replaces=state.observed(key))

    write("member/b", {"address": "127.0.0.1:1", "api": "127.0.0.1:2", "incarnation": "x"})
    assert ClusterView(state).members() == []  # no resources yet: not placeable
    write("resources/b", {"backend": "torch", "memory_bytes": 5})
    write("member/a", {"address": "127.0.0.1:3", "api": "127.0.0.1:4", "incarnation": "y"})
    write("resources/a", {"backend": "torch", "memory_bytes": "lots"})  # malformed: skipped
    view = ClusterView(state)
    assert [m.member_id for m in view.members()] == ["b"] and view.get("b").memory_bytes == 5
    write("status/b", {"plan_id": "p", "layer_start": 0, "layer_end": 3, "state": "ready", "error": None})
    assert view.status("b").state == "ready" and view.status("a").state == "idle"
    write("request/r1", "running")
    write("request/r1", "finished")
    assert view.requests()["finished"] == 1
    write("member/b", None)  # left
    assert view.members() == []


@pytest.mark.spec("N1", "K9")
def test_a_data_dir_is_locked_by_one_process(tmp_path: Path) -> None:
    from mesh.identity import lock_data_dir

    handle = lock_data_dir(tmp_path / "d")
    with pytest.raises(ConfigError, match="in use by another node process"):
        lock_data_dir(tmp_path / "d")
    handle.close()
    lock_data_dir(tmp_path / "d").close()  # free again once the holder is gone
