"""Run a model through a list of in-process stages, as the runtime does over the network.

Used by the backend tests and the benchmark: no links, just the same step sequence (prefill
with the prompt, then one token per decode step) handed stage to stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backends.base import Backend
from mesh.errors import BackendError


def greedy_generate(stages: Sequence[Backend], prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from stages covering [0, L) in order (each with a fresh KV cache)."""
    caches = [s.new_cache() for s in stages]
    out: list[int] = []
    tokens, pos = list(prompt_ids), 0
    for _ in range(new_tokens):
        logits = step(stages, caches, tokens, pos)
        token = int(np.argmax(logits))
        out.append(token)
        pos += len(tokens)
        tokens = [token]
    return out


def step(stages: Sequence[Backend], caches: Sequence[object], tokens: list[int], pos: int) -> np.ndarray:
    """One prefill or decode step through every stage; returns the last stage's logits."""
    hidden = None
    result = None
    for stage, cache in zip(stages, caches):
        if stage.is_first:
            result = stage.forward(cache, start_pos=pos, token_ids=tokens)
        else:
            result = stage.forward(cache, start_pos=pos, hidden=hidden)
        hidden = result.hidden
    if result is None or result.logits is None:
        raise BackendError("the stages do not end with the last layer: no logits")
    return result.logits
