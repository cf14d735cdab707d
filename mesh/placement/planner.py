"""The planner: a pure function from what the replicated state says (members, their roles,
offered memory and published profiles) and the served model to the runtime's ``Plan``. Every
node calls it with the same state and gets the same plan (no master).

Order: members with roles make a disaggregated plan (spec N13); else ``--placement solver``
asks the placement solver (spec P17); else (or when no member has published a profile yet)
the memory-proportional split. Must not know: the node, the kernel's events, IO.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mesh.errors import MeshError, PlacementError
from mesh.kernel.records import PLACEMENT_KEY, ClusterView
from mesh.models import GGUFSource, Model
from mesh.placement.costmodel import Link, ModelSpec, Topology, predict
from mesh.placement.perf import load_rates, solver_form, topology
from mesh.placement.pipeline import (
    GIB,
    Capacity,
    ModelSize,
    Plan,
    Stage,
    model_size,
    per_layer_bytes,
    place_by_roles,
    place_pipeline,
    quantization_bits,
)
from mesh.placement.solver import Request, solve

PLACEMENTS = ("memory", "solver", "tensor")
OBJECTIVES = ("ttft", "decode", "goodput")
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
NOMINAL_LINK_LATENCY_S = 1e-3  # the links --placement solver assumes (1 GbE)
NOMINAL_LINK_BYTES_PER_S = 1.25e8


# Placement hysteresis (spec P21). A plan made for the same members moves only when the cost
# model predicts the new one at least REPLAN_MARGIN better, plus what the move costs: the seconds
# the busiest member spends loading layers it does not hold (at LOAD_BYTES_PER_S) spread over
# MOVE_HORIZON_S of serving. 15 %: above the spread of repeated measurements of one plan (decode
# tok/s of the default model over runs of one day: 39.7-42.0, and the per-layer calibrations of
# members on one host differ by about as much, README "Models"), below the gains worth having.
REPLAN_MARGIN = 0.15
MOVE_HORIZON_S = 600.0
# bytes of a stage in its compute dtype loaded per second: the default model on this project's
# 2-core AMD EPYC took 4.6 s in f32 (140 MB/s) and 18.5 s in bf16 with int4 quantization
# (18 MB/s) for all 30 layers (2026-12-06); the slower figure, so that a move is never cheap on paper
LOAD_BYTES_PER_S = 18e6


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanInputs:
    """What the planner needs besides the state: the model's measured size, the context it
    must hold (tokens), ``placement`` (one of ``PLACEMENTS``), the solver's ``objective``
    (one of ``OBJECTIVES``) and ``spec``, the cost model's view of the model in the compute
    dtype (only read by the solver); ``margin``: the predicted gain (a fraction) a plan for the
    same members must promise, besides the cost of moving, to replace the one serving (P21)."""

    size: ModelSize
    context_tokens: int
    placement: str = "solver"
    objective: str = "goodput"
    spec: ModelSpec | None = None
    dtype: str = "f32"
    margin: float = REPLAN_MARGIN


# bf16 matmul FLOP/s over f32 from which a CPU computes in bf16 by default. Matmul gains turn
# into smaller decode gains (the rest of a step does not speed up): on this project's AMD EPYC,
# bf16 matmuls measure 2.2x f32 and the default model decodes 1.4x faster (README "Models").
# A CPU without bf16 instructions emulates them at well under 1x, so 1.5x tells the two apart.
BF16_CPU_SPEEDUP = 1.5


def compute_dtype(dtype: str | None, device: str | None, profile: Any = None, backend: str = "torch") -> str:
    """The dtype a stage computes in: ``--dtype``; else f16 on a GPU; else on a CPU bf16 when
    the torch backend runs there and the device profile (``DeviceProfile.flops``, FLOP/s per
    dtype) measured bf16 matmuls at least ``BF16_CPU_SPEEDUP`` times f32's, else f32. The
    device is the profile's (resolved) when there is one, else ``device`` (None: cpu). Only
    the torch backend's CPU dtype is chosen by measurement: the profile measures torch's
    matmuls, and MLX's CPU kernels are slower in bf16 (README "Models")."""
    if dtype:
        return dtype
    if not str(getattr(profile, "device", None) or device or "cpu").startswith("cpu"):
        return "f16"
    flops = getattr(profile, "flops", None) or {}
    fast = backend == "torch" and flops.get("bf16", 0.0) >= BF16_CPU_SPEEDUP * flops.get("f32", float("inf"))
    return "bf16" if fast else "f32"


# bits per weight of --quantize, the larger of the two backends: torchao int8 per channel (a
# scale per row, negligible; MLX's groups of 64 with a float16 scale and bias: 8.5); int4 torch
# in groups of 32 with a 16-bit scale and zero (5.0; MLX's groups of 64: 4.5)
QUANTIZE_BITS = {"int8": 8.5, "int4": 5.0}


def weight_bits(config: Any, quantize: str | None) -> float | None:
    """Bits per weight matrix parameter a stage holds: ``--quantize``'s, else what an
    MLX-quantized directory declares (``quantization_bits``), else None (the compute dtype)."""
    if quantize == "none":
        return None
    return QUANTIZE_BITS.get(quantize or "") or quantization_bits(config)


def loaded_weight_bits(model: Model, quantize: str | None, backend_cls: Any, dtype: str,
                       device: str | None) -> float | None:
    """Bits per weight matrix parameter a stage of ``model`` holds on a ``backend_cls`` backend
    (a ``Backend`` subclass) computing in ``dtype`` (spec P20): ``weight_bits`` (``--quantize``,
    an MLX-quantized config) where it gives one; else, for a GGUF file and the default
    ``--quantize``, the average over the decoder layers' matrices of the bits the backend holds
    each GGUF type at (``backend_cls.gguf_kept_bits``), ``dtype``'s own for the types it
    dequantizes; None (the compute dtype) when it keeps none."""
    bits = weight_bits(model.config, quantize)
    if bits is not None or quantize is not None or not model.ref.gguf_file:
        return bits
    kept = backend_cls.gguf_kept_bits(dtype=dtype, device=device)
    source = model.tensor_source()
    types = source.layer_matrix_types() if kept and isinstance(source, GGUFSource) else {}
    if not set(types) & set(kept):
        return None
    return sum(n * kept.get(kind, 8.0 * DTYPE_BYTES[dtype]) for kind, n in types.items()) / sum(types.values())


def sizes(model: Model, quantize: str | None, backend_cls: Any, dtype: str, device: str | None
          ) -> tuple[ModelSize, ModelSpec]:
    """What a node of ``backend_cls`` computing in ``dtype`` plans with: the model's size (the
    memory split's) and its cost-model spec, both at the bits the backend keeps the weights at
    (``loaded_weight_bits``, spec P20). Reads the model's config and files (a worker thread)."""
    bits = loaded_weight_bits(model, quantize, backend_cls, dtype, device)
    return (model_size(model, DTYPE_BYTES[dtype], weight_bits=bits),
            model_spec(model.config, model.model_id, dtype, bits))


def model_spec(config: Any, model_id: str, dtype: str, bits: float | None = None) -> ModelSpec:
    """The cost model's view of a model in ``dtype`` (matrices at ``bits`` per weight when
    quantized), with the weight, KV and edge bytes counted from the model's own transformers
    class (``ModelSpec.from_counts``, the bytes ``model_size_from_config`` gives), so the
    solver and the memory-proportional split agree on what a layer weighs, and a MoE layer's
    FLOPs and bytes per token are those of the experts a token is routed to; its name carries
    the dtype, since a calibration is only valid for both."""
    name = f"{model_id}@{dtype}" if bits is None else f"{model_id}@{dtype}/{bits:g}b"
    return ModelSpec.from_counts(config, name=name, dtype_bytes=DTYPE_BYTES[dtype], weight_bits=bits)


def failed_members(view: ClusterView) -> dict[str, str]:
    """``{member id: error}`` of the members whose last load failed (status ``failed``): left
    out of placement (spec N17), so the rest re-place around them instead of waiting."""
    out = {}
    for member in view.members():
        status = view.status(member.member_id)
        if status.state == "failed":
            out[member.member_id] = status.error or "loading failed"
    return out


def plan(view: ClusterView, inputs: PlanInputs) -> Plan:
    """The plan for the members ``view`` holds, leaving out those whose load failed
    (``failed_members``) and those stopping gracefully (status ``leaving``, spec N20). Raises PlacementError when the model does not fit them, naming the
    members left out and why."""
    failed = failed_members(view)
    leaving = {m.member_id for m in view.members() if view.status(m.member_id).state == "leaving"}
    members = [m for m in view.members() if m.member_id not in failed and m.member_id not in leaving]
    try:
        found = _plan(view, inputs, members, set(failed) | leaving)
        return keep_or_move(view, inputs, replace(found, considered=frozenset(m.member_id for m in members)))
    except PlacementError as exc:
        if not failed and not leaving:
            raise
        why = "; ".join([*(f"{member[:8]} failed to load: {error}" for member, error in sorted(failed.items())),
                         *(f"{member[:8]} is leaving" for member in sorted(leaving))])
        raise PlacementError(f"{exc} (left out: {why})") from exc


def recorded_plan(view: ClusterView, num_layers: int) -> Plan | None:
    """The serving plan the state records (``placement``, spec N21), with the members it was
    made for; None when there is none, or it is malformed or for another number of layers."""
    value = view.state.get(PLACEMENT_KEY)
    if not isinstance(value, dict):
        return None

    def stage(row: Any) -> Stage:
        if not isinstance(row, list) or len(row) not in (3, 4) or (len(row) == 4 and not isinstance(row[3], list)):
            raise ValueError(f"a stage row is [member, start, end] or [member, start, end, [members]]: {row!r}")
        return Stage(member_id=str(row[0]), layer_start=int(row[1]), layer_end=int(row[2]),
                     group=tuple(str(m) for m in row[3]) if len(row) == 4 else ())

    def stages(rows: Any) -> tuple[Stage, ...]:
        return tuple(stage(row) for row in rows)

    try:
        members = value.get("members", [])
        return Plan(num_layers=num_layers, stages=stages(value.get("stages", [])),
                    prefill_stages=stages(value.get("prefill_stages", [])),
                    considered=frozenset(str(m) for m in members) if isinstance(members, list) else frozenset())
    except (TypeError, ValueError, MeshError):
        return None


def keep_or_move(view: ClusterView, inputs: PlanInputs, candidate: Plan) -> Plan:
    """Placement hysteresis (spec P21): the plan serving now (``recorded_plan``) when it was
    made for the members ``candidate`` considers and the cost model does not predict
    ``candidate`` better by ``inputs.margin`` plus the cost of moving
    (``move_s`` / ``MOVE_HORIZON_S``); else ``candidate``. Only the solver's plans move for
    predictions (the memory split changes with membership and memory only)."""
    current = recorded_plan(view, inputs.size.num_layers)
    if (current is None or current.plan_id == candidate.plan_id or current.considered != candidate.considered
            or inputs.placement != "solver" or inputs.spec is None):
        return candidate
    now, new = score(view, inputs, current), score(view, inputs, candidate)
    if now is None or new is None:
        return candidate
    need = inputs.margin + move_s(current, candidate, inputs.size, load_rates(view)) / MOVE_HORIZON_S
    return candidate if new >= now * (1 + need) else current


def score(view: ClusterView, inputs: PlanInputs, found: Plan) -> float | None:
    """What the solver's objective predicts for ``found`` on the topology it plans on
    (``solver_topology``), higher is better: requests per second end to end (1 / the
    end-to-end time of a request, ``goodput``), decode tokens/s (``decode``) or 1 / TTFT
    (``ttft``); None when it cannot be predicted (a member without a profile)."""
    spec = inputs.spec
    if spec is None:
        return None
    topo = solver_topology(view, inputs)
    ids = {d.id for d in topo.devices}
    if any(s.member_id not in ids for s in found.all_stages):
        return None
    request = _request(inputs)
    try:
        p = predict(solver_form(found), topo, spec, prompt_tokens=request.prompt_tokens, new_tokens=request.new_tokens)
    except PlacementError:
        return None
    seconds = {"ttft": p.ttft_s, "goodput": p.e2e_s}.get(inputs.objective)  # the solver's own terms
    value = p.decode_tokens_per_s if seconds is None else 1.0 / seconds if seconds > 0 else 0.0
    return value if value > 0 and value != float("inf") else None


def move_s(current: Plan, candidate: Plan, size: ModelSize, rates: dict[str, float] | None = None) -> float:
    """Seconds a move from ``current`` to ``candidate`` costs: the layers (and embeddings and
    head) each member must load that its current stage does not hold, at the rate the member's
    last load measured (``rates``: bytes/s by member id, its published profile), else
    ``LOAD_BYTES_PER_S``; members load at once, so the slowest one's."""
    held = {s.member_id: s for s in current.all_stages}
    worst = 0.0
    for stage in candidate.all_stages:
        old = held.get(stage.member_id)
        have = range(old.layer_start, old.layer_end) if old is not None else range(0)
        layers = sum(1 for g in range(stage.layer_start, stage.layer_end) if g not in have)
        edges = size.edge_bytes if old is None or (stage.layer_start == 0) != (old.layer_start == 0) \
            or (stage.layer_end == size.num_layers) != (old.layer_end == size.num_layers) else 0
        rate = (rates or {}).get(stage.member_id, LOAD_BYTES_PER_S)
        worst = max(worst, (layers * size.layer_bytes + edges) / rate)
    return worst


def _plan(view: ClusterView, inputs: PlanInputs, members: list[Any], failed: set[str]) -> Plan:
    if not members:
        raise PlacementError("no member can load the model")
    found = place_by_roles(members, inputs.size, context_tokens=inputs.context_tokens)
    if found is None and inputs.placement == "tensor":  # members whose last group just failed stay out (N26)
        able = [replace(m, tp_address="") if view.status(m.member_id).ungrouped else m for m in members]
        found = tensor_plan(able, inputs.size, context_tokens=inputs.context_tokens)
    if found is None and inputs.placement == "solver" and inputs.spec is not None:
        found = solver_plan(view, inputs, exclude=failed)
    if found is None:
        capacities = [Capacity(member_id=m.member_id, usable_bytes=m.memory_bytes) for m in members]
        found = place_pipeline(capacities, inputs.size, context_tokens=inputs.context_tokens)
    return found


GROUP_LIBRARIES = ("torch", "mlx")  # backends whose nodes run tensor-parallel groups (mesh.node.groups)


def tensor_plan(members: list[Any], size: ModelSize, *, context_tokens: int) -> Plan | None:
    """``--placement tensor`` (spec N26): one tensor-parallel group over every layer, of the
    members that offer a ``--tp-address`` and run one library with groups (``GROUP_LIBRARIES``:
    torch or MLX; the one giving the larger group, torch on a tie), by id, as many as the
    largest group size the model splits into (``size.tp_sizes``); the first leads it. Each member holds
    its share of every layer's weights and KV cache at ``context_tokens``, and the embeddings
    and head whole. None when fewer than 2 such members are present (a pipeline is placed
    instead: a group is never formed half). Raises PlacementError when the group's members
    cannot hold their shares."""
    n, able = 0, []
    for library in GROUP_LIBRARIES:
        these = sorted((m for m in members if m.tp_address and m.backend == library), key=lambda m: m.member_id)
        k = max((k for k in size.tp_sizes if k <= len(these)), default=0)
        if k > n:
            n, able = k, these
    if n < 2:
        return None
    chosen = able[:n]
    need = size.num_layers * per_layer_bytes(size, context_tokens) // n + size.edge_bytes
    short = [m.member_id[:8] for m in chosen if m.memory_bytes < need]
    if short:
        raise PlacementError(f"a tensor-parallel group of {n} needs {need / GIB:.2f} GiB on each member at "
                             f"{context_tokens} tokens of context; {', '.join(short)} offer less")
    return Plan(num_layers=size.num_layers, stages=(Stage(member_id=chosen[0].member_id, layer_start=0,
                                                          layer_end=size.num_layers,
                                                          group=tuple(m.member_id for m in chosen[1:])),))


def solver_plan(view: ClusterView, inputs: PlanInputs, exclude: set[str] = frozenset()) -> Plan | None:  # type: ignore[assignment]
    """The placement solver's plan (spec P17) from the members' published profiles and
    offered memory. A member that has not published a profile yet (it just joined) is left
    out rather than placed by memory and then moved once its profile lands (every move reloads
    layers); None (memory-proportional placement over every member) when no member has a
    profile, or when the profiled ones cannot hold the model but all could. Links are the
    measured ones where published (``solver_topology``). Members in ``exclude`` (their load
    failed, or leaving) are left out.

    Raises PlacementError when the solver finds no plan that fits every member.
    """
    spec = inputs.spec
    if spec is None:
        return None
    topo = solver_topology(view, inputs, exclude)
    missing = len([m for m in view.members() if m.member_id not in exclude]) - len(topo.devices)
    if not topo.devices:
        return None
    # spec N26: groups of the members offering a trusted link (--tp-address), each group of one
    # library: MLX members always (they split the weights in the files' format), torch members
    # when the weights are float (a torch group runs float weights: a quantized model would be
    # priced at its quantized size but load 3-4x that)
    grouped = {m.member_id: m.backend for m in view.members() if m.tp_address and m.backend in GROUP_LIBRARIES
               and (m.backend == "mlx" or inputs.size.weight_bits is None)
               and m.member_id not in exclude and not view.status(m.member_id).ungrouped}
    try:
        solution = solve(topo, spec, _request(inputs), objective=inputs.objective, disaggregation=True,
                         tensor_parallel=grouped if len(grouped) >= 2 else False, group_sizes=inputs.size.tp_sizes)
    except PlacementError:
        if missing:
            return None
        raise
    return runtime_plan(spec.num_layers, solution.plan)


def _request(inputs: PlanInputs) -> Request:
    context = inputs.context_tokens
    return Request(context_tokens=context, prompt_tokens=min(context, 512), new_tokens=128)


def solver_topology(view: ClusterView, inputs: PlanInputs, exclude: set[str] = frozenset()) -> Topology:  # type: ignore[assignment]
    """The devices with a published profile (less ``exclude``) and the links between them the
    solver plans on: each pair's measured link (``perf.topology``: median RTT / 2, probe
    throughput, spec L2) where both ends published one, else a nominal 1 GbE. The live figures
    move all the time; the plan follows them only through the hysteresis (``keep_or_move``)."""
    measured = topology(view, inputs.dtype)
    devices = tuple(d for d in measured.devices if d.id not in exclude)
    known = {(link.a, link.b): link for link in measured.links}
    links = tuple(known.get(tuple(sorted((a.id, b.id))), Link(  # type: ignore[call-overload]
        a=a.id, b=b.id, latency_s=NOMINAL_LINK_LATENCY_S, bandwidth_bytes_per_s=NOMINAL_LINK_BYTES_PER_S))
        for i, a in enumerate(devices) for b in devices[i + 1:])
    ids = {d.id for d in devices}
    return Topology(devices=devices, links=links,
                    collectives=tuple(c for c in measured.collectives if all(m in ids for m in c[0])))


def runtime_plan(num_layers: int, placement: Any) -> Plan:
    """The runtime's ``Plan`` for a solver ``PlacementPlan``: stages of role ``prefill`` become
    the plan's prefill pipeline (spec N13), the others its stages; a stage on several devices
    is a tensor-parallel group led by its first device (spec N26)."""

    def stages(roles: tuple[str, ...]) -> tuple[Stage, ...]:
        return tuple(Stage(member_id=s.devices[0], layer_start=s.layer_start, layer_end=s.layer_end,
                           group=tuple(s.devices[1:])) for s in placement.stages if s.role in roles)

    return Plan(num_layers=num_layers, stages=stages(("both", "decode")), prefill_stages=stages(("prefill",)))


def describe(found: Plan) -> str:
    """One log line for a plan: each stage as ``member[start,end)``, prefill stages apart."""
    def one(s: Stage) -> str:
        return "+".join(s.members) + f"[{s.layer_start},{s.layer_end})"  # a+b: a tensor-parallel group

    text = ", ".join(one(s) for s in found.stages)
    if found.prefill_stages:
        text += " (prefill on " + ", ".join(one(s) for s in found.prefill_stages) + ")"
    return text
