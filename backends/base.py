"""The compute backend contract: load a layer range, run prefill/decode steps with a KV cache.

A backend knows a model's math (through a well-kept library) and nothing of nodes, links or
plans. Every method here is blocking; the runtime calls them from a worker thread so the
event loop keeps serving heartbeats and HTTP. Spec: specs/backend.md.

The public step methods are template methods: ``forward``, ``export_kv`` and ``import_kv``
check their input here (spec B6, B10) and then call the subclass's ``_forward``,
``_export_kv`` and ``_import_kv``, so every backend, a third-party plugin's included, refuses
bad input with the same ``BackendError`` messages. The checks use the stage's dimensions
(``vocab_size``, ``hidden_size``, ``context_length``, ``kv_heads``, ``head_dim``); a
dimension left ``None`` is not checked.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.errors import BackendError
from mesh.models import Model
from mesh.wire import DTYPES, WireTensor

# progress(done, total): called while loading, from the loading thread.
Progress = Callable[[int, int], None]

HIDDEN_DTYPES = ("f32", "f16", "bf16")
# the smallest magnitude a float32 rounds to infinity from, when cast to this compute dtype
# (round to nearest even: the halfway point above the largest finite value)
_OVERFLOW: dict[str, float] = {
    "f16": 65520.0, "bf16": float(np.array([0x7F7F8000], dtype="<u4").view("<f4")[0])}


@dataclass(frozen=True, slots=True, kw_only=True)
class StepOutput:
    """What one stage returns for one step.

    ``hidden``: the hidden states for the next stage, f32 ``[1, n_tokens, hidden_size]``
    (None on the last stage). ``logits``: float32 ``[vocab_size]`` at the last position
    (only on the last stage).
    """

    hidden: WireTensor | None = None
    logits: np.ndarray | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchItem:
    """One request's part of a batched step (``Backend.forward_batch``): its KV cache, the
    first position, and ``token_ids`` (first stage) or ``hidden`` (later stages), as for
    ``Backend.forward``."""

    cache: Any
    start_pos: int
    token_ids: list[int] | None = None
    hidden: WireTensor | None = None

    @property
    def n_positions(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        return self.hidden.shape[1] if self.hidden is not None and len(self.hidden.shape) == 3 else 0


class StepLock:
    """The lock of a stage: ``with lock:`` holds it alone (loading, unloading, a backend whose
    steps are not re-entrant); ``with lock.shared():`` lets steps on different KV caches hold
    it together (``Backend.concurrent_steps``, spec B17), never beside a holder alone. Waiting
    sole holders go first, so a load is not starved by a stream of steps. Why not a library's:
    Python's ``threading`` has no reader-writer lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharing = 0  # holders of the shared side
        self._alone = False  # whether a sole holder holds it
        self._waiting = 0  # sole holders waiting

    def __enter__(self) -> StepLock:
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._alone and not self._sharing)
            finally:
                self._waiting -= 1
            self._alone = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._alone = False
            self._cond.notify_all()

    def shared(self) -> _Shared:
        return _Shared(self)


class _Shared:
    def __init__(self, lock: StepLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        lock = self.lock
        with lock._cond:
            lock._cond.wait_for(lambda: not lock._alone and not lock._waiting)
            lock._sharing += 1

    def __exit__(self, *exc: object) -> None:
        lock = self.lock
        with lock._cond:
            lock._sharing -= 1
            if not lock._sharing:
                lock._cond.notify_all()


class Backend(ABC):
    """One pipeline stage of a model: layers ``[layer_start, layer_end)``.

    The first stage (``layer_start == 0``) also holds the token embeddings; the last
    (``layer_end == num_layers``) the final norm and LM head.

    A subclass implements ``load``, ``new_cache`` and ``_forward``, and optionally
    ``_forward_batch`` (several requests' steps in one library call; the default runs them
    one after another),
    ``_export_kv`` / ``_import_kv`` (KV cache moves), ``_cached_positions`` (so the export
    range is checked against what a cache holds) and ``_drop_layers`` (what ``unload``
    frees). ``load`` sets the dimensions the checks use (``set_dimensions``).
    """

    name: str = ""
    # max abs logit difference from transformers' reference (f32, CPU) the conformance suite
    # allows (specs/backend.md B11); another library's kernels sum in another order
    logit_tolerance: float = 1e-3

    @property
    def concurrent_steps(self) -> bool:
        """Whether ``forward_batch`` may run on two threads at once, on different KV caches
        (spec B17): a stage's prefill lane computes prompt chunks beside its decode batches
        (specs/node.md N25). Default False: one step at a time."""
        return False

    def share_threads(self, lanes: int, *, lane: bool = False) -> None:
        """``lanes`` threads (1 or 2) compute this stage's steps now (spec B17), and this call
        comes from the thread about to compute: the prefill lane's (``lane``) or the stage's own.
        A backend whose kernels run on a pool of threads gives each its share of the cores, all
        of them to the stage's own thread alone. Default: nothing."""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run on this machine (a library it needs is not installed,
        with the command that installs it), or None. ``python -m mesh plugins`` shows it
        (spec R5); building the backend raises BackendError with the same reason."""
        return None

    @classmethod
    def gguf_kept_bits(cls, *, dtype: str, device: str | None) -> dict[str, float]:
        """Bits per weight (scales included) at which a stage of this backend, built with
        ``dtype`` and ``device`` and the default ``--quantize``, holds a GGUF file's matrices of
        each GGUF type it keeps quantized, e.g. ``{"Q4_1": 5.0}``; types not named are
        dequantized to ``dtype``. Placement sizes a GGUF model with it
        (``mesh.placement.planner.loaded_weight_bits``, spec P20). Default: none kept."""
        return {}

    def __init__(self) -> None:
        self.layer_start = 0
        self.layer_end = 0
        self.num_layers = 0
        # the stage's dimensions, checked by forward/import_kv; None: not known, not checked
        self.vocab_size: int | None = None
        self.hidden_size: int | None = None
        self.context_length: int | None = None  # positions must stay below it
        self.kv_heads: int | None = None
        self.head_dim: int | None = None
        self.compute_dtype: str | None = None  # f32, f16 or bf16: hidden states must fit it
        # one step at a time, and no step while (un)loading: libraries' modules and caches
        # are not re-entrant; a subclass takes it in its _forward / _export_kv / _import_kv
        # (its shared side where steps may run at once: ``concurrent_steps``, spec B17)
        self._lock = StepLock()

    @property
    def loaded(self) -> bool:
        return self.layer_end > self.layer_start

    @property
    def is_first(self) -> bool:
        return self.loaded and self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.loaded and self.layer_end == self.num_layers

    def set_dimensions(self, config: Any) -> None:
        """Take the checked dimensions from a transformers-style model config: ``vocab_size``,
        ``hidden_size``, ``max_position_embeddings`` (no limit when absent),
        ``num_key_value_heads`` (else ``num_attention_heads``) and ``head_dim`` (else
        hidden_size / num_attention_heads)."""
        heads = int(config.num_attention_heads)
        self.vocab_size = int(config.vocab_size)
        self.hidden_size = int(config.hidden_size)
        limit = getattr(config, "max_position_embeddings", None)
        self.context_length = int(limit) if limit is not None else None
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // heads)

    @abstractmethod
    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        """Load layers [layer_start, layer_end) (and embeddings / head where they belong).

        Reads only the tensors of that range. Raises BackendError (bad range) or ModelError.
        """

    def adopt_from(self, other: Backend) -> None:
        """Offer the layers of ``other`` (a loaded backend of the same class, device and dtype)
        to the next ``load``: layers both ranges share are reused instead of read again, their
        weights held once by both stages.

        The default does nothing (a backend that cannot share reloads everything). Call before
        ``load``. ``other`` keeps computing, also while ``load`` runs on another thread: a node
        changing plans serves the old stage until the new one is ready (make-before-break,
        spec B9, N21).
        """

    @abstractmethod
    def new_cache(self) -> Any:
        """A fresh, empty per-request KV cache for this stage's layers."""

    # -- KV cache moves (spec B10) ---------------------------------------------------------
    def export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        """The keys and values ``cache`` holds for positions [start_pos, end_pos), per layer of
        this stage: ``(global layer index, keys, values)``, each ``[1, kv_heads, n, head_dim]``
        in the compute dtype. For moving a request's KV cache between nodes (a replica, or
        prefill/decode disaggregation). Raises BackendError when nothing is loaded, for
        positions the cache does not hold, or when the backend cannot export (no
        ``_export_kv``)."""
        if type(self)._export_kv is Backend._export_kv:
            raise BackendError(f"the {self.name or type(self).__name__} backend cannot export KV caches")
        if not self.loaded:
            raise BackendError("no layers loaded")
        held = self._cached_positions(cache)
        if not 0 <= start_pos < end_pos or (held is not None and end_pos > held):
            holds = f" (it holds [0, {held}))" if held is not None else ""
            raise BackendError(f"positions [{start_pos}, {end_pos}) are not in the cache{holds}")
        return self._export_kv(cache, start_pos=start_pos, end_pos=end_pos)

    def import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        """Append ``export_kv`` output to ``cache``: every layer of this stage must be given,
        in order, each continuing at the position the cache has reached. Everything is
        checked before anything is appended. Raises BackendError when nothing is loaded, for a
        missing or foreign layer, keys and values that do not fit ``[1, kv_heads, n,
        head_dim]`` (both the same shape), or a backend that cannot import (no
        ``_import_kv``)."""
        if type(self)._import_kv is Backend._import_kv:
            raise BackendError(f"the {self.name or type(self).__name__} backend cannot import KV caches")
        if not self.loaded:
            raise BackendError("no layers loaded")
        given, want = [g for g, _, _ in layers], list(range(self.layer_start, self.layer_end))
        if given != want:
            raise BackendError(f"KV for layers {given} given; this stage needs {want}")
        heads = self.kv_heads if self.kv_heads is not None else "kv_heads"
        head_dim = self.head_dim if self.head_dim is not None else "head_dim"
        for g, keys, values in layers:
            k = keys.shape
            if (k != values.shape or len(k) != 4 or k[0] != 1 or (self.kv_heads is not None and k[1] != heads)
                    or (self.head_dim is not None and k[3] != head_dim)):
                raise BackendError(f"layer {g}: keys {list(k)} / values {list(values.shape)} do not "
                                   f"fit [1, {heads}, n, {head_dim}]")
        self._import_kv(cache, layers)

    def _cached_positions(self, cache: Any) -> int | None:
        """How many positions ``cache`` holds (export ranges must end there), or None when the
        backend does not say (its ``_export_kv`` then checks). May raise BackendError for a
        cache that is not this stage's."""
        return None

    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        """``export_kv`` after its checks: 0 <= start_pos < end_pos, inside the cache."""
        raise NotImplementedError  # never called: export_kv refuses first

    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        """``import_kv`` after its checks: every layer of this stage in order, shapes fit."""
        raise NotImplementedError  # never called: import_kv refuses first

    # -- compute ---------------------------------------------------------------------------
    def forward(
        self,
        cache: Any,
        *,
        start_pos: int,
        token_ids: list[int] | None = None,
        hidden: WireTensor | None = None,
    ) -> StepOutput:
        """Run this stage on ``n`` new positions ``start_pos .. start_pos+n-1``.

        The first stage takes ``token_ids`` (length n >= 1, integers in [0, vocab_size));
        later stages take ``hidden`` (f32/f16/bf16 ``[1, n, hidden_size]``, finite). Prefill
        is a call with the whole prompt, decode a call with one token. Appends the new
        keys/values to ``cache`` and returns ``hidden`` (not last stage) or float32
        ``logits`` ``[vocab_size]`` (last stage).

        Raises BackendError when nothing is loaded, on a wrong input kind, value or shape,
        or a position outside the context window (``_forward`` may refuse more, e.g. a
        ``start_pos`` that does not continue the cache).
        """
        if not self.loaded:
            raise BackendError("no layers loaded")
        self._check_step(start_pos, token_ids, hidden)
        return self._forward(cache, start_pos=start_pos, token_ids=token_ids, hidden=hidden)

    def _check_step(self, start_pos: int, token_ids: list[int] | None, hidden: WireTensor | None) -> None:
        """The checks of ``forward`` (spec B6); raises BackendError."""
        if self.layer_start == 0:
            if token_ids is None or hidden is not None or not token_ids:
                raise BackendError("the first stage takes token ids, not hidden states")
            n = len(token_ids)
            vocab = self.vocab_size
            # type() is int: a bool or a float holding an integer is not a token id
            if not all(type(t) is int and t >= 0 and (vocab is None or t < vocab) for t in token_ids):
                raise BackendError(f"token ids must be integers in [0, {vocab if vocab is not None else 'vocab'})")
        else:
            if hidden is None or token_ids is not None:
                raise BackendError("a later stage takes hidden states, not token ids")
            width = self.hidden_size
            if len(hidden.shape) != 3 or hidden.shape[0] != 1 or (width is not None and hidden.shape[2] != width):
                raise BackendError(f"hidden states must be [1, n, {width if width is not None else 'hidden'}], "
                                   f"got {list(hidden.shape)}")
            check_hidden_values(hidden, self.compute_dtype)
            n = hidden.shape[1]
        limit = self.context_length
        if start_pos < 0 or (limit is not None and start_pos + n > limit):
            raise BackendError(f"positions {start_pos}..{start_pos + n - 1} are outside the context window")

    def forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        """Run the steps of several requests at once (continuous batching, spec B16): item
        ``i`` is what ``forward(items[i].cache, start_pos=..., token_ids=... | hidden=...)``
        would run, each on its own KV cache and positions; decode steps (one position) and
        prefill chunks (several) mix in one batch.

        Returns one entry per item, in order: its ``StepOutput`` (hidden ``[1, n_i, hidden]``
        or float32 logits ``[vocab]`` at its last position), or the ``BackendError`` that
        refused it; an item refused by the checks of ``forward`` (B6), or that does not start
        where its cache ends (where the backend says, ``_cached_positions``), changes nothing
        and does not stop the others. One cache may be given several times, in order, each item
        starting where the one before it ends (consecutive prefill chunks of one prompt); an
        item after a refused or failed one of its cache is refused too. A request's results
        are the same alone or batched: greedy tokens identical, logits within the backend's
        ``logit_tolerance`` (bit-identical on the torch backend in bf16). An error of the
        batched call itself is every remaining item's error (their caches may have moved on:
        the requests start over, spec FO3).
        """
        results: list[StepOutput | BackendError | None] = [None] * len(items)
        valid: list[int] = []
        ends: dict[int, int | None] = {}  # cache -> where its last valid item ends (None: one was refused)
        for i, item in enumerate(items):
            try:
                if not self.loaded:
                    raise BackendError("no layers loaded")
                self._check_step(item.start_pos, item.token_ids, item.hidden)
                if id(item.cache) in ends:  # a later chunk of the same request: it continues the one before
                    if ends[id(item.cache)] != item.start_pos:
                        raise BackendError(f"the step starts at position {item.start_pos}; the batch's step before "
                                           f"it on the same KV cache ends at {ends[id(item.cache)]}")
                else:
                    held = self._cached_positions(item.cache)
                    if held is not None and held != item.start_pos:
                        raise BackendError(f"the step starts at position {item.start_pos}; its KV cache holds {held}")
            except BackendError as exc:
                results[i] = exc
                ends[id(item.cache)] = None  # the cache's later items cannot continue it
                continue
            ends[id(item.cache)] = item.start_pos + item.n_positions
            valid.append(i)
        if valid:
            try:
                outs = self._forward_batch([items[i] for i in valid])
                if len(outs) != len(valid):
                    raise BackendError(f"the batched step gave {len(outs)} results for {len(valid)} requests")
            except BackendError as exc:
                outs = [exc] * len(valid)
            for i, out in zip(valid, outs, strict=True):
                results[i] = out
        return results  # type: ignore[return-value]

    def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        """``forward_batch`` after its checks (every item valid; a cache's items in order, each
        continuing the one before). The default
        runs ``_forward`` on each item in turn (an item's BackendError is its result); a
        backend whose library batches overrides it."""
        out: list[StepOutput | BackendError] = []
        failed: set[int] = set()  # caches whose earlier item failed: their later items cannot run
        for item in items:
            if id(item.cache) in failed:
                out.append(BackendError("an earlier step of the batch on the same KV cache failed"))
                continue
            try:
                out.append(self._forward(item.cache, start_pos=item.start_pos, token_ids=item.token_ids,
                                         hidden=item.hidden))
            except BackendError as exc:
                out.append(exc)
                failed.add(id(item.cache))
        return out

    @abstractmethod
    def _forward(
        self,
        cache: Any,
        *,
        start_pos: int,
        token_ids: list[int] | None = None,
        hidden: WireTensor | None = None,
    ) -> StepOutput:
        """``forward`` after its checks: exactly one of ``token_ids`` (first stage) and
        ``hidden`` (later stages, finite f32/f16/bf16 ``[1, n, hidden_size]``) is given, and
        the positions lie inside the context window."""

    def run_head(self) -> None:
        """Run this last stage's final norm and LM head once on one all-zero position (compute
        dtype), results materialized, so calibration can time the part of a step that does not
        scale with the stage's layers (specs/placement.md P19).

        Raises BackendError when no last stage is loaded, NotImplementedError where a backend
        cannot run them alone (the default: calibration then keeps the cost model's estimate).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run its LM head alone")

    def _warm_up(self) -> None:
        """One step of two positions on a throwaway cache (zeros in ``compute_dtype``, else
        f32, on a later stage).

        The first forward pays one-off costs (kernel selection or compilation, allocator
        growth): a backend calls this at the end of ``load`` to pay them there rather than in
        the first request's time to first token."""
        cache = self.new_cache()
        if self.layer_start == 0:
            self.forward(cache, start_pos=0, token_ids=[0, 0])
        else:
            width, dtype = self.hidden_size or 0, self.compute_dtype or "f32"
            zeros = WireTensor(dtype=dtype, shape=(1, 2, width), data=bytes(2 * width * DTYPES[dtype][1]))
            self.forward(cache, start_pos=0, hidden=zeros)

    def unload(self) -> None:
        """Drop the layers (``_drop_layers``, under the lock); a step afterwards raises
        BackendError("no layers loaded")."""
        with self._lock:
            self._drop_layers()
            self.layer_start = self.layer_end = 0

    def _drop_layers(self) -> None:
        """Free what ``load`` built; called by ``unload`` with the lock held."""


def check_hidden_values(hidden: WireTensor, compute_dtype: str | None = None) -> None:
    """Raise BackendError unless ``hidden`` is f32, f16 or bf16 and holds only finite values,
    also once cast to ``compute_dtype`` (f32, f16 or bf16; None: not cast)."""
    if hidden.dtype not in HIDDEN_DTYPES:
        raise BackendError(f"hidden states must be f32, f16 or bf16, got {hidden.dtype}")
    values = as_float32(hidden)
    if not np.isfinite(values).all():
        raise BackendError("hidden states hold NaN or infinite values")
    limit = _OVERFLOW.get(compute_dtype or "")
    if limit is not None and values.size and float(np.abs(values).max()) >= limit:
        # a stage computing in a narrower dtype would turn them into infinities
        raise BackendError(f"hidden states hold NaN or infinite values once cast to {compute_dtype} "
                           f"(magnitudes must stay below {limit:g})")


def as_float32(tensor: WireTensor) -> np.ndarray:
    """The values of an f32, f16 or bf16 WireTensor as a float32 array of its shape (a copy
    for f16 and bf16)."""
    if tensor.dtype == "bf16":  # bf16 is the upper half of a float32
        bits = np.frombuffer(tensor.data, dtype="<u2").astype("<u4") << 16
        return bits.view("<f4").reshape(tensor.shape)
    if tensor.dtype not in ("f32", "f16"):
        raise BackendError(f"expected f32, f16 or bf16 values, got {tensor.dtype}")
    return np.frombuffer(tensor.data, dtype="<f4" if tensor.dtype == "f32" else "<f2").astype(np.float32).reshape(
        tensor.shape)


def source_has(source: Any, name: str) -> bool:
    """Whether a model's tensor source (``Model.tensor_source()``) holds tensor ``name``."""
    if hasattr(source, "has"):
        return bool(source.has(name))
    return name in source.names()


def check_range(layer_start: int, layer_end: int, num_layers: int) -> None:
    """Raise BackendError unless 0 <= layer_start < layer_end <= num_layers."""
    if not 0 <= layer_start < layer_end <= num_layers:
        raise BackendError(
            f"layer range [{layer_start}, {layer_end}) is invalid for a {num_layers}-layer model; "
            f"need 0 <= start < end <= {num_layers}"
        )
