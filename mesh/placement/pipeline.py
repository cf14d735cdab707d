"""Pipeline placement: which member runs which contiguous layer range.

A pure function of (members with their usable memory, model size, context length): the same
input gives the same plan on every node. This first placement splits layers in proportion
to the memory each member has left for layers (largest-remainder rounding), so every share
fits. Spec: specs/placement.md (P1-P6).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mesh.errors import PlacementError
from mesh.models import Model, sliced_config

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
    """Layers ``[layer_start, layer_end)`` on ``member_id``."""

    member_id: str
    layer_start: int
    layer_end: int


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
        members = [s.member_id for s in self.all_stages]
        if len(set(members)) != len(members):
            raise PlacementError(f"a member holds two stages: {members}")

    @property
    def all_stages(self) -> tuple[Stage, ...]:
        """Prefill stages (if any), then the decode stages."""
        return self.prefill_stages + self.stages

    @property
    def plan_id(self) -> str:
        """A short digest naming this plan; equal plans have equal ids on every node."""
        shape: list[object] = [self.num_layers, [[s.member_id, s.layer_start, s.layer_end] for s in self.stages]]
        if self.prefill_stages:
            shape.append([[s.member_id, s.layer_start, s.layer_end] for s in self.prefill_stages])
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]

    def stage_of(self, member_id: str) -> Stage | None:
        return next((s for s in self.all_stages if s.member_id == member_id), None)

    def role_of(self, member_id: str) -> str | None:
        """``prefill``, ``decode`` (a disaggregated plan), ``both`` (a plain one) or None."""
        if any(s.member_id == member_id for s in self.prefill_stages):
            return "prefill"
        if any(s.member_id == member_id for s in self.stages):
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


def model_size(model: Model, dtype_bytes: int = 4) -> ModelSize:
    """Bytes per layer and for embeddings/head of ``model`` at ``dtype_bytes`` bytes per
    parameter (``model_size_from_config`` of its config)."""
    return model_size_from_config(model.config, dtype_bytes)


def model_size_from_config(config: Any, dtype_bytes: int = 4) -> ModelSize:
    """Bytes per layer and for embeddings/head, counted from a meta-device instance of the
    transformers class ``config`` describes (no weights are read or downloaded; biases,
    non-gated MLPs and extra norms are counted as they are), plus GQA-aware KV bytes, at
    ``dtype_bytes`` bytes per parameter. Raises what transformers raises for a config it
    cannot build (ValueError for an unknown architecture)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        one = AutoModelForCausalLM.from_config(sliced_config(config, 0, 1))
    layer = sum(p.numel() for p in one.model.layers[0].parameters())
    edge = sum(p.numel() for n, p in one.named_parameters() if not n.startswith("model.layers."))
    if getattr(config, "tie_word_embeddings", False):
        edge += one.model.embed_tokens.weight.numel()  # the last stage holds its own copy
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return ModelSize(
        num_layers=int(config.num_hidden_layers),
        layer_bytes=layer * dtype_bytes,
        edge_bytes=edge * dtype_bytes,
        kv_bytes_per_token_per_layer=2 * kv_heads * head_dim * dtype_bytes,
    )
