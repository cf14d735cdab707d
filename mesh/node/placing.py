"""The node's current plan: recomputed by the pure planner after every change of the cluster
state, and what follows a new plan (the loader is told, the placement metric counts it; the plan
that serves meanwhile is ``mesh.node.serving``'s). Spec: specs/node.md N2-N4, N13, N21;
specs/placement.md P17.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mesh.errors import PlacementError
from mesh.kernel.records import ClusterView
from mesh.placement import planner
from mesh.placement.pipeline import Plan

log = logging.getLogger(__name__)


class Placement:
    """``plan`` (None while there is none) and ``error`` (why not). Ports: ``view()`` the
    state now; ``inputs()`` the planner's inputs (None until the model's size is known);
    ``want(plan)`` tells the loader; ``changed()`` counts a new plan."""

    def __init__(self, *, view: Callable[[], ClusterView], inputs: Callable[[], planner.PlanInputs | None],
                 want: Callable[[Plan | None], None], changed: Callable[[], None]) -> None:
        self.view, self.inputs, self.want, self.changed = view, inputs, want, changed
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
                # the last members stopping on purpose is no error (spec N20)
                quiet = all(view.status(m.member_id).state == "leaving" for m in view.members())
                (log.info if quiet else log.error)("placement failed: %s", exc)
            self.plan, self.error = None, f"placement failed: {exc}"
            self.want(None)
            return
        if self.plan is None or plan.plan_id != self.plan.plan_id:
            self.plan = plan
            self.changed()
            log.info("plan %s: %s", plan.plan_id, planner.describe(plan))
            self.want(plan)
