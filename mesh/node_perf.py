"""The performance side of a node: its measured device profile, the cost model's prediction
for the current plan beside measured figures, and placement by the solver. A mixin of
``mesh.node.Node``. Spec: specs/placement.md P7, P16, P17.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from mesh.errors import MeshError
from mesh.placement import Plan, Stage

if TYPE_CHECKING:
    from pathlib import Path

    from mesh.membership import ClusterView
    from mesh.models import Model
    from mesh.node import NodeConfig
    from mesh.replication import Replication
    from mesh.runtime import Coordinator

log = logging.getLogger("mesh.node")

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
NOMINAL_LINK_LATENCY_S = 1e-3  # the links --placement solver assumes (1 GbE)
NOMINAL_LINK_BYTES_PER_S = 1.25e8


class NodePerformance:
    """Profile, predictions and solver placement of a node (mixed into ``Node``)."""

    config: NodeConfig
    data_dir: Path
    member_id: str
    model: Model
    plan: Plan | None
    profile: Any
    replication: Replication | None
    coordinator: Coordinator | None
    _joined: bool
    _stop: asyncio.Event

    def view(self) -> ClusterView:
        raise NotImplementedError

    async def _measure_profile(self) -> None:
        """Measure (or read the cached) device profile, before the model loads: measured
        while this process loads weights, the figures would be of a busy CPU (spec P7)."""
        from mesh.node import _backend_options
        from mesh.profile import load_or_measure_profile

        options = _backend_options(self.config)
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
        from mesh.perf import profile_key, profile_record

        profile = self.profile
        if profile is None:
            return
        while not self._joined and not self._stop.is_set():
            await asyncio.sleep(0.2)
        if self.replication is not None and not self._stop.is_set():
            self.replication.emit("profile.set", profile_key(self.member_id),
                                  profile_record(profile.flops, profile.memory_bandwidth_bytes_per_s, profile.device))

    def _performance(self) -> dict[str, Any]:
        """The cost model's prediction for the current plan beside what this node measured."""
        from mesh.costmodel import ModelSpec
        from mesh.perf import predicted

        assert self.coordinator is not None
        measured = self.coordinator.measured.summary()
        prompt = measured["prompt_tokens"] if measured else 128
        new = measured["new_tokens"] if measured else 64
        dtype = self._compute_dtype()
        try:
            spec = ModelSpec.from_config(self.model.config, name=self.model.model_id, dtype_bytes=DTYPE_BYTES[dtype])
        except (MeshError, AttributeError, TypeError, ValueError) as exc:
            return {"predicted": None, "measured": measured, "error": f"no model spec: {exc}"}
        return {"predicted": predicted(self.view(), self.plan, spec, dtype, prompt_tokens=prompt, new_tokens=new),
                "measured": measured}

    def _solver_plan(self, context: int) -> Plan | None:
        """The placement solver's plan (``--placement solver``; spec P17) from the members'
        published profiles and offered memory; None (memory-proportional placement) until
        every member has published a profile. Links are taken as a nominal 1 GbE between
        every pair: live link figures move all the time, and a plan must not follow them
        without hysteresis (every change reloads layers).

        Raises PlacementError when the solver finds no plan that fits.
        """
        from mesh.costmodel import Link, ModelSpec, Topology
        from mesh.perf import topology
        from mesh.solver import Request, solve

        dtype = self._compute_dtype()
        devices = topology(self.view(), dtype).devices
        if len(devices) != len(self.view().members()):
            return None
        links = tuple(Link(a=a.id, b=b.id, latency_s=NOMINAL_LINK_LATENCY_S, bandwidth_bytes_per_s=NOMINAL_LINK_BYTES_PER_S)
                      for i, a in enumerate(devices) for b in devices[i + 1:])
        spec = ModelSpec.from_config(self.model.config, name=self.model.model_id, dtype_bytes=DTYPE_BYTES[dtype])
        request = Request(context_tokens=context, prompt_tokens=min(context, 512), new_tokens=128)
        solution = solve(Topology(devices=devices, links=links), spec, request, objective=self.config.objective,
                         disaggregation=False, tensor_parallel=False)  # what the runtime can run today
        return Plan(num_layers=spec.num_layers, stages=tuple(
            Stage(member_id=s.devices[0], layer_start=s.layer_start, layer_end=s.layer_end)
            for s in solution.plan.stages))

    def _compute_dtype(self) -> str:
        return self.config.dtype or ("f32" if (self.config.device or "cpu").startswith("cpu") else "f16")
