"""Constrained decoding where the last stage samples: a request's JSON schema becomes a token
mask over the logits, so the output always parses and validates (spec A27).

The grammar engine is llguidance (https://github.com/guidance-ai/llguidance; the engine behind
llama.cpp's and vLLM's structured output): it compiles a JSON schema against the model's
tokenizer and, per step, fills a bitmask of the tokens that keep the output a prefix of a valid
document, then consumes the sampled token. Chosen by measurement (``python -m mesh
bench-grammar``): xgrammar masks faster (a few microseconds a token against tens for
llguidance, both far below a decode step) but requires torch, which an MLX-only Mac does not
have; llguidance has no dependencies beyond its wheel (Linux, macOS arm64, Windows).

A stage keeps one matcher per request. A step carries the schema and the tokens generated so
far (``Forward.grammar``): a matcher that has not consumed exactly those (a new attempt after
a failover, a decode stage that did not prefill) is rebuilt from them, so any node can pick a
constrained request up where another left it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from mesh.errors import RequestFailed
from mesh.runtime.engine import schema_grammar

MAX_COMPILED = 64  # compiled schemas a node keeps (least recently used first out)


class Grammars:
    """A node's compiled schemas and the matchers of its requests.

    ``tokenizer``: returns the model's Hugging Face tokenizer (loaded on first use).
    """

    def __init__(self, tokenizer: Callable[[], Any]) -> None:
        self._tokenizer = tokenizer
        self._lltok: Any = None
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._matchers: dict[str, tuple[Any, int]] = {}  # req -> (matcher, tokens consumed)

    def _compiled(self, schema_text: str) -> str:
        grammar = self._grammars.pop(schema_text, None) or schema_grammar(schema_text)
        self._grammars[schema_text] = grammar
        while len(self._grammars) > MAX_COMPILED:
            self._grammars.popitem(last=False)
        return grammar

    def _matcher(self, req: str, schema_text: str, generated: list[int]) -> Any:
        import llguidance
        import llguidance.hf

        held = self._matchers.get(req)
        if held is not None and held[1] == len(generated):
            return held[0]
        if self._lltok is None:
            self._lltok = llguidance.hf.from_tokenizer(self._tokenizer())
        matcher = llguidance.LLMatcher(self._lltok, self._compiled(schema_text))
        if generated and not matcher.consume_tokens(generated):
            raise RequestFailed(f"the tokens generated so far do not fit the JSON schema: {matcher.get_error()}")
        self._matchers[req] = (matcher, len(generated))
        return matcher

    def constrain(self, req: str, schema_text: str, generated: list[int], logits: np.ndarray) -> np.ndarray:
        """``logits`` (float32 ``[vocab]``) with every token the schema does not allow next set
        to -inf. Raises RequestFailed when the matcher is in error (nothing is allowed)."""
        import llguidance.numpy as lnp

        matcher = self._matcher(req, schema_text, generated)
        mask = lnp.allocate_token_bitmask(1, self._lltok.vocab_size)
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error():
            raise RequestFailed(f"constrained decoding failed: {matcher.get_error()}")
        # the logits may be longer than the tokenizer (Qwen pads its head past its vocabulary):
        # ids the tokenizer does not have are never allowed
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")
        allowed = np.zeros(len(logits), dtype=bool)
        n = min(len(logits), self._lltok.vocab_size)
        allowed[:n] = bits[:n].astype(bool)
        if not allowed.any():
            raise RequestFailed("constrained decoding: the schema allows no next token")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def advance(self, req: str, token: int) -> None:
        """The sampled ``token`` was taken: the matcher moves past it."""
        held = self._matchers.get(req)
        if held is None:
            return
        matcher, consumed = held
        if not matcher.consume_token(int(token)):
            self._matchers.pop(req, None)
            raise RequestFailed(f"constrained decoding: the sampled token {token} does not fit the schema")
        self._matchers[req] = (matcher, consumed + 1)

    def drop(self, req: str) -> None:
        self._matchers.pop(req, None)
