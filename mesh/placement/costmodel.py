"""Cost model of a placement: memory per device, TTFT and decode tokens/s (pure, sans-IO).

Roofline per layer (Williams, Waterman, Patterson, "Roofline", CACM 2009): a step takes
max(FLOPs / FLOP/s, bytes moved / memory bandwidth). Prefill of P tokens is compute-bound
(every weight is used P times); decode is bandwidth-bound (every weight and the KV cache
are read once per token). Between pipeline stages the hidden states cross a link
(latency + bytes / bandwidth). A tensor-parallel group splits each layer's weights, FLOPs
and KV over its k devices and adds two all-reduces of the hidden states per layer (ring
all-reduce: 2 (k-1)/k x bytes over the slowest link, plus 2 (k-1) latencies; Patarasuk &
Yuan, JPDC 2009). With prefill/decode disaggregation the KV cache of the prompt moves from
each prefill device to the decode device holding the same layers (Zhong et al.,
"DistServe", OSDI 2024). Batch size 1: a pipeline does not overlap one request's stages.

FLOPs per token per layer: 2 x parameters (one multiply-add per weight) plus attention,
4 x heads x head_dim per earlier position (QK^T and AV; Kaplan et al. 2020, Table 1).
A device may carry a ``Calibration``: per-layer step times of the running model measured on
the device itself after it loaded its layers. Small layers never reach the roofline (every
operator pays a fixed dispatch cost, a skinny GEMM or a GEMV over a few MiB runs far below
peak), so where a calibration exists it replaces the roofline for the weights' part of a
step; the KV cache's and attention's growth with context stay on the roofline.

Spec: specs/placement.md (P9-P12, P19).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mesh.errors import PlacementError

if TYPE_CHECKING:
    from mesh.placement.pipeline import ModelSize

ROLES = ("both", "prefill", "decode")
ACTIVATION_MARGIN = 0.05  # of a device's weights, for activations and allocator slack
ACTIVATION_BUFFERS = 8  # hidden-state-sized buffers per prompt token held during prefill


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """What placement needs to know of a model, in the compute dtype.

    Bytes: ``layer_bytes`` (weights of one decoder layer), ``embed_bytes``, ``head_bytes``
    (LM head and final norm; a tied head is a copy on the last stage),
    ``kv_bytes_per_token_per_layer`` (2 x kv heads x head dim x dtype bytes, GQA-aware),
    ``hidden_bytes`` (one token's hidden state). FLOPs: ``layer_flops_per_token`` (2 x layer
    parameters), ``attn_flops_per_position`` (per layer, per token, per earlier position),
    ``head_flops_per_token`` (2 x vocab x hidden).
    """

    name: str
    num_layers: int
    layer_bytes: int
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    hidden_bytes: int
    layer_flops_per_token: float
    attn_flops_per_position: float
    head_flops_per_token: float
    # bytes of weights one decode token reads per layer (a MoE layer: shared weights plus the
    # routed experts it picks); 0: all of ``layer_bytes``
    layer_read_bytes: int = 0

    @property
    def read_bytes(self) -> int:
        """Weight bytes a decode token reads per layer."""
        return self.layer_read_bytes or self.layer_bytes

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.layer_bytes < 1 or self.hidden_bytes < 1:
            raise PlacementError(f"model {self.name}: needs >= 1 layer, layer bytes and hidden bytes")

    @classmethod
    def from_dimensions(cls, *, name: str, num_layers: int, hidden_size: int, intermediate_size: int,
                        num_attention_heads: int, num_key_value_heads: int, vocab_size: int,
                        dtype_bytes: int, head_dim: int | None = None, tie_word_embeddings: bool = False,
                        gated_mlp: bool = True) -> ModelSpec:
        """A decoder-only transformer (Llama / Qwen / Mistral layout: q, k, v, o projections, a
        gated MLP of three matrices, two RMSNorms per layer) from its config dimensions."""
        hd = head_dim or hidden_size // num_attention_heads
        attn = hidden_size * hd * (2 * num_attention_heads + 2 * num_key_value_heads)
        mlp = (3 if gated_mlp else 2) * hidden_size * intermediate_size
        layer_params = attn + mlp + 2 * hidden_size
        embed = vocab_size * hidden_size
        return cls(name=name, num_layers=num_layers, layer_bytes=layer_params * dtype_bytes,
                   embed_bytes=embed * dtype_bytes, head_bytes=(embed + hidden_size) * dtype_bytes,
                   kv_bytes_per_token_per_layer=2 * num_key_value_heads * hd * dtype_bytes,
                   hidden_bytes=hidden_size * dtype_bytes, layer_flops_per_token=2.0 * layer_params,
                   attn_flops_per_position=4.0 * num_attention_heads * hd,
                   head_flops_per_token=2.0 * vocab_size * hidden_size)

    @classmethod
    def from_counts(cls, config: Any, *, name: str, dtype_bytes: int, weight_bits: float | None = None) -> ModelSpec:
        """From a transformers config counted on its own class (``pipeline.layer_counts``):
        the bytes ``model_size_from_config`` gives (largest layer resident, MoE experts all
        resident; ``weight_bits`` for quantized matrices), the KV bytes of its attention
        (``kv_bytes_per_token``: MLA's latent too), and per token the FLOPs (2 x parameters
        read) and weight bytes of what a token reads (``num_experts_per_tok`` routed experts).
        Raises what transformers raises for a config it cannot build."""
        from mesh.placement.pipeline import layer_counts, model_size_from_config

        counts = layer_counts(config)
        size = model_size_from_config(config, dtype_bytes, weight_bits=weight_bits)
        spec = cls.from_config(config, name=name, dtype_bytes=dtype_bytes)
        per_param = dtype_bytes if weight_bits is None else weight_bits / 8
        embed = int(config.vocab_size) * int(config.hidden_size)
        embed_bytes = int(embed * per_param)
        return replace(spec, layer_bytes=size.layer_bytes, embed_bytes=embed_bytes,
                       head_bytes=max(1, size.edge_bytes - embed_bytes),
                       kv_bytes_per_token_per_layer=size.kv_bytes_per_token_per_layer,
                       layer_flops_per_token=2.0 * counts.active, layer_read_bytes=max(1, int(counts.active * per_param)))

    @classmethod
    def from_config(cls, config: Any, *, name: str, dtype_bytes: int, size: ModelSize | None = None) -> ModelSpec:
        """From a transformers config (``num_hidden_layers``, ``hidden_size``, ...), with
        ``dtype_bytes`` bytes per parameter. With ``size`` (``model_size`` of the same model in
        the same dtype) the bytes are the measured ones (``with_size``), so the solver and the
        memory-proportional split (``place_pipeline``) decide on the same bytes whether the
        model fits. Raises PlacementError as ``with_size``."""
        spec = cls.from_dimensions(
            name=name, num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size), num_attention_heads=int(config.num_attention_heads),
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
            vocab_size=int(config.vocab_size), dtype_bytes=dtype_bytes,
            head_dim=getattr(config, "head_dim", None),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
        from mesh.placement.pipeline import kv_bytes_per_token

        spec = replace(spec, kv_bytes_per_token_per_layer=kv_bytes_per_token(config, dtype_bytes))  # MLA's latent
        return spec if size is None else spec.with_size(size)

    def with_size(self, size: ModelSize) -> ModelSpec:
        """This spec with the bytes ``size`` counted on the model's own class (spec P9): weights
        per layer, KV bytes per token per layer, and the edges ``size.edge_bytes`` split into
        the embedding table on the first stage (this spec's ``embed_bytes``) and the rest (final
        norm and LM head, a tied head's copy included) on the last, so first + last hold exactly
        the edges ``place_pipeline`` reserves. FLOPs stay the formula's.

        Raises PlacementError when ``size`` cannot describe this model in this dtype: another
        layer count, other KV bytes per token (another dtype or attention layout), or edges
        smaller than the embedding table."""
        if size.num_layers != self.num_layers:
            raise PlacementError(f"model {self.name}: the measured size has {size.num_layers} layers, "
                                 f"the config {self.num_layers}")
        if size.kv_bytes_per_token_per_layer != self.kv_bytes_per_token_per_layer:
            raise PlacementError(f"model {self.name}: the measured size has {size.kv_bytes_per_token_per_layer} "
                                 f"KV bytes per token per layer, the config {self.kv_bytes_per_token_per_layer}; "
                                 "measure it in the compute dtype")
        head_bytes = size.edge_bytes - self.embed_bytes
        if head_bytes < 0:
            raise PlacementError(f"model {self.name}: the measured edges ({size.edge_bytes} bytes) are smaller "
                                 f"than the embedding table ({self.embed_bytes} bytes)")
        return replace(self, layer_bytes=size.layer_bytes, head_bytes=head_bytes,
                       kv_bytes_per_token_per_layer=size.kv_bytes_per_token_per_layer)


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Step times of one model's decoder layers measured on one device (``mesh/placement/calibrate.py``).

    ``decode_layer_s``: seconds per layer for one decode token at a short context;
    ``prefill_layer_s`` + ``prefill_token_layer_s`` x P: seconds per layer to prefill P tokens
    (a line fitted through two prompt lengths). ``head_s``: seconds for the final norm and LM
    head of one position, timed alone on a last stage (None where the stage was not last or the
    backend cannot run its head alone: the roofline estimate stands in). ``model`` names the
    model and compute dtype the figures are for; they are meaningless for any other.
    """

    model: str
    decode_layer_s: float
    prefill_layer_s: float
    prefill_token_layer_s: float
    head_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("decode_layer_s", "prefill_layer_s", "prefill_token_layer_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise PlacementError(f"calibration {name} must be a finite number of seconds >= 0, got {value!r}")
        if self.decode_layer_s <= 0 or self.prefill_layer_s + self.prefill_token_layer_s <= 0:
            raise PlacementError("a calibration's decode and prefill step times must be > 0 s")
        head = self.head_s
        if head is not None and (not isinstance(head, int | float) or isinstance(head, bool) or not 0 < head < math.inf):
            raise PlacementError(f"calibration head_s must be a finite number of seconds > 0 or absent, got {head!r}")

    def to_wire(self) -> dict[str, Any]:
        wire = {"model": self.model, "decode_layer_s": self.decode_layer_s, "prefill_layer_s": self.prefill_layer_s,
                "prefill_token_layer_s": self.prefill_token_layer_s}
        return wire if self.head_s is None else wire | {"head_s": self.head_s}


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """A device as placement sees it: usable memory (bytes), matmul FLOP/s in the compute
    dtype, memory bandwidth (bytes/s). Zero or unknown memory means unusable."""

    id: str
    memory_bytes: int
    flops: float
    memory_bandwidth_bytes_per_s: float
    backend: str = "torch"
    calibration: Calibration | None = None

    def calibrated_for(self, model: ModelSpec) -> Calibration | None:
        """This device's calibration when it was measured for ``model`` (same name)."""
        cal = self.calibration
        return cal if cal is not None and cal.model == model.name else None

    @property
    def usable(self) -> bool:
        return self.memory_bytes > 0 and self.flops > 0 and self.memory_bandwidth_bytes_per_s > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A direct link between two devices (symmetric): latency (s), bandwidth (bytes/s)."""

    a: str
    b: str
    latency_s: float
    bandwidth_bytes_per_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Devices and the links between them (a missing link: no direct path); ``collectives``:
    what a tensor-parallel group's collective took where its steps ran it, measured by the
    group (``(sorted member ids, seconds per all-reduce of one token's hidden state)``): it
    prices that group's all-reduces instead of its links' latency (spec P10)."""

    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    collectives: tuple[tuple[tuple[str, ...], float], ...] = ()
    _index: dict[tuple[str, str], Link] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise PlacementError(f"duplicate device ids in the topology: {sorted(ids)}")
        known = set(ids)
        for link in self.links:
            if link.a not in known or link.b not in known:
                raise PlacementError(f"link {link.a}-{link.b} names a device not in the topology")
            self._index[(link.a, link.b)] = self._index[(link.b, link.a)] = link

    def device(self, device_id: str) -> Device:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise PlacementError(f"no device {device_id!r} in the topology")

    def link(self, a: str, b: str) -> Link | None:
        return self._index.get((a, b))

    def to_file(self) -> dict[str, Any]:
        """The topology in the file format ``python -m mesh plan --topology`` and ``python -m
        mesh gym --topology`` read (devices: id, memory_bytes, flops, memory_bandwidth_bytes_per_s,
        backend; links: a, b, latency_s, bandwidth_bytes_per_s)."""
        return {"devices": [{"id": d.id, "memory_bytes": d.memory_bytes, "flops": d.flops,
                             "memory_bandwidth_bytes_per_s": d.memory_bandwidth_bytes_per_s, "backend": d.backend}
                            for d in self.devices],
                "links": [{"a": link.a, "b": link.b, "latency_s": link.latency_s,
                           "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s} for link in self.links]}

    def transfer_s(self, a: str, b: str, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from a to b (0 on one device; inf with no link)."""
        if a == b:
            return 0.0
        link = self.link(a, b)
        if link is None or link.bandwidth_bytes_per_s <= 0:
            return math.inf
        return link.latency_s + nbytes / link.bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    """Layers [layer_start, layer_end) on ``devices`` (more than one: a tensor-parallel
    group), for ``role`` (both, prefill or decode)."""

    devices: tuple[str, ...]
    layer_start: int
    layer_end: int
    role: str = "both"

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPlan:
    """Stages in layer order per role; ``disaggregated`` when prefill and decode differ."""

    stages: tuple[StagePlan, ...]

    def role_stages(self, role: str) -> list[StagePlan]:
        """The pipeline that runs ``role`` (prefill or decode), in layer order."""
        return sorted((s for s in self.stages if s.role in (role, "both")), key=lambda s: s.layer_start)

    @property
    def disaggregated(self) -> bool:
        return any(s.role != "both" for s in self.stages)

    def to_wire(self) -> list[dict[str, Any]]:
        return [{"devices": list(s.devices), "layer_start": s.layer_start, "layer_end": s.layer_end, "role": s.role}
                for s in self.stages]


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """Predicted figures for one request: TTFT (s), decode tokens/s, the KV transfer of a
    disaggregated plan (s), and the end-to-end time of ``new_tokens`` tokens (s)."""

    ttft_s: float
    decode_tokens_per_s: float
    kv_transfer_s: float
    e2e_s: float

    def to_wire(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "kv_transfer_s": self.kv_transfer_s, "e2e_s": self.e2e_s}


def _calibration(topology: Topology, model: ModelSpec, stage: StagePlan) -> Calibration | None:
    """The calibration a stage computes at (spec P19): its device's for ``model``; for a
    tensor-parallel group of k, the slowest member's figures divided by k (each member runs
    1/k of every layer's matrices and attention heads: the split layer takes as long as the
    slowest member's share), when every member measured ``model``; else None (roofline)."""
    cals = [topology.device(d).calibrated_for(model) for d in stage.devices]
    if any(c is None for c in cals):
        return None
    if len(cals) == 1:
        return cals[0]
    k = len(cals)
    return Calibration(model=model.name, decode_layer_s=max(c.decode_layer_s for c in cals) / k,  # type: ignore[union-attr]
                       prefill_layer_s=max(c.prefill_layer_s for c in cals) / k,  # type: ignore[union-attr]
                       prefill_token_layer_s=max(c.prefill_token_layer_s for c in cals) / k)  # type: ignore[union-attr]


def _group(topology: Topology, stage: StagePlan) -> tuple[float, float, float, float]:
    """(FLOP/s, bandwidth, all-reduce bandwidth, all-reduce latency) of a stage's devices."""
    devices = [topology.device(d) for d in stage.devices]
    flops = sum(d.flops for d in devices)
    bandwidth = sum(d.memory_bandwidth_bytes_per_s for d in devices)
    if len(devices) == 1:
        return flops, bandwidth, math.inf, 0.0
    links = [topology.link(a.id, b.id) for i, a in enumerate(devices) for b in devices[i + 1:]]
    if any(link is None for link in links):
        return flops, bandwidth, 0.0, math.inf
    slowest = min(link.bandwidth_bytes_per_s for link in links if link is not None)
    measured = dict(topology.collectives).get(tuple(sorted(stage.devices)))
    if measured is not None:  # the group's own collectives: software and waiting included, not just the wire
        return flops, bandwidth, slowest, measured / (2 * (len(devices) - 1))
    return flops, bandwidth, slowest, max(link.latency_s for link in links if link is not None)


def allreduce_s(k: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` among k devices over links of ``bandwidth``
    (bytes/s) and ``latency`` (s): 2 (k-1)/k x bytes / bandwidth + 2 (k-1) x latency (a
    reduce-scatter then an all-gather, Patarasuk & Yuan 2009)."""
    if k <= 1:
        return 0.0
    if bandwidth <= 0:
        return math.inf
    return 2 * (k - 1) / k * nbytes / bandwidth + 2 * (k - 1) * latency


def prefill_stage_s(topology: Topology, model: ModelSpec, stage: StagePlan, prompt_tokens: int) -> float:
    """Seconds for a stage to prefill ``prompt_tokens`` tokens (causal attention: P^2/2)."""
    flops, bandwidth, ar_bw, ar_lat = _group(topology, stage)
    p = prompt_tokens
    cal = _calibration(topology, model, stage)
    reduce = 2 * allreduce_s(len(stage.devices), p * model.hidden_bytes, ar_bw, ar_lat)
    if cal is not None:  # measured weights' part, plus attention's quadratic FLOPs (spec P19)
        attn = model.attn_flops_per_position * p * p / 2 / flops
        return stage.layers * (cal.prefill_layer_s + cal.prefill_token_layer_s * p + attn + reduce)
    layer_flops = p * model.layer_flops_per_token + model.attn_flops_per_position * p * p / 2
    per_layer = max(layer_flops / flops, model.layer_bytes / bandwidth)
    return stage.layers * (per_layer + reduce)


def decode_stage_s(topology: Topology, model: ModelSpec, stage: StagePlan, context_tokens: int) -> float:
    """Seconds for a stage to decode one token at ``context_tokens`` positions of KV."""
    flops, bandwidth, ar_bw, ar_lat = _group(topology, stage)
    c = context_tokens
    cal = _calibration(topology, model, stage)
    reduce = 2 * allreduce_s(len(stage.devices), model.hidden_bytes, ar_bw, ar_lat)
    if cal is not None:  # measured weights' part, plus reading the KV cache (spec P19)
        return stage.layers * (cal.decode_layer_s + model.kv_bytes_per_token_per_layer * c / bandwidth + reduce)
    layer_flops = model.layer_flops_per_token + model.attn_flops_per_position * c
    layer_bytes = model.read_bytes + model.kv_bytes_per_token_per_layer * c
    per_layer = max(layer_flops / flops, layer_bytes / bandwidth)
    return stage.layers * (per_layer + reduce)


def head_s(model: ModelSpec, flops: float, bandwidth_bytes_per_s: float) -> float:
    """Seconds for the LM head of one token (roofline; it is one large GEMV, which reaches it)."""
    return max(model.head_flops_per_token / flops, model.head_bytes / bandwidth_bytes_per_s)


def _head_s(topology: Topology, model: ModelSpec, stage: StagePlan) -> float:
    """The last stage's LM head: a device's own timing of it where its calibration for ``model``
    has one (spec P19), else the roofline. A tensor-parallel group computes it whole on every
    member (transformers' plans and mlx-lm's ``shard`` leave it unsplit), so it takes as long
    as on the slowest member."""
    def one(device: Device) -> float:
        cal = device.calibrated_for(model)
        if cal is not None and cal.head_s is not None:
            return cal.head_s
        return head_s(model, device.flops, device.memory_bandwidth_bytes_per_s)

    return max(one(topology.device(i)) for i in stage.devices)


def _hops_s(topology: Topology, stages: list[StagePlan], nbytes: float) -> float:
    return sum(topology.transfer_s(a.devices[-1], b.devices[0], nbytes) for a, b in zip(stages, stages[1:]))


def predict(plan: PlacementPlan, topology: Topology, model: ModelSpec, *, prompt_tokens: int,
            new_tokens: int = 256) -> Prediction:
    """TTFT, decode tokens/s (batch 1, at the mean context prompt + new/2) and end-to-end time
    of one request. Unreachable hops give inf; a plan missing a role raises PlacementError."""
    prefill, decode = plan.role_stages("prefill"), plan.role_stages("decode")
    for role, stages in (("prefill", prefill), ("decode", decode)):
        if sum(s.layers for s in stages) != model.num_layers:
            raise PlacementError(f"the {role} stages cover {sum(s.layers for s in stages)} of "
                                 f"{model.num_layers} layers")
    ttft = sum(prefill_stage_s(topology, model, s, prompt_tokens) for s in prefill)
    ttft += _hops_s(topology, prefill, prompt_tokens * model.hidden_bytes) + _head_s(topology, model, prefill[-1])
    context = prompt_tokens + new_tokens // 2
    step = sum(decode_stage_s(topology, model, s, context) for s in decode) + _head_s(topology, model, decode[-1])
    step += _hops_s(topology, decode, model.hidden_bytes)
    if len(decode) > 1 or len(decode[0].devices) > 1:  # the sampled token goes back to the first stage
        step += topology.transfer_s(decode[-1].devices[-1], decode[0].devices[0], 8)
    kv = 0.0
    if plan.disaggregated:
        # Each layer's KV leaves as soon as that layer is prefilled, so the transfer overlaps
        # the prefill (layer-wise KV streaming, as in DistServe and Splitwise). With L layers,
        # t_p prefill and t_k transfer per layer (uniform), the last KV lands at
        # t_p + t_k + (L - 1) max(t_p, t_k); what is exposed is that minus the prefill, L t_p.
        transfer = 0.0
        for layer in range(model.num_layers):
            src = next(s for s in prefill if s.layer_start <= layer < s.layer_end)
            dst = next(s for s in decode if s.layer_start <= layer < s.layer_end)
            transfer += topology.transfer_s(src.devices[0], dst.devices[0],
                                            prompt_tokens * model.kv_bytes_per_token_per_layer)
        layers = model.num_layers
        t_p = sum(prefill_stage_s(topology, model, s, prompt_tokens) for s in prefill) / layers
        t_k = transfer / layers
        kv = t_p + t_k + (layers - 1) * max(t_p, t_k) - layers * t_p
    rate = 1.0 / step if step > 0 else math.inf
    steps = max(0, new_tokens - 1)
    return Prediction(ttft_s=ttft, decode_tokens_per_s=rate, kv_transfer_s=kv,
                      e2e_s=ttft + kv + (steps * step if steps else 0.0))  # never 0 x inf


def memory_needed(plan: PlacementPlan, model: ModelSpec, *, context_tokens: int, prompt_tokens: int) -> dict[str, int]:
    """Bytes each device needs: its share of weights and of the KV cache (at the context for
    decode and both, at the prompt for prefill-only stages), embeddings on the first stage of
    each pipeline, the head on the last, hidden-state buffers for a prompt, plus a margin."""
    need: dict[str, float] = {}
    for role in ("prefill", "decode"):
        stages = plan.role_stages(role)
        for i, stage in enumerate(stages):
            if role == "decode" and stage.role == "both":
                continue  # counted once, under prefill
            k = len(stage.devices)
            tokens = prompt_tokens if stage.role == "prefill" else context_tokens
            weights = stage.layers * model.layer_bytes / k
            if i == 0:
                weights += model.embed_bytes
            if i == len(stages) - 1:
                weights += model.head_bytes
            kv = stage.layers * model.kv_bytes_per_token_per_layer * tokens / k
            buffers = ACTIVATION_BUFFERS * prompt_tokens * model.hidden_bytes
            for device in stage.devices:
                need[device] = need.get(device, 0.0) + weights * (1 + ACTIVATION_MARGIN) + kv + buffers
    return {d: math.ceil(v) for d, v in sorted(need.items())}
