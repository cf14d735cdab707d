"""An example mesh backend plugin: ``TimedBackend`` runs another registered backend (torch by
default, or the one named in ``MESH_TIMED_INNER``) and keeps how long each prefill and decode
step took, logging a summary every 100 steps.

It shows the whole contract of ``backends.base.Backend`` a plugin implements: ``load`` a layer
range, ``new_cache`` per request, ``_forward`` a step (token ids on the first stage, hidden
states on the others; hidden states out, or logits on the last stage), optionally
``_export_kv`` / ``_import_kv`` (KV cache moves) and ``adopt_from`` (layer reuse), and
``BackendError`` for bad input. The base class checks the input of ``forward``, ``export_kv``
and ``import_kv`` before it calls the underscore methods; here the inner backend, which knows
the model's dimensions, checks it again in full. The conformance suite
(``mesh.testing.conformance``) checks it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from backends.base import Backend, Progress, StepOutput
from mesh import registry
from mesh.errors import BackendError
from mesh.models import Model
from mesh.wire import WireTensor

log = logging.getLogger(__name__)


class TimedBackend(Backend):
    """Times the steps of an inner backend. ``timings``: ``{"prefill": [s, ...], "decode": [s, ...]}``.

    Args:
        device, dtype: passed to the inner backend (``--device``, ``--dtype``).
    """

    name = "timed"

    def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
        super().__init__()
        inner_name = os.environ.get("MESH_TIMED_INNER", "torch")
        if inner_name == self.name:
            raise BackendError("MESH_TIMED_INNER cannot name the timed backend itself")
        options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.inner: Backend = registry.load("backend", inner_name, expected=Backend)(**options)
        self.logit_tolerance = self.inner.logit_tolerance
        self.timings: dict[str, list[float]] = {"prefill": [], "decode": []}

    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        self.inner.load(model, layer_start, layer_end, progress)
        self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, self.inner.num_layers

    def adopt_from(self, other: Backend) -> None:
        if isinstance(other, TimedBackend):
            self.inner.adopt_from(other.inner)

    def new_cache(self) -> Any:
        return self.inner.new_cache()

    def _forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                hidden: WireTensor | None = None) -> StepOutput:
        started = time.perf_counter()
        out = self.inner.forward(cache, start_pos=start_pos, token_ids=token_ids, hidden=hidden)
        n = len(token_ids) if token_ids is not None else (hidden.shape[1] if hidden is not None else 0)
        kind = "prefill" if n > 1 else "decode"
        self.timings[kind].append(time.perf_counter() - started)
        steps = len(self.timings["prefill"]) + len(self.timings["decode"])
        if steps % 100 == 0:
            log.info("timed backend, layers [%d, %d): %s", self.layer_start, self.layer_end, self.summary())
        return out

    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        return self.inner.export_kv(cache, start_pos=start_pos, end_pos=end_pos)

    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        self.inner.import_kv(cache, layers)

    def unload(self) -> None:
        self.inner.unload()
        super().unload()

    def summary(self) -> str:
        """Steps and mean milliseconds per step, by kind."""
        parts = []
        for kind, times in self.timings.items():
            if times:
                parts.append(f"{kind} {len(times)} steps, {1000 * sum(times) / len(times):.1f} ms each")
        return "; ".join(parts) or "no steps yet"
