"""What a node reports, as pure functions of what it knows: whether it is ready to serve (and
why not), and the body of ``GET /v1/cluster`` (members and their layer ranges, requests,
kernel figures, links, predicted and measured performance, security, this node's requests).
Nothing here writes or waits. Spec: specs/node.md N4, N9, N12; specs/api.md A10, A11.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh.kernel.records import ClusterView
from mesh.kernel.replication import Replication
from mesh.placement.costmodel import ModelSpec
from mesh.placement.perf import predicted, topology
from mesh.placement.pipeline import Plan
from mesh.runtime.request_core import PlanState


def performance(view: ClusterView, plan: Plan | None, spec: ModelSpec | None, dtype: str,
                measured: dict[str, Any] | None, spec_error: str = "") -> dict[str, Any]:
    """The cost model's prediction for ``plan`` beside what this node measured (spec P16):
    predicted for the measured median prompt and completion lengths (128 and 64 tokens until
    a request finished)."""
    if spec is None:
        return {"predicted": None, "measured": measured, "error": f"no model spec: {spec_error}"}
    prompt = measured["prompt_tokens"] if measured else 128
    new = measured["new_tokens"] if measured else 64
    return {"predicted": predicted(view, plan, spec, dtype, prompt_tokens=prompt, new_tokens=new),
            "measured": measured}


def kernel_figures(replication: Replication) -> dict[str, Any]:
    """The kernel's own figures: state hash, events applied, version vector, entries, buffer."""
    state, replica = replication.state, replication.replica
    return {
        "state_hash": state.content_hash(),
        "events_applied": replica.applied,
        "version_vector": state.context.to_wire(),
        "live_entries": state.live_entries(),
        "buffered_events": replica.buffer.buffered(),
        "tail_events": len(replica.tail),
        "log_records": replication.log.records,
    }


def cluster_info(*, model_id: str, num_layers: int, plan: Plan | None, ready: tuple[bool, str], view: ClusterView,
                 serving_plan_id: str | None,
                 member_id: str, kernel: dict[str, Any], recent_events: list[Any], performance: dict[str, Any],
                 security: dict[str, Any], local: dict[str, Any], dtype: str = "f32") -> dict[str, Any]:
    """The body of ``GET /v1/cluster`` (spec A10); ``topology``: the members with a published
    profile (FLOP/s in ``dtype``) and their measured links, in the topology-file format
    (``Topology.to_file``), for ``python -m mesh plan`` and ``gym``."""
    members = []
    for m in view.members():
        stage = plan.stage_of(m.member_id) if plan else None
        place = plan.group_place(m.member_id) if plan else None
        stage = stage or (place[0] if place else None)
        members.append({
            "id": m.member_id,
            "address": m.address,
            "api_address": m.api_address,
            "backend": m.backend,
            "memory_bytes": m.memory_bytes,
            "layer_start": stage.layer_start if stage else None,
            "layer_end": stage.layer_end if stage else None,
            "role": plan.role_of(m.member_id) if plan else None,
            "state": view.status(m.member_id).state,
            "held": [list(r) for r in view.status(m.member_id).held],
            "self": m.member_id == member_id,
            # spec N26: its place in a tensor-parallel group (0 leads), of how many members, and where
            "tensor_parallel": {"rank": place[1] if place else 0, "size": len(stage.members), "address": m.tp_address}
            if stage is not None and stage.group else None,
        })
    return {
        "model": model_id,
        "num_layers": num_layers,
        "plan_id": plan.plan_id if plan else None,
        "plan": {"stages": [s.wire() for s in plan.stages], "prefill_stages": [s.wire() for s in plan.prefill_stages]}
        if plan else None,
        "serving_plan_id": serving_plan_id,
        "ready": ready[0],
        "reason": ready[1],
        "members": members,
        "requests": view.requests(),
        "kernel": kernel,
        "links": view.links(),
        "topology": topology(view, dtype).to_file(),
        "performance": performance,
        "security": security,
        "local": {"id": member_id, **local},
        "events": [event_row(e) for e in reversed(recent_events)],
    }


def event_row(event: Any) -> dict[str, Any]:
    """An applied kernel event for people: type, key, origin, seq, wall time (ms)."""
    key = event.payload.get("key") if isinstance(event.payload, dict) else None
    return {"type": event.type, "key": key if isinstance(key, str) else None, "origin": event.id.origin,
            "seq": event.id.seq, "time_ms": event.hlc.physical_ms}


class NodeStatus:
    """``mesh.runtime.engine.ClusterStatus`` of a node: ``/health``, ``/v1/cluster`` and the
    gauges of ``/metrics``, read from narrow ports at request time. ``placement()`` is
    (the target plan, why there is none); ``serving()`` the ``PlanState`` requests start on
    (spec N21: the plan serving while the target loads); ``leaving()`` whether this node is
    stopping (``/health`` then says so, spec N20); ``stats()`` the
    request plane's statistics (None before it exists); ``spec`` the cost model's view of the
    model in ``dtype``."""

    def __init__(self, *, member_id: str, model_id: str, num_layers: int, replication: Replication,
                 linked: Callable[[], list[str]], placement: Callable[[], tuple[Plan | None, str]],
                 serving: Callable[[], PlanState], leaving: Callable[[], bool] = lambda: False,
                 stats: Callable[[], Any], metrics_text: Callable[[], bytes | None], security: dict[str, Any],
                 spec: Callable[[], ModelSpec | None], dtype: str) -> None:
        self.member_id, self.model_id, self.num_layers = member_id, model_id, num_layers
        self.replication = replication
        self.linked, self.placement, self.serving, self.leaving = linked, placement, serving, leaving
        self.stats, self._metrics_text, self.security, self.spec, self.dtype = stats, metrics_text, security, spec, dtype

    def view(self) -> ClusterView:
        return ClusterView(self.replication.state)

    def health(self) -> tuple[bool, str]:
        if self.leaving():  # spec N20: a load balancer stops sending here
            return False, "this node is leaving the cluster: send requests to another node"
        state = self.serving()
        return state.ready, state.reason

    def admits(self) -> tuple[bool, str]:
        """Ready, or a placed plan is only loading: every member of it linked and none whose
        load failed (a partition or a failure gets its 503 at once, for a client or load
        balancer to go elsewhere)."""
        ready, reason = self.health()
        plan = self.serving().plan
        if ready or self.leaving() or plan is None:
            return ready, reason
        view, linked = self.view(), {*self.linked(), self.member_id}
        return all(s.member_id in linked and view.status(s.member_id).state != "failed" for s in plan.all_stages), reason

    def cluster_info(self) -> dict[str, Any]:
        plan, _ = self.placement()
        serving = self.serving()
        stats = self.stats()
        local = {"kv_caches": stats.kv_caches, "coordinating": stats.active, "failed_attempts": stats.failed_attempts,
                 "recovery_s": list(stats.recovery_s), "queued": stats.queued, "refused": stats.refused,
                 "batches": stats.batches, "batched_steps": stats.batched_steps, "prefix_cache": stats.prefix,
                 **stats.requests} if stats is not None else {}
        local["dtype"] = self.dtype  # the compute dtype (spec N19)
        view = self.view()
        return cluster_info(
            model_id=self.model_id, num_layers=self.num_layers, plan=plan, ready=self.health(), view=view,
            serving_plan_id=serving.plan.plan_id if serving.ready and serving.plan else None,
            member_id=self.member_id, kernel=kernel_figures(self.replication),
            recent_events=list(self.replication.replica.recent), security=self.security, local=local, dtype=self.dtype,
            performance=performance(view, plan, self.spec(), self.dtype, stats.measured if stats is not None else None))

    def metrics_text(self) -> bytes | None:
        return self._metrics_text()

    def metrics_sample(self) -> dict[str, Any]:
        """The gauges of ``GET /metrics``, read at scrape time."""
        stats = self.stats()
        links = [(row["to"], row["rtt_p50_s"]) for row in self.view().links()
                 if row["from"] == self.member_id and isinstance(row.get("rtt_p50_s"), int | float)]
        if stats is None:
            return {"kv_caches": 0, "kv_replica_bytes": 0, "active_requests": 0, "links": links}
        return {"kv_caches": stats.kv_caches, "kv_replica_bytes": stats.kv_replica_bytes,
                "active_requests": stats.active, "links": links, "queued_requests": stats.queued,
                "refused_requests": stats.refused, "batches": stats.batches, "batched_steps": stats.batched_steps,
                "prefix": stats.prefix or {}}
