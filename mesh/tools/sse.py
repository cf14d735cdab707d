"""The one client for streamed chat completions (OpenAI's API over server-sent events), shared
by the benchmarks (``benchutil.stream_request``) and the fault suite
(``faults.harness.stream_chat``).

It knows the wire format only: a POST to ``/v1/chat/completions`` with ``"stream": true``, then
``data: <JSON object>`` lines, ended by ``data: [DONE]``; an error mid-stream is a chunk with an
``error`` object. What counts as success, which clock stamps a chunk and what is kept is each
caller's: the two result shapes sit on top of ``chat_chunks``. Spec: specs/api.md A1 (error
JSON), A3 (the stream) and A4 (the usage chunk), as a client reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

CHAT_PATH = "/v1/chat/completions"


def chat_body(model: str, content: str, max_tokens: int, *, include_usage: bool = False) -> dict[str, Any]:
    """A greedy (temperature 0) streamed request for exactly ``max_tokens`` new tokens
    (``ignore_eos``), with one user message; ``include_usage`` asks for the final usage chunk
    (``stream_options``) that reports the token counts."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatChunk:
    """One ``data:`` line of the stream. ``done``: the ``[DONE]`` line (nothing else set);
    ``error``: the message of an error chunk (nothing else read from it); otherwise ``pieces``,
    the non-empty delta texts, one per choice that has text, and, on a usage chunk, the token
    counts."""

    done: bool = False
    error: str | None = None
    pieces: tuple[str, ...] = ()
    completion_tokens: int | None = None
    prompt_tokens: int | None = None


def parse_data_line(line: str) -> ChatChunk | None:
    """The chunk a line of the stream carries, or None for a line that is not a ``data:`` line
    (blank separators, comments, other fields). Raises ValueError for a ``data:`` line that is
    neither ``[DONE]`` nor a well-formed chunk object (bad JSON, not an object, an ``error``
    that is not an object, a usage block without integer counts, choices that are not objects):
    the server never sends one, so the stream cannot be trusted past it."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return ChatChunk(done=True)
    chunk = json.loads(payload)  # json.JSONDecodeError is a ValueError
    if not isinstance(chunk, dict):
        raise ValueError(f"a stream chunk is not a JSON object: {payload[:80]!r}")
    if "error" in chunk:
        error = chunk["error"]
        if not isinstance(error, dict):
            raise ValueError(f"an error chunk without an error object: {payload[:80]!r}")
        return ChatChunk(error=str(error.get("message")))
    completion_tokens = prompt_tokens = None
    usage = chunk.get("usage")
    if usage:
        try:
            completion_tokens, prompt_tokens = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a usage chunk without token counts: {payload[:80]!r}") from exc
    pieces = []
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            raise ValueError(f"a choice is not a JSON object: {payload[:80]!r}")
        piece = (choice.get("delta") or {}).get("content")
        if piece:
            pieces.append(str(piece))
    return ChatChunk(pieces=tuple(pieces), completion_tokens=completion_tokens, prompt_tokens=prompt_tokens)


def chat_chunks(lines: Iterable[str]) -> Iterator[ChatChunk]:
    """The chunks of a stream's lines, in order, as they arrive (a caller stamps each one on
    its own clock); the ``[DONE]`` chunk is the last one yielded. A stream that ends without
    it simply stops: telling that apart is the caller's rule. Raises ValueError as
    ``parse_data_line``."""
    for line in lines:
        chunk = parse_data_line(line)
        if chunk is None:
            continue
        yield chunk
        if chunk.done:
            return


@contextmanager
def open_chat_stream(url: str, body: dict[str, Any], *, timeout: float | httpx.Timeout,
                     headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
    """POST ``body`` to ``url`` + ``/v1/chat/completions`` and hold the streamed response open
    (its status not checked: an error status is a result too). ``timeout``: seconds, or an
    ``httpx.Timeout``. Raises what httpx raises (``httpx.HTTPError`` and its subclasses)."""
    import httpx  # only the clients need it; the CLI imports this module lazily too

    with httpx.Client(timeout=timeout) as client, \
            client.stream("POST", url + CHAT_PATH, json=body, headers=headers or {}) as response:
        yield response


def error_message(response: httpx.Response) -> str | None:
    """The message of an answer's OpenAI error JSON (``{"error": {"message": ...}}``; the body
    must have been read), or None when the body is not that JSON."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None
