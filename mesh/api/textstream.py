"""Incremental detokenizer with a stop-string filter: token ids in, safe text out.

Sans-IO: no asyncio, no clocks, no HTTP. It knows a tokenizer's ``decode`` and nothing
about engines or the OpenAI wire format. Spec: specs/api.md (A5 stop strings never leak,
A6 UTF-8 never broken, A13 bounded work per token).

Detokenizing one token at a time is wrong for byte-level BPE and byte-fallback tokenizers:
a multi-byte UTF-8 character can be split across tokens, and decoding a lone fragment yields
U+FFFD. SentencePiece tokenizers also drop the leading space of the first token decoded.
So we decode a short *window* of recent tokens twice -- ``ids[prefix:read]`` (already
emitted) and ``ids[prefix:]`` -- emit the difference, and hold it back while it ends in
U+FFFD. This is the algorithm of Hugging Face TGI (``Model.decode_token`` in
``text_generation_server/models/model.py``) and vLLM (``detokenize_incrementally`` in
``vllm/transformers_utils/detokenizer_utils.py``); HF ``TextStreamer`` solves the same
problem with a coarser rule (flush at word boundaries). The window only grows while the text
ends in U+FFFD, and is capped (``max_held_tokens``) so the work per token stays bounded even
for a model that emits endless byte fragments: total work is O(tokens), not O(tokens^2).

Stop strings: any suffix of the decoded text that is a prefix of some stop string is held
back, so a partial stop string is never emitted and later withdrawn. When a stop string
completes, only the text before it is emitted and ``stopped`` turns true.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.errors import ApiError, MeshError
from mesh.runtime.engine import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context for the first generated token (vLLM uses 5 too):
# SentencePiece decoders strip a leading space from the first token of a decode call.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes, so a real character completes within 4 held tokens;
# past this many held tokens the text is emitted as decoded (with U+FFFD where invalid).
DEFAULT_MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    """Token ids in, text that will not change out (no split characters, no U+FFFD tail).

    ``prompt_tail_ids``: the last prompt tokens, decoded only as left context (only the last
    ``PROMPT_CONTEXT_TOKENS`` are kept). Special tokens are not emitted as text unless
    ``keep_special`` (a tool-call parser needs markers such as ``<|call|>``).
    """

    __slots__ = ("_finished", "_ids", "_max_held", "_prefix", "_read", "_skip", "_tokenizer")

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_tail_ids: Sequence[int] = (),
        max_held_tokens: int = DEFAULT_MAX_HELD_TOKENS,
        keep_special: bool = False,
    ) -> None:
        if max_held_tokens < 1:
            raise ValueError(f"max_held_tokens must be >= 1, got {max_held_tokens}")
        self._tokenizer = tokenizer
        # Only the window ids[prefix:] matters; older ids are dropped as offsets advance.
        self._ids: list[int] = list(prompt_tail_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._prefix = 0
        self._read = len(self._ids)
        self._max_held = max_held_tokens
        self._finished = False
        self._skip = not keep_special

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip)

    def _emit(self, *, force: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            return self._advance(len(self._ids), full_text[len(prefix_text) :])
        if force:
            return self._advance(len(self._ids), full_text[len(prefix_text) :])
        if len(self._ids) - self._read < self._max_held:
            return ""  # spec A6: a character may still be incomplete; wait for more tokens
        return self._emit_stable_part(prefix_text, full_text)

    def _emit_stable_part(self, prefix_text: str, full_text: str) -> str:
        """Too many tokens held, still ending in U+FFFD: invalid bytes, not a character
        in progress. Emit up to the last cut that (a) leaves the last 3 tokens held -- an
        incomplete UTF-8 character has at most 3 bytes, each token at least 1 -- and (b)
        splits no complete character: its decode is a prefix of the window's decode."""
        for cut in range(len(self._ids) - 3, self._read, -1):
            text = self._decode(self._ids[self._prefix : cut])
            if full_text.startswith(text) and len(text) > len(prefix_text):
                return self._advance(cut, text[len(prefix_text) :])
        return self._advance(len(self._ids), full_text[len(prefix_text) :])

    def _advance(self, cut: int, new_text: str) -> str:
        # The tokens just emitted become the next window's left context (spec A13: the
        # window only ever holds the previous emission plus the tokens held since).
        del self._ids[: self._read]
        self._prefix, self._read = 0, cut - self._read
        return new_text

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that is now final (often "")."""
        if self._finished:
            raise MeshError("IncrementalDetokenizer.push() after finish()")
        self._ids.append(token_id)
        return self._emit(force=False)

    def finish(self) -> str:
        """Flush the text still held (a trailing incomplete character becomes U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        if len(self._ids) == self._read:
            return ""
        return self._emit(force=True)


class StopStringFilter:
    """Text pieces in, text before the first stop string out; never a partial stop string.

    The first stop string to *complete* wins (earliest end; at equal ends, the longest),
    which is what checking after every character would give, independent of how the text
    was split into pieces.
    """

    __slots__ = ("_pending", "_stop", "_stop_string", "_stopped")

    def __init__(self, stop: Sequence[str] = ()) -> None:
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ApiError(f"stop strings must be non-empty strings, got {s!r}", param="stop")
        self._stop = tuple(dict.fromkeys(stop))
        self._pending = ""  # decoded text not yet emitted: always shorter than the longest stop
        self._stopped = False
        self._stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        """True once a stop string completed; later input is ignored."""
        return self._stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop_string

    def _held_suffix_len(self, text: str) -> int:
        # spec A5: the longest suffix of text that is a proper prefix of some stop string.
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, text: str) -> str:
        """Add decoded text; return what is safe to emit."""
        if self._stopped or not text:
            return ""
        pending = self._pending + text
        match: tuple[int, int, str] | None = None  # (end, -length, stop)
        for s in self._stop:
            i = pending.find(s)
            if i >= 0:
                candidate = (i + len(s), -len(s), s)
                if match is None or candidate < match:
                    match = candidate
        if match is not None:
            end, neg_len, s = match
            self._stopped, self._stop_string, self._pending = True, s, ""
            return pending[: end + neg_len]
        held = self._held_suffix_len(pending)
        self._pending = pending[len(pending) - held :]
        return pending[: len(pending) - held]

    def finish(self) -> str:
        """Flush held text: the generation ended, so a partial stop string is just text."""
        if self._stopped:
            return ""
        out, self._pending = self._pending, ""
        return out


class TextStream:
    """Generated token ids in, text to send the client out (spec A5, A6).

    ``push(token_id)`` returns the text that is now safe to emit (often ""); ``finish()``
    returns the rest at the end of generation. Once ``stopped`` is true a stop string has
    completed: the text before it has been returned and further pushes return "".
    Special tokens (EOS, chat markers) are not emitted as text unless ``keep_special``.

    Raises ``ApiError`` (param ``stop``) for an empty stop string.
    """

    __slots__ = ("_detok", "_stop")

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        prompt_tail_ids: Sequence[int] = (),
        max_held_tokens: int = DEFAULT_MAX_HELD_TOKENS,
        keep_special: bool = False,
    ) -> None:
        self._stop = StopStringFilter(stop)
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_tail_ids=prompt_tail_ids, max_held_tokens=max_held_tokens,
            keep_special=keep_special,
        )

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def stop_string(self) -> str | None:
        return self._stop.stop_string

    def push(self, token_id: int) -> str:
        if self._stop.stopped:
            return ""
        return self._stop.push(self._detok.push(token_id))

    def finish(self) -> str:
        if self._stop.stopped:
            return ""
        return self._stop.push(self._detok.finish()) + self._stop.finish()
