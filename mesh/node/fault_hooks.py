"""Fault injection in a running node, for the fault-injection suite (``python -m mesh faults``).

``python -m mesh node --fault-plan FILE --fault-label NAME`` wraps the node's transport in
``transports.faults.FaultyTransport`` (label NAME, so partitions can name this node) and
watches FILE: a JSON object ``{"plan": {FaultPlan fields}, "reset": int, "seed": int}``.
``plan`` takes effect on every link from the next message (``partition`` is a list of
``[src_label, dst_label]`` pairs); each time ``reset`` grows, every open link is reset.
A missing or malformed file leaves the plan as it was (with a warning): a half-written file
must not stop a test. Never use these flags outside tests: they make links lose messages.
Spec: specs/faults.md F15.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from transports.base import Transport
from transports.faults import FaultPlan, FaultyTransport

log = logging.getLogger(__name__)

POLL_S = 0.1


def plan_from_json(raw: object) -> FaultPlan:
    """A ``FaultPlan`` from its JSON form; ConfigError names a bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a fault plan must be a JSON object, got {type(raw).__name__}")
    fields: dict[str, Any] = dict(raw)
    if "partition" in fields:
        cut = fields["partition"]
        if not isinstance(cut, list) or not all(isinstance(p, list) and len(p) == 2 for p in cut):
            raise ConfigError("fault plan field 'partition' must be a list of [src_label, dst_label] pairs")
        fields["partition"] = frozenset((str(a), str(b)) for a, b in cut)
    try:
        return FaultPlan(**fields)
    except TypeError as exc:
        raise ConfigError(f"fault plan: {exc}; valid fields: {sorted(FaultPlan.__dataclass_fields__)}") from exc


def read_control(path: Path) -> tuple[FaultPlan, int, int]:
    """(plan, reset counter, seed) from the control file; ConfigError or OSError when unreadable."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    reset, seed = raw.get("reset", 0), raw.get("seed", 0)
    if type(reset) is not int or type(seed) is not int:
        raise ConfigError(f"{path}: 'reset' and 'seed' must be integers")
    return plan_from_json(raw.get("plan", {})), reset, seed


def wrap(transport: Transport, *, label: str, path: Path) -> FaultyTransport:
    """The node's transport wrapped for fault injection, with the file's plan applied now
    (a missing file: no faults yet)."""
    plan, seed = FaultPlan(), 0
    if path.exists():
        plan, _, seed = read_control(path)
    log.warning("FAULT INJECTION on: links follow %s (label %s)", path, label)
    return FaultyTransport(transport, label=label, rng=random.Random(seed), plan=plan)


async def watch(transport: FaultyTransport, path: Path, stop: asyncio.Event) -> None:
    """Apply the control file's changes until ``stop`` is set (polls every 0.1 s)."""
    seen: tuple[float, int] | None = None
    resets = None
    while not stop.is_set():
        try:
            stat = path.stat()
            if seen != (stat.st_mtime, stat.st_size):
                seen = (stat.st_mtime, stat.st_size)
                plan, reset, _ = read_control(path)
                if plan != transport.plan:
                    log.warning("fault injection: new plan %s", plan)
                    transport.set_plan(plan)
                if resets is not None and reset > resets:
                    log.warning("fault injection: resetting every link")
                    await transport.reset_all()
                resets = reset
        except FileNotFoundError:
            pass
        except (OSError, ConfigError) as exc:
            log.warning("fault injection: cannot read %s: %s", path, exc)
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
        except TimeoutError:
            pass
