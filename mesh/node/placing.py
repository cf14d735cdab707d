"""The node's current plan: recomputed by the pure planner after every change of the cluster
state, and what follows a new plan (the loader is told, the placement metric counts it, the
member with the lowest id records it in the state). Spec: specs/node.md N2-N4, N13;
specs/placement.md P17.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mesh.errors import PlacementError
from mesh.kernel.records import ClusterView
from mesh.placement import planner
from mesh.placement.pipeline import Plan

log = logging.getLogger(__name__)


class Placement:
    """``plan`` (None while there is none) and ``error`` (why not). Ports: ``view()`` the
    state now; ``inputs()`` the planner's inputs (None until the model's size is known);
    ``want(plan)`` tells the loader; ``changed()`` counts a new plan; ``record(plan_id,
    stages, prefill_stages, first_member)`` records it (``SelfRecords.placement``)."""

    def __init__(self, *, view: Callable[[], ClusterView], inputs: Callable[[], planner.PlanInputs | None],
                 want: Callable[[Plan | None], None], changed: Callable[[], None],
                 record: Callable[[str, list[list[Any]], list[list[Any]], str | None], None]) -> None:
        self.view, self.inputs, self.want, self.changed, self.record = view, inputs, want, changed, record
        self.plan: Plan | None = None
        self.error = "no placement yet"

    def replan(self) -> None:
        inputs = self.inputs()
        if inputs is None:
            return
        view = self.view()
        try:
            plan = planner.plan(view, inputs)
        except PlacementError as exc:
            if self.plan is not None or self.error != f"placement failed: {exc}":
                log.error("placement failed: %s", exc)
            self.plan, self.error = None, f"placement failed: {exc}"
            self.want(None)
            return
        if self.plan is None or plan.plan_id != self.plan.plan_id:
            self.plan = plan
            self.changed()
            log.info("plan %s: %s", plan.plan_id, planner.describe(plan))
            self.want(plan)
        members = view.members()
        self.record(plan.plan_id, [[s.member_id, s.layer_start, s.layer_end] for s in plan.stages],
                    [[s.member_id, s.layer_start, s.layer_end] for s in plan.prefill_stages],
                    members[0].member_id if members else None)
