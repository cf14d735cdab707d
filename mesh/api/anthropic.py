"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API over
the same engine, chat template and tool-call parser as the OpenAI endpoints.

Request, response, streaming events and error shapes follow Anthropic's API reference
(https://docs.anthropic.com/en/api/messages, .../messages-streaming, .../errors): a system
prompt, ``text`` / ``tool_use`` / ``tool_result`` content blocks, tools with ``input_schema``,
``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none``, and the event sequence
``message_start``, ``content_block_start``, ``content_block_delta`` (``text_delta`` or
``input_json_delta``), ``content_block_stop``, ``message_delta``, ``message_stop``.
Spec: specs/api.md (A25).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse, Response

from mesh.api.chat import ToolSupport
from mesh.api.generation import (
    Choices,
    admit,
    check_prompt_chars,
    engine_failure,
    guarded,
    max_tokens_for,
    model_not_found,
    parse_body,
    read_json_object,
    respond,
    sse,
)
from mesh.api.openai_schema import SEED_MAX, SEED_MIN, check_extra_fields, validation_error_to_api_error
from mesh.api.toolcalls import Delta, ToolStream
from mesh.errors import ApiError, MeshError
from mesh.runtime.engine import ClusterStatus, Engine, SamplingParams

MAX_STOP_SEQUENCES = 8
HARMLESS = frozenset({"metadata", "service_tier", "container", "context_management", "mcp_servers_disabled"})
NEUTRAL: dict[str, tuple[Any, ...]] = {"top_k": (None,), "thinking": (None, {"type": "disabled"}),
                                       "mcp_servers": (None, [])}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
BLOCK_TYPES = ("text", "tool_use", "tool_result")
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: accepted, no effect here


class TextBlock(_Open):
    type: Literal["text"]
    text: StrictStr


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict[str, Any]


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: StrictStr | list[TextBlock] | None = None
    is_error: StrictBool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(b.text for b in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: StrictStr | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, block in enumerate(value):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in BLOCK_TYPES:
                    raise PydanticCustomError(
                        "unsupported_value",
                        "content block [{i}] has type '{kind}'; mesh takes {types}",
                        {"i": i, "kind": kind, "types": ", ".join(BLOCK_TYPES)})
        return value


class AnthropicTool(_Open):
    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: StrictStr | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool | None = None


class MessagesRequest(BaseModel):
    """The body of ``POST /v1/messages`` (``max_tokens`` is required, as Anthropic's is)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: StrictInt = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: StrictStr | list[TextBlock] | None = None
    stop_sequences: list[StrictStr] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: StrictBool | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # not Anthropic's; as in OpenAI's API
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None

    def tool_choice_name(self) -> str | None:
        """In OpenAI's terms: None (no tools or ``none``), "auto", "required" or a name."""
        choice = self.tool_choice
        if not self.tools or (choice is not None and choice.type == "none"):
            return None
        if choice is None or choice.type == "auto":
            return "auto"
        if choice.type == "any":
            return "required"
        return choice.name

    def check(self) -> None:
        """ApiError 400 for what cannot be honoured (A25)."""
        if self.tool_choice is not None and self.tool_choice.type == "tool":
            names = {t.name for t in self.tools or []}
            if self.tool_choice.name not in names:
                raise ApiError(f"tool_choice.name must name one of 'tools' (got {self.tool_choice.name!r}).",
                               param="tool_choice.name")
        if any(s == "" for s in self.stop_sequences or []):
            raise ApiError("stop_sequences must be non-empty strings.", param="stop_sequences")
        check_extra_fields(self.model_extra or {}, HARMLESS, NEUTRAL)

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation in transformers' chat format: the system prompt first, ``tool_use``
        blocks as an assistant's ``tool_calls``, ``tool_result`` blocks as ``tool`` messages."""
        out: list[dict[str, Any]] = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            out.append({"role": "system", "content": text})
        names = {b.id: b.name for m in self.messages if not isinstance(m.content, str)
                 for b in m.content if isinstance(b, ToolUseBlock)}
        for m in self.messages:
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": m.content})
                continue
            texts = [b.text for b in m.content if isinstance(b, TextBlock)]
            if m.role == "assistant":
                message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
                calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                         for b in m.content if isinstance(b, ToolUseBlock)]
                if calls:
                    message["tool_calls"] = calls
                out.append(message)
                continue
            for b in m.content:
                if isinstance(b, ToolResultBlock):
                    tool = {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                    if b.tool_use_id in names:
                        tool["name"] = names[b.tool_use_id]
                    out.append(tool)
                elif isinstance(b, ToolUseBlock):
                    raise ApiError("tool_use blocks belong in assistant messages.", param="messages")
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
        return out

    def openai_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                  **({"description": t.description} if t.description else {})}}
                for t in self.tools or []]


def anthropic_error(error: ApiError) -> JSONResponse:
    """``error`` in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    message = f"{error.param}: {error.message}" if error.param and error.param not in error.message else error.message
    headers = {"Retry-After": str(error.retry_after_s or 1)} if error.status in (429, 503) else None
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                        status_code=error.status, headers=headers)


def _stream_error(error: ApiError) -> bytes:
    kind = ERROR_TYPES.get(error.status, "api_error")
    return sse({"type": "error", "error": {"type": kind, "message": error.message}}, event="error")


async def count_tokens(request: Request, engine: Engine, tools: ToolSupport) -> Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": n}`` of the templated prompt."""
    try:
        body = await read_json_object(request)
        body.setdefault("max_tokens", 1)
        try:
            req = MessagesRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error_to_api_error(e) from None
        req.check()
        if req.model != engine.model_id:
            raise model_not_found(engine, req.model)
        ids, _, _ = await _prompt(req, engine, tools)
        return JSONResponse({"input_tokens": len(ids)})
    except ApiError as e:
        return anthropic_error(e)


async def _prompt(req: MessagesRequest, engine: Engine, tools: ToolSupport) -> tuple[list[int], Any, str]:
    choice = req.tool_choice_name()
    fmt = await tools.format() if choice is not None else None
    template = req.template_messages()
    check_prompt_chars(sum(len(m["content"]) for m in template), engine.context_length, "messages")
    prefill = fmt.prefill(choice) if fmt is not None else ""
    try:
        ids = await asyncio.to_thread(engine.encode_chat, template, req.openai_tools() if fmt is not None else None)
        if prefill:
            ids = ids + await asyncio.to_thread(engine.encode, prefill, add_special_tokens=False)
    except MeshError as e:
        raise engine_failure(e) from None
    return ids, fmt, prefill


async def messages(request: Request, engine: Engine, status: ClusterStatus, tools: ToolSupport) -> Response:
    try:
        return await _messages(request, engine, status, tools)
    except ApiError as e:
        return anthropic_error(e)


async def _messages(request: Request, engine: Engine, status: ClusterStatus, tools: ToolSupport) -> Response:
    req = await parse_body(request, MessagesRequest)
    req.check()
    admit(engine, status, req.model)
    ids, fmt, prefill = await _prompt(req, engine, tools)
    params = SamplingParams(
        max_tokens=max_tokens_for(req.max_tokens, "max_tokens", len(ids), engine.context_length),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
    )
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    try:
        choices = Choices.fan_out(engine, [ids], params, 1, list(req.stop_sequences or []),
                                  keep_special=fmt is not None)
    except MeshError as e:
        raise engine_failure(e) from None
    one = 1 if req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use else None
    parser = ToolStream(fmt, prefill, id_prefix="toolu_", max_calls=one) if fmt is not None else None
    model = engine.model_id

    def stop_reason() -> tuple[str, str | None]:
        g = choices.items[0]
        if parser is not None and parser.calls and g.finish_reason == "stop":
            return "tool_use", None
        if g.stop_string is not None:
            return "stop_sequence", g.stop_string
        return STOP_REASONS.get(g.finish_reason or "", "end_turn"), None

    async def collect() -> dict[str, Any]:
        text = (await choices.collect())[0]
        content: list[dict[str, Any]] = []
        if parser is not None:
            text = parser.feed(text).content + parser.finish().content
        if text:
            content.append({"type": "text", "text": text})
        for call in parser.calls if parser is not None else []:
            content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments)})
        reason, sequence = stop_reason()
        return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence,
                "usage": {"input_tokens": len(ids), "output_tokens": choices.items[0].completion_tokens}}

    async def events() -> AsyncGenerator[bytes, None]:
        yield sse({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": len(ids), "output_tokens": 0}}},
            event="message_start")
        blocks = _Blocks()
        async for _, piece, _ in choices.events():
            if piece is None:
                if parser is not None:
                    for event in blocks.add(parser.finish()):
                        yield event
                break
            for event in blocks.add(parser.feed(piece) if parser is not None else Delta(content=piece)):
                yield event
        for event in blocks.close():
            yield event
        reason, sequence = stop_reason()
        yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": {"output_tokens": choices.items[0].completion_tokens}}, event="message_delta")
        yield sse({"type": "message_stop"}, event="message_stop")

    def stream() -> AsyncGenerator[bytes, None]:
        return guarded(events(), choices, message_id, error_event=_stream_error, done=None)

    return await respond(request, choices, message_id, stream=stream if req.stream else None, collect=collect)


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class _Blocks:
    """Content blocks of a streamed message, opened and closed as text and calls arrive."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def _start(self, block: dict[str, Any]) -> bytes:
        self.index += 1
        self.kind = block["type"]
        return sse({"type": "content_block_start", "index": self.index, "content_block": block},
                   event="content_block_start")

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta}, event="content_block_delta")

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [sse({"type": "content_block_stop", "index": self.index}, event="content_block_stop")]

    def add(self, delta: Delta) -> list[bytes]:
        out: list[bytes] = []
        if delta.content:
            if self.kind != "text":
                out += self.close()
                out.append(self._start({"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": delta.content}))
        for call, start, text in delta.calls:
            if start:
                out += self.close()
                out.append(self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}))
            if text:
                out.append(self._delta({"type": "input_json_delta", "partial_json": text}))
        return out
