"""Pick the next token from logits: greedy, temperature and nucleus (top-p) sampling.

Backend-independent (NumPy on float32 logits) so every backend samples the same way.
Randomness is a pure function of (seed, step): token k of a seeded request is drawn from
``numpy.random.default_rng([seed, k])``, so a request rebuilt elsewhere after a failure
draws the same tokens. Spec: specs/backend.md (B7).
"""

from __future__ import annotations

import numpy as np

from mesh.runtime.engine import Sampled, SamplingParams

MIN_TEMPERATURE = 1e-4  # temperatures in (0, 1e-4) sample like 0 (greedy)


def with_logprobs(logits: np.ndarray, token: int, top: int) -> Sampled:
    """``token`` with its log probability and the ``top`` most likely tokens (spec A26).

    Log-softmax of the raw float32 ``[vocab_size]`` logits in float64; ties among the top
    tokens go to the lowest id. The same logits give the same numbers wherever the last stage
    runs."""
    scaled = logits.astype(np.float64)
    scaled -= scaled.max()
    logprobs = scaled - np.log(np.exp(scaled).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        order = np.argsort(-logprobs, kind="stable")[:top]
        best = tuple((int(i), float(logprobs[i])) for i in order)
    return Sampled(token, float(logprobs[token]), best)


def sample(logits: np.ndarray, params: SamplingParams, *, step: int, request_seed: int) -> int:
    """Return the next token id.

    Args:
        logits: float32 ``[vocab_size]`` scores at the last position.
        params: temperature 0 (or below 1e-4) -> argmax (ties go to the lowest id); else softmax of
            logits / temperature, cut to the smallest set whose mass >= top_p
            (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration").
        step: index of the token being generated (0 for the first).
        request_seed: ``params.seed`` if given, else a per-request random seed chosen once.
    """
    if params.temperature < MIN_TEMPERATURE:
        return int(np.argmax(logits))  # below this, softmax(logits / t) is argmax (or overflows)
    scaled = logits.astype(np.float64) / params.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = int(np.searchsorted(cumulative, params.top_p) + 1)
        kept = order[:keep]
        mass = probs[kept] / probs[kept].sum()
        rng = np.random.default_rng([request_seed & 0xFFFFFFFFFFFFFFFF, step])
        return int(kept[rng.choice(len(kept), p=mass)])
    rng = np.random.default_rng([request_seed & 0xFFFFFFFFFFFFFFFF, step])
    return int(rng.choice(len(probs), p=probs))
