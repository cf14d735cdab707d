"""Which plan requests start on: make-before-break plan changes (spec N21).

The planner gives the *target* plan: what every member should load now. While its stages
load, requests keep starting on the plan that served before (each member keeps the old
stage beside the new one, ``mesh.node.loader``), so a member joining or leaving opens no
window of 503s. A plan serves once every stage's member holds its layers (``held`` in the
member's status record) and is linked; the status event that makes the target servable is
the switch, the same event on every node. The member with the lowest id records the serving
plan in the state (``placement``), where a node that just joined, and so never served
anything, finds the plan to start its first requests on.

Sans-IO: the node feeds the view, its links and what its own worker holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mesh.kernel.records import ClusterView
from mesh.placement.pipeline import Plan
from mesh.placement.planner import recorded_plan
from mesh.runtime.request_core import PlanState

log = logging.getLogger(__name__)


def servable(plan: Plan, *, view: ClusterView, linked: set[str], member_id: str,
             held: list[tuple[int, int]]) -> tuple[bool, str]:
    """(True, "ok") when every stage of ``plan`` is held by its member, and a tensor-parallel
    group's stage by each member of the group (its status record's ``held``; this node's own
    stage from ``held``, what its worker holds, since a status may be a record restored from
    before a restart), and the members are linked (``linked``: members with a live link); else
    (False, why not, naming the first stage that is not)."""
    present = {m.member_id for m in view.members()}
    for stage in plan.all_stages:
        span = (stage.layer_start, stage.layer_end)
        for member in stage.members:  # a tensor-parallel group's members hold it too (spec N26)
            if member == member_id == stage.member_id:
                if span not in held:
                    return False, f"this node has not loaded layers [{span[0]}, {span[1]}) yet"
                continue
            status = view.status(member)
            if member not in present:
                return False, f"member {member} is not in the cluster"
            if not status.holds(*span):
                if status.plan_id != plan.plan_id:
                    return False, (f"member {member} is switching to plan {plan.plan_id} "
                                   f"(layers [{span[0]}, {span[1]})); it reports plan "
                                   f"{status.plan_id or 'none'}, state {status.state}")
                detail = f": {status.error}" if status.error else ""
                return False, (f"member {member} has not loaded layers "
                               f"[{span[0]}, {span[1]}) yet (state {status.state}{detail})")
            if member not in linked and member != member_id:
                return False, f"no link to member {member} yet"
    return True, "ok"


class Serving:
    """The serving plan of this node (``plan``; None before any served). ``choose`` takes the
    target plan (None: there is none, ``error`` says why) and returns the ``PlanState``
    requests start on: the target when servable, else the plan that served before while it
    still is (a plan change under way), else the recorded one (a node that just joined); a
    state that is not ready names why the target is not."""

    def __init__(self, member_id: str, move_off: Callable[[str], object] = lambda member: None) -> None:
        self.member_id = member_id
        self.plan: Plan | None = None
        self.move_off = move_off
        self._last: tuple[bool, str] = (False, "")
        self._moved: set[str] = set()  # leaving members whose requests were moved off

    def choose(self, target: Plan | None, error: str, **now: Any) -> PlanState:
        """``_choose``, and one log line when readiness or its reason changed."""
        state = self._choose(target, error, **now)
        if (state.ready, state.reason) != self._last:
            self._last = (state.ready, state.reason)
            if state.ready and state.plan is not None:
                log.info("ready: the model is placed and loaded on %d member(s)", len(state.plan.all_stages))
            else:
                log.info("not ready: %s", state.reason)
        return state

    def _choose(self, target: Plan | None, error: str, *, view: ClusterView, linked: set[str],
               held: list[tuple[int, int]], clock_fault: str | None, num_layers: int) -> PlanState:
        if clock_fault is not None:
            return PlanState(plan=None, ready=False, reason=clock_fault)  # nothing to wait for
        linked = linked | {self.member_id}
        why = error
        if target is not None:
            ok, why = servable(target, view=view, linked=linked, member_id=self.member_id, held=held)
            if ok:
                if self.plan is None or self.plan.plan_id != target.plan_id:
                    log.info("serving plan %s", target.plan_id)
                self.plan = target
                self._move_off_leavers(target, view)
                return PlanState(plan=target, ready=True, reason="ok")
        for fallback in (self.plan, recorded_plan(view, num_layers)):
            if fallback is not None and servable(fallback, view=view, linked=linked, member_id=self.member_id,
                                                 held=held)[0]:
                self.plan = fallback
                return PlanState(plan=fallback, ready=True, reason="ok")
        return PlanState(plan=target, ready=False, reason=why)

    def _move_off_leavers(self, serving: Plan, view: ClusterView) -> None:
        """Spec N20: once the plan placed without a leaving member serves, the requests this
        node coordinates through it move now (``move_off(member)``: their attempt ends and
        resumes on the serving plan from the KV replica) instead of keeping it for up to
        ``--drain-s``; once per leave."""
        placed = {s.member_id for s in serving.all_stages}
        leaving = {m.member_id for m in view.members() if view.status(m.member_id).state == "leaving"} - placed
        for member in sorted(leaving - self._moved):
            log.info("member %s is leaving: moving the requests through it to plan %s", member, serving.plan_id)
            self.move_off(member)
        self._moved = leaving

    def handed_over(self, target: Plan | None, *, busy: bool) -> bool:
        """Whether a leaving node may go (spec N20): no request holds a KV cache here
        (``busy``), and the target plan, placed without it, serves (or there is none: nobody
        can take over)."""
        return not busy and (target is None or self.plan == target and target.stage_of(self.member_id) is None)
