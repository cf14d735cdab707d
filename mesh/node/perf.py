"""The performance side of a node: its measured device profile, the cost model's prediction
for the current plan beside measured figures, and placement by the solver. A mixin of
``mesh.node.node.Node``. Spec: specs/placement.md P7, P16, P17.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from mesh.errors import MeshError, PlacementError
from mesh.placement.pipeline import Plan, Stage

if TYPE_CHECKING:
    from pathlib import Path

    from mesh.kernel.records import ClusterView
    from mesh.kernel.replication import Replication
    from mesh.models import Model
    from mesh.node.config import NodeConfig
    from mesh.runtime.coordinator import Coordinator

log = logging.getLogger("mesh.node.node")

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
NOMINAL_LINK_LATENCY_S = 1e-3  # the links --placement solver assumes (1 GbE)
NOMINAL_LINK_BYTES_PER_S = 1.25e8
RECALIBRATE_AFTER_S = 5.0  # the stage is timed again every 5-10 s after it loaded, if idle ...
RECALIBRATIONS = 3  # ... this many times


class NodePerformance:
    """Profile, predictions and solver placement of a node (mixed into ``Node``)."""

    config: NodeConfig
    data_dir: Path
    member_id: str
    model: Model
    plan: Plan | None
    profile: Any
    calibration: Any
    _stage_times: Any
    _calibrating: Any
    replication: Replication | None
    links: Any
    worker: Any
    coordinator: Coordinator | None
    _joined: bool
    _stop: asyncio.Event

    def view(self) -> ClusterView:
        raise NotImplementedError

    async def _measure_profile(self) -> None:
        """Measure (or read the cached) device profile, before the model loads: measured
        while this process loads weights, the figures would be of a busy CPU (spec P7)."""
        from mesh.node.config import backend_options
        from mesh.placement.profile import load_or_measure_profile

        options = backend_options(self.config)
        try:
            profile = await asyncio.to_thread(
                load_or_measure_profile, self.data_dir, backend=self.config.backend, device=options.get("device"),
                memory_fraction=self.config.memory_fraction, budget_s=1.0)
        except Exception as exc:  # a profile is an aid to placement: its failure costs only predictions
            log.warning("could not measure this device's profile: %s", exc)
            return
        log.info("device profile: %s", ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in profile.flops.items())
                 + f", memory bandwidth {profile.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s")
        self.profile = profile

    async def _publish_profile(self) -> None:
        """Publish the profile once this node has joined (spec P16)."""
        while not self._joined and not self._stop.is_set():
            await asyncio.sleep(0.2)
        self._emit_profile()

    def _emit_profile(self) -> None:
        from mesh.placement.perf import profile_key, profile_record

        profile = self.profile
        if profile is None or self.replication is None or not self._joined or self._stop.is_set():
            return
        self.replication.emit("profile.set", profile_key(self.member_id), profile_record(
            profile.flops, profile.memory_bandwidth_bytes_per_s, profile.device, calibration=self.calibration))

    async def _calibrate(self, backend: Any) -> None:
        """Time the stage just loaded and publish per-layer figures with the profile (spec
        P19). Runs before the stage is offered to requests; a failure costs only predictions.
        Members of one host load at once and would time each other's load, so the stage is
        timed again a few times later while idle, keeping the fastest time of each step."""
        self._stage_times, self._calibrating = None, backend
        if await self._time_stage(backend):
            self.links.spawn(self._recalibrate(backend), "recalibrate")

    async def _recalibrate(self, backend: Any) -> None:
        # spread by member id, so members of one host do not time each other again
        spread = int(self.member_id[:4], 16) % 1000 / 1000
        for _ in range(RECALIBRATIONS):
            await asyncio.sleep(RECALIBRATE_AFTER_S * (1 + spread))
            if self._calibrating is not backend:
                return  # replaced: its own calibration runs
            if not self.worker.caches:  # serving: try again later
                await self._time_stage(backend)

    async def _time_stage(self, backend: Any) -> bool:
        """Time ``backend``'s stage once more, fold it into the fastest times so far, refit
        and publish; False when it cannot be timed."""
        from mesh.placement.calibrate import fastest, fit_calibration, time_stage
        from mesh.placement.costmodel import head_s

        profile = self.profile
        flops = profile.flops.get(self._compute_dtype()) if profile is not None else None
        if flops is None:
            return False
        try:
            spec = self._model_spec()
            times = await asyncio.to_thread(time_stage, backend, hidden_size=int(self.model.config.hidden_size))
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
            self._emit_profile()
        return True

    def _model_spec(self) -> Any:
        """The cost model's view of the served model in the compute dtype; its name carries
        the dtype, since a calibration is only valid for both."""
        from mesh.placement.costmodel import ModelSpec

        dtype = self._compute_dtype()
        return ModelSpec.from_config(self.model.config, name=f"{self.model.model_id}@{dtype}",
                                     dtype_bytes=DTYPE_BYTES[dtype])

    def _performance(self) -> dict[str, Any]:
        """The cost model's prediction for the current plan beside what this node measured."""
        from mesh.placement.perf import predicted

        assert self.coordinator is not None
        measured = self.coordinator.measured.summary()
        prompt = measured["prompt_tokens"] if measured else 128
        new = measured["new_tokens"] if measured else 64
        dtype = self._compute_dtype()
        try:
            spec = self._model_spec()
        except (MeshError, AttributeError, TypeError, ValueError) as exc:
            return {"predicted": None, "measured": measured, "error": f"no model spec: {exc}"}
        return {"predicted": predicted(self.view(), self.plan, spec, dtype, prompt_tokens=prompt, new_tokens=new),
                "measured": measured}

    def _solver_plan(self, context: int) -> Plan | None:
        """The placement solver's plan (spec P17) from the members' published profiles and
        offered memory. A member that has not published a profile yet (it just joined) is
        left out rather than placed by memory and then moved once its profile lands (every
        move reloads layers); None (memory-proportional placement over every member) when no
        member has a profile, or when the profiled ones cannot hold the model but all could.
        Links are taken as a nominal 1 GbE between every pair: live link figures move all
        the time, and a plan must not follow them without hysteresis.

        Raises PlacementError when the solver finds no plan that fits every member.
        """
        from mesh.placement.costmodel import Link, Topology
        from mesh.placement.perf import topology
        from mesh.placement.solver import Request, solve

        dtype = self._compute_dtype()
        devices = topology(self.view(), dtype).devices
        missing = len(self.view().members()) - len(devices)
        if not devices:
            return None
        links = tuple(Link(a=a.id, b=b.id, latency_s=NOMINAL_LINK_LATENCY_S, bandwidth_bytes_per_s=NOMINAL_LINK_BYTES_PER_S)
                      for i, a in enumerate(devices) for b in devices[i + 1:])
        spec = self._model_spec()
        request = Request(context_tokens=context, prompt_tokens=min(context, 512), new_tokens=128)
        try:  # tensor-parallel groups: the runtime cannot run them yet
            solution = solve(Topology(devices=devices, links=links), spec, request, objective=self.config.objective,
                             disaggregation=True, tensor_parallel=False)
        except PlacementError:
            if missing:
                return None
            raise
        return runtime_plan(spec.num_layers, solution.plan)

    def _compute_dtype(self) -> str:
        return self.config.dtype or ("f32" if (self.config.device or "cpu").startswith("cpu") else "f16")


def runtime_plan(num_layers: int, placement: Any) -> Plan:
    """The runtime's ``Plan`` for a solver ``PlacementPlan`` of single-device stages: stages
    of role ``prefill`` become the plan's prefill pipeline (spec N13), the others its stages.
    Raises PlacementError for a plan the runtime cannot run (a tensor-parallel group)."""
    if any(len(s.devices) != 1 for s in placement.stages):
        raise PlacementError("the runtime runs single-device stages only (no tensor-parallel groups)")

    def stages(roles: tuple[str, ...]) -> tuple[Stage, ...]:
        return tuple(Stage(member_id=s.devices[0], layer_start=s.layer_start, layer_end=s.layer_end)
                     for s in placement.stages if s.role in roles)

    return Plan(num_layers=num_layers, stages=stages(("both", "decode")), prefill_stages=stages(("prefill",)))
