"""One request's generations as the HTTP endpoints need them: token ids in, text pieces, a
finish reason and usage out, for ``n`` choices at once.

Shared by ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST /v1/messages``;
knows the ``Engine`` protocol and OpenAI's finish reasons, not HTTP routes or JSON shapes.
Spec: specs/api.md (A4 usage, A5 stop strings, A7 closing cancels, A8 finish reasons,
A11 context window, A20 ``n`` choices).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from mesh.api.asgi import ClientDisconnected, EventStream, server_error, unless_disconnected
from mesh.api.openai_schema import validation_error_to_api_error
from mesh.api.textstream import TextStream
from mesh.errors import ApiError, MeshError, RequestFailed
from mesh.runtime.engine import ClusterStatus, Engine, Sampled, SamplingParams

log = logging.getLogger("mesh.api.app")

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CHARS_PER_TOKEN = 64  # a token is never longer than this many characters in practice
SEED_MASK = 2**64


def engine_failure(error: MeshError) -> ApiError:
    """The API error for a MeshError from the engine: its own if it is an ApiError, else 503."""
    if isinstance(error, ApiError):
        return error
    code = "request_failed" if isinstance(error, RequestFailed) else "service_unavailable"
    return server_error(f"The cluster could not serve this request: {error}", code=code)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # json.loads accepts NaN/Infinity; JSON not


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; ApiError 400 (malformed, not an object) or 413 (too big)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(
                f"Request body exceeds {MAX_BODY_BYTES} bytes.",
                status=413,
                code="request_too_large",
            )
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(Content-Type: application/json).",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(
            f"The request body must be a JSON object, not {type(body).__name__}.",
            code="invalid_json",
        )
    return body


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """The body as ``model``; ApiError 400 naming the first bad field (413 when too big)."""
    body = await read_json_object(request)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None


def model_not_found(engine: Engine, model: str) -> ApiError:
    return ApiError(f"The model '{model}' does not exist; this node serves '{engine.model_id}'.",
                    status=404, param="model", code="model_not_found")


def admit(engine: Engine, status: ClusterStatus, model: str) -> None:
    """404 unless ``model`` is the engine's (spec A15); 503 unless the cluster takes requests
    now (spec A9: a plan that is loading holds the request instead)."""
    if model != engine.model_id:
        raise model_not_found(engine, model)
    ready, reason = status.admits()
    if not ready:
        raise server_error(f"The cluster is not ready: {reason}")


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event (``data: <json>``, with ``event: <name>`` when given)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def max_tokens_for(requested: int | None, param: str, prompt_tokens: int, context_length: int,
                   *, what: str = "messages") -> int:
    """Spec A11: prompt + max_tokens must fit the context; the default is what is left.

    Raises ApiError 400 ``context_length_exceeded`` naming ``param`` (or ``what``, the prompt's
    field, when the prompt alone fills the context)."""
    if prompt_tokens >= context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"{what} resulted in {prompt_tokens} tokens, leaving no room for a completion. "
            f"Please reduce the length of the {what}.",
            param=what,
            code="context_length_exceeded",
        )
    if requested is None:
        return context_length - prompt_tokens
    if prompt_tokens + requested > context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the {what}, "
            f"{requested} in the completion). Please reduce the length of the {what} or "
            "completion.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def check_prompt_chars(chars: int, context_length: int, what: str) -> None:
    """Reject a prompt of ``chars`` characters that cannot fit the context (400), before paying
    for tokenizing a huge body: no tokenizer yields fewer tokens than this bound allows."""
    if chars > context_length * MAX_CHARS_PER_TOKEN:
        raise ApiError(
            f"The {what} hold {chars} characters, far beyond the model's context window of "
            f"{context_length} tokens.",
            param=what,
            code="context_length_exceeded",
        )


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a seeded request (spec A20): ``seed + index`` wrapped
    into a signed 64-bit integer, so choice 0 draws what an ``n = 1`` request draws and every
    choice is reproducible on its own."""
    if seed is None:
        return None
    value = (seed + index) % SEED_MASK
    return value - SEED_MASK if value >= 2**63 else value


class Generation:
    """One choice's token stream turned into text pieces, usage and a finish reason.

    Owns the engine's iterator and closes it in ``aclose`` (spec A7). ``finish_reason``:
    "stop" on EOS or a stop string, "length" at ``max_tokens`` (spec A8). ``keep_special``
    keeps special tokens in the text (for a tool-call parser that reads markers).
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                 *, keep_special: bool = False) -> None:
        self._text = TextStream(engine.tokenizer, stop=stop, prompt_tail_ids=prompt_ids,
                                keep_special=keep_special)
        self._eos = frozenset() if params.ignore_eos else engine.eos_token_ids
        self._max_tokens = params.max_tokens
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_string: str | None = None
        # spec A26: the tokens with logprobs consumed so far (not EOS) with their text offsets,
        # and those since the last take; ``emitted``: characters of text sent so far
        self.sampled: list[tuple[Sampled, int]] = []
        self._untaken = 0
        self.emitted = 0
        self._first: int | None = None
        self._started = False
        self._tokens = engine.generate(prompt_ids, params)

    async def _next_token(self) -> int | None:
        try:
            return await anext(self._tokens)
        except StopAsyncIteration:
            return None

    async def start(self) -> None:
        """Wait for the first token, so failures before it can still get a 503."""
        if not self._started:
            self._first = await self._next_token()
            self._started = True

    async def pieces(self) -> AsyncGenerator[str, None]:
        """Text pieces to send, possibly empty; sets ``finish_reason`` before the last."""
        async for piece in self._pieces():
            self.emitted += len(piece)
            yield piece

    async def _pieces(self) -> AsyncGenerator[str, None]:
        await self.start()
        token = self._first
        while True:
            if token is None:  # the engine ended without EOS
                self.finish_reason = "length" if self.completion_tokens >= self._max_tokens else "stop"
                yield self._text.finish()
                return
            self.completion_tokens += 1
            if isinstance(token, Sampled) and token not in self._eos:
                # spec A26: its text starts where the text sent so far ends (a character still
                # held for its next bytes starts there too)
                self.sampled.append((token, self.emitted))
            if token in self._eos:
                self.finish_reason = "stop"
                yield self._text.finish()
                return
            piece = self._text.push(token)
            if self._text.stopped:  # spec A5: emit text before the stop string, then cancel
                self.finish_reason = "stop"
                self.stop_string = self._text.stop_string
                yield piece
                return
            if self.completion_tokens >= self._max_tokens:
                self.finish_reason = "length"
                yield piece + self._text.finish()
                return
            yield piece
            token = await self._next_token()

    def take_sampled(self) -> list[tuple[Sampled, int]]:
        """The tokens with logprobs consumed since the last call, each with the character
        offset of its text in the choice's text (spec A26)."""
        out = self.sampled[self._untaken:]
        self._untaken = len(self.sampled)
        return out

    async def aclose(self) -> None:
        aclose: Callable[[], Awaitable[None]] | None = getattr(self._tokens, "aclose", None)
        if aclose is not None:
            await aclose()


_DONE = object()


class Choices:
    """The ``n`` (or prompts x ``n``) generations of one request, run at once (spec A20).

    ``prompts[i]`` and ``params[i]`` make choice ``i``. The engine serves them as separate
    requests: concurrently, batched where the stage batches. ``start`` waits for every first
    token (so a failure before any text is still a 503); ``events`` yields ``(index, piece)``
    in arrival order and ``(index, None)`` when a choice ends; ``aclose`` closes them all.
    Usage counts each distinct prompt once, as OpenAI does for ``n`` > 1.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
                 stop: list[str], *, keep_special: bool = False) -> None:
        # An engine's generate() starts nothing until its iterator is first read, so a failure
        # here (a bad stop string) leaves nothing to close.
        self.items = [Generation(engine, prompt, p, stop, keep_special=keep_special)
                      for prompt, p in zip(prompts, params, strict=True)]
        self._distinct_prompts = {id(p): len(p) for p in prompts}
        self._tasks: list[asyncio.Task[None]] = []
        self._first: list[asyncio.Future[None]] = []
        self._queue: asyncio.Queue[tuple[int, object, list[tuple[Sampled, int]]]] = asyncio.Queue()

    @classmethod
    def fan_out(cls, engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int,
                stop: list[str], *, keep_special: bool = False) -> Choices:
        """``n`` choices per prompt; choice ``i`` of a seeded request uses ``choice_seed``."""
        all_prompts: list[list[int]] = []
        all_params: list[SamplingParams] = []
        for prompt in prompts:
            for _ in range(n):
                all_params.append(replace(params, seed=choice_seed(params.seed, len(all_prompts))))
                all_prompts.append(prompt)
        return cls(engine, all_prompts, all_params, stop, keep_special=keep_special)

    async def start(self) -> None:
        """Start every choice and wait for each one's first token (or the first failure).

        Each choice runs in its own task from here on, reading its engine iterator as fast as
        it yields, so a choice waiting for admission behind its siblings is never stuck
        behind a consumer that has not read them yet."""
        loop = asyncio.get_running_loop()
        self._first = [loop.create_future() for _ in self.items]
        self._tasks = [asyncio.create_task(self._run(i, g)) for i, g in enumerate(self.items)]
        try:
            await asyncio.gather(*self._first)
        finally:
            for f in self._first:  # retrieve every failure, not only the first one raised
                if f.done() and not f.cancelled():
                    f.exception()

    async def _run(self, i: int, g: Generation) -> None:
        first = self._first[i]
        try:
            await g.start()
            first.set_result(None)
            async for piece in g.pieces():
                self._queue.put_nowait((i, piece, g.take_sampled()))
            self._queue.put_nowait((i, _DONE, g.take_sampled()))
        except BaseException as exc:  # reaches start() or the consumer of events(), which re-raise it
            if not first.done():
                first.set_exception(exc if isinstance(exc, Exception) else MeshError(f"choice {i} stopped"))
            self._queue.put_nowait((i, exc, []))
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def events(self) -> AsyncIterator[tuple[int, str | None, list[tuple[Sampled, int]]]]:
        """``(index, piece, sampled)`` as pieces arrive, ``(index, None, sampled)`` when choice
        ``index`` ends; ``sampled``: the tokens with logprobs behind the piece (spec A26; empty
        without logprobs). Raises the first failure of any choice."""
        if not self._tasks:
            await self.start()
        running = len(self.items)
        while running:
            # No timeout here: each choice ends, fails or is cancelled within the engine's
            # own bounded time (Engine contract), and each of those puts an item.
            i, item, sampled = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _DONE:
                running -= 1
                yield i, None, sampled
            else:
                yield i, item, sampled  # type: ignore[misc]

    async def collect(self) -> list[str]:
        """Every choice's whole text, by index."""
        texts = [""] * len(self.items)
        async for i, piece, _ in self.events():
            if piece:
                texts[i] += piece
        return texts

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for g in self.items:
            await g.aclose()

    @property
    def usage(self) -> dict[str, int]:
        prompt = sum(self._distinct_prompts.values())
        completion = sum(g.completion_tokens for g in self.items)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}



async def respond(request: Request, choices: Choices, completion_id: str, *,
                  stream: Callable[[], AsyncGenerator[bytes, None]] | None,
                  collect: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """Run ``choices`` for one HTTP request: a JSON body from ``collect()``, or with ``stream``
    an SSE response of its events. Failures before the first token are 503 (spec A16); a
    client that leaves cancels every choice (spec A7)."""
    handed_over = False
    try:
        await unless_disconnected(request.receive, choices.start())
        if stream is not None:
            handed_over = True  # the event stream closes the choices now
            return EventStream(stream(), on_close=choices.aclose)
        result = await unless_disconnected(request.receive, collect())
    except MeshError as e:
        raise engine_failure(e) from None
    except ClientDisconnected:
        log.info("%s: client disconnected; generation cancelled", completion_id)
        return Response(status_code=499)
    finally:
        if not handed_over:
            await choices.aclose()
    return JSONResponse(result)


async def guarded(events: AsyncGenerator[bytes, None], choices: Choices, completion_id: str, *,
                  error_event: Callable[[ApiError], bytes], done: bytes | None) -> AsyncGenerator[bytes, None]:
    """``events`` with a failure mid-stream turned into ``error_event`` (the status is already
    sent, spec A3), ``done`` last, and the choices closed however the stream ends."""
    try:
        async for event in events:
            yield event
    except MeshError as e:
        log.warning("%s: failed mid-stream: %s", completion_id, e)
        yield error_event(engine_failure(e))
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("%s: unexpected error mid-stream (incident %s)", completion_id, incident)
        yield error_event(server_error(
            f"Internal error in the mesh node (incident {incident}); see the node's log.", code="internal_error"))
    finally:
        await events.aclose()
        await choices.aclose()
    if done is not None:
        yield done
