"""``POST /v1/chat/completions``: messages through the model's chat template, ``n`` choices,
tool calls, streamed or not.

Knows OpenAI's chat-completion and chunk shapes; the choices run through
``mesh.api.generation``, tool calls are parsed by ``mesh.api.toolcalls``. Spec: specs/api.md
(A3-A8, A10, A11, A14, A20-A23).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import Request
from starlette.responses import Response

from mesh.api.generation import (
    Choices,
    admit,
    check_prompt_chars,
    engine_failure,
    guarded,
    max_tokens_for,
    parse_body,
    respond,
    sse,
)
from mesh.api.logprobs import Spelling, chat_logprobs
from mesh.api.openai_schema import ChatCompletionRequest, check_supported
from mesh.api.toolcalls import ToolFormat, ToolStream, detect_format
from mesh.errors import ApiError, MeshError
from mesh.runtime.engine import ClusterStatus, Engine, Sampled, SamplingParams, schema_grammar

log = logging.getLogger("mesh.api.app")

PROBE_TOOL = "mesh_probe_tool_7f3a"  # a name no real template prints unless it renders tools


class ToolSupport:
    """Whether the model's chat template renders tools, and in which call format (spec A21).

    Probed once, the first time a request brings tools: the template renders a conversation
    with one made-up tool and the tool's name must appear in the prompt (templates without
    tool support ignore ``tools``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._result: ToolFormat | ApiError | None = None

    async def format(self) -> ToolFormat:
        """The format; raises ApiError 400 ``tools_not_supported`` naming why not."""
        if self._result is None:
            self._result = await asyncio.to_thread(self._probe)
        if isinstance(self._result, ApiError):
            raise self._result
        return self._result

    def _probe(self) -> ToolFormat | ApiError:
        engine = self._engine
        tool = {"type": "function", "function": {"name": PROBE_TOOL, "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
        try:
            ids = engine.encode_chat([{"role": "user", "content": "hi"}], [tool])
            rendered = engine.tokenizer.decode(ids, skip_special_tokens=False)
        except MeshError:
            rendered = ""
        if PROBE_TOOL not in rendered:
            return ApiError(
                f"The chat template of '{engine.model_id}' has no tool support (it does not render "
                "'tools'); leave 'tools' out, or set tool_choice to 'none'.",
                param="tools",
                code="tools_not_supported",
            )
        tokenizer = engine.tokenizer
        fmt = detect_format(getattr(tokenizer, "chat_template", None), getattr(tokenizer, "response_template", None))
        if fmt is None:
            return ApiError(
                f"The chat template of '{engine.model_id}' renders tools, but in a tool-call format mesh "
                "does not parse (known: hermes/qwen <tool_call>, llama 3 JSON, mistral [TOOL_CALLS], "
                "gpt-oss harmony, or a tokenizer response_template).",
                param="tools",
                code="tools_not_supported",
            )
        return fmt


async def chat_completions(request: Request, engine: Engine, status: ClusterStatus, tools: ToolSupport,
                           clock: Callable[[], float] = time.time) -> Response:
    req = await parse_body(request, ChatCompletionRequest)
    check_supported(req)
    admit(engine, status, req.model)
    check_prompt_chars(sum(len(m.content or "") for m in req.messages), engine.context_length, "messages")
    choice = req.tool_choice_name
    fmt = await tools.format() if choice is not None else None
    specs = [t.to_template() for t in req.tools or []] if fmt is not None else None
    names = req.call_names()
    messages = [m.to_template(names) for m in req.messages]
    prefill = fmt.prefill(choice) if fmt is not None else ""
    try:
        # Tokenizing runs off the event loop so heartbeats and other requests go on.
        prompt_ids = await asyncio.to_thread(engine.encode_chat, messages, specs)
        if prefill:  # spec A22: tool_choice required / named opens the call itself
            prompt_ids = prompt_ids + await asyncio.to_thread(engine.encode, prefill, add_special_tokens=False)
    except MeshError as e:
        raise engine_failure(e) from None
    schema = req.response_format.schema_text() if req.response_format is not None else None
    if schema is not None:  # spec A27: compiled once here, off the event loop, so a bad one is a 400
        await asyncio.to_thread(schema_grammar, schema)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = SamplingParams(
        max_tokens=max_tokens_for(req.requested_max_tokens, param, len(prompt_ids), engine.context_length),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        ignore_eos=bool(req.ignore_eos),
        logprobs=req.logprobs_k,
        json_schema=schema,
    )
    n = req.n or 1
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(clock())
    try:
        choices = Choices.fan_out(engine, [prompt_ids], params, n, req.stop_strings, keep_special=fmt is not None)
    except MeshError as e:
        raise engine_failure(e) from None
    log.info("%s: %d prompt tokens, n %d, max_tokens %d, stream %s, tools %s", completion_id, len(prompt_ids),
             n, params.max_tokens, bool(req.stream), fmt.name if fmt else None)
    one = 1 if req.parallel_tool_calls is False else None  # spec A21: only the first call is kept
    parsers = [ToolStream(fmt, prefill, max_calls=one) if fmt is not None else None for _ in range(n)]
    spelling = Spelling(engine.tokenizer) if req.logprobs else None
    shape = _Shape(completion_id, created, engine.model_id, req.include_usage, spelling)

    async def collect() -> dict[str, Any]:
        texts = await choices.collect()
        out = []
        for i, text in enumerate(texts):
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            parser = parsers[i]
            if parser is not None:
                delta = parser.feed(text)
                rest = parser.finish()
                message["content"] = (delta.content + rest.content) or None
                if parser.calls:
                    message["tool_calls"] = [c.to_openai() for c in parser.calls]
            out.append({"index": i, "message": message,
                        "logprobs": chat_logprobs(spelling, [t for t, _ in choices.items[i].sampled]),
                        "finish_reason": _finish(choices, i, parser)})
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_id,
                "choices": out, "usage": choices.usage, "system_fingerprint": None}

    def stream() -> AsyncGenerator[bytes, None]:
        return guarded(_events(choices, parsers, shape), choices, completion_id,
                       error_event=lambda e: sse(e.to_json()), done=sse("[DONE]"))

    return await respond(request, choices, completion_id, stream=stream if req.stream else None, collect=collect)


def _finish(choices: Choices, i: int, parser: ToolStream | None) -> str | None:
    reason = choices.items[i].finish_reason
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason


class _Shape:
    """The chunk envelope of one streamed chat completion (spec A3)."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool,
                 spelling: Spelling | None) -> None:
        self.head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": None}
        self.include_usage = include_usage
        self.spelling = spelling
        self.pending: dict[int, list[Sampled]] = {}  # spec A26: tokens whose logprobs no chunk carried yet

    def chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        tokens = self.pending.pop(index, []) if delta or finish_reason else []
        logprobs = chat_logprobs(self.spelling, tokens) if tokens else None
        event: dict[str, Any] = {**self.head, "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.include_usage:
            event["usage"] = None
        return sse(event)

    def usage(self, usage: dict[str, int]) -> bytes:
        return sse({**self.head, "choices": [], "usage": usage})


async def _events(choices: Choices, parsers: list[ToolStream | None], shape: _Shape) -> AsyncGenerator[bytes, None]:
    """SSE events of a streamed chat completion: per choice a role chunk, content and
    tool-call deltas (OpenAI's format, spec A21), a finish chunk; then usage if asked."""
    for i in range(len(choices.items)):
        yield shape.chunk(i, {"role": "assistant", "content": ""})
    async for i, piece, sampled in choices.events():
        shape.pending.setdefault(i, []).extend(t for t, _ in sampled)
        parser = parsers[i]
        if piece is None:
            if parser is not None:
                for event in _delta_chunks(shape, i, parser.finish()):
                    yield event
            yield shape.chunk(i, {}, _finish(choices, i, parser))
        elif parser is None:
            if piece:
                yield shape.chunk(i, {"content": piece})
        else:
            for event in _delta_chunks(shape, i, parser.feed(piece)):
                yield event
    if shape.include_usage:
        yield shape.usage(choices.usage)


def _delta_chunks(shape: _Shape, i: int, delta: Any) -> list[bytes]:
    out = []
    if delta.content:
        out.append(shape.chunk(i, {"content": delta.content}))
    if delta.calls:
        out.append(shape.chunk(i, {"tool_calls": delta.openai_tool_calls()}))
    return out
