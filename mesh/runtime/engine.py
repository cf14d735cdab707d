"""What the HTTP API needs from the cluster: the ``Engine`` protocol and sampling params.

The API (``mesh/api/app.py``) depends only on this module, so it can be tested against a
fake engine; ``mesh/runtime/coordinator.py`` provides the real one. Spec: specs/api.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mesh.errors import ApiError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_SCHEMA_CHARS = 256 * 1024  # a JSON schema travels with every step of its request (spec A27)
_GRAMMAR_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no run of whitespace to wander into


def schema_grammar(schema_text: str) -> str:
    """The llguidance grammar of a JSON schema (its JSON text). Raises ApiError 400 (param
    ``response_format``) naming the problem when the schema cannot be compiled. CPU work
    (milliseconds, more for a large schema): call it off the event loop."""
    import llguidance

    try:
        schema = json.loads(schema_text)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_GRAMMAR_OPTIONS)
    except Exception as exc:  # whatever the library raises for a schema it cannot take is the client's 400
        raise ApiError(f"The JSON schema cannot be used for constrained decoding: {exc}",
                       param="response_format", code="invalid_value") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ApiError(f"The JSON schema cannot be used for constrained decoding: {error}",
                       param="response_format", code="invalid_value")
    return grammar  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick each next token.

    ``temperature`` 0 means greedy (argmax); ``top_p`` in (0, 1] is nucleus sampling
    (Holtzman et al. 2019); ``seed`` makes sampling reproducible: token k is drawn from a
    generator seeded by (seed, k), so a rebuilt request draws the same tokens.
    ``max_tokens`` counts generated tokens, >= 1. ``ignore_eos`` keeps generating past an
    end-of-sequence token (vLLM's extension, for benchmarks that need exact lengths).
    ``logprobs``: None, or how many most likely alternatives (0-20) to report with each token's
    own log probability: the engine then yields ``Sampled`` tokens (spec A26).
    ``json_schema``: None, or a JSON schema's text: every token is sampled from those that keep
    the output a prefix of a document the schema accepts (spec A27).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ApiError("max_tokens must be >= 1", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise ApiError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ApiError("top_p must be in (0, 1]", param="top_p")
        if self.json_schema is not None and len(self.json_schema) > MAX_SCHEMA_CHARS:
            raise ApiError(f"The JSON schema is {len(self.json_schema)} characters; mesh takes at most "
                           f"{MAX_SCHEMA_CHARS}.", param="response_format", code="invalid_value")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampled(int):
    """A generated token id (an ``int``) with its log probability under the model and the
    ``top`` most likely tokens at its position: ``((id, logprob), ...)``, most likely first.

    Log probabilities are natural logs of the softmax of the last stage's raw logits (before
    temperature and top-p), as OpenAI and vLLM report them; float64 math on float32 logits."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def __new__(cls, token: int, logprob: float, top: tuple[tuple[int, float], ...] = ()) -> Sampled:
        self = super().__new__(cls, token)
        self.logprob = logprob
        self.top = top
        return self


class Tokenizer(Protocol):
    """The subset of a Hugging Face tokenizer the API uses."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Engine(Protocol):
    """The cluster as the API sees it.

    ``generate`` yields generated token ids one at a time; it ends after an end-of-sequence
    token (which it yields) or after ``params.max_tokens`` tokens. Closing the iterator
    early (``aclose()``, or the consumer being cancelled) cancels the request on every node
    and frees its KV caches. Failures raise ``RequestFailed`` (or another ``MeshError``)
    within a bounded time; it never hangs.
    """

    model_id: str
    context_length: int
    eos_token_ids: frozenset[int]
    tokenizer: Tokenizer

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Apply the model's own chat template (with the generation prompt) and tokenize.

        ``messages`` in transformers' chat format (``tool_calls`` and ``tool`` messages
        included); ``tools``: OpenAI function specs the template renders. Raises ApiError
        (400) if the template rejects the conversation.
        """
        ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain ``text`` (a completion prompt, a prefill), with the tokenizer's
        BOS when ``add_special_tokens``."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]: ...


@runtime_checkable
class ClusterStatus(Protocol):
    """What the API reports besides generating: ``/health``, ``/v1/cluster`` and ``/metrics``.
    The node implements it (``mesh.node.report.NodeStatus``); an engine that runs alone may
    implement it too and be passed as both."""

    def health(self) -> tuple[bool, str]:
        """(ready, reason): ready only when the model is placed and loaded across the cluster."""
        ...

    def admits(self) -> tuple[bool, str]:
        """(admit, reason): whether a new chat completion is taken: when ready, and also while
        a placed plan is loading (a member joined, or replaces one that was lost): the engine
        then holds the request until that plan serves, up to its admission timeout (spec
        N21, ``Timeouts.admit_s``). Otherwise the reason of the 503."""
        ...

    def cluster_info(self) -> dict[str, Any]:
        """JSON for ``GET /v1/cluster``: ``members`` (id, address, backend, memory_bytes,
        layer_start, layer_end), ``model``, ``num_layers``."""
        ...

    def metrics_text(self) -> bytes | None:
        """``GET /metrics`` in the Prometheus text format, or None without metrics."""
        ...
