"""Batched steps for the torch backend: several requests' new positions in one forward of
transformers' model, each request on its own ``DynamicCache`` (spec B16).

The positions of all requests in a batch are laid end to end as one sequence ``[1, T]``
(decode steps and prefill chunks alike), so every linear layer, norm and MLP runs once over
the T rows; attention, the only place where requests must not see each other, runs per
request: a ``RaggedCache`` hands each request's slice of the new keys and values to that
request's own cache (``DynamicCache.update``, as a lone step would) and an attention function
registered with transformers' ``AttentionInterface`` calls transformers' own
``sdpa_attention_forward`` once per request, on its query rows and its whole cache, with the
mask a lone step of that shape gets. This is the layout of transformers' continuous-batching
engine (sequences packed into one row, attention per sequence), built from the model classes
the stage already holds; transformers' ``PagedAttentionCache`` owns its memory for one whole
model and scheduler, which a pipeline stage serving requests that come and go cannot adopt.

Every step of a stage that packs runs this way, one request alone included, so a request's
results do not depend on the batch it lands in: in bf16 on a CPU its logits are bit-identical
in any batch (the linears' kernels give a row the same result at any row count); in f32 MKL
picks other kernels for one row than for several, and logits move by about 1e-4.

Only models whose layers all attend fully, with transformers' ``sdpa`` attention, batch this
way; sliding-window layers (gemma3, gpt-oss) and multi-head latent attention (deepseek, whose
cache holds latents that the layer expands after it) keep the one-at-a-time default.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from backends.base import BatchItem, StepOutput
from backends.torch_wire import tensor_to_wire, wire_to_tensor
from mesh.errors import BackendError

RAGGED = "mesh_ragged"  # the attention implementation's name while a batched forward runs
GROW_POSITIONS = 256  # a request's KV buffers grow by this many positions at a time (GrowingLayer)
SHORT_KEYS = 256  # decode rows over at most this many keys attend in one call, padded to it (_decode_rows)


def can_batch(config: Any) -> bool:
    """Whether a stage of ``config`` batches by packing: sdpa attention and no sliding-window
    or other non-full attention layer."""
    if getattr(config, "_attn_implementation", None) not in ("sdpa", RAGGED):
        return False
    if getattr(config, "kv_lora_rank", None):  # MLA (deepseek): the cache holds latents, expanded after it
        return False
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return all(kind == "full_attention" for kind in kinds)
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


def _cache_class() -> type:
    from transformers.cache_utils import Cache

    class RaggedCache(Cache):  # type: ignore[misc]
        """The caches of a packed batch: ``update`` splits the new keys/values (``[1, kv_heads,
        T, head_dim]``) by request and appends each slice to that request's cache; the
        attention function reads each request's whole keys/values from ``kv``."""

        def __init__(self, caches: list[Any], sizes: list[int], scratch: _Scratch) -> None:  # noqa: D107 - no Cache.__init__: no layers of its own
            self.caches, self.sizes, self.scratch = caches, sizes, scratch
            self.layers: list[Any] = []
            self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
            self._plan: _DecodePlan | None = None

        def decode_plan(self, device: torch.device) -> _DecodePlan:
            """The batch's ``_DecodePlan``, made at the first layer (every layer's is the same)."""
            if self._plan is None:
                self._plan = _DecodePlan([k.shape[2] for k, _ in self.kv], self.sizes, device)
            return self._plan

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.kv, at = [], 0
            for cache, n in zip(self.caches, self.sizes, strict=True):
                self.kv.append(cache.update(key_states[:, :, at:at + n], value_states[:, :, at:at + n], layer_idx))
                at += n
            return key_states, value_states

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0

    return RaggedCache


def _growing_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[misc]
        """One layer of a request's KV cache that appends in place: transformers' ``DynamicLayer``
        concatenates the whole cache with the new positions on every update (a copy of all of it
        per step and per prefill chunk, 10 % of an 8-request decode step here); this one keeps
        ``[1, kv_heads, capacity, head_dim]`` buffers grown ``GROW_POSITIONS`` at a time, and
        ``keys``/``values`` are views of their filled part, so everything that reads a
        ``DynamicLayer`` (attention, ``get_seq_length``, KV export) reads it unchanged. Whoever
        assigns ``keys``/``values`` directly (``crop``, ``reset``) is followed: the next update
        starts new buffers from them."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            buf = getattr(self, "_buffers", None)
            held = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
            if buf is not None and not (held and self.keys.data_ptr() == buf[0].data_ptr()
                                        and held == self._filled):
                buf = None  # keys/values were replaced from outside: start over from them
            if buf is None and held == 0:
                self._filled = 0
            need = held + key_states.shape[-2]
            if buf is None or need > buf[0].shape[-2]:
                room = -(-need // GROW_POSITIONS) * GROW_POSITIONS
                grown = []
                for old, new in ((self.keys, key_states), (self.values, value_states)):
                    b = new.new_empty(new.shape[0], new.shape[1], room, new.shape[3])
                    if held:
                        b[:, :, :held] = old
                    grown.append(b)
                buf = self._buffers = (grown[0], grown[1])
            buf[0][:, :, held:need] = key_states
            buf[1][:, :, held:need] = value_states
            self._filled = need
            self.keys, self.values = buf[0][:, :, :need], buf[1][:, :, :need]
            return self.keys, self.values

    return GrowingLayer


_RAGGED_CACHE: type | None = None
_GROWING_LAYER: type | None = None


def new_packed_cache(config: Any) -> Any:
    """A ``DynamicCache`` for a stage that packs (``can_batch``), its layers ``GrowingLayer``s."""
    from transformers import DynamicCache

    _register()
    cache = DynamicCache(config=config)
    cache.layers = [_GROWING_LAYER() for _ in cache.layers]  # type: ignore[misc]
    return cache


def _ragged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention per request of a packed batch: ``query`` ``[1, heads, T, head_dim]``; each
    request's rows attend to its own cache with the mask its lone step would get (none for
    one position or a prefill from position 0, causal from its offset otherwise)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = kwargs.pop(RAGGED, None)
    if packed is None:  # called outside forward_packed: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs: list[torch.Tensor | None] = [None] * len(packed.sizes)
    if _plain_math(kwargs):
        _decode_rows(query, packed, kwargs.get("scaling"), outs)
    at = 0
    for row, ((keys, values), n) in enumerate(zip(packed.kv, packed.sizes, strict=True)):
        if outs[row] is not None:
            at += n
            continue
        past = keys.shape[2] - n
        mask = None
        if n > 1 and past > 0:
            rows = torch.arange(n, device=keys.device).unsqueeze(1) + past
            mask = (torch.arange(past + n, device=keys.device).unsqueeze(0) <= rows)[None, None]
        if mask is not None and _plain(module, kwargs):
            # a chunk after cached positions: transformers' sdpa path copies every KV head group
            # (``repeat_kv``) whenever a mask is given on a CPU, which re-reads the whole cache
            # three times over per chunk on a GQA model; torch's own sdpa takes the groups as
            # they are (``enable_gqa``) with the same mask, 3-4x faster for a small chunk deep
            # in a long prompt here
            out = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, at:at + n], keys, values, attn_mask=mask, scale=kwargs.get("scaling"),
                enable_gqa=True).transpose(1, 2).contiguous()
        else:
            out, _ = sdpa_attention_forward(module, query[:, :, at:at + n], keys, values, mask, **kwargs)
        outs[row] = out
        at += n
    return torch.cat(outs, dim=1), None  # type: ignore[arg-type]


def _decode_rows(query: torch.Tensor, packed: Any, scaling: float | None, outs: list[torch.Tensor | None]) -> None:
    """Attention of the batch's decode rows (one new position each), written into ``outs``
    (``[1, 1, heads, head_dim]`` per row): those with at most ``SHORT_KEYS`` keys in one call
    over their caches copied into ``SHORT_KEYS`` positions (the rest masked out), the others
    one call each.

    This is transformers' eager attention (``eager_attention_forward``: ``q @ k^T * scaling``,
    softmax in f32, back to the compute dtype, ``@ v``) with the query's heads grouped by KV
    head instead of the KV heads copied (``repeat_kv``). Why not torch's fused sdpa: on a CPU
    in bf16 its flash kernel packs the whole cache on every call, which for one query is most
    of the work: 124 us per call over 140 keys and 2.25 ms over 4,000, against 77 us and
    0.24 ms here; and one call over several requests' padded caches makes a step of 8 short
    requests one call per layer instead of 8 (270 us against 1 ms; AMD EPYC 2 cores, torch
    2.13, SmolLM2-135M's 9 heads over 3 KV heads, 2026-12-06). Padding decides nothing: a
    request's row is computed over the same ``SHORT_KEYS`` positions alone or with others, and
    a batched matmul gives each matrix the result it gets alone, so a request's logits stay
    bit-identical in any batch (B16)."""
    plan = packed.decode_plan(query.device)
    for row, at in plan.long:
        keys, values = packed.kv[row]
        outs[row] = _gqa_attention(query[:, :, at:at + 1], keys, values, None, scaling)
    if not plan.short:
        return
    b = len(plan.short)
    keys, values = packed.scratch.rows(b, packed.kv[plan.short[0]][0], [packed.kv[row][0].shape[2] for row in plan.short])
    for i, row in enumerate(plan.short):
        k, v = packed.kv[row]
        keys[i, :, :k.shape[2]], values[i, :, :k.shape[2]] = k[0], v[0]
    rows = query.index_select(2, plan.index).transpose(0, 2)  # [b, heads, 1, head_dim]
    out = _gqa_attention(rows, keys, values, plan.mask, scaling)
    for i, row in enumerate(plan.short):
        outs[row] = out[i:i + 1]


class _DecodePlan:
    """Which rows of a packed batch are decode rows and how they attend; the same for every
    layer of one forward. ``short``: rows over at most ``SHORT_KEYS`` keys, with ``index`` (their
    query positions in the packed sequence) and ``mask`` (f32 ``[b, 1, 1, SHORT_KEYS]``, ``-inf``
    past each row's keys); ``long``: ``(row, position)`` of the others."""

    def __init__(self, lengths: list[int], sizes: list[int], device: torch.device) -> None:
        starts = np.cumsum([0] + sizes)
        self.short = [row for row, (n, length) in enumerate(zip(sizes, lengths, strict=True))
                      if n == 1 and length <= SHORT_KEYS]
        self.long = [(row, int(starts[row])) for row, (n, length) in enumerate(zip(sizes, lengths, strict=True))
                     if n == 1 and length > SHORT_KEYS]
        self.index = torch.tensor([int(starts[row]) for row in self.short], dtype=torch.long, device=device)
        self.mask = torch.full((len(self.short), 1, 1, SHORT_KEYS), float("-inf"), device=device)
        for i, row in enumerate(self.short):
            self.mask[i, ..., :lengths[row]] = 0.0


class _Scratch:
    """Reused ``[rows, kv_heads, SHORT_KEYS, head_dim]`` key and value buffers for the short
    decode rows (allocating and zeroing them per layer cost more than the attention). Positions
    past what a row holds now are zeros, never another request's keys, so nothing one request
    computed (an overflow to inf or NaN included) reaches another through the padding."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.filled: list[int] = []

    def rows(self, b: int, like: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (b, like.shape[1], SHORT_KEYS, like.shape[3])
        if (self.keys is None or self.keys.shape[0] < b or self.keys.shape[1:] != shape[1:]
                or self.keys.dtype != like.dtype or self.keys.device != like.device):
            self.keys = like.new_zeros(max(b, 8), *shape[1:])
            self.values = like.new_zeros(max(b, 8), *shape[1:])
            self.filled = [0] * self.keys.shape[0]
        assert self.values is not None
        for i, length in enumerate(lengths):
            if length < self.filled[i]:
                self.keys[i, :, length:self.filled[i]] = 0
                self.values[i, :, length:self.filled[i]] = 0
            self.filled[i] = length
        return self.keys[:b], self.values[:b]


def _gqa_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float | None) -> torch.Tensor:
    """One query position per batch row: ``query`` ``[b, heads, 1, head_dim]``, ``keys`` and
    ``values`` ``[b, kv_heads, length, head_dim]``, ``mask`` ``None`` or f32 ``[b, 1, 1, length]``
    added to the scores (``-inf`` for padding); heads ``h`` of KV head ``h // (heads / kv_heads)``
    as in transformers' ``repeat_kv``. Returns ``[b, 1, heads, head_dim]`` in the query's dtype."""
    b, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    scores = torch.matmul(query.reshape(b, kv_heads, heads // kv_heads, dim), keys.transpose(2, 3))
    scores = scores * (dim ** -0.5 if scaling is None else scaling)
    scores = scores.float() if mask is None else scores.float() + mask
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, values).reshape(b, heads, 1, dim).transpose(1, 2)


def _plain_math(kwargs: dict[str, Any]) -> bool:
    """Whether an attention call is plain scaled dot-product attention (no soft cap, position
    bias, attention sinks or dropout)."""
    return (not kwargs.get("dropout") and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and kwargs.get("s_aux") is None and kwargs.get("sinks") is None)


def _plain(module: Any, kwargs: dict[str, Any]) -> bool:
    """Whether an attention call is plain scaled dot-product attention over KV head groups,
    which torch's sdpa computes as it is."""
    return getattr(module, "num_key_value_groups", 1) > 1 and _plain_math(kwargs)


_registered = False


def _register() -> None:
    global _registered, _RAGGED_CACHE, _GROWING_LAYER
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(RAGGED, _ragged_attention)
        _RAGGED_CACHE = _cache_class()
        _GROWING_LAYER = _growing_layer()
        _registered = True


def use_packing(stage: Any) -> None:
    """Make every attention module of ``stage`` (a transformers model whose config passed
    ``can_batch``) call the per-request attention: its config, and those of layers adopted from
    another stage (``Backend.adopt_from``: they keep their donor's config object), name it."""
    _register()
    for config in {id(m.config): m.config for m in stage.modules() if hasattr(m, "config")}.values():
        config._attn_implementation = RAGGED


def forward_packed(backend: Any, items: list[BatchItem]) -> list[StepOutput | BackendError]:
    """One forward of ``backend``'s stage module over every item's new positions (see the
    module docstring); called with the backend's lock held, after ``forward_batch``'s checks."""
    _register()
    model, device, dtype = backend._model, backend.device, backend.dtype
    run = list(range(len(items)))
    chosen = items
    results: list[StepOutput | BackendError | None] = [None] * len(items)
    sizes = [item.n_positions for item in chosen]
    positions = torch.cat([torch.arange(it.start_pos, it.start_pos + n) for it, n in zip(chosen, sizes, strict=True)])
    lanes = backend.__dict__.setdefault("_decode_scratch", threading.local())  # one per thread: steps may run
    scratch = lanes.__dict__.setdefault("scratch", _Scratch())  # on two at once (spec B17)
    packed = _RAGGED_CACHE([it.cache for it in chosen], sizes, scratch)  # type: ignore[misc]
    kwargs: dict[str, Any] = {backend._cache_kw: packed, "use_cache": True, RAGGED: packed,
                              "position_ids": positions.unsqueeze(0).to(device),
                              # a prepared 4D mask is taken as it is; the ragged attention makes its own
                              "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)}
    if backend.layer_start == 0:
        ids = [t for it in chosen for t in it.token_ids]
        kwargs["input_ids"] = torch.tensor([ids], dtype=torch.long, device=device)
    else:
        kwargs["inputs_embeds"] = torch.cat([wire_to_tensor(it.hidden).to(device, dtype) for it in chosen], dim=1)
    try:
        hidden = model.model(**kwargs).last_hidden_state
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise BackendError(f"the batched step of {len(chosen)} requests failed: {exc}") from exc
    ends = np.cumsum(sizes)
    if backend.layer_end < backend.num_layers:
        for i, end, n in zip(run, ends, sizes, strict=True):
            results[i] = StepOutput(hidden=tensor_to_wire(hidden[:, end - n:end]))
    else:
        logits = model.lm_head(hidden[0, torch.as_tensor(ends - 1)]).float().cpu().numpy()
        for row, i in enumerate(run):
            results[i] = StepOutput(logits=np.ascontiguousarray(logits[row], dtype=np.float32))
    return results  # type: ignore[return-value]
