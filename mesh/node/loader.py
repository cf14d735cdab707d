"""The stage loader: loads the layer range the current plan gives this node (reusing the
layers the old range shares, spec B9), reports its load status, measures the device profile
and calibrates each loaded stage (spec P7, P16, P19). Loading runs in a worker thread, so the
node keeps serving heartbeats and HTTP meanwhile (spec N5).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from pathlib import Path
from typing import Any

from backends.base import Backend
from mesh.errors import MeshError
from mesh.identity import host_dir
from mesh.kernel.records import MemberStatus
from mesh.loading import LoadProgress
from mesh.models import Model
from mesh.placement.calibrate import fastest, fit_calibration, time_stage
from mesh.placement.costmodel import ModelSpec, head_s
from mesh.placement.perf import profile_record
from mesh.placement.pipeline import Plan
from mesh.placement.profile import load_or_measure_profile

log = logging.getLogger(__name__)

SETTLE_S = 0.3  # a burst of joins settles before a load starts
RECALIBRATE_AFTER_S = 5.0  # the stage is timed again every 5-10 s after it loaded, if idle ...
RECALIBRATIONS = 3  # ... this many times


async def measure_profile(data_dir: Path, config: Any, *, executor: Executor) -> Any:
    """This device's profile (FLOP/s per dtype, memory bandwidth) for the backend, device and
    memory fraction of ``config`` (a ``NodeConfig``), read from the cache in ``data_dir`` or
    the one this user's nodes share on this host (``host_dir``), else measured, on
    ``executor`` (the node's compute thread); None when it cannot be
    measured (a profile is an aid to placement: its failure costs only predictions). Measured
    before the model loads: measured while this process loads weights, the figures would be of
    a busy CPU (spec P7)."""
    try:
        profile = await asyncio.get_running_loop().run_in_executor(executor, partial(
            load_or_measure_profile, data_dir, backend=config.backend, device=config.device,
            memory_fraction=config.memory_fraction, budget_s=1.0, shared_dir=host_dir(), refresh=config.remeasure))
    except Exception as exc:
        log.warning("could not measure this device's profile: %s", exc)
        return None
    log.info("device profile: %s", ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in profile.flops.items())
             + f", memory bandwidth {profile.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s")
    return profile


class StageLoader:
    """Keeps this node's loaded stage equal to what the plan asks of it.

    Ports: ``new_backend()`` builds an unloaded backend; ``held()`` / ``install(backend)`` read
    and swap the stage the request plane computes with (None: nothing); ``set_status`` writes
    this node's load status; ``publish(record)`` writes its profile record; ``idle()`` tells
    whether no request holds a KV cache here (recalibration waits for that);
    ``loaded(layers, reused)`` counts a finished load (spec N14); ``executor`` is the one thread
    that runs every backend call of this node, loads and timings as well as steps: a CPU
    library's thread pool (torch's OpenMP) keeps a team of spinning workers per calling thread,
    and two teams on the cores halve decode speed (measured: 21 against 44-56 ms per token,
    README "Models").
    """

    def __init__(self, member_id: str, model: Model, *, new_backend: Callable[[], Backend],
                 held: Callable[[], Backend | None], install: Callable[[Backend | None], None],
                 set_status: Callable[[MemberStatus], None], publish: Callable[[dict[str, Any]], None],
                 idle: Callable[[], bool], loaded: Callable[[int, int], None], profile: Any, spec: ModelSpec | None,
                 dtype: str, executor: Executor) -> None:
        self.member_id = member_id
        self.executor = executor
        self.model = model
        self.new_backend = new_backend
        self.held = held
        self.install = install
        self.set_status = set_status
        self.publish = publish
        self.idle = idle
        self.loaded = loaded
        self.profile = profile
        self.spec = spec
        self.dtype = dtype
        self.calibration: Any = None  # per-layer step times of the loaded stage (spec P19)
        self._wanted = asyncio.Event()
        self._plan: Plan | None = None
        self._stage_times: Any = None  # the fastest timings of the loaded stage so far
        self._calibrating: Backend | None = None  # the backend those timings are of
        self._failed: MemberStatus | None = None  # the status of this process's last load, if it failed

    def want(self, plan: Plan | None) -> None:
        """The plan changed (or failed: None): load what it asks of this node, soon."""
        self._plan = plan
        self._wanted.set()

    def publish_profile(self) -> None:
        if self.profile is not None:
            self.publish(profile_record(self.profile.flops, self.profile.memory_bandwidth_bytes_per_s,
                                        self.profile.device, calibration=self.calibration))

    async def run(self, joined: asyncio.Event) -> None:
        """Load stages as plans change, until cancelled; recalibrations run beside, and the
        profile is published once this node has joined (``joined``, spec P16)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._publish_when(joined), name="profile")
            while True:
                await self._wanted.wait()
                await asyncio.sleep(SETTLE_S)
                self._wanted.clear()
                calibrated = await self._load(self._plan)
                if calibrated is not None:
                    tasks.create_task(self._recalibrate(calibrated), name="recalibrate")

    async def _publish_when(self, joined: asyncio.Event) -> None:
        await joined.wait()
        self.publish_profile()

    async def _load(self, plan: Plan | None) -> Backend | None:
        """Bring the held stage to what ``plan`` asks; the newly loaded backend when it could
        be calibrated (to be timed again later), else None."""
        stage = plan.stage_of(self.member_id) if plan else None
        plan_id = plan.plan_id if plan else ""
        if stage is None:
            self.install(None)
            # a failed load stays reported (the planner leaves this member out, spec N17)
            # until this process loads a stage again: else it would be placed, fail, and so on
            if self._failed is None:
                self.set_status(MemberStatus(plan_id=plan_id, state="idle"))
            return None
        status = MemberStatus(plan_id=plan_id, layer_start=stage.layer_start, layer_end=stage.layer_end,
                              state="ready")
        current = self.held()
        if current is not None and (current.layer_start, current.layer_end) == (stage.layer_start, stage.layer_end):
            self.set_status(status)
            return None
        self.set_status(MemberStatus(**{**status.to_wire(), "state": "loading"}))
        backend = self.new_backend()
        progress = LoadProgress(f"layers [{stage.layer_start},{stage.layer_end})", tty=sys.stderr.isatty())
        if current is not None:  # reuse the layers both ranges share (spec B9); the old range
            self.install(None)  # is unusable from here, and its requests fail anyway
            backend.adopt_from(current)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, backend.load, self.model, stage.layer_start, stage.layer_end, progress)
        except Exception as exc:  # a backend plugin may raise anything: report it, keep serving
            if not isinstance(exc, MeshError):
                log.exception("backend %s failed to load layers", backend.name)
            log.error("loading layers [%d, %d) failed: %s", stage.layer_start, stage.layer_end, exc)
            self._failed = MemberStatus(**{**status.to_wire(), "state": "failed", "error": str(exc)})
            self.set_status(self._failed)
            return None
        finally:
            progress.close()
        # spec N14: what the load took from the stage it replaced; a backend that does not say
        # (no ``reused_layers``) read every layer
        self.loaded(stage.layer_end - stage.layer_start, int(getattr(backend, "reused_layers", 0) or 0))
        self._stage_times, self._calibrating = None, backend
        timed = await self._time_stage(backend)  # calibrated before the stage is offered to requests
        self.install(backend)
        self._failed = None
        self.set_status(status)
        return backend if timed else None

    async def _recalibrate(self, backend: Backend) -> None:
        """Members of one host load at once and time each other's load, so the stage is timed
        again a few times later while idle, keeping the fastest time of each step; spread by
        member id, so members of one host do not time each other again."""
        spread = int(self.member_id[:4], 16) % 1000 / 1000
        for _ in range(RECALIBRATIONS):
            await asyncio.sleep(RECALIBRATE_AFTER_S * (1 + spread))
            if self._calibrating is not backend:
                return  # replaced: its own calibration runs
            if self.idle():  # serving: try again later
                await self._time_stage(backend)

    async def _time_stage(self, backend: Backend) -> bool:
        """Time ``backend``'s stage once more, fold it into the fastest times so far, refit and
        publish (spec P19); False when it cannot be timed (a failure costs only predictions)."""
        profile, spec = self.profile, self.spec
        flops = profile.flops.get(self.dtype) if profile is not None else None
        if flops is None or spec is None:
            return False
        try:
            times = await asyncio.get_running_loop().run_in_executor(
                self.executor, partial(time_stage, backend, hidden_size=int(self.model.config.hidden_size)))
            if self._calibrating is not backend:
                return False  # replaced while timing
            self._stage_times = times = fastest(self._stage_times, times)
            last = backend.layer_end == spec.num_layers
            head = head_s(spec, flops, profile.memory_bandwidth_bytes_per_s) if last else 0.0
            calibration = fit_calibration(model=spec, layers=backend.layer_end - backend.layer_start,
                                          prefill_s=times[0], decode_s=times[1], head_s=head, flops=flops)
        except Exception as exc:  # a backend plugin may raise anything; calibration is an aid
            log.warning("could not calibrate the loaded stage: %s", exc)
            return False
        if calibration != self.calibration:
            log.info("calibration: decode %.2f ms/layer, prefill %.2f ms + %.3f ms/token per layer",
                     calibration.decode_layer_s * 1e3, calibration.prefill_layer_s * 1e3,
                     calibration.prefill_token_layer_s * 1e3)
            self.calibration = calibration
            self.publish_profile()
        return True
