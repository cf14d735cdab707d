"""The stage loader: loads the layer range the target plan gives this node beside the stage
it holds (make-before-break, spec N21: the old stage serves until the new plan does, the
layers both share held once, spec B9), retires a stage no plan uses once its requests are
done, reports its load status, measures the device profile and calibrates each loaded stage
after it serves (spec P7, P16, P19). Loading runs on the node's compute thread, so the node
keeps serving heartbeats and HTTP meanwhile (spec N5).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from backends.base import Backend
from backends.group import GroupBackend
from mesh.errors import MeshError
from mesh.identity import host_dir
from mesh.kernel.records import MemberStatus
from mesh.loading import LoadProgress
from mesh.models import Model
from mesh.placement.calibrate import fastest, fit_calibration, time_stage
from mesh.placement.costmodel import ModelSpec, head_s
from mesh.placement.perf import below_peers, profile_record
from mesh.placement.pipeline import Plan
from mesh.placement.profile import BUSY_LIMIT, hardware, load_or_measure_profile

log = logging.getLogger(__name__)

SETTLE_S = 0.3  # a burst of joins settles before a load starts
RECALIBRATE_AFTER_S = 5.0  # the stage is timed again every 5-10 s after it loaded, if idle ...
RECALIBRATIONS = 3  # ... this many times
CALIBRATE_WAIT_S = 60.0  # a new stage is first timed when idle, or after this long
RETIRE_CHECK_S = 0.5  # how often stages no plan uses are looked for
PEER_CHECK_AFTER_S = 15.0  # the others' profiles have arrived by then (spec P7)
MIN_TIMED_LOAD_S = 0.5  # a load shorter than this does not set the load rate (spec P21)
RETIRE_GRACE_S = 2.0  # an unused stage stays this long, for nodes that switch plans a little later
UNGROUPED_S = 30.0  # after its tensor-parallel group failed, a member stays out of groups this long (N26)


def fits_beside(ranges: list[tuple[int, int]], *, layer_bytes: int, edge_bytes: int, kv_bytes_per_layer: int,
                memory_bytes: int, shares: bool) -> bool:
    """Whether stages of ``ranges`` (layer ranges) fit ``memory_bytes`` together: each layer
    ``layer_bytes`` plus ``kv_bytes_per_layer`` of KV cache (the context the plan reserves),
    the embeddings and head once (``edge_bytes``); layers in two ranges count once when the
    backend shares them (``shares``, spec B9), else once per range. The planner's own account
    of a stage (``mesh.placement.pipeline.place_pipeline``), over the union."""
    if shares:
        layers = len(set().union(*(range(a, b) for a, b in ranges)))
    else:
        layers = sum(b - a for a, b in ranges)
    return layers * (layer_bytes + kv_bytes_per_layer) + edge_bytes <= memory_bytes


async def measure_profile(data_dir: Path, config: Any, *, executor: Executor, refresh: bool = False) -> Any:
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
            memory_fraction=config.memory_fraction, budget_s=1.0, shared_dir=host_dir(), refresh=refresh or config.remeasure))
    except Exception as exc:
        log.warning("could not measure this device's profile: %s", exc)
        return None
    log.info("device profile: %s", ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in profile.flops.items())
             + f", memory bandwidth {profile.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s")
    return profile


def fits_in(size: Any, context_tokens: int, memory_bytes: int, backend_cls: type[Backend]
            ) -> Callable[[list[tuple[int, int]]], bool]:
    """``fits_beside`` for a model of ``size`` (``ModelSize``) with ``context_tokens`` of KV per
    layer, on a node offering ``memory_bytes`` with backends of ``backend_cls`` (sharing
    layers when it overrides ``Backend.adopt_from``)."""
    shares = backend_cls.adopt_from is not Backend.adopt_from
    return partial(fits_beside, layer_bytes=size.layer_bytes, edge_bytes=size.edge_bytes, memory_bytes=memory_bytes,
                   kv_bytes_per_layer=size.kv_bytes_per_token_per_layer * context_tokens, shares=shares)


def _log_unload_error(done: asyncio.Future[Any]) -> None:
    """A retired group's unload runs unawaited: its error is logged, never lost."""
    if not done.cancelled() and done.exception() is not None:
        log.error("ending a retired tensor-parallel group's processes failed: %r", done.exception())

class StageLoader:
    """Keeps this node's loaded stages what the plans ask of it (spec N21).

    Ports: ``new_backend()`` builds an unloaded backend; ``holder`` holds the stages (the
    request plane's ``StageWorker``: ``stages`` by layer range, ``add_stage``, ``retire``,
    ``caches_on``, ``caches``), and ``changed()`` is called after it changed; ``serving()`` the
    plan requests start on now (None: none); ``fits(ranges)`` whether stages of these ranges
    fit this node's memory together (``fits_beside``); ``set_status`` writes this node's load
    status; ``publish(record)`` its profile record (recalibration waits for no request to hold
    a KV cache here); ``peers()`` the profile records other members published and
    ``remeasure()`` measures this device again (``check_profile``); ``loaded(layers, reused)``
    counts a finished
    load (spec N14); ``drain_s``: the longest an unused stage is kept for the requests still
    on it (they fail over after, spec FO3); ``executor`` is the one thread that runs every
    backend call of this node, loads and timings as well as steps: a CPU library's thread pool
    (torch's OpenMP) keeps a team of spinning workers per calling thread, and two teams on the
    cores halve decode speed (measured: 21 against 44-56 ms per token, README "Models").
    """

    def __init__(self, member_id: str, model: Model, *, new_backend: Callable[[], Backend],
                 holder: Any, changed: Callable[[], None], serving: Callable[[], Plan | None],
                 fits: Callable[[list[tuple[int, int]]], bool], set_status: Callable[[MemberStatus], None],
                 publish: Callable[[dict[str, Any]], None], loaded: Callable[[int, int], None], profile: Any,
                 spec: ModelSpec | None, dtype: str, executor: Executor, drain_s: float = 30.0,
                 peers: Callable[[], list[dict[str, Any]]] = list,
                 remeasure: Callable[[], Awaitable[Any]] | None = None, groups: Any = None) -> None:
        self.member_id = member_id
        self.executor = executor
        self.model = model
        self.new_backend = new_backend
        self.holder, self.changed = holder, changed
        self.serving, self.fits = serving, fits
        self.set_status = set_status
        self.publish = publish
        self.loaded = loaded
        self.profile = profile
        self.hardware = hardware(profile.device) if profile is not None else ""
        self.load_bytes_per_s: float | None = None  # the weights the last timed load read per second
        self.peers, self.remeasure = peers, remeasure
        self.spec = spec
        self.dtype = dtype
        self.drain_s = drain_s
        # a stage loaded beside one that serves loads on a thread of its own: on the compute
        # thread every step would wait for the whole load (4-18 s for the default model here),
        # where two threads' OpenMP teams only slow the steps meanwhile (spec N21)
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-load")
        self.calibration: Any = None  # per-layer step times of the loaded stage (spec P19)
        self.collective: dict[str, Any] | None = None  # the all-reduce of the group this node leads (P10)
        self._wanted = asyncio.Event()
        self._plan: Plan | None = None
        self._stage_times: Any = None  # the fastest timings of the loaded stage so far
        self._calibrating: Backend | None = None  # the backend those timings are of
        self._failed: MemberStatus | None = None  # the status of this process's last load, if it failed
        self._status = MemberStatus()  # the last status written, less ``held``
        self._unused_since: dict[tuple[int, int], float] = {}  # stage -> when no plan used it (monotonic s)
        self.leaving = False  # a graceful stop: state ``leaving``, placed around (spec N20)
        self.groups = groups  # this node's part in tensor-parallel groups (``mesh.node.groups.Groups``, N26)
        self._groups_held: dict[tuple[int, int], tuple[str, ...]] = {}  # a held group stage -> its other members
        self._ungrouped_until = 0.0  # monotonic s: out of groups until then (its last group failed, N26)

    def want(self, plan: Plan | None) -> None:
        """The plan changed (or failed: None): load what it asks of this node, soon."""
        self._plan = plan
        self._wanted.set()

    def leave(self) -> None:
        """Announce a graceful stop: the status says ``leaving`` (the planner places around
        this member, spec N20); the stages held go on serving until no plan uses them."""
        self.leaving = True
        self._write(self._status)

    def publish_profile(self) -> None:
        if self.profile is not None:
            self.publish(profile_record(self.profile.flops, self.profile.memory_bandwidth_bytes_per_s,
                                        self.profile.device, calibration=self.calibration, hardware=self.hardware,
                                        load_bytes_per_s=self.load_bytes_per_s, collective=self.collective))

    async def run(self, joined: asyncio.Event) -> None:
        """Load stages as plans change, until cancelled; recalibrations and the retiring of
        unused stages run beside, and the profile is published once this node has joined
        (``joined``, spec P16). The load thread ends with it."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._publish_when(joined), name="profile")
                tasks.create_task(self._retire_forever(), name="retire")
                while True:
                    await self._wanted.wait()
                    await asyncio.sleep(SETTLE_S)
                    self._wanted.clear()
                    loaded = await self._load(self._plan)
                    if loaded is not None:
                        tasks.create_task(self._recalibrate(loaded), name="calibrate")
        finally:
            self._beside.shutdown(wait=False, cancel_futures=True)

    async def _publish_when(self, joined: asyncio.Event) -> None:
        await joined.wait()
        self.publish_profile()
        await asyncio.sleep(PEER_CHECK_AFTER_S)
        await self.check_profile()

    async def check_profile(self) -> bool:
        """Spec P7: compare this device's profile with those members on the same hardware
        published (``perf.below_peers``); a figure far below theirs is measured again, and the
        new profile replaces it (and is published) when it is no longer below them and was not
        taken on a busy CPU. True when it was replaced."""
        mine = self.profile
        if mine is None or self.remeasure is None or not self.hardware:
            return False
        same = [r for r in self.peers() if r.get("hardware") == self.hardware and r.get("device") == mine.device]
        wrong = below_peers(mine.flops, mine.memory_bandwidth_bytes_per_s, same)
        if not wrong:
            return False
        log.warning("profile: %s of %d member(s) on the same hardware; measuring again", "; ".join(wrong), len(same))
        new = await self.remeasure()
        if new is None or new.busy > BUSY_LIMIT or below_peers(new.flops, new.memory_bandwidth_bytes_per_s, same):
            log.warning("profile: measured again, still off (or on a busy CPU); keeping the first figures")
            return False
        self.profile = new
        self.publish_profile()
        return True

    def _write(self, status: MemberStatus) -> None:
        """Write ``status`` with what is held now (and ``leaving`` once stopping)."""
        self._status = status
        state = "leaving" if self.leaving else status.state
        following = self.groups.held() if self.groups is not None else None
        self.set_status(MemberStatus(plan_id=status.plan_id, layer_start=status.layer_start,
                                     layer_end=status.layer_end, state=state, error=status.error,
                                     held=(*self.holder.stages, *([following] if following else [])),
                                     rendezvous=status.rendezvous, ungrouped=time.monotonic() < self._ungrouped_until))

    def _in_use(self) -> set[tuple[int, int]]:
        """The layer ranges of this node in the target plan and in the plan serving now."""
        used = set()
        for plan in (self._plan, self.serving()):
            stage = plan.stage_of(self.member_id) if plan is not None else None
            if stage is not None:
                used.add((stage.layer_start, stage.layer_end))
        return used

    def retire_unused(self, now: float) -> list[tuple[int, int]]:
        """Retire the stages neither the target nor the serving plan uses, once no request
        holds a KV cache on them and ``RETIRE_GRACE_S`` passed (other nodes may switch plans
        a little later), or ``drain_s`` passed whatever runs there; the ranges retired."""
        used, retired = self._in_use(), []
        for layers in list(self.holder.stages):
            if layers in used:
                self._unused_since.pop(layers, None)
                continue
            since = self._unused_since.setdefault(layers, now)
            if (self.holder.caches_on(layers) == 0 and now - since >= RETIRE_GRACE_S) or now - since >= self.drain_s:
                if self.holder.caches_on(layers):
                    log.warning("retiring layers [%d, %d) with %d request(s) still on them after %.0f s",
                                *layers, self.holder.caches_on(layers), self.drain_s)
                self._retire(layers)
                self._unused_since.pop(layers, None)
                retired.append(layers)
                log.info("layers [%d, %d) retired: no plan uses them", *layers)
        if retired:
            self._write(self._status)
        return retired

    def _retire(self, layers: tuple[int, int]) -> None:
        self._groups_held.pop(layers, None)
        backend = self.holder.stages.get(layers)
        self.holder.retire(layers)
        if isinstance(backend, GroupBackend):
            # a group's processes end only when told (its members then end with it), off the loop:
            # the stop waits for a step in flight
            unloading = asyncio.get_running_loop().run_in_executor(self._beside, backend.unload)
            unloading.add_done_callback(_log_unload_error)
        self.changed()

    async def _retire_forever(self) -> None:
        while True:
            await asyncio.sleep(RETIRE_CHECK_S)
            self.retire_unused(time.monotonic())
            self.check_groups()

    def check_groups(self) -> None:
        """Spec N26: a tensor-parallel stage whose group failed (a member died, froze or lost
        its link) is retired, and so is this node's member process once it ended or its leader
        met again without it; the status says why (state ``idle``: this node is not to blame, it
        stays placeable) and the plan is loaded again: the same group formed anew while its
        members live, else the plan the planner makes without the member that is gone."""
        for layers, backend in list(self.holder.stages.items()):
            failure = backend.check() if isinstance(backend, GroupBackend) else None
            if failure:
                log.error("layers [%d, %d): %s", *layers, failure)
                self._retire(layers)
                self._failed_group(layers, failure)
        f = self.groups.following if self.groups is not None else None
        if f is not None and f.plan_id not in {p.plan_id for p in (self._plan, self.serving()) if p is not None}:
            self.groups.stop()  # neither plan has it any more: its leader has moved on too
            self._write(self._status)
            return
        why = self.groups.lost() if self.groups is not None else None
        if why:
            log.error("%s", why)
            layers = self.groups.following.layers
            self.groups.stop()
            self._failed_group(layers, why)
        elif f is not None and self.groups.following is None:  # its leader retired the group
            self._write(self._status)
        if self._ungrouped_until and time.monotonic() >= self._ungrouped_until:
            self._ungrouped_until = 0.0  # it may join groups again
            self._write(self._status)

    def _failed_group(self, layers: tuple[int, int], why: str) -> None:
        plan_id = self._plan.plan_id if self._plan is not None else ""
        if self._plan is not None and any(layers == (s.layer_start, s.layer_end) and self.member_id in s.members
                                          for s in self._plan.all_stages):
            self._ungrouped_until = time.monotonic() + UNGROUPED_S  # a group the target plan has failed
        self._write(MemberStatus(plan_id=plan_id, layer_start=layers[0], layer_end=layers[1], state="idle", error=why))
        self._wanted.set()

    async def _load(self, plan: Plan | None) -> Backend | None:
        """Bring the held stages to what ``plan`` asks: its stage loaded beside the ones held
        when they fit together, else in their place; the newly loaded backend (to be
        calibrated, ``_recalibrate``), else None."""
        stage = plan.stage_of(self.member_id) if plan else None
        plan_id = plan.plan_id if plan else ""
        # a member process of an older plan's group goes on until that group's leader retires it
        # (or neither plan has it: ``check_groups``), as a stage serves until the new plan does (N21)
        place = plan.group_place(self.member_id) if plan is not None and self.groups is not None else None
        if place is not None:
            return await self._follow(plan, *place)
        if stage is None:
            # a failed load stays reported (the planner leaves this member out, spec N17)
            # until this process loads a stage again: else it would be placed, fail, and so on
            if self._failed is None:
                self._write(MemberStatus(plan_id=plan_id, state="idle"))
            return None
        want = (stage.layer_start, stage.layer_end)
        status = MemberStatus(plan_id=plan_id, layer_start=want[0], layer_end=want[1], state="ready")
        held = dict(self.holder.stages)
        if want in held and self._groups_held.get(want, ()) == stage.group and want in self.holder.held():
            self._write(status)
            return None
        self._write(MemberStatus(plan_id=plan_id, layer_start=want[0], layer_end=want[1], state="loading"))
        if stage.group:  # a tensor-parallel group this node leads (N26): its members hold the weights
            backend, donor = self._group_backend(plan, stage), None
        else:
            backend = self.new_backend()
            donor = max(held.values(), key=lambda b: _overlap(want, (b.layer_start, b.layer_end)), default=None)
        if held and not stage.group and not self.fits([*held, want]):
            # both do not fit: the old stages go first; requests wait for the new plan (bounded)
            # rather than fail, and the layers both share are still taken from the donor
            log.warning("layers [%d, %d) do not fit beside %s: replacing them", *want, sorted(held))
            for layers in held:
                self._retire(layers)
            self._write(self._status)
        if donor is not None:
            backend.adopt_from(donor)  # the layers both ranges share are held once (spec B9)
        progress = LoadProgress(f"layers [{want[0]},{want[1]})", tty=sys.stderr.isatty())
        started = time.perf_counter()
        try:
            loading = asyncio.get_running_loop().run_in_executor(
                self._beside if self.holder.stages or stage.group else self.executor, backend.load, self.model,
                want[0], want[1], progress)
            if stage.group:
                await self._unless_moved(loading, backend, plan_id)
            await loading
        except Exception as exc:  # a backend plugin may raise anything: report it, keep serving
            if stage.group and (self._plan is None or self._plan.plan_id != plan_id):
                log.info("the tensor-parallel group of plan %s did not form before the plan moved on", plan_id)
                return None
            if not isinstance(exc, MeshError):
                log.exception("backend %s failed to load layers", backend.name)
            log.error("loading layers [%d, %d) failed: %s", want[0], want[1], exc)
            self._failed = MemberStatus(plan_id=plan_id, layer_start=want[0], layer_end=want[1], state="failed",
                                        error=str(exc))
            self._write(self._failed)
            return None
        finally:
            progress.close()
            donor = None
        # spec N14: what the load took from the stage it replaced; a backend that does not say
        # (no ``reused_layers``) read every layer
        reused = int(getattr(backend, "reused_layers", 0) or 0)
        self.loaded(want[1] - want[0], reused)
        self._load_rate(backend, want[1] - want[0] - reused, want[1] - want[0], time.perf_counter() - started)
        self._stage_times, self._calibrating = None, backend
        freeze_heap()
        self._groups_held[want] = stage.group  # a group and a single-device stage of one range differ
        self.holder.add_stage(backend)  # serves at once; calibrated after, off the readiness path (spec N21)
        self.changed()
        self._failed = None
        self._write(status)
        return backend  # calibrated by ``_recalibrate`` once idle: requests may be moving onto it now
    def _group_backend(self, plan: Plan, stage: Any) -> Backend:
        loop = asyncio.get_running_loop()
        status = MemberStatus(plan_id=plan.plan_id, layer_start=stage.layer_start, layer_end=stage.layer_end,
                              state="loading")

        def publish(rendezvous: str) -> None:  # from the loading thread: the members meet there (N26)
            loop.call_soon_threadsafe(lambda: self._write(replace(status, rendezvous=rendezvous)))

        backend = self.groups.leader(stage, publish)
        # its failure retires it at once: no request's next attempt may start on it (a resume there
        # would fail and lose the request's KV replica)
        backend.on_failure = lambda: loop.call_soon_threadsafe(self.check_groups)
        return backend

    async def _unless_moved(self, loading: Any, backend: Any, plan_id: str) -> None:
        """Wait for a group's ``loading``; cancel it (``backend.cancel``) once the plan moved on."""
        while not loading.done():
            await asyncio.wait({loading}, timeout=0.2)
            if self._plan is None or self._plan.plan_id != plan_id:
                backend.cancel()
                break

    async def _follow(self, plan: Plan, stage: Any, rank: int) -> None:
        """Spec N26: take place ``rank`` in ``stage``'s group (``Groups.follow``), with status
        ``loading`` meanwhile, ``ready`` once the group formed, ``failed`` when it could not."""
        want = (stage.layer_start, stage.layer_end)
        status = MemberStatus(plan_id=plan.plan_id, layer_start=want[0], layer_end=want[1], state="ready")
        if self.groups.held() == want and self.groups.following.plan_id == plan.plan_id:
            self._write(status)
            return None
        self._write(replace(status, state="loading"))
        try:
            joined = await self.groups.follow(plan, stage, rank, lambda: self._plan is not None
                                              and self._plan.plan_id == plan.plan_id)
        except Exception as exc:  # noqa: BLE001 - whatever failed (a spawn refused too) is this member's failure
            log.error("joining the tensor-parallel group of layers [%d, %d) failed: %s", *want, exc)
            self._failed = replace(status, state="failed", error=str(exc))
            self._write(self._failed)
            return None
        if joined:
            self._failed = None
            self._write(status)
        return None

    async def _recalibrate(self, backend: Backend) -> None:
        """Time a newly loaded stage once no request holds a KV cache here (or after
        ``CALIBRATE_WAIT_S`` whatever runs: a step then waits for the timing on the compute
        thread), so that the requests a plan switch moves onto it are not held up; then,
        since members of one host load at once and time each other's load, a few times more
        while idle, keeping the fastest time of each step, spread by member id so members of
        one host do not time each other again."""
        if isinstance(backend, GroupBackend):
            # a group's step times are not this device's (P19 prices groups from their members'
            # calibrations); what it measures is its collective (P10)
            await self._time_group(backend)
            return
        waited = 0.0
        while self.holder.caches and waited < CALIBRATE_WAIT_S:
            await asyncio.sleep(0.5)
            waited += 0.5
        if self._calibrating is not backend or not await self._time_stage(backend):
            return
        spread = int(self.member_id[:4], 16) % 1000 / 1000
        for _ in range(RECALIBRATIONS):
            await asyncio.sleep(RECALIBRATE_AFTER_S * (1 + spread))
            if self._calibrating is not backend:
                return  # replaced: its own calibration runs
            if not self.holder.caches:  # serving: try again later
                await self._time_stage(backend)

    async def _time_group(self, backend: Any) -> None:
        """Spec P10: measure the all-reduce of the group this node leads where its steps run it
        (else back to back, until steps ran) once idle, then a few times more, and publish it
        with this node's profile for the planner's price of that group."""
        members = (self.member_id, *self._groups_held.get((backend.layer_start, backend.layer_end), ()))
        for attempt in range(1 + RECALIBRATIONS):
            await asyncio.sleep(RECALIBRATE_AFTER_S if attempt else SETTLE_S)
            if self._calibrating is not backend or getattr(backend, "failure", None):
                return
            try:
                alone, inside = await asyncio.get_running_loop().run_in_executor(
                    self.executor, backend.allreduce_s, 20)
            except Exception as exc:  # a failed group is retired elsewhere; the figure is an aid
                log.warning("could not time the tensor-parallel group's all-reduce: %s", exc)
                return
            if inside is None and self.collective is not None and self.collective["members"] == list(members):
                continue  # no step ran since: keep the figure measured inside steps
            self.collective = {"members": list(members), "seconds": inside if inside is not None else alone}
            self.publish_profile()

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
                                          prefill_s=times[0], decode_s=times[1], head_s=head, flops=flops,
                                          measured_head_s=times[2])
        except Exception as exc:  # a backend plugin may raise anything; calibration is an aid
            log.warning("could not calibrate the loaded stage: %s", exc)
            return False
        if calibration != self.calibration:
            log.info("calibration: decode %.2f ms/layer, prefill %.2f ms + %.3f ms/token per layer%s",
                     calibration.decode_layer_s * 1e3, calibration.prefill_layer_s * 1e3,
                     calibration.prefill_token_layer_s * 1e3,
                     "" if calibration.head_s is None else f", LM head {calibration.head_s * 1e3:.2f} ms")
            self.calibration = calibration
            self.publish_profile()
        return True


    def _load_rate(self, backend: Backend, read: int, layers: int, took_s: float) -> None:
        """Spec P21: the weights a load read per second (its share of ``weight_bytes`` for the
        layers it read, not those it took from a donor), published with the profile for the
        planner's cost of moving; a load too short to time says nothing."""
        weight_bytes = getattr(backend, "weight_bytes", 0) or 0
        if read <= 0 or took_s < MIN_TIMED_LOAD_S or weight_bytes <= 0:
            return
        self.load_bytes_per_s = weight_bytes * read / layers / took_s
        log.info("loaded %.0f MiB of weights at %.1f MB/s", weight_bytes * read / layers / 2**20,
                 self.load_bytes_per_s / 1e6)
        self.publish_profile()


def freeze_heap() -> None:
    """Take every object alive now (the stage's modules, the libraries' own objects) out of the
    garbage collector's full collections (``gc.freeze``, Python's ``gc`` docs): such a
    collection walks them all with the GIL held, 0.29-0.35 s for a node serving the default
    model (921k objects; AMD EPYC 2 cores, 2026-12-06), which stalls every step and stream
    meanwhile, at moments the allocation counts pick. Objects stay freed by reference counting;
    what the last load left in reference cycles (a retired stage) is collected first, once."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))
