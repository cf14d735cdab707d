"""Device profiles: a real CPU measurement, the data-dir cache, wire validation, simulated
devices. Spec: specs/placement.md (P7, P8)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.identity import MEMORY_GRANULE
from mesh.placement import profile as profile_mod
from mesh.placement.profile import (
    PROFILE_FILE,
    PROFILE_VERSION,
    DeviceProfile,
    load_or_measure_profile,
    measure_profile,
    profile_from_spec,
)

GIB = 1 << 30


@pytest.fixture
def fake_measure(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the measurement with a fixed profile; returns the list of calls' kwargs."""
    calls: list[dict[str, Any]] = []

    def fake(**kwargs: Any) -> DeviceProfile:
        calls.append(kwargs)
        return DeviceProfile(
            memory_total_bytes=8 * GIB, memory_usable_bytes=4 * GIB, flops={"f32": 1e11},
            memory_bandwidth_bytes_per_s=2e10, backend="torch", device="cpu",
            measured_at_ms=1_700_000_000_000 + len(calls), software=profile_mod.software("torch"),
        )

    monkeypatch.setattr(profile_mod, "measure_profile", fake)
    return calls


@pytest.mark.spec("P7")
def test_real_measurement_on_cpu() -> None:
    p = measure_profile(device="cpu", budget_s=0.5)
    assert p.backend == "torch" and p.device == "cpu" and p.version == PROFILE_VERSION
    assert "f32" in p.flops and set(p.flops) <= {"f32", "f16", "bf16"}
    assert all(math.isfinite(v) and v > 0 for v in p.flops.values())
    assert p.flops["f32"] > 1e8
    assert math.isfinite(p.memory_bandwidth_bytes_per_s) and p.memory_bandwidth_bytes_per_s > 1e8
    assert 0 < p.memory_usable_bytes <= p.memory_total_bytes
    assert p.memory_usable_bytes % MEMORY_GRANULE == 0
    assert DeviceProfile.from_wire(json.loads(json.dumps(p.to_wire()))) == p


@pytest.mark.spec("P7")
def test_an_mlx_node_is_measured_with_mlx_kernels() -> None:
    """An MLX node's profile times MLX's own matmul and GEMV (on a Linux CPU they run far below
    torch's, and placement must see that), stored under MLX's device names."""
    pytest.importorskip("mlx.core")
    p = measure_profile(backend="mlx", device="cpu", budget_s=0.5)
    assert p.backend == "mlx" and p.device == "cpu" and p.software.startswith("mlx ")
    assert "f32" in p.flops and all(math.isfinite(v) and v > 1e8 for v in p.flops.values())
    assert p.memory_bandwidth_bytes_per_s > 1e8
    assert DeviceProfile.from_wire(json.loads(json.dumps(p.to_wire()))) == p


@pytest.mark.spec("P7")
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backend": "nonsense"}, "--backend"),
        ({"backend": "mlx", "device": "cuda"}, "not an mlx device"),
        ({"device": "nonsense"}, "--device"),
        ({"device": "cuda:99"}, "--device"),
        ({"memory_fraction": 1.5}, "--memory-fraction"),
        ({"budget_s": 0.0}, "budget_s"),
    ],
)
def test_measure_rejects_bad_arguments(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        measure_profile(**kwargs)


@pytest.mark.spec("P7")
def test_cache_round_trip_rereads_memory(tmp_path: Path, fake_measure: list[dict[str, Any]]) -> None:
    first = load_or_measure_profile(tmp_path, device="cpu", budget_s=0.1)
    assert len(fake_measure) == 1 and (tmp_path / PROFILE_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp"))  # written via a temp file, then renamed
    second = load_or_measure_profile(tmp_path, device="cpu", memory_fraction=0.5)
    assert len(fake_measure) == 1  # served from the cache
    assert second.flops == first.flops and second.measured_at_ms == first.measured_at_ms
    assert second.memory_bandwidth_bytes_per_s == first.memory_bandwidth_bytes_per_s
    # memory is read now, not cached: the fake's 4 GiB usable is replaced by the real figure
    assert second.memory_usable_bytes != 4 * GIB or second.memory_total_bytes != 8 * GIB
    assert second.memory_usable_bytes % MEMORY_GRANULE == 0


@pytest.mark.spec("P7")
def test_refresh_remeasures(tmp_path: Path, fake_measure: list[dict[str, Any]]) -> None:
    load_or_measure_profile(tmp_path, device="cpu")
    again = load_or_measure_profile(tmp_path, refresh=True, device="cpu")
    assert len(fake_measure) == 2
    assert again.measured_at_ms == 1_700_000_000_002
    cached = json.loads((tmp_path / PROFILE_FILE).read_text())
    assert cached["measured_at_ms"] == 1_700_000_000_002


@pytest.mark.spec("P7")
@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"version": 4}', b"", json.dumps({"flops": "fast"}).encode()],
)
def test_corrupt_cache_remeasures_with_warning(
    tmp_path: Path, fake_measure: list[dict[str, Any]], caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    (tmp_path / PROFILE_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="mesh.placement.profile"):
        p = load_or_measure_profile(tmp_path, device="cpu")
    assert len(fake_measure) == 1 and p.device == "cpu"
    assert any("corrupt" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert DeviceProfile.from_wire(json.loads((tmp_path / PROFILE_FILE).read_text())) == p  # repaired


@pytest.mark.spec("P7")
def test_other_version_or_device_remeasures(tmp_path: Path, fake_measure: list[dict[str, Any]]) -> None:
    load_or_measure_profile(tmp_path, device="cpu")
    path = tmp_path / PROFILE_FILE
    wire = json.loads(path.read_text())
    path.write_text(json.dumps(wire | {"version": PROFILE_VERSION + 1}))
    load_or_measure_profile(tmp_path, device="cpu")
    assert len(fake_measure) == 2
    path.write_text(json.dumps(wire | {"device": "cuda:0"}))
    load_or_measure_profile(tmp_path, device="cpu")
    assert len(fake_measure) == 3
    load_or_measure_profile(tmp_path, device="cpu")
    assert len(fake_measure) == 3


GOOD = profile_from_spec(memory_bytes=16 * GIB, flops=5e12, memory_bandwidth_bytes_per_s=1e11).to_wire()


@pytest.mark.spec("P7")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_total_bytes", -1),
        ("memory_total_bytes", 1.5),
        ("memory_total_bytes", True),
        ("memory_usable_bytes", "lots"),
        ("memory_usable_bytes", 32 * GIB),  # more than the total
        ("flops", {}),
        ("flops", [1e9]),
        ("flops", {"f64": 1e9}),
        ("flops", {"f32": -1.0}),
        ("flops", {"f32": math.inf}),
        ("flops", {"f32": "1e9"}),
        ("memory_bandwidth_bytes_per_s", 0),
        ("memory_bandwidth_bytes_per_s", math.nan),
        ("memory_bandwidth_bytes_per_s", None),
        ("backend", ""),
        ("backend", 7),
        ("device", None),
        ("measured_at_ms", -5),
        ("measured_at_ms", "now"),
        ("version", PROFILE_VERSION + 1),
        ("version", str(PROFILE_VERSION)),
    ],
)
def test_from_wire_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        DeviceProfile.from_wire(GOOD | {field: value})


@pytest.mark.spec("P7")
def test_from_wire_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError, match="map"):
        DeviceProfile.from_wire([GOOD])
    for field in GOOD:
        with pytest.raises(ConfigError, match=f"{field}.*missing"):
            DeviceProfile.from_wire({k: v for k, v in GOOD.items() if k != field})
    with pytest.raises(ConfigError, match="'colour'.*unknown"):
        DeviceProfile.from_wire(GOOD | {"colour": "red"})


@pytest.mark.spec("P7")
def test_from_wire_accepts_whole_numbers_as_floats() -> None:
    p = DeviceProfile.from_wire(GOOD | {"flops": {"f32": 5}, "memory_bandwidth_bytes_per_s": 7})
    assert p.flops == {"f32": 5.0} and type(p.flops["f32"]) is float
    assert type(p.memory_bandwidth_bytes_per_s) is float


@pytest.mark.spec("P8")
def test_profile_from_spec() -> None:
    p = profile_from_spec(memory_bytes=24 * GIB, flops=20 * 10**12, memory_bandwidth_bytes_per_s=8e11, dtype="f16")
    assert p.memory_total_bytes == p.memory_usable_bytes == 24 * GIB
    assert p.flops == {"f16": 2e13} and p.memory_bandwidth_bytes_per_s == 8e11
    assert p.backend == "torch" and p.device == "simulated" and p.version == PROFILE_VERSION
    assert DeviceProfile.from_wire(json.loads(json.dumps(p.to_wire()))) == p
    for bad, field in [({"memory_bytes": -1}, "memory_total_bytes"), ({"flops": 0.0}, "flops"),
                       ({"dtype": "int8"}, "flops"), ({"memory_bandwidth_bytes_per_s": -2.0}, "bandwidth")]:
        kwargs: dict[str, Any] = {"memory_bytes": GIB, "flops": 1e12, "memory_bandwidth_bytes_per_s": 1e11} | bad
        with pytest.raises(ConfigError, match=field):
            profile_from_spec(**kwargs)


@pytest.mark.spec("P7")
def test_nodes_on_one_host_measure_once_and_share_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              fake_measure: list[dict[str, Any]]) -> None:
    """Nodes without a cache of their own take the host's; they measure one at a time (a slow
    measurement holds the others back), so four started at once measure once and agree."""
    import threading
    import time

    host = tmp_path / "host"
    slow = profile_mod.measure_profile

    def measure_slowly(**kwargs: Any) -> DeviceProfile:
        time.sleep(0.3)  # while this runs, the other threads find the lock held
        return slow(**kwargs)

    monkeypatch.setattr(profile_mod, "measure_profile", measure_slowly)
    results: dict[int, DeviceProfile] = {}

    def start(i: int) -> None:
        results[i] = load_or_measure_profile(tmp_path / f"node{i}", device="cpu", shared_dir=host)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(fake_measure) == 1 and len(results) == 4
    assert len({p.measured_at_ms for p in results.values()}) == 1
    assert all((tmp_path / f"node{i}" / PROFILE_FILE).is_file() for i in range(4))  # each keeps its own copy
    assert json.loads((host / "profile-torch-cpu.json").read_text())["measured_at_ms"] == 1_700_000_000_001
    # a refresh measures and updates the host's copy
    load_or_measure_profile(tmp_path / "node5", refresh=True, device="cpu", shared_dir=host)
    assert len(fake_measure) == 2
    assert json.loads((host / "profile-torch-cpu.json").read_text())["measured_at_ms"] == 1_700_000_000_002
    # a node whose own cache is usable keeps it
    assert load_or_measure_profile(tmp_path / "node0", device="cpu", shared_dir=host).measured_at_ms == \
        1_700_000_000_001
    # an unwritable host directory costs only the sharing
    blocked = tmp_path / "file"
    blocked.write_text("")
    load_or_measure_profile(tmp_path / "node6", device="cpu", shared_dir=blocked / "host")
    assert len(fake_measure) == 3 and (tmp_path / "node6" / PROFILE_FILE).is_file()


@pytest.mark.spec("P7")
def test_a_profile_measured_on_a_busy_cpu_or_by_another_library_is_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Figures timed while other processes took over BUSY_LIMIT of the CPU serve that run only:
    nothing is cached, here or for the host, and the next start measures again; a profile
    measured with another torch is measured again; --remeasure replaces a good one."""
    busy = [0.6]

    def fake(**kwargs: Any) -> DeviceProfile:
        return DeviceProfile(memory_total_bytes=8 * GIB, memory_usable_bytes=4 * GIB, flops={"f32": 1e11},
                             memory_bandwidth_bytes_per_s=2e10, backend="torch", device="cpu",
                             measured_at_ms=1_700_000_000_000, software=profile_mod.software("torch"), busy=busy[0])

    monkeypatch.setattr(profile_mod, "measure_profile", fake)
    host = tmp_path / "host"
    with caplog.at_level(logging.WARNING, logger="mesh.placement.profile"):
        first = load_or_measure_profile(tmp_path / "node", device="cpu", shared_dir=host)
    assert first.busy == 0.6 and "not caching it" in caplog.text
    assert not (tmp_path / "node" / "profile.json").exists() and not (host / "profile-torch-cpu.json").exists()
    busy[0] = 0.1
    assert load_or_measure_profile(tmp_path / "node", device="cpu", shared_dir=host).busy == 0.1
    cached = json.loads((tmp_path / "node" / "profile.json").read_text())
    assert cached["busy"] == 0.1 and (host / "profile-torch-cpu.json").exists()
    busy[0] = 0.0
    assert load_or_measure_profile(tmp_path / "node", device="cpu", shared_dir=host).busy == 0.1  # the cache
    assert load_or_measure_profile(tmp_path / "node", device="cpu", shared_dir=host, refresh=True).busy == 0.0
    (tmp_path / "node" / "profile.json").write_text(json.dumps(cached | {"software": "torch 0.1"}))
    (host / "profile-torch-cpu.json").unlink()
    busy[0] = 0.05
    assert load_or_measure_profile(tmp_path / "node", device="cpu", shared_dir=host).busy == 0.05  # re-measured


@pytest.mark.spec("P7")
def test_the_share_of_other_processes_is_read_from_proc_stat() -> None:
    """This process alone busy: the others' share stays near 0; readings that went nowhere give 0."""
    import time as _time

    before = profile_mod._cpu_times()
    if before is None:
        pytest.skip("no /proc/stat here")
    end = _time.monotonic() + 0.3
    while _time.monotonic() < end:
        pass
    after = profile_mod._cpu_times()
    assert 0.0 <= profile_mod._others_share(before, after) <= 1.0
    assert profile_mod._others_share(before, before) == 0.0 and profile_mod._others_share(None, after) == 0.0
    assert measure_profile(device="cpu", budget_s=0.3).software.startswith("torch ")


@pytest.mark.spec("P7")
def test_runs_are_summarised_by_the_median_without_interrupted_ones_and_wrong_figures_are_remeasured(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from mesh.placement.profile import insane, robust_seconds

    assert robust_seconds([1.0, 1.1, 1.2, 9.0]) == 1.1  # the run another process interrupted is dropped
    assert robust_seconds([2.0]) == 2.0 and robust_seconds([1.0, 1.4, 1.45]) == 1.4  # not the lucky minimum
    assert insane({"f32": 1e11}, 2e10) == []
    assert insane({"f32": 2.6e8, "bf16": 5e7}, 2e10) == ["bf16 0.05 GFLOP/s"]
    measured = iter([5e7, 5e7, 5e7, 1e11])  # f32 FLOP/s of successive measurements

    def once(**kwargs: Any) -> DeviceProfile:
        return DeviceProfile(memory_total_bytes=8 * GIB, memory_usable_bytes=4 * GIB, flops={"f32": next(measured)},
                             memory_bandwidth_bytes_per_s=2e10, backend="torch", device="cpu",
                             measured_at_ms=1_700_000_000_000, software=profile_mod.software("torch"))

    monkeypatch.setattr(profile_mod, "_measure_once", once)
    with caplog.at_level(logging.WARNING, logger="mesh.placement.profile"):
        wrong = measure_profile(device="cpu")  # wrong twice: this run only
        right = measure_profile(device="cpu")  # wrong once, then right
    assert wrong.busy == 1.0 and right.busy == 0.0 and right.flops == {"f32": 1e11}
    assert caplog.text.count("measuring again") == 2 and "this run only" in caplog.text
