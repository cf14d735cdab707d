"""Placement optimizer: the fastest plan the cost model knows of, exactly, per candidate.

Candidates, each priced with ``mesh.placement.costmodel.predict``:

1. every device alone (when it holds the model);
2. a pipeline over two or more devices: a mixed-integer program (``scipy.optimize.milp``,
   HiGHS) choosing which devices take part, how many layers each runs, and which is first
   (holds the embeddings) and last (holds the head), under each device's memory budget,
   minimising the objective's linear cost (per-layer time on each device, the head on the
   last, one hop per device taking part). The middle devices are then ordered to make the
   hops cheapest (every order for up to 6 of them, nearest neighbour beyond);
3. with prefill/decode disaggregation: devices ranked by FLOP/s per byte/s of memory
   bandwidth, the top k prefill and the rest decode (k = 1 .. min(n-1, 4): a single
   request's prefill is not sped up by more stages, which only add memory), each set solved
   as in 2 for its own role, the KV transfer priced between them;
4. the memory-proportional split (``mesh.placement.pipeline.place_pipeline``), the baseline;
5. tensor-parallel groups running all layers: every linked pair of devices, and for each
   larger group size the model splits into, each device with the devices of its fastest links
   (each member holds 1/k of every layer's weights and KV cache; two all-reduces per layer
   cross their links), which win only where the links are fast enough to pay for them;
6. a tensor-parallel group as one stage of a pipeline: for the ``MAX_PIPELINE_GROUPS`` groups
   of 5 with the cheapest layer (leaving devices for other stages), the program of 2 with that
   group as one of its stages (its members' memory each holding 1/k of its layers, its layers
   priced with their all-reduces), so a fast pair on a cable can run the part of a model it
   holds faster while a big device holds the rest.

The best by the objective wins (ties: fewer devices, then the earlier candidate), so the
plan is never predicted worse than the baseline or than the best device alone. Same input,
same plan: devices are taken in id order and ties are broken by id. Pure: no I/O.
Spec: specs/placement.md (P9-P14).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp  # type: ignore[import-untyped]

from mesh.errors import PlacementError
from mesh.placement.costmodel import (
    ACTIVATION_BUFFERS,
    ACTIVATION_MARGIN,
    Device,
    ModelSpec,
    PlacementPlan,
    Prediction,
    StagePlan,
    Topology,
    decode_stage_s,
    memory_needed,
    predict,
    prefill_stage_s,
)
from mesh.placement.pipeline import Capacity, ModelSize, place_pipeline

OBJECTIVES = ("ttft", "decode", "goodput")
GIB = 1 << 30
MAX_EXACT_ORDER = 6  # middle devices ordered by trying every permutation up to this many
MAX_PREFILL_DEVICES = 4  # disaggregated candidates prefill on the top k <= 4 devices by FLOP/s per byte/s
MAX_PIPELINE_GROUPS = 3  # tensor-parallel groups tried as one stage of a pipeline (each try: one more MILP)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """The request a plan is judged on: prompt and generated tokens, and the context the KV
    cache is budgeted for (tokens)."""

    context_tokens: int
    prompt_tokens: int
    new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.context_tokens < 1 or not 1 <= self.prompt_tokens <= self.context_tokens or self.new_tokens < 1:
            raise PlacementError(f"need 1 <= prompt ({self.prompt_tokens}) <= context ({self.context_tokens}) "
                                 f"and new tokens >= 1 ({self.new_tokens})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Solution:
    """The chosen plan with its prediction and memory per device (bytes), and the same for
    the memory-proportional baseline (None when the baseline cannot place the model)."""

    plan: PlacementPlan
    predicted: Prediction
    memory_bytes: dict[str, int]
    baseline: PlacementPlan | None
    baseline_predicted: Prediction | None
    candidates: int


def score(prediction: Prediction, objective: str) -> float:
    """Lower is better: TTFT (s), seconds per decoded token, or the end-to-end time (s)."""
    if objective == "ttft":
        return prediction.ttft_s
    if objective == "decode":
        return 1.0 / prediction.decode_tokens_per_s if prediction.decode_tokens_per_s > 0 else math.inf
    if objective == "goodput":
        return prediction.e2e_s
    raise PlacementError(f"objective {objective!r} unknown; valid: {', '.join(OBJECTIVES)}")


def _per_layer_s(topology: Topology, model: ModelSpec, device: Device | tuple[Device, ...], role: str,
                 objective: str, request: Request) -> tuple[float, float]:
    """(seconds per layer on ``device`` or a tensor-parallel group of devices, its all-reduces
    included, seconds of the head there: whole on the slowest member) in the objective's terms."""
    members = device if isinstance(device, tuple) else (device,)
    one = StagePlan(devices=tuple(d.id for d in members), layer_start=0, layer_end=1, role=role)
    head = max(max(model.head_flops_per_token / d.flops, model.head_bytes / d.memory_bandwidth_bytes_per_s)
               for d in members)
    prefill = prefill_stage_s(topology, model, one, request.prompt_tokens)
    decode = decode_stage_s(topology, model, one, request.prompt_tokens + request.new_tokens // 2)
    steps = max(0, request.new_tokens - 1)
    if role == "prefill":
        return prefill, head
    if role == "decode":
        return (decode, head) if objective == "decode" else (steps * decode, steps * head)
    if objective == "ttft":
        return prefill, head
    if objective == "decode":
        return decode, head
    return prefill + steps * decode, head * (1 + steps)


def _budget(model: ModelSpec, role: str, request: Request) -> tuple[float, float]:
    """(bytes per layer, fixed bytes per device taking part) for ``role``."""
    tokens = request.prompt_tokens if role == "prefill" else request.context_tokens
    per_layer = model.layer_bytes * (1 + ACTIVATION_MARGIN) + model.kv_bytes_per_token_per_layer * tokens
    return per_layer, ACTIVATION_BUFFERS * request.prompt_tokens * model.hidden_bytes


def _hop_s(topology: Topology, model: ModelSpec, device: Device, others: list[Device], role: str,
           objective: str, request: Request) -> float:
    """The cheapest hop from ``device`` to another candidate, in the objective's terms."""
    prompt = request.prompt_tokens * model.hidden_bytes
    best = math.inf
    for other in others:
        if other.id == device.id:
            continue
        if role == "prefill" or objective == "ttft":
            cost = topology.transfer_s(device.id, other.id, prompt)
        else:
            token = topology.transfer_s(device.id, other.id, model.hidden_bytes)
            cost = token if objective == "decode" else topology.transfer_s(device.id, other.id, prompt) + \
                max(0, request.new_tokens - 1) * token
        best = min(best, cost)
    return best


def _pipeline_milp(topology: Topology, model: ModelSpec, devices: list[Device], role: str, objective: str,
                   request: Request, group: tuple[Device, ...] = ()) -> PlacementPlan | None:
    """The best pipeline of >= 2 of ``devices`` for ``role`` (None when none fits). With
    ``group``: those devices are one tensor-parallel stage of it (each holding 1/k of its
    layers' weights and KV cache, the edges whole), the others single-device stages; hops
    between stages are priced from the group's first member (its leader)."""
    taken = {d.id for d in group}
    units = ([group] if group else []) + [(d,) for d in devices if d.id not in taken]
    leaders = [u[0] for u in units]
    linked = [u for u in units if math.isfinite(_hop_s(topology, model, u[0], leaders, role, objective, request))]
    n, layers = len(linked), model.num_layers
    if n < 2:
        return None
    per_layer_bytes, fixed = _budget(model, role, request)
    # variables: x_d (layers), u_d (takes part), f_d (first), l_d (last)
    cost = np.zeros(4 * n)
    linked_leaders = [u[0] for u in linked]
    for i, u in enumerate(linked):
        layer_s, head_s = _per_layer_s(topology, model, u, role, objective, request)
        cost[i] = layer_s
        cost[n + i] = _hop_s(topology, model, u[0], linked_leaders, role, objective, request) + 1e-12 * i  # ties: ids
        cost[3 * n + i] = head_s
    rows, lower, upper = [], [], []

    def row(coeffs: dict[int, float], lo: float, hi: float) -> None:
        r = np.zeros(4 * n)
        for k, v in coeffs.items():
            r[k] = v
        rows.append(r)
        lower.append(lo)
        upper.append(hi)

    row({i: 1.0 for i in range(n)}, layers, layers)  # every layer exactly once
    row({2 * n + i: 1.0 for i in range(n)}, 1, 1)  # one first
    row({3 * n + i: 1.0 for i in range(n)}, 1, 1)  # one last
    row({n + i: 1.0 for i in range(n)}, 2, n)  # two or more stages
    if group:
        if linked[0] is not group:
            return None
        row({n: 1.0}, 1, 1)  # the group takes part (else this is the plain pipeline)
    for i, u in enumerate(linked):
        row({i: 1.0, n + i: -layers}, -np.inf, 0)  # x <= L u
        row({i: 1.0, n + i: -1.0}, 0, np.inf)  # x >= u: no empty stage
        row({2 * n + i: 1.0, n + i: -1.0}, -np.inf, 0)
        row({3 * n + i: 1.0, n + i: -1.0}, -np.inf, 0)
        row({2 * n + i: 1.0, 3 * n + i: 1.0}, -np.inf, 1)  # first and last differ
        row({i: per_layer_bytes / len(u), n + i: fixed, 2 * n + i: model.embed_bytes, 3 * n + i: model.head_bytes},
            -np.inf, min(d.memory_bytes for d in u))  # the memory budget (of each member of a group)
    upper_bounds = np.concatenate([np.full(n, layers), np.ones(3 * n)])
    result = milp(cost, constraints=LinearConstraint(np.array(rows), lower, upper), integrality=np.ones(4 * n),
                  bounds=Bounds(np.zeros(4 * n), upper_bounds), options={"time_limit": 10.0})
    if result.x is None:
        return None
    x = [int(round(v)) for v in result.x[:n]]
    used = [u[0] for i, u in enumerate(linked) if x[i] > 0]
    first = next(u[0] for i, u in enumerate(linked) if round(result.x[2 * n + i]) == 1)
    last = next(u[0] for i, u in enumerate(linked) if round(result.x[3 * n + i]) == 1)
    order = _order(topology, model, first, last, [d for d in used if d.id not in (first.id, last.id)])
    counts = {u[0].id: x[i] for i, u in enumerate(linked)}
    unit_of = {u[0].id: u for u in linked}
    stages, start = [], 0
    for d in order:
        stages.append(StagePlan(devices=tuple(m.id for m in unit_of[d.id]), layer_start=start,
                                layer_end=start + counts[d.id], role=role))
        start += counts[d.id]
    return PlacementPlan(stages=tuple(stages))


def _order(topology: Topology, model: ModelSpec, first: Device, last: Device, middle: list[Device]) -> list[Device]:
    """first, the middle devices in the order with the cheapest hops, last."""
    def hops(path: list[Device]) -> float:
        return sum(topology.transfer_s(a.id, b.id, model.hidden_bytes) for a, b in zip(path, path[1:]))

    if len(middle) <= MAX_EXACT_ORDER:
        best = min(itertools.permutations(middle), key=lambda p: (hops([first, *p, last]), [d.id for d in p]))
        return [first, *best, last]
    path, left = [first], sorted(middle, key=lambda d: d.id)
    while left:
        nxt = min(left, key=lambda d: (topology.transfer_s(path[-1].id, d.id, model.hidden_bytes), d.id))
        path.append(nxt)
        left.remove(nxt)
    return [*path, last]


def _fits(plan: PlacementPlan, topology: Topology, model: ModelSpec, request: Request) -> dict[str, int] | None:
    need = memory_needed(plan, model, context_tokens=request.context_tokens, prompt_tokens=request.prompt_tokens)
    return need if all(need[d] <= topology.device(d).memory_bytes for d in need) else None


def baseline_plan(topology: Topology, model: ModelSpec, request: Request) -> PlacementPlan | None:
    """The memory-proportional split over every usable device (None when it cannot place)."""
    members = [Capacity(member_id=d.id, usable_bytes=d.memory_bytes if d.usable else 0) for d in topology.devices]
    size = ModelSize(num_layers=model.num_layers, layer_bytes=model.layer_bytes,
                     edge_bytes=model.embed_bytes + model.head_bytes,
                     kv_bytes_per_token_per_layer=model.kv_bytes_per_token_per_layer)
    try:
        plan = place_pipeline(members, size, context_tokens=request.context_tokens)
    except PlacementError:
        return None
    return PlacementPlan(stages=tuple(StagePlan(devices=(s.member_id,), layer_start=s.layer_start,
                                                layer_end=s.layer_end) for s in plan.stages))


def _groups(topology: Topology, devices: list[Device], tensor_parallel: bool | Collection[str] | Mapping[str, str],
            sizes: Collection[int]) -> list[tuple[str, ...]]:
    """Tensor-parallel groups worth pricing: every linked pair of the devices that may form
    groups (``tensor_parallel``: all, none, these ids, or ``{id: library}``: groups only of
    devices of one library); for each larger size in ``sizes``, one group per device: it and
    the devices of the fastest links to it (each pair linked, ties by id), so the candidates
    grow linearly with the devices, not as their subsets."""
    if not tensor_parallel:
        return []
    if isinstance(tensor_parallel, Mapping):
        out = []
        for library in sorted(set(tensor_parallel.values())):
            out += _groups(topology, devices, {i for i, lib in tensor_parallel.items() if lib == library}, sizes)
        return out
    able = [d.id for d in devices if tensor_parallel is True or d.id in tensor_parallel]
    out = []
    if 2 in sizes:
        out += [(a, b) for a, b in itertools.combinations(able, 2) if topology.link(a, b) is not None]
    for k in sorted(k for k in sizes if 2 < k <= len(able)):
        for seed in able:
            def speed(other: str) -> tuple[float, str]:
                link = topology.link(seed, other)
                return (-link.bandwidth_bytes_per_s if link is not None else math.inf, other)

            near = sorted((o for o in able if o != seed and topology.link(seed, o) is not None), key=speed)[:k - 1]
            group = tuple(sorted([seed, *near]))
            if (len(group) == k and group not in out
                    and all(topology.link(a, b) is not None for a, b in itertools.combinations(group, 2))):
                out.append(group)
    return out


def _pipeline_groups(topology: Topology, model: ModelSpec, groups: list[tuple[Device, ...]], devices: int,
                     objective: str, request: Request) -> list[tuple[Device, ...]]:
    """The groups worth trying as one stage of a pipeline: the ``MAX_PIPELINE_GROUPS`` with the
    cheapest layer in the objective's terms (each try is one more MILP), of those leaving a
    device for the pipeline's other stages."""
    able = [g for g in groups if len(g) < devices]
    return sorted(able, key=lambda g: (_per_layer_s(topology, model, g, "both", objective, request)[0],
                                       [d.id for d in g]))[:MAX_PIPELINE_GROUPS]


def _best(topology: Topology, model: ModelSpec, request: Request, objective: str,
          disaggregation: bool, tensor_parallel: bool | Collection[str] | Mapping[str, str] = True,
          group_sizes: Collection[int] = (2,)) -> tuple[PlacementPlan | None, PlacementPlan | None, int]:
    """(the best plan that fits or None, the baseline plan or None, candidates priced)."""
    score(Prediction(ttft_s=1, decode_tokens_per_s=1, kv_transfer_s=0, e2e_s=1), objective)  # validates it
    devices = sorted((d for d in topology.devices if d.usable), key=lambda d: d.id)
    candidates: list[PlacementPlan] = []
    for d in devices:  # 1: each device alone
        candidates.append(PlacementPlan(stages=(StagePlan(devices=(d.id,), layer_start=0,
                                                          layer_end=model.num_layers),)))
    pipeline = _pipeline_milp(topology, model, devices, "both", objective, request)  # 2
    if pipeline is not None:
        candidates.append(pipeline)
    groups = _groups(topology, devices, tensor_parallel, group_sizes)
    for group in groups:  # 5: tensor-parallel groups over every layer
        candidates.append(PlacementPlan(stages=(StagePlan(devices=group, layer_start=0, layer_end=model.num_layers),)))
    by_id = {d.id: d for d in devices}
    for group in _pipeline_groups(topology, model, [tuple(by_id[i] for i in g) for g in groups], len(devices),
                                  objective, request):  # 6: a group as one stage of a pipeline
        candidate = _pipeline_milp(topology, model, devices, "both", objective, request, group=group)
        if candidate is not None:
            candidates.append(candidate)
    if disaggregation and objective != "decode" and len(devices) >= 2:  # 3
        ranked = sorted(devices, key=lambda d: (-d.flops / d.memory_bandwidth_bytes_per_s, d.id))
        # One request's prefill does not run faster on more pipeline stages (they take turns);
        # more prefill devices only add memory, so the split tries up to MAX_PREFILL_DEVICES.
        for k in range(1, min(len(ranked), MAX_PREFILL_DEVICES + 1)):
            pre, dec = ranked[:k], ranked[k:]
            for p in _role_options(topology, model, pre, "prefill", objective, request):
                for q in _role_options(topology, model, dec, "decode", objective, request):
                    candidates.append(PlacementPlan(stages=p.stages + q.stages))
    base = baseline_plan(topology, model, request)  # 4
    if base is not None:
        candidates.append(base)
    best: tuple[float, int, int] | None = None
    chosen: PlacementPlan | None = None
    for index, plan in enumerate(candidates):
        if _fits(plan, topology, model, request) is None:
            continue
        prediction = predict(plan, topology, model, prompt_tokens=request.prompt_tokens, new_tokens=request.new_tokens)
        key = (score(prediction, objective), len({d for s in plan.stages for d in s.devices}), index)
        if math.isfinite(key[0]) and (best is None or key < best):
            best, chosen = key, plan
    return chosen, base, len(candidates)


def solve(topology: Topology, model: ModelSpec, request: Request, *, objective: str = "goodput",
          disaggregation: bool = True, tensor_parallel: bool | Collection[str] | Mapping[str, str] = True,
          group_sizes: Collection[int] = (2,)) -> Solution:
    """The best plan for ``request`` under ``objective`` (see the module docstring);
    ``disaggregation`` and ``tensor_parallel`` off leave only single-device pipeline stages.
    ``tensor_parallel`` may name the devices that can form groups (spec N26: those with a
    trusted link), or map them to their library (groups are of one library), and
    ``group_sizes`` the group sizes the model splits into.

    Raises:
        PlacementError: no plan fits; the message names the bytes needed, the bytes usable
            across how many devices, and the largest context that would fit; or the
            objective is unknown.
    """
    chosen, base, count = _best(topology, model, request, objective, disaggregation, tensor_parallel, group_sizes)
    if chosen is None:
        raise PlacementError(_shortfall(topology, model, request))
    memory = _fits(chosen, topology, model, request)
    assert memory is not None
    base_pred = None if base is None or _fits(base, topology, model, request) is None else predict(
        base, topology, model, prompt_tokens=request.prompt_tokens, new_tokens=request.new_tokens)
    return Solution(plan=chosen, predicted=predict(chosen, topology, model, prompt_tokens=request.prompt_tokens,
                                                   new_tokens=request.new_tokens),
                    memory_bytes=memory, baseline=base if base_pred is not None else None,
                    baseline_predicted=base_pred, candidates=count)


def _role_options(topology: Topology, model: ModelSpec, devices: list[Device], role: str, objective: str,
                  request: Request) -> list[PlacementPlan]:
    """Plans of one role over ``devices``: the best single device that fits, and the MILP pipeline."""
    options = []
    singles = []
    for d in devices:
        plan = PlacementPlan(stages=(StagePlan(devices=(d.id,), layer_start=0, layer_end=model.num_layers, role=role),))
        need = memory_needed(plan, model, context_tokens=request.context_tokens, prompt_tokens=request.prompt_tokens)
        if need[d.id] <= d.memory_bytes:
            layer_s, head_s = _per_layer_s(topology, model, d, role, objective, request)
            singles.append((model.num_layers * layer_s + head_s, d.id, plan))
    if singles:
        options.append(min(singles, key=lambda t: (t[0], t[1]))[2])
    pipeline = _pipeline_milp(topology, model, devices, role, objective, request)
    if pipeline is not None:
        options.append(pipeline)
    return options


def _shortfall(topology: Topology, model: ModelSpec, request: Request) -> str:
    per_layer, fixed = _budget(model, "both", request)
    need = model.num_layers * per_layer + model.embed_bytes + model.head_bytes + fixed
    usable = [d for d in topology.devices if d.usable]
    total = sum(d.memory_bytes for d in usable)
    return (f"needs {need / GIB:.2f} GiB for {model.num_layers} layers + KV at {request.context_tokens} tokens; "
            f"{total / GIB:.2f} GiB usable across {len(usable)} device(s) (devices with zero or unknown memory, "
            f"FLOP/s or bandwidth are not used); largest context that would fit: "
            f"{largest_context(topology, model, request)} tokens")


def largest_context(topology: Topology, model: ModelSpec, request: Request) -> int:
    """The largest context (tokens) at which some plan still fits; 0 when none does."""
    def fits(context: int) -> bool:
        r = Request(context_tokens=context, prompt_tokens=min(request.prompt_tokens, context),
                    new_tokens=request.new_tokens)
        return _best(topology, model, r, "decode", False)[0] is not None

    if not fits(1):
        return 0
    lo, hi = 1, max(1, request.context_tokens - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def validate_plan(plan: PlacementPlan, topology: Topology, model: ModelSpec, request: Request) -> dict[str, int]:
    """Check a manual placement (explicit layer ranges) against the budgets; returns the
    bytes each device needs.

    Raises:
        PlacementError: a role's stages do not cover every layer once in contiguous,
            non-empty ranges; a stage names an unknown or unusable device; or a device's need
            exceeds its memory (naming the device, both sizes, and its layers).
    """
    for role in ("prefill", "decode"):
        start = 0
        for stage in plan.role_stages(role):
            if stage.role not in ("both", "prefill", "decode"):
                raise PlacementError(f"stage role {stage.role!r} unknown; valid: both, prefill, decode")
            if stage.layer_start != start or stage.layer_end <= stage.layer_start:
                raise PlacementError(f"{role} stages must cover layers 0..{model.num_layers} in contiguous, "
                                     f"non-empty ranges; got [{stage.layer_start}, {stage.layer_end}) after {start}")
            start = stage.layer_end
        if start != model.num_layers:
            raise PlacementError(f"{role} stages cover {start} of {model.num_layers} layers")
    for stage in plan.stages:
        for device in stage.devices:
            if not topology.device(device).usable:
                raise PlacementError(f"device {device} has zero or unknown memory, FLOP/s or bandwidth")
    need = memory_needed(plan, model, context_tokens=request.context_tokens, prompt_tokens=request.prompt_tokens)
    for device, nbytes in need.items():
        have = topology.device(device).memory_bytes
        if nbytes > have:
            layers = sum(s.layers for s in plan.stages if device in s.devices)
            raise PlacementError(f"device {device} needs {nbytes / GIB:.2f} GiB for its {layers} layers + KV at "
                                 f"{request.context_tokens} tokens; it has {have / GIB:.2f} GiB")
    return need
