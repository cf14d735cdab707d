"""Token log probabilities in OpenAI's two shapes: chat's ``logprobs.content`` entries and the
legacy completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``.

The numbers come from the last stage (``mesh.runtime.sampling.with_logprobs``); this module
only spells tokens: each id decoded alone (special tokens kept), with its UTF-8 ``bytes``
(a byte-level token that is part of a character decodes to U+FFFD, as in vLLM). Spec:
specs/api.md (A26).
"""

from __future__ import annotations

from typing import Any

from mesh.runtime.engine import Sampled, Tokenizer


class Spelling:
    """Token id -> its text, decoded once per request."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token: int) -> str:
        got = self._texts.get(token)
        if got is None:
            got = self._texts[token] = self._tokenizer.decode([int(token)], skip_special_tokens=False)
        return got

    def chat(self, tokens: list[Sampled]) -> list[dict[str, Any]]:
        """Chat-completion ``logprobs.content`` entries: ``token``, ``logprob``, ``bytes`` and
        ``top_logprobs`` (the same three for each alternative)."""
        out = []
        for t in tokens:
            out.append({**self._entry(int(t), t.logprob),
                        "top_logprobs": [self._entry(i, lp) for i, lp in t.top]})
        return out

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    def completion(self, tokens: list[tuple[Sampled, int]], offset: int) -> dict[str, Any]:
        """Legacy-completion ``logprobs``: per token its text, logprob, ``{text: logprob}`` of
        the alternatives, and the character offset in the choice's text where its text starts
        (recorded as the text was sent, so a character split over byte tokens is counted once;
        ``offset``: characters before the generated text, an echoed prompt)."""
        return {"tokens": [self.text(int(t)) for t, _ in tokens], "token_logprobs": [t.logprob for t, _ in tokens],
                "top_logprobs": [{self.text(i): lp for i, lp in t.top} for t, _ in tokens],
                "text_offset": [offset + at for _, at in tokens]}


def chat_logprobs(spelling: Spelling | None, tokens: list[Sampled]) -> dict[str, Any] | None:
    """A chat choice's (or chunk's) ``logprobs`` object, or None when not asked for."""
    if spelling is None:
        return None
    return {"content": spelling.chat(tokens), "refusal": None}
