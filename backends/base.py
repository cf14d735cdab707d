"""The compute backend contract: load a layer range, run prefill/decode steps with a KV cache.

A backend knows a model's math (through a well-kept library) and nothing of nodes, links or
plans. Every method here is blocking; the runtime calls them from a worker thread so the
event loop keeps serving heartbeats and HTTP. Spec: specs/backend.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.errors import BackendError
from mesh.models import Model
from mesh.wire import WireTensor

# progress(done, total): called while loading, from the loading thread.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepOutput:
    """What one stage returns for one step.

    ``hidden``: the hidden states for the next stage, f32 ``[1, n_tokens, hidden_size]``
    (None on the last stage). ``logits``: float32 ``[vocab_size]`` at the last position
    (only on the last stage).
    """

    hidden: WireTensor | None = None
    logits: np.ndarray | None = None


class Backend(ABC):
    """One pipeline stage of a model: layers ``[layer_start, layer_end)``.

    The first stage (``layer_start == 0``) also holds the token embeddings; the last
    (``layer_end == num_layers``) the final norm and LM head.
    """

    name: str = ""
    # max abs logit difference from transformers' reference (f32, CPU) the conformance suite
    # allows (specs/backend.md B11); another library's kernels sum in another order
    logit_tolerance: float = 1e-3

    def __init__(self) -> None:
        self.layer_start = 0
        self.layer_end = 0
        self.num_layers = 0

    @property
    def loaded(self) -> bool:
        return self.layer_end > self.layer_start

    @property
    def is_first(self) -> bool:
        return self.loaded and self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.loaded and self.layer_end == self.num_layers

    @abstractmethod
    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        """Load layers [layer_start, layer_end) (and embeddings / head where they belong).

        Reads only the tensors of that range. Raises BackendError (bad range) or ModelError.
        """

    def adopt_from(self, other: Backend) -> None:
        """Offer the layers of ``other`` (a loaded backend of the same class, device and dtype,
        about to be replaced) to the next ``load``: layers both ranges share are reused instead
        of read again.

        The default does nothing (a backend that cannot share reloads everything). Call before
        ``load``; ``other`` must not be used for compute afterwards.
        """

    @abstractmethod
    def new_cache(self) -> Any:
        """A fresh, empty per-request KV cache for this stage's layers."""

    def export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        """The keys and values ``cache`` holds for positions [start_pos, end_pos), per layer of
        this stage: ``(global layer index, keys, values)``, each ``[1, kv_heads, n, head_dim]``
        in the compute dtype. For moving a request's KV cache between nodes (a replica, or
        prefill/decode disaggregation). Raises BackendError for positions the cache does not
        hold, or when the backend cannot export (the default)."""
        raise BackendError(f"the {self.name or type(self).__name__} backend cannot export KV caches")

    def import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        """Append ``export_kv`` output to ``cache``: every layer of this stage must be given,
        each continuing at the position the cache has reached. Raises BackendError for a
        missing or foreign layer, a shape or dtype that does not fit, or (the default) a
        backend that cannot import."""
        raise BackendError(f"the {self.name or type(self).__name__} backend cannot import KV caches")

    @abstractmethod
    def forward(
        self,
        cache: Any,
        *,
        start_pos: int,
        token_ids: list[int] | None = None,
        hidden: WireTensor | None = None,
    ) -> StepOutput:
        """Run this stage on ``n`` new positions ``start_pos .. start_pos+n-1``.

        The first stage takes ``token_ids`` (length n); later stages take ``hidden``
        (f32/f16/bf16 ``[1, n, hidden_size]``). Prefill is a call with the whole prompt,
        decode a call with one token. Appends the new keys/values to ``cache``.

        Raises BackendError on a wrong input kind, shape, or a position past the context.
        """

    def unload(self) -> None:
        self.layer_start = self.layer_end = 0


def check_range(layer_start: int, layer_end: int, num_layers: int) -> None:
    """Raise BackendError unless 0 <= layer_start < layer_end <= num_layers."""
    if not 0 <= layer_start < layer_end <= num_layers:
        raise BackendError(
            f"layer range [{layer_start}, {layer_end}) is invalid for a {num_layers}-layer model; "
            f"need 0 <= start < end <= {num_layers}"
        )
