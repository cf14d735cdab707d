"""Sampling: greedy, seeded reproducibility, nucleus cut."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ApiError
from mesh.runtime.engine import SamplingParams
from mesh.runtime.sampling import sample, with_logprobs


@pytest.mark.spec("B7")
def test_greedy_is_argmax_lowest_on_ties() -> None:
    logits = np.array([0.1, 3.0, 3.0, -1.0], dtype=np.float32)
    assert sample(logits, SamplingParams(max_tokens=1, temperature=0.0), step=0, request_seed=1) == 1


@pytest.mark.spec("B7")
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(min_value=-(2**63), max_value=2**63 - 1), step=st.integers(min_value=0, max_value=10**6),
       top_p=st.floats(min_value=0.05, max_value=1.0), temperature=st.floats(min_value=0.1, max_value=2.0))
def test_seeded_sampling_is_a_function_of_seed_and_step(seed: int, step: int, top_p: float, temperature: float) -> None:
    logits = np.random.default_rng(7).normal(size=500).astype(np.float32)
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
    assert sample(logits, params, step=step, request_seed=seed) == sample(logits, params, step=step, request_seed=seed)


@pytest.mark.spec("B7")
def test_top_p_keeps_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8)
    drawn = {sample(logits, params, step=k, request_seed=3) for k in range(400)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    wide = {sample(logits, SamplingParams(max_tokens=1, temperature=1.0), step=k, request_seed=3) for k in range(400)}
    assert wide == {0, 1, 2, 3}


@pytest.mark.spec("B7")
def test_bad_params_are_api_errors() -> None:
    for kwargs in ({"max_tokens": 0}, {"max_tokens": 1, "temperature": 2.5}, {"max_tokens": 1, "top_p": 0.0}):
        with pytest.raises(ApiError):
            SamplingParams(**kwargs)


@pytest.mark.spec("B7")
def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    """Regression: temperature 5e-324 overflowed logits / t to inf and sampled from NaNs."""
    logits = np.array([0.5, 2.0, 1.0], dtype=np.float32)
    assert sample(logits, SamplingParams(max_tokens=1, temperature=5e-324), step=0, request_seed=1) == 1


@pytest.mark.spec("A26")
@given(st.lists(st.floats(-30, 30, allow_nan=False), min_size=2, max_size=40), st.integers(0, 20), st.data())
def test_logprobs_are_the_log_softmax_of_the_logits(values: list[float], top: int, data: st.DataObject) -> None:
    logits = np.asarray(values, dtype=np.float32)
    token = data.draw(st.integers(0, len(values) - 1))
    got = with_logprobs(logits, token, top)
    exact = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) - logits.max()
    assert int(got) == token and got.logprob == pytest.approx(exact[token], abs=1e-9)
    assert len(got.top) == min(top, len(values))
    assert [lp for _, lp in got.top] == sorted((lp for _, lp in got.top), reverse=True)
    if got.top:
        assert got.top[0][1] == pytest.approx(exact.max(), abs=1e-9)
        assert got.top[0][0] == int(np.argmax(logits))  # ties to the lowest id, as greedy sampling
    assert with_logprobs(logits, token, top).top == got.top  # a function of the logits alone
