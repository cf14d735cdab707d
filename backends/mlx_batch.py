"""Batched decode steps for the MLX backend (spec B16): the decode steps of several requests
in one call of mlx-lm's model with its own batched cache. Each layer's ``KVCache`` of the
requests is merged into a left-padded ``BatchKVCache`` (mlx-lm's ``BatchKVCache.merge``, the
layout of its ``BatchGenerator``; the cache's mask hides the padding), and each request's row
is taken back (``extract``) after the step. Logits stay within the backend's tolerance of a
lone step (the padding changes the attention's summation order)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from backends.base import BatchItem, StepOutput
from backends.mlx_wire import array_to_wire, wire_to_array
from mesh.errors import BackendError


def forward_decode_rows(backend: Any, items: list[BatchItem]) -> list[StepOutput | BackendError | None]:
    """Run the decode steps among ``items`` (one position each, on plain ``KVCache`` layers,
    their cache given once) as one call of ``backend``'s (an ``MlxBackend``) stage when there
    are at least two. Returns one entry per item: its output where it ran here, None for the
    items the caller runs one after another, in order (prefill chunks, a prompt's consecutive
    chunks on one cache, caches of other kinds: rotating, hybrid). Raises BackendError when the
    backend holds no layers."""
    from mlx_lm.models.cache import BatchKVCache, KVCache

    uses = Counter(id(it.cache) for it in items)  # a cache given twice runs its items in turn, in order
    decode = [i for i, it in enumerate(items) if it.n_positions == 1 and uses[id(it.cache)] == 1
              and all(type(c) is KVCache and c.keys is not None for c in it.cache)]
    results: list[StepOutput | BackendError | None] = [None] * len(items)
    if len(decode) >= 2:
        with backend._lock:
            stage = backend._model
            if stage is None:
                raise BackendError("no layers loaded")
            mx = backend._mx
            with mx.stream(backend._device):
                rows = [items[i] for i in decode]
                inputs = embeds = None
                if rows[0].token_ids is not None:
                    inputs = mx.array([it.token_ids for it in rows], dtype=mx.int32)
                else:
                    embeds = mx.concatenate([wire_to_array(it.hidden, backend.dtype) for it in rows], axis=0)
                merged = [BatchKVCache.merge([it.cache[layer] for it in rows]) for layer in range(len(rows[0].cache))]
                out = backend._run(stage, inputs, embeds, merged)
                if backend.layer_end < backend.num_layers:
                    out = out.astype(backend.dtype)
                else:
                    out = backend._head(stage)(out[:, -1, :]).astype(mx.float32)
                for row, it in enumerate(rows):
                    for layer, batched in enumerate(merged):
                        it.cache[layer] = batched.extract(row)
                mx.eval(out, [c.state for it in rows for c in it.cache])
                for row, i in enumerate(decode):
                    results[i] = (StepOutput(hidden=array_to_wire(out[row:row + 1]))
                                  if backend.layer_end < backend.num_layers
                                  else StepOutput(logits=np.array(out[row], dtype=np.float32)))
    return results
