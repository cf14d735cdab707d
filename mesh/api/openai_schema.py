"""The request body of ``POST /v1/chat/completions`` as pydantic v2 models, and its checks.

Knows OpenAI's field names and what mesh supports of them; knows nothing of engines,
HTTP or tokenizers. Spec: specs/api.md (A2 bad input is 4xx, A10 ``n`` bounds,
A14 unsupported fields rejected, harmless ones accepted, A21 tools).

Types are strict (no "5" for 5, no true for 1) because OpenAI rejects wrong types with 400.
Extra top-level fields are allowed by the model and then sorted by ``check_supported``:
harmless ones are accepted and ignored, ones that would change the result are rejected with
a 400 that names them, and unknown ones are rejected as OpenAI does ("Unrecognized request
argument supplied").
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from mesh.errors import ApiError
from mesh.runtime.engine import MAX_TOP_LOGPROBS

VALID_ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16  # n per request (OpenAI allows 128; each choice is a request on the cluster)
MAX_TOOLS = 128  # OpenAI's limit
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# Accepted and ignored whatever their value: they do not change the generated text.
HARMLESS_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "stream_options",
    }
)
# Accepted only with a value that means "off"; anything else would change the result.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "moderation": (None,),
}


def _text_parts(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("invalid_type", "content must be a string or a list of text content parts")
    texts: list[str] = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise PydanticCustomError("invalid_type", "content part [{i}] must be an object", {"i": i})
        kind = part.get("type")
        if kind != "text":
            raise PydanticCustomError(
                "unsupported_value",
                "content part [{i}] has type '{kind}'; only 'text' parts are supported",
                {"i": i, "kind": kind},
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise PydanticCustomError("invalid_type", "content part [{i}] needs a string 'text'", {"i": i})
        texts.append(text)
    return "\n".join(texts)


def _check_stop(value: Any) -> str | list[str] | None:
    # A hand-written check instead of a pydantic union, so errors name `stop`, not a
    # union branch.
    if value is None or isinstance(value, str):
        strings = [] if value is None else [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        strings = value
    else:
        raise PydanticCustomError("invalid_type", "stop must be a string or a list of up to 4 strings")
    if len(strings) > MAX_STOP_STRINGS:
        raise PydanticCustomError(
            "invalid_value",
            "stop takes at most {n} strings, got {got}",
            {"n": MAX_STOP_STRINGS, "got": len(strings)},
        )
    if any(s == "" for s in strings):
        raise PydanticCustomError("invalid_value", "stop strings must be non-empty")
    return value  # type: ignore[no-any-return]


StopField = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    arguments: StrictStr


class ToolCallIn(BaseModel):
    """A call in an earlier assistant message: ``arguments`` is a JSON string, as OpenAI sends it."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message. ``content`` is a string or a list of ``{"type": "text", "text": ...}``
    parts, which are joined with "\\n" (as vLLM does); ``developer`` is treated as ``system``.
    An assistant message may carry ``tool_calls`` (then ``content`` may be null); a ``tool``
    message answers one call by ``tool_call_id``."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str | None:
        return _text_parts(value)

    def check_shape(self, i: int) -> None:
        """ApiError 400 naming the field for a message whose fields do not fit its role."""
        where = f"messages.[{i}]"
        if self.tool_calls and self.role != "assistant":
            raise ApiError(f"Only assistant messages carry tool_calls ({where} is {self.role}).",
                           param=f"{where}.tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ApiError(f"Missing required parameter: '{where}.tool_call_id'.", param=f"{where}.tool_call_id",
                           code="missing_required_parameter")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ApiError(f"Missing required parameter: '{where}.content'.", param=f"{where}.content",
                           code="missing_required_parameter")

    def to_template(self, call_names: dict[str, str] | None = None) -> dict[str, Any]:
        """The message as chat templates want it (transformers' convention): ``developer``
        becomes ``system``; a call's JSON ``arguments`` become an object; a tool message gets
        the ``name`` of the function it answers (from ``call_names``, id -> name)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.content or ""}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    args: Any = json.loads(call.function.arguments)
                except ValueError:
                    args = call.function.arguments
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": args}})
            out["tool_calls"] = calls
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            name = self.name or (call_names or {}).get(self.tool_call_id or "")
            if name:
                out["name"] = name
        return out


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolSpec(BaseModel):
    """One entry of ``tools``: ``{"type": "function", "function": {name, description, parameters}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec

    def to_template(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (spec A27)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_text(self) -> str | None:
        """The JSON schema to constrain decoding with (``json_object``: any object), or None."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ApiError("response_format of type 'json_schema' needs 'json_schema'.",
                               param="response_format.json_schema", code="missing_required_parameter")
            return json.dumps(self.json_schema.schema_)  # key order kept: properties are written in it
        return None


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class _Name(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: StrictStr

    type: Literal["function"]
    function: _Name


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (validated; not yet checked against the
    engine: model id and context length are the API's job)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, gt=0)
    max_completion_tokens: StrictInt | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopField = None
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: StrictBool | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extension: keep generating past end-of-sequence (benchmarks need exact lengths).
    ignore_eos: StrictBool | None = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logprobs_k(self) -> int | None:
        """``SamplingParams.logprobs``: None when not asked, else the alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_choice_name(self) -> str | None:
        """``None``, "auto", "required" or the named function (``"none"`` and no tools: None)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def call_names(self) -> dict[str, str]:
        """Tool-call id -> function name over the conversation's assistant messages."""
        return {c.id: c.function.name for m in self.messages for c in (m.tool_calls or [])}

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


def format_param(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic error location in OpenAI's style: ``messages.[0].role``."""
    if not loc:
        return None
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)


def validation_error_to_api_error(error: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field (``param``), the way OpenAI does."""
    first = error.errors(include_url=False)[0]
    param = format_param(tuple(first["loc"]))
    kind = first["type"]
    if kind == "missing":
        return ApiError(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    code = "invalid_type" if kind.endswith("_type") or kind == "invalid_type" else "invalid_value"
    if kind == "unsupported_value":
        code = "unsupported_value"
    where = f"'{param}'" if param else "the request body"
    return ApiError(f"Invalid value for {where}: {first['msg']}.", param=param, code=code)


def _unsupported(name: str, value: Any, neutral: tuple[Any, ...]) -> ApiError:
    return ApiError(
        f"Parameter '{name}' with value {value!r} is not supported by mesh; "
        f"leave it out or set it to one of {list(neutral)!r}.",
        param=name,
        code="unsupported_parameter",
    )


def check_supported(request: ChatCompletionRequest) -> None:
    """Raise ``ApiError`` (400) for a field mesh cannot honour (spec A10, A14)."""
    if request.response_format is not None and request.response_format.type != "text" and request.tool_choice_name:
        raise ApiError("response_format json_object / json_schema together with tools is not supported; "
                       "send one of them.", param="response_format", code="unsupported_value")
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError("top_logprobs needs logprobs: true.", param="top_logprobs", code="invalid_value")
    if request.tool_choice not in (None, "none", "auto") and not request.tools:
        raise ApiError("tool_choice needs 'tools'.", param="tool_choice", code="invalid_value")
    if isinstance(request.tool_choice, NamedToolChoice) and request.tools:
        named = request.tool_choice.function.name
        if named not in {t.function.name for t in request.tools}:
            raise ApiError(f"tool_choice names '{named}', which is not in 'tools'.", param="tool_choice",
                           code="invalid_value")
    if (
        request.max_tokens is not None
        and request.max_completion_tokens is not None
        and request.max_tokens != request.max_completion_tokens
    ):
        raise ApiError(
            "max_tokens and max_completion_tokens disagree; send only max_completion_tokens.",
            param="max_tokens",
        )
    if request.stream_options is not None and not request.stream:
        raise ApiError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    for i, message in enumerate(request.messages):
        message.check_shape(i)
        for key, value in (message.model_extra or {}).items():
            if value is None or (key == "refusal"):
                continue
            raise ApiError(
                f"Field '{key}' in messages[{i}] is not supported by mesh.",
                param=f"messages.[{i}].{key}",
                code="unsupported_parameter",
            )
    check_extra_fields(request.model_extra or {}, HARMLESS_FIELDS, NEUTRAL_VALUES)


def check_extra_fields(extra: dict[str, Any], harmless: frozenset[str], neutral: dict[str, tuple[Any, ...]]) -> None:
    """Sort the fields a model did not declare (spec A14): ``harmless`` ones are ignored,
    ``neutral`` ones pass only with a value that means "off" (else 400
    ``unsupported_parameter``), anything else is 400 ``unknown_parameter``."""
    for key, value in extra.items():
        if key in harmless:
            continue
        if key in neutral:
            # `x == 0` is true for False too; compare types so `logprobs: 0` is rejected alike.
            if any(value == v and type(value) is type(v) for v in neutral[key]):
                continue
            if isinstance(value, float) and 0 in neutral[key] and value == 0.0:
                continue
            raise _unsupported(key, value, neutral[key])
        raise ApiError(
            f"Unrecognized request argument supplied: {key}",
            param=key,
            code="unknown_parameter",
        )
