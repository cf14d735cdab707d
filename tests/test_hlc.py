"""Hybrid logical clock: the receive/send rules, the max-drift policy, counter overflow and
absurd timestamps (spec K4)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ClockDriftError, KernelError, MeshError
from mesh.kernel.hlc import MAX_COUNTER, MAX_PHYSICAL_MS, HybridClock, Timestamp

T = Timestamp


def test_error_tree() -> None:
    assert issubclass(ClockDriftError, KernelError) and issubclass(KernelError, MeshError)


@pytest.mark.spec("K4")
def test_now_is_strictly_increasing_in_the_same_millisecond() -> None:
    clock = HybridClock()
    assert clock.last == T(0, 0)
    assert [clock.now(1000) for _ in range(3)] == [T(1000, 0), T(1000, 1), T(1000, 2)]
    assert clock.now(1001) == T(1001, 0)
    assert clock.last == T(1001, 0)


@pytest.mark.spec("K4")
def test_remote_far_ahead_is_rejected_and_the_clock_is_unchanged() -> None:
    clock = HybridClock(max_drift_ms=1_000)
    before = clock.now(10_000)
    with pytest.raises(ClockDriftError, match="ahead"):
        clock.observe(T(11_001, 0), 10_000)
    assert clock.last == before
    with pytest.raises(ClockDriftError):
        clock.observe(T(MAX_PHYSICAL_MS, MAX_COUNTER), 10_000)
    assert clock.last == before
    # The node keeps running: later timestamps are normal.
    assert clock.now(10_000) == T(10_000, 1)
    assert clock.now(10_500) == T(10_500, 0)
    # Exactly at the bound is accepted.
    assert clock.observe(T(11_500, 3), 10_500) == T(11_500, 4)


@pytest.mark.spec("K4")
def test_equal_physical_time_with_a_larger_remote_counter() -> None:
    clock = HybridClock()
    clock.now(500)
    clock.now(500)  # last = 500.1
    assert clock.observe(T(500, 7), 500) == T(500, 8)
    # ...and with a smaller remote counter, the local counter wins.
    assert clock.observe(T(500, 2), 500) == T(500, 9)
    # Physical time behind both: the same rule applies.
    assert clock.observe(T(500, 20), 400) == T(500, 21)


@pytest.mark.spec("K4")
def test_remote_physical_ahead_within_drift_with_a_small_counter() -> None:
    clock = HybridClock(max_drift_ms=100)
    for _ in range(5):
        clock.now(1_000)  # last = 1000.4
    assert clock.observe(T(1_050, 1), 1_020) == T(1_050, 2)
    # The clock now runs ahead of physical time: local events keep counting on it.
    assert clock.now(1_030) == T(1_050, 3)


@pytest.mark.spec("K4")
def test_local_physical_ahead_of_both() -> None:
    clock = HybridClock()
    clock.now(1_000)
    assert clock.observe(T(1_100, 42), 2_000) == T(2_000, 0)


@pytest.mark.spec("K4")
def test_physical_clock_going_backwards_still_increases() -> None:
    clock = HybridClock()
    a = clock.now(5_000)
    b = clock.now(4_000)  # wall clock stepped back
    c = clock.observe(T(3_000, 9), 3_500)
    d = clock.now(4_999)
    e = clock.now(5_001)
    assert a < b < c < d < e
    assert (b, c, d, e) == (T(5_000, 1), T(5_000, 2), T(5_000, 3), T(5_001, 0))


@pytest.mark.spec("K4")
def test_counter_overflow_carries_into_physical_time() -> None:
    clock = HybridClock()
    assert clock.observe(T(100, MAX_COUNTER - 1), 100) == T(100, MAX_COUNTER)
    assert clock.now(100) == T(101, 0)
    clock2 = HybridClock()
    assert clock2.observe(T(100, MAX_COUNTER), 100) == T(101, 0)
    # Many local events in one millisecond roll over too.
    clock3 = HybridClock()
    stamps = [clock3.now(7) for _ in range(MAX_COUNTER + 3)]
    assert stamps[-3:] == [T(7, MAX_COUNTER), T(8, 0), T(8, 1)]


@pytest.mark.spec("K4")
def test_counter_overflow_never_passes_the_drift_ceiling() -> None:
    clock = HybridClock(max_drift_ms=10)
    assert clock.observe(T(110, MAX_COUNTER - 1), 100) == T(110, MAX_COUNTER)
    with pytest.raises(ClockDriftError, match="ceiling"):
        clock.now(100)
    assert clock.last == T(110, MAX_COUNTER)
    with pytest.raises(ClockDriftError):
        clock.observe(T(105, 0), 100)
    assert clock.last == T(110, MAX_COUNTER)
    assert clock.now(101) == T(111, 0)  # one ms later there is room
    fresh = HybridClock(max_drift_ms=10)
    with pytest.raises(ClockDriftError):
        fresh.observe(T(110, MAX_COUNTER), 100)
    assert fresh.last == T(0, 0)
    top = HybridClock(max_drift_ms=10)
    top.last = T(MAX_PHYSICAL_MS, MAX_COUNTER)
    with pytest.raises(ClockDriftError):
        top.now(MAX_PHYSICAL_MS)
    assert top.last == T(MAX_PHYSICAL_MS, MAX_COUNTER)


@pytest.mark.spec("K4")
def test_timestamp_order_and_wire() -> None:
    assert T(1, 5) < T(2, 0) < T(2, 1)
    assert sorted([T(3, 0), T(1, 9), T(1, 2)]) == [T(1, 2), T(1, 9), T(3, 0)]
    ts = T(physical_ms=1_700_000_000_000, counter=12)
    assert ts.to_wire() == [1_700_000_000_000, 12]
    assert Timestamp.from_wire(cbor2.loads(cbor2.dumps(ts.to_wire()))) == ts
    assert Timestamp.from_wire((5, 6)) == T(5, 6)
    assert Timestamp.from_wire([MAX_PHYSICAL_MS, MAX_COUNTER]) == T(MAX_PHYSICAL_MS, MAX_COUNTER)
    assert str(T(3, 4)) == "3.4"


ABSURD: list[Any] = [
    [2**200, 0],
    [0, 2**200],
    [-1, 0],
    [0, -1],
    [MAX_PHYSICAL_MS + 1, 0],
    [0, MAX_COUNTER + 1],
    ["x", 0],
    [0, "1"],
    [True, 0],
    [0, False],
    [1.5, 0],
    [1.0, 0],
    [0, 2.0],
    [None, 0],
    [[1], 0],
    [],
    [1],
    [1, 2, 3],
    "x",
    None,
    5,
    {"physical_ms": 1, "counter": 0},
    b"\x00\x01",
    -(2**200),
]


@pytest.mark.spec("K4")
@pytest.mark.parametrize("wire", ABSURD, ids=repr)
def test_absurd_timestamps_are_rejected(wire: Any) -> None:
    with pytest.raises(KernelError):
        Timestamp.from_wire(wire)
    if isinstance(wire, list) and len(wire) == 2:
        with pytest.raises(KernelError):
            Timestamp(wire[0], wire[1])


@pytest.mark.spec("K4")
@pytest.mark.parametrize("now_ms", [-1, 2**200, MAX_PHYSICAL_MS + 1, True, 1.5, "1"])
def test_bad_local_physical_time_is_refused(now_ms: Any) -> None:
    clock = HybridClock()
    with pytest.raises(KernelError):
        clock.now(now_ms)
    with pytest.raises(KernelError):
        clock.observe(T(1, 1), now_ms)
    assert clock.last == T(0, 0)


def test_bad_arguments() -> None:
    with pytest.raises(KernelError):
        HybridClock().observe([1, 2], 10)  # type: ignore[arg-type]
    with pytest.raises(KernelError):
        HybridClock(max_drift_ms=-1)
    with pytest.raises(KernelError):
        HybridClock(max_drift_ms=True)


DRIFT = 1_000
physical = st.integers(min_value=0, max_value=20_000)
counter = st.one_of(st.integers(min_value=0, max_value=MAX_COUNTER), st.sampled_from([MAX_COUNTER - 1, MAX_COUNTER]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("now"), physical),
        st.tuples(st.just("observe"), physical, st.builds(Timestamp, physical, counter)),
    ),
    max_size=60,
)


@pytest.mark.spec("K4")
@settings(max_examples=300, deadline=None)
@given(ops)
def test_any_interleaving_is_strictly_increasing(steps: list[Any]) -> None:
    clock = HybridClock(max_drift_ms=DRIFT)
    seen: list[Timestamp] = []  # every timestamp issued or accepted
    for step in steps:
        before = clock.last
        now_ms = step[1]
        ceiling = min(now_ms + DRIFT, MAX_PHYSICAL_MS)
        try:
            if step[0] == "now":
                result = clock.now(now_ms)
            else:
                remote = step[2]
                result = clock.observe(remote, now_ms)
        except ClockDriftError:
            assert clock.last == before  # rejected: nothing moved
            if step[0] == "observe" and step[2].physical_ms > ceiling:
                continue
            # otherwise only a saturated counter at the drift ceiling may refuse
            inputs = [before] if step[0] == "now" else [before, step[2]]
            high = max([now_ms] + [t.physical_ms for t in inputs])
            assert high + 1 > ceiling
            assert any(t.physical_ms == high and t.counter == MAX_COUNTER for t in inputs)
            continue
        assert all(result > t for t in seen)
        assert result > before
        if step[0] == "observe":
            assert result > step[2]
            seen.append(step[2])
            high = max(before.physical_ms, step[2].physical_ms, now_ms)
        else:
            high = max(before.physical_ms, now_ms)
        # close to physical time: at most one ms of overflow carry, never past the ceiling
        assert result.physical_ms in (high, high + 1)
        assert result.physical_ms == high or result.physical_ms <= ceiling
        assert clock.last == result
        seen.append(result)
