"""Fault injection in a running node: the control file (specs/faults.md F15)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.node.fault_hooks import plan_from_json, read_control, watch, wrap
from transports.faults import FaultPlan
from transports.memory import MemoryTransport


def _write(path: Path, body: object) -> None:
    path.write_text(json.dumps(body))


@pytest.mark.spec("F15")
def test_plans_parse_from_json_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    plan = plan_from_json({"loss": 0.1, "partition": [["n1", "n0"]], "jitter_s": 0.2})
    assert plan == FaultPlan(loss=0.1, jitter_s=0.2, partition=frozenset({("n1", "n0")}))
    with pytest.raises(ConfigError, match="partition"):
        plan_from_json({"partition": ["n1"]})
    with pytest.raises(ConfigError, match="valid fields"):
        plan_from_json({"lose": 0.1})
    with pytest.raises(ConfigError, match="loss"):
        plan_from_json({"loss": 2})
    path = tmp_path / "f.json"
    _write(path, {"plan": {"duplicate": 0.5}, "reset": 2, "seed": 9})
    assert read_control(path) == (FaultPlan(duplicate=0.5), 2, 9)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        read_control(path)


@pytest.mark.spec("F15")
async def test_the_watcher_applies_plans_and_resets_and_survives_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    transport = wrap(MemoryTransport(), label="n0", path=path)  # no file yet: no faults
    assert transport.plan == FaultPlan() and transport.label == "n0"
    resets: list[int] = []

    async def fake_reset() -> None:
        resets.append(1)

    transport.reset_all = fake_reset  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(watch(transport, path, stop))
    try:
        _write(path, {"plan": {"loss": 0.25}, "reset": 0})
        await _until(lambda: transport.plan == FaultPlan(loss=0.25))
        assert resets == []  # the first reading sets the counter, it resets nothing
        _write(path, {"plan": {"loss": 0.25, "delay_s": 0.01}, "reset": 1})
        await _until(lambda: resets == [1] and transport.plan.delay_s == 0.01)
        path.write_text("{half a fi")  # a half-written file: logged, plan kept
        await asyncio.sleep(0.3)
        assert transport.plan == FaultPlan(loss=0.25, delay_s=0.01) and resets == [1]
        _write(path, {"plan": {}, "reset": 1})
        await _until(lambda: transport.plan == FaultPlan())
    finally:
        stop.set()
        await asyncio.wait_for(task, 2.0)


async def _until(check: object, timeout_s: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "the watcher did not apply the file in time"
        await asyncio.sleep(0.05)
