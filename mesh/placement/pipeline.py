"""Pipeline placement: which member runs which contiguous layer range.

A pure function of (members with their usable memory, model size, context length): the same
input gives the same plan on every node. This first placement splits layers in proportion
to the memory each member has left for layers (largest-remainder rounding), so every share
fits. Spec: specs/placement.md (P1-P6).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import PlacementError
from mesh.models import Model, tensor_parallel_sizes

GIB = 1 << 30


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSize:
    """Bytes a model needs, in the compute dtype.

    ``layer_bytes``: weights of one decoder layer; ``edge_bytes``: embeddings + final norm +
    LM head (reserved on every member, since any member may end up first or last);
    ``kv_bytes_per_token_per_layer``: 2 (K and V) x kv heads x head dim x dtype bytes.
    """

    num_layers: int
    layer_bytes: int
    edge_bytes: int
    kv_bytes_per_token_per_layer: int
    tp_sizes: tuple[int, ...] = ()  # the tensor-parallel group sizes it splits into (``tensor_parallel_sizes``)
    weight_bits: float | None = None  # bits per matrix weight when kept quantized; None: float weights

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.layer_bytes < 1:
            raise PlacementError("a model needs >= 1 layer of >= 1 byte")


@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    """A member and the memory it offers, in bytes (0 or unknown -> unusable)."""

    member_id: str
    usable_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """Layers ``[layer_start, layer_end)`` on ``member_id``; with ``group``, on a
    tensor-parallel group (spec N26): ``member_id`` leads it (member 0, the stage requests go
    to) and ``group`` names the other members, members 1.. in order."""

    member_id: str
    layer_start: int
    layer_end: int
    group: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        """Every member computing the stage, the leader first."""
        return (self.member_id, *self.group)

    def wire(self) -> list[Any]:
        """``[member, layer_start, layer_end]``, and the group's other members when it has some."""
        row: list[Any] = [self.member_id, self.layer_start, self.layer_end]
        return [*row, list(self.group)] if self.group else row


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """An ordered pipeline: stage i feeds stage i+1; together they cover every layer once.

    With ``prefill_stages`` the plan is disaggregated (spec N13): a request's prefill runs
    through ``prefill_stages`` (a second pipeline over every layer, on other members), its
    KV cache moves to ``stages``, and decode runs there.
    """

    num_layers: int
    stages: tuple[Stage, ...]
    prefill_stages: tuple[Stage, ...] = ()
    # the members the planner could place when it made this plan (spec P21: a change of this
    # set re-places at once; otherwise the plan moves only for a large enough predicted gain)
    considered: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        for role, stages in (("", self.stages), ("prefill ", self.prefill_stages)):
            if role and not stages:
                continue
            expected = 0
            for stage in stages:
                if stage.layer_start != expected or stage.layer_end <= stage.layer_start:
                    raise PlacementError(f"{role}stages must be contiguous and non-empty: {stages}")
                expected = stage.layer_end
            if expected != self.num_layers:
                raise PlacementError(f"{role}stages cover {expected} of {self.num_layers} layers")
        members = [m for s in self.all_stages for m in s.members]
        if len(set(members)) != len(members):
            raise PlacementError(f"a member holds two stages: {members}")

    @property
    def all_stages(self) -> tuple[Stage, ...]:
        """Prefill stages (if any), then the decode stages."""
        return self.prefill_stages + self.stages

    @property
    def plan_id(self) -> str:
        """A short digest naming this plan; equal plans have equal ids on every node."""
        shape: list[object] = [self.num_layers, [s.wire() for s in self.stages]]
        if self.prefill_stages:
            shape.append([s.wire() for s in self.prefill_stages])
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]

    def stage_of(self, member_id: str) -> Stage | None:
        return next((s for s in self.all_stages if s.member_id == member_id), None)

    def group_place(self, member_id: str) -> tuple[Stage, int] | None:
        """The stage whose tensor-parallel group ``member_id`` belongs to without leading it,
        and its place there (1..), or None."""
        return next(((s, s.group.index(member_id) + 1) for s in self.all_stages if member_id in s.group), None)

    def role_of(self, member_id: str) -> str | None:
        """``prefill``, ``decode`` (a disaggregated plan), ``both`` (a plain one) or None."""
        if any(member_id in s.members for s in self.prefill_stages):
            return "prefill"
        if any(member_id in s.members for s in self.stages):
            return "decode" if self.prefill_stages else "both"
        return None


def per_layer_bytes(size: ModelSize, context_tokens: int) -> int:
    """Weights plus the KV cache of one layer at ``context_tokens`` positions."""
    return size.layer_bytes + size.kv_bytes_per_token_per_layer * context_tokens


def place_pipeline(members: list[Capacity], size: ModelSize, *, context_tokens: int) -> Plan:
    """Split ``size.num_layers`` layers over ``members`` in proportion to the memory each has
    left for layers: ``cap = floor((usable - edge_bytes) / per_layer_bytes)`` layers.

    Members are ordered by id (spec P2: deterministic); members given 0 layers are left out.
    Rounding uses the largest-remainder (Hamilton) method, ties to the earlier member.

    Raises:
        PlacementError: when all members together cannot hold the model, naming the bytes
            needed and available and the largest context that would fit.
    """
    if not members:
        raise PlacementError("no members to place the model on")
    ids = [m.member_id for m in members]
    if len(set(ids)) != len(ids):
        raise PlacementError(f"duplicate member ids in {ids}")
    ordered = sorted(members, key=lambda m: m.member_id)
    n = size.num_layers
    per_layer = per_layer_bytes(size, context_tokens)
    caps = [max(0, (max(0, m.usable_bytes) - size.edge_bytes) // per_layer) for m in ordered]
    if sum(caps) < n:
        usable = sum(max(0, m.usable_bytes) for m in ordered)
        need = n * per_layer + size.edge_bytes
        raise PlacementError(
            f"needs {need / GIB:.2f} GiB for {n} layers + KV at {context_tokens} tokens on one member "
            f"(and {size.edge_bytes / GIB:.2f} GiB of embeddings/head on each); "
            f"{usable / GIB:.2f} GiB usable across {len(ordered)} member(s); "
            f"largest context that fits: {largest_context(ordered, size)} tokens"
        )
    # Weights are the caps (memory left for layers, in whole layers). Since n <= sum(caps),
    # each quota n*cap/sum(caps) <= cap, and rounding a quota up never passes an integer cap:
    # no share can exceed its cap (spec P3).
    shares = _largest_remainder(n, caps)
    stages: list[Stage] = []
    start = 0
    for member, share in zip(ordered, shares):
        if share:
            stages.append(Stage(member_id=member.member_id, layer_start=start, layer_end=start + share))
            start += share
    return Plan(num_layers=n, stages=tuple(stages))


def largest_context(members: list[Capacity], size: ModelSize) -> int:
    """The largest context (tokens) at which ``members`` can still hold every layer; 0 if none."""
    if size.kv_bytes_per_token_per_layer <= 0:
        return 0
    lo, hi = 0, 1 << 24
    if not _fits(members, size, lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(members, size, mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fits(members: list[Capacity], size: ModelSize, context_tokens: int) -> bool:
    per_layer = per_layer_bytes(size, context_tokens)
    return sum(max(0, (max(0, m.usable_bytes) - size.edge_bytes) // per_layer) for m in members) >= size.num_layers


def _largest_remainder(total: int, weights: list[int]) -> list[int]:
    # Integer arithmetic: the same shares on every machine, no float rounding.
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def place_by_roles(members: list[Any], size: ModelSize, *, context_tokens: int) -> Plan | None:
    """A disaggregated plan (spec N13) when members ask for roles (``--role``): prefill on the
    members that asked for ``prefill``, decode on all others, each side a memory-proportional
    pipeline over every layer (``place_pipeline``). None when no member asked for ``prefill``
    or none is left to decode (a plain plan is made instead).

    ``members``: records with ``member_id``, ``memory_bytes`` and ``role``.
    Raises PlacementError (naming the side) when one side cannot hold the model.
    """
    prefill = [m for m in members if getattr(m, "role", "any") == "prefill"]
    decode = [m for m in members if getattr(m, "role", "any") != "prefill"]
    if not prefill or not decode:
        return None
    sides = []
    for name, side in (("prefill", prefill), ("decode", decode)):
        try:
            sides.append(place_pipeline([Capacity(member_id=m.member_id, usable_bytes=m.memory_bytes) for m in side],
                                        size, context_tokens=context_tokens))
        except PlacementError as exc:
            raise PlacementError(f"the {name} members cannot hold the model: {exc}") from exc
    return Plan(num_layers=size.num_layers, stages=sides[1].stages, prefill_stages=sides[0].stages)


def model_size(model: Model, dtype_bytes: int = 4, *, weight_bits: float | None = None) -> ModelSize:
    """Bytes per layer and for embeddings/head of ``model`` as a stage loads it
    (``model_size_from_config`` of its config; ``weight_bits`` defaults to what an MLX-quantized
    directory declares, ``quantization_bits``)."""
    if weight_bits is None:
        weight_bits = quantization_bits(model.config)
    return model_size_from_config(model.config, dtype_bytes, weight_bits=weight_bits)


def quantization_bits(config: Any) -> float | None:
    """Bits per weight of an mlx-community style quantized model (``quantization`` in its
    config.json: ``bits`` and ``group_size``, affine: a float16 scale and bias per group, so
    ``bits + 32 / group_size``), or None for a float model. Per-module overrides are not
    counted (they are a few layers)."""
    quantization = getattr(config, "quantization", None)
    if not isinstance(quantization, dict) or not isinstance(quantization.get("bits"), int):
        return None
    group = quantization.get("group_size", 64)
    return quantization["bits"] + 32 / group if isinstance(group, int) and group > 0 else float(quantization["bits"])


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCounts:
    """Parameters of a model's decoder layers, counted on its own transformers class.

    ``resident``: the largest layer's parameters (all experts of a MoE layer), split into
    ``matrices`` (tensors of 2 or more dimensions: what weight quantization packs) and the rest;
    ``active``: parameters one token reads per layer on average over the layers (a MoE layer's
    shared weights plus ``num_experts_per_tok`` of its routed experts); ``edge_matrices`` /
    ``edge_other``: embeddings, final norm and LM head."""

    num_layers: int
    resident_matrices: int
    resident_other: int
    active: float
    edge_matrices: int
    edge_other: int


def layer_counts(config: Any) -> LayerCounts:
    """Count ``config``'s parameters on a meta-device instance of its transformers class with
    every layer (dense first layers, MLP-only layers and expert layers each as they are). A
    routed-expert tensor is one under ``.experts.`` whose first dimension is the expert count;
    a token reads ``num_experts_per_tok`` of them. Raises what transformers raises for a config
    it cannot build (ValueError for an unknown architecture)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = next((int(v) for v in (getattr(config, n, None) for n in ("num_local_experts", "num_experts",
                                                                        "n_routed_experts")) if isinstance(v, int)), 0)
    per_token = int(getattr(config, "num_experts_per_tok", 0) or 0)
    resident: list[tuple[int, int]] = []
    active: list[float] = []
    for layer in model.model.layers:
        matrices = other = 0
        read = 0.0
        for name, param in layer.named_parameters():
            n = param.numel()
            if param.dim() >= 2:
                matrices += n
            else:
                other += n
            routed = ".experts." in f".{name}" and experts > 1 and param.dim() >= 2 and param.shape[0] == experts
            read += n * per_token / experts if routed and per_token else n
        resident.append((matrices, other))
        active.append(read)
    edge_matrices = edge_other = 0
    for name, param in model.named_parameters():
        if not name.startswith("model.layers."):
            edge_matrices, edge_other = (edge_matrices + param.numel(), edge_other) if param.dim() >= 2 else \
                (edge_matrices, edge_other + param.numel())
    if getattr(config, "tie_word_embeddings", False):
        edge_matrices += model.model.embed_tokens.weight.numel()  # the last stage holds its own copy
    biggest = max(resident, key=sum)
    return LayerCounts(num_layers=len(resident), resident_matrices=biggest[0], resident_other=biggest[1],
                       active=sum(active) / len(active), edge_matrices=edge_matrices, edge_other=edge_other)


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV cache bytes one token adds to one layer: 2 (keys and values) x KV heads x head dim x
    ``dtype_bytes`` (GQA-aware), or for multi-head latent attention (deepseek_v2/v3: a
    ``kv_lora_rank``) the compressed latent plus the RoPE key, (kv_lora_rank +
    qk_rope_head_dim) x ``dtype_bytes``, as mlx-lm caches it (DeepSeek-V2 paper, section 2.1.2;
    transformers' cache keeps the expanded keys and values, more)."""
    latent = getattr(config, "kv_lora_rank", None)
    if isinstance(latent, int) and latent > 0:
        return (latent + int(getattr(config, "qk_rope_head_dim", 0) or 0)) * dtype_bytes
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return 2 * kv_heads * head_dim * dtype_bytes


def model_size_from_config(config: Any, dtype_bytes: int = 4, *, weight_bits: float | None = None) -> ModelSize:
    """Bytes per layer (the largest: all experts of a MoE layer resident) and for
    embeddings/head, counted from a meta-device instance of the transformers class ``config``
    describes (``layer_counts``: no weights are read or downloaded; biases, non-gated MLPs,
    extra norms and dense first layers are counted as they are), plus the KV bytes per token
    (``kv_bytes_per_token``). Weights take ``dtype_bytes`` bytes per parameter, or, with
    ``weight_bits``, the matrices take that many bits each (quantized: include the scales'
    share, e.g. 4.5 for 4 bits in groups of 64 with float16 scales and biases) and the rest
    (norms, biases) ``dtype_bytes``. Raises what transformers raises for a config it cannot
    build (ValueError for an unknown architecture)."""
    counts = layer_counts(config)

    def weights(matrices: int, other: int) -> int:
        matrix_bytes = matrices * dtype_bytes if weight_bits is None else math.ceil(matrices * weight_bits / 8)
        return int(matrix_bytes + other * dtype_bytes)

    return ModelSize(
        num_layers=int(config.num_hidden_layers),
        layer_bytes=weights(counts.resident_matrices, counts.resident_other),
        edge_bytes=weights(counts.edge_matrices, counts.edge_other),
        kv_bytes_per_token_per_layer=kv_bytes_per_token(config, dtype_bytes),
        tp_sizes=tensor_parallel_sizes(config),
        weight_bits=weight_bits,
    )
