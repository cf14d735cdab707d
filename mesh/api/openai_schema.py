"""The request body of ``POST /v1/chat/completions`` as pydantic v2 models, and its checks.

Knows OpenAI's field names and what mesh supports of them; knows nothing of engines,
HTTP or tokenizers. Spec: specs/api.md (A2 bad input is 4xx, A10 n>1 rejected,
A14 unsupported fields rejected, harmless ones accepted).

Types are strict (no "5" for 5, no true for 1) because OpenAI rejects wrong types with 400.
Extra top-level fields are allowed by the model and then sorted by ``check_supported``:
harmless ones are accepted and ignored, ones that would change the result are rejected with
a 400 that names them, and unknown ones are rejected as OpenAI does ("Unrecognized request
argument supplied").
"""

from __future__ import annotations

from typing import Any, Literal

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

from mesh.errors import ApiError

VALID_ROLES = ("system", "user", "assistant", "developer")
MAX_STOP_STRINGS = 4  # OpenAI's limit
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# Accepted and ignored whatever their value: they do not change the generated text.
HARMLESS_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
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
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "moderation": (None,),
}


class ChatMessage(BaseModel):
    """One message. ``content`` is a string or a list of ``{"type": "text", "text": ...}``
    parts, which are joined with "\\n" (as vLLM does); ``developer`` is treated as ``system``."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError(
                "invalid_type", "content must be a string or a list of text content parts"
            )
        texts: list[str] = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise PydanticCustomError(
                    "invalid_type", "content part [{i}] must be an object", {"i": i}
                )
            kind = part.get("type")
            if kind != "text":
                raise PydanticCustomError(
                    "unsupported_value",
                    "content part [{i}] has type '{kind}'; only 'text' parts are supported",
                    {"i": i, "kind": kind},
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise PydanticCustomError(
                    "invalid_type", "content part [{i}] needs a string 'text'", {"i": i}
                )
            texts.append(text)
        return "\n".join(texts)

    def to_template(self) -> dict[str, str]:
        """The message as the chat template wants it (``developer`` becomes ``system``)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


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
    stop: str | list[str] | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extension: keep generating past end-of-sequence (benchmarks need exact lengths).
    ignore_eos: StrictBool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> str | list[str] | None:
        # A hand-written check instead of a pydantic union, so errors name `stop`, not a
        # union branch.
        if value is None or isinstance(value, str):
            strings = [] if value is None else [value]
        elif isinstance(value, list) and all(isinstance(s, str) for s in value):
            strings = value
        else:
            raise PydanticCustomError(
                "invalid_type", "stop must be a string or a list of up to 4 strings"
            )
        if len(strings) > MAX_STOP_STRINGS:
            raise PydanticCustomError(
                "invalid_value",
                "stop takes at most {n} strings, got {got}",
                {"n": MAX_STOP_STRINGS, "got": len(strings)},
            )
        if any(s == "" for s in strings):
            raise PydanticCustomError("invalid_value", "stop strings must be non-empty")
        return value  # type: ignore[no-any-return]

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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


def _unsupported(name: str, value: Any) -> ApiError:
    return ApiError(
        f"Parameter '{name}' with value {value!r} is not supported by mesh; "
        f"leave it out or set it to one of {[v for v in NEUTRAL_VALUES[name]]!r}.",
        param=name,
        code="unsupported_parameter",
    )


def check_supported(request: ChatCompletionRequest) -> None:
    """Raise ``ApiError`` (400) for a field mesh cannot honour (spec A10, A14)."""
    if request.n is not None and request.n != 1:
        raise ApiError(
            f"n>1 is not supported (got n={request.n}); mesh returns one choice per request.",
            param="n",
            code="unsupported_value",
        )
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
        for key, value in (message.model_extra or {}).items():
            if value is None or (key == "refusal"):
                continue
            raise ApiError(
                f"Field '{key}' in messages[{i}] is not supported by mesh (no tool calls).",
                param=f"messages.[{i}].{key}",
                code="unsupported_parameter",
            )
    for key, value in (request.model_extra or {}).items():
        if key in HARMLESS_FIELDS:
            continue
        if key in NEUTRAL_VALUES:
            # `x == 0` is true for False too; compare types so `logprobs: 0` is rejected alike.
            if any(value == v and type(value) is type(v) for v in NEUTRAL_VALUES[key]):
                continue
            if isinstance(value, float) and 0 in NEUTRAL_VALUES[key] and value == 0.0:
                continue
            raise _unsupported(key, value)
        raise ApiError(
            f"Unrecognized request argument supplied: {key}",
            param=key,
            code="unknown_parameter",
        )
