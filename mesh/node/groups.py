"""This node's part in tensor-parallel groups (spec N26): the leader's stage, a member's process.

A plan's stage may be a group (``Stage.group``) of members running one library: torch
(``backends/torch_group.py``: gloo) or MLX (``backends/mlx_group.py``: MLX's ring), the
node's ``--backend``. Its leader loads it as that library's ``GroupBackend`` (``leader``),
whose process listens on this node's ``--tp-address`` and whose port the loader publishes in
this node's status record (``rendezvous``), so the port reaches the other members over the
authenticated mesh link. Every other member of the group runs one ``GroupMember`` process
(``follow``): it waits for the leader's rendezvous for the plan, starts the process and waits
until the group has formed, giving up when the plan moves on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backends.group import GroupBackend, GroupMember, GroupSpec
from backends.group_wire import parse_rendezvous
from backends.mlx_group import MlxGroupBackend
from backends.torch_group import TorchGroupBackend
from mesh.errors import BackendError
from mesh.kernel.records import MemberStatus
from mesh.models import Model
from mesh.placement.pipeline import Plan, Stage

log = logging.getLogger(__name__)

WAIT_STEP_S = 0.2  # how often a wait checks that the plan still asks for it
LOAD_TIMEOUT_S = 600.0  # a group's members load and meet within this (a big model from a slow disk)
STEP_TIMEOUT_S = 300.0  # the longest answer a group's leader waits for (a long prompt's prefill chunk)
LIBRARIES: dict[str, type[GroupBackend]] = {"torch": TorchGroupBackend, "mlx": MlxGroupBackend}  # --backend -> groups


@dataclass(slots=True)
class Following:
    """The group member process this node runs for ``plan_id``'s stage ``layers`` at ``rank``,
    started on the leader's ``rendezvous``."""

    plan_id: str
    layers: tuple[int, int]
    rank: int
    rendezvous: str
    member: GroupMember


class Groups:
    """This node's part in tensor-parallel groups. ``address``: its ``--tp-address``;
    ``timeout_s`` bounds each collective (the node's ``--dead-after-s``: a member that dies,
    freezes or loses its link is found within it); ``status_of(member)`` reads a member's
    status record (the leader's rendezvous); ``library``: ``torch`` or ``mlx`` (the node's
    ``--backend``), ``device``: the members' compute device where the library takes one (MLX)."""

    def __init__(self, member_id: str, model: Model, *, address: str, dtype: str, timeout_s: float,
                 status_of: Callable[[str], MemberStatus], library: str = "torch", device: str | None = None) -> None:
        self.member_id, self.model, self.address = member_id, model, address
        self.dtype, self.timeout_s, self.status_of = dtype, timeout_s, status_of
        self.backend_class = LIBRARIES[library]
        self.device = device
        self.following: Following | None = None
        self._leader = ""  # the leader of the group this node last took a place in
        self._met = ""  # the rendezvous it met there: a group forms anew at another one

    @classmethod
    def of(cls, config: Any, member_id: str, model: Model, dtype: str, view: Callable[[], Any]) -> Groups | None:
        """A node's groups for its ``NodeConfig`` (None without ``--tp-address``, or for a
        backend without groups: placement groups only torch and MLX nodes): collectives bounded
        by ``--dead-after-s``, members' status read from ``view()``."""
        if not config.tp_address or config.backend not in LIBRARIES:
            return None
        return cls(member_id, model, address=config.tp_address, dtype=dtype, timeout_s=config.dead_after_s,
                   status_of=lambda member: view().status(member), library=config.backend, device=config.device)

    def spec(self, rank: int, world: int, address: str, port: int = 0, secret: str = "") -> GroupSpec:
        # members on one host (a loopback trial) share its cores; elsewhere each has its own
        threads = max(1, (os.cpu_count() or 1) // world) if address.startswith("127.") else None
        return GroupSpec(rank=rank, world=world, address=address, port=port, timeout_s=self.timeout_s,
                         load_timeout_s=LOAD_TIMEOUT_S, threads=threads, bind=self.address,
                         secret=secret or secrets.token_hex(16), device=self.device)

    def leader(self, stage: Stage, rendezvous: Callable[[str], None]) -> GroupBackend:
        """The backend of ``stage``, a group this node leads; ``rendezvous(host:port)`` is called
        from its loading thread once its process listens."""
        return self.backend_class(group=self.spec(0, len(stage.members), self.address), dtype=self.dtype,
                                 rendezvous=rendezvous, step_timeout_s=STEP_TIMEOUT_S)

    def held(self) -> tuple[int, int] | None:
        """The layers of the group this node's member process computes, while it runs."""
        f = self.following
        return f.layers if f is not None and f.member.alive else None

    def lost(self) -> str | None:
        """Why this node's member process is no longer right: it failed, or the leader published
        another rendezvous for the plan (the group formed again without it); None when it is,
        or when its leader stopped it (the group retired: ``following`` is cleared)."""
        f = self.following
        if f is None:
            return None
        if not f.member.alive:
            if f.member.process.exitcode == 0:  # the leader retired the group: nothing failed
                self.following = None
                return None
            return f"tensor-parallel member {f.rank} of plan {f.plan_id} ended (exit code {f.member.process.exitcode})"
        status = self.status_of(self._leader)
        if status.plan_id == f.plan_id and status.rendezvous not in ("", f.rendezvous):
            return f"the leader of plan {f.plan_id}'s group met again at {status.rendezvous}"
        return None

    def stop(self) -> None:
        """End this node's member process, if it runs one."""
        if self.following is not None:
            self.following.member.stop()
            self.following = None

    async def follow(self, plan: Plan, stage: Stage, rank: int, wanted: Callable[[], bool]) -> bool:
        """Take place ``rank`` in ``stage``'s group for ``plan``: wait for its leader's
        rendezvous (a new one: not the one a process of this node met before), start the
        member's process and wait until the group has formed. False when the plan no longer
        asks for it (``wanted``) before that. Raises BackendError (the leader published nothing,
        or the member failed to load or meet in ``LOAD_TIMEOUT_S``)."""
        layers = (stage.layer_start, stage.layer_end)
        f = self.following
        if f is not None and (f.plan_id, f.layers, f.rank) == (plan.plan_id, layers, rank) and self.lost() is None:
            return True
        self.stop()
        self._leader = stage.member_id
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            if not wanted():
                return False
            status = self.status_of(stage.member_id)
            if (status.plan_id == plan.plan_id and status.rendezvous and status.rendezvous != self._met
                    and parse_rendezvous(status.rendezvous) is not None):
                break
            if time.monotonic() > deadline:
                raise BackendError(f"the group's leader {stage.member_id[:8]} published no rendezvous for plan "
                                   f"{plan.plan_id} within {LOAD_TIMEOUT_S:g} s")
            await asyncio.sleep(WAIT_STEP_S)
        host, port, secret = parse_rendezvous(status.rendezvous)
        self._met = status.rendezvous
        member = self.backend_class.member(self.spec(rank, len(stage.members), host, port, secret), self.model, *layers, self.dtype)
        await asyncio.to_thread(member.start)
        ready = asyncio.ensure_future(asyncio.to_thread(member.ready))
        try:
            while not ready.done():
                await asyncio.wait({ready}, timeout=WAIT_STEP_S)
                if not wanted():
                    member.cancel()
            ready.result()
        except BackendError:
            if not wanted():
                return False
            raise
        finally:
            if not ready.done():  # cancelled (the node stops): the member's wait ends, its process too
                member.cancel()
        self.following = Following(plan.plan_id, layers, rank, status.rendezvous, member)
        log.info("member %d of the tensor-parallel group of layers [%d, %d) led by %s", rank, *layers,
                 stage.member_id[:8])
        return True


