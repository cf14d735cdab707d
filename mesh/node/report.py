"""What a node reports: whether it is ready to serve (and why not), and ``/v1/cluster``:
members and their layer ranges, requests, kernel figures, links, performance, security. A
mixin of ``mesh.node.node.Node``; it only reads. Spec: specs/node.md, specs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.placement.pipeline import Plan

if TYPE_CHECKING:
    from mesh.kernel.records import ClusterView
    from mesh.kernel.replication import Replication
    from mesh.models import Model
    from mesh.node.config import NodeConfig
    from mesh.node.links import Links
    from mesh.runtime.coordinator import Coordinator, StageWorker
    from mesh.security import LinkSecurity


class NodeReport:
    """Readiness and ``/v1/cluster`` of a node (mixed into ``Node``)."""

    config: NodeConfig
    member_id: str
    model: Model
    plan: Plan | None
    plan_error: str
    clock_fault: str | None
    replication: Replication | None
    links: Links
    worker: StageWorker
    coordinator: Coordinator | None
    security: LinkSecurity | None

    def view(self) -> ClusterView:
        raise NotImplementedError

    def _performance(self) -> dict[str, Any]:
        raise NotImplementedError

    def current_plan(self) -> Plan | None:
        return self.plan

    def ready(self) -> tuple[bool, str]:
        """True only when every stage of the current plan reports its layers loaded."""
        if self.clock_fault is not None:
            return False, self.clock_fault
        if self.plan is None or self.replication is None:
            return False, self.plan_error
        view = self.view()
        linked = set(self.links.linked()) | {self.member_id}
        for stage in self.plan.all_stages:
            status = view.status(stage.member_id)
            want = (self.plan.plan_id, stage.layer_start, stage.layer_end, "ready")
            if (status.plan_id, status.layer_start, status.layer_end, status.state) != want:
                if status.plan_id != self.plan.plan_id:
                    return False, (f"member {stage.member_id} is switching to plan {self.plan.plan_id} "
                                   f"(layers [{stage.layer_start}, {stage.layer_end})); it reports plan "
                                   f"{status.plan_id or 'none'}, state {status.state}")
                detail = f": {status.error}" if status.error else ""
                return False, (f"member {stage.member_id} has not loaded layers "
                               f"[{stage.layer_start}, {stage.layer_end}) yet (state {status.state}{detail})")
            if stage.member_id not in linked:
                return False, f"no link to member {stage.member_id} yet"
            held = self.worker.backend
            if stage.member_id == self.member_id and (
                    held is None or (held.layer_start, held.layer_end) != (stage.layer_start, stage.layer_end)):
                # its status may be a record restored from before a restart: trust only what is loaded
                return False, f"this node has not loaded layers [{stage.layer_start}, {stage.layer_end}) yet"
        return True, "ok"

    def cluster_info(self) -> dict[str, Any]:
        assert self.replication is not None
        ready, reason = self.ready()
        view = self.view()
        state = self.replication.state
        replica = self.replication.replica
        members = []
        for m in view.members():
            stage = self.plan.stage_of(m.member_id) if self.plan else None
            members.append({
                "id": m.member_id,
                "address": m.address,
                "api_address": m.api_address,
                "backend": m.backend,
                "memory_bytes": m.memory_bytes,
                "layer_start": stage.layer_start if stage else None,
                "layer_end": stage.layer_end if stage else None,
                "role": self.plan.role_of(m.member_id) if self.plan else None,
                "state": view.status(m.member_id).state,
                "self": m.member_id == self.member_id,
            })
        return {
            "model": self.model.model_id,
            "num_layers": self.model.num_layers,
            "plan_id": self.plan.plan_id if self.plan else None,
            "ready": ready,
            "reason": reason,
            "members": members,
            "requests": view.requests(),
            "kernel": {
                "state_hash": state.content_hash(),
                "events_applied": replica.applied,
                "version_vector": state.context.to_wire(),
                "live_entries": state.live_entries(),
                "buffered_events": replica.buffer.buffered(),
                "tail_events": len(replica.tail),
                "log_records": self.replication.log.records,
            },
            "links": self.view().links(),
            "performance": self._performance(),
            "security": {
                "authenticated": self.security is not None,
                "cluster": self.security.cluster_fingerprint if self.security is not None else None,
                "transport": self.config.transport,
            },
            "local": {"id": self.member_id, "kv_caches": len(self.worker.caches),
                      "coordinating": self.coordinator.active if self.coordinator else 0,
                      "failed_attempts": self.coordinator.failed_attempts if self.coordinator else 0,
                      "recovery_s": list(self.coordinator.recovery_times)[-32:] if self.coordinator else [],
                      **(self.coordinator.requests.to_wire() if self.coordinator else {"active": [], "recent": []})},
            "events": [_event_row(e) for e in reversed(replica.recent)],
        }


def _event_row(event: Any) -> dict[str, Any]:
    """An applied kernel event for people: type, key, origin, seq, wall time (ms)."""
    key = event.payload.get("key") if isinstance(event.payload, dict) else None
    return {"type": event.type, "key": key if isinstance(key, str) else None, "origin": event.id.origin,
            "seq": event.id.seq, "time_ms": event.hlc.physical_ms}
