"""``POST /v1/completions``: OpenAI's legacy text-completion endpoint (plain prompts, no chat
template), used by evaluation harnesses and many tools.

``prompt`` is a string, a list of strings, a list of token ids or a list of those; each prompt
gets ``n`` choices, numbered prompt by prompt (choice ``p * n + j``), as OpenAI does. ``echo``
puts the prompt before the text; ``suffix`` asks for the text between prompt and suffix,
which needs a model trained for fill-in-the-middle (its tokenizer has the FIM tokens).
Spec: specs/api.md (A24).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
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
from mesh.api.logprobs import Spelling
from mesh.api.openai_schema import (
    HARMLESS_FIELDS,
    MAX_CHOICES,
    NEUTRAL_VALUES,
    SEED_MAX,
    SEED_MIN,
    StopField,
    StreamOptions,
    check_extra_fields,
)
from mesh.errors import ApiError, MeshError
from mesh.runtime.engine import ClusterStatus, Engine, Sampled, SamplingParams

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 16
# Fill-in-the-middle tokens (prefix, suffix, middle) of the families that have them: StarCoder /
# SmolLM, Qwen 2.5 Coder, CodeLlama. The prompt is laid out prefix-suffix-middle (PSM).
FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),
)


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (validated; ``prompt`` is checked by ``prompts``)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    prompt: str | list[Any]
    suffix: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    stop: StopField = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompts(self, vocab_size: int) -> list[str | list[int]]:
        """The prompts: strings or token-id lists. Raises ApiError 400 naming ``prompt``."""
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif p and all(type(x) is int for x in p):
            out = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            out = list(p)
        elif p and all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in p):
            out = [list(x) for x in p]
        else:
            raise ApiError("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                           "token-id lists, and not empty.", param="prompt", code="invalid_type")
        if len(out) > MAX_PROMPTS:
            raise ApiError(f"'prompt' holds {len(out)} prompts; mesh takes at most {MAX_PROMPTS}.", param="prompt")
        for ids in out:
            if isinstance(ids, list) and any(not 0 <= t < vocab_size for t in ids):
                raise ApiError(f"'prompt' holds a token id outside the vocabulary [0, {vocab_size}).",
                               param="prompt")
        return out


def check_completion_fields(req: CompletionRequest) -> None:
    """Raise ApiError 400 for a field mesh cannot honour (spec A24, as A14 for chat)."""
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(f"best_of other than n is not supported (got best_of={req.best_of}); mesh does not "
                       "rank candidates.", param="best_of", code="unsupported_value")
    if req.logprobs is not None and req.echo:
        raise ApiError("logprobs with echo would need the prompt's logprobs, which mesh does not compute; "
                       "leave one of them out.", param="logprobs", code="unsupported_value")
    if req.stream_options is not None and not req.stream:
        raise ApiError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options")
    check_extra_fields(req.model_extra or {}, HARMLESS_FIELDS, NEUTRAL_VALUES)


def fim_prompt(engine: Engine, prompt: str, suffix: str) -> str:
    """``prompt`` and ``suffix`` laid out for fill-in-the-middle; ApiError 400 (param ``suffix``)
    when the model's vocabulary has no FIM tokens."""
    vocab = engine.tokenizer.get_vocab() if hasattr(engine.tokenizer, "get_vocab") else {}
    for pre, suf, mid in FIM_TOKENS:
        if pre in vocab and suf in vocab and mid in vocab:
            return f"{pre}{prompt}{suf}{suffix}{mid}"
    raise ApiError(f"'suffix' needs a model trained for fill-in-the-middle; '{engine.model_id}' has no FIM "
                   "tokens in its vocabulary.", param="suffix", code="unsupported_value")


async def completions(request: Request, engine: Engine, status: ClusterStatus,
                      clock: Callable[[], float] = time.time) -> Response:
    req = await parse_body(request, CompletionRequest)
    check_completion_fields(req)
    admit(engine, status, req.model)
    vocab_size = len(engine.tokenizer) if hasattr(engine.tokenizer, "__len__") else 2**31
    prompts = req.prompts(vocab_size)
    check_prompt_chars(sum(len(p) for p in prompts if isinstance(p, str)), engine.context_length, "prompt")
    n = req.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(f"{len(prompts)} prompts times n={n} is {len(prompts) * n} choices; mesh takes at most "
                       f"{MAX_CHOICES} per request.", param="n")
    try:
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, list):
                ids.append(p)
            else:
                text = fim_prompt(engine, p, req.suffix) if req.suffix is not None else p
                ids.append(await asyncio.to_thread(engine.encode, text))
    except MeshError as e:
        raise engine_failure(e) from None
    longest = max(len(x) for x in ids)
    if not all(ids):
        raise ApiError("A prompt is empty after tokenizing.", param="prompt")
    params = SamplingParams(
        max_tokens=max_tokens_for(DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens, "max_tokens",
                                  longest, engine.context_length, what="prompt"),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        ignore_eos=bool(req.ignore_eos),
        logprobs=req.logprobs,
    )
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(clock())
    try:
        choices = Choices.fan_out(engine, ids, params, n, req.stop_strings)
    except MeshError as e:
        raise engine_failure(e) from None
    echoes = [""] * len(choices.items)
    if req.echo:
        for i in range(len(choices.items)):
            p = prompts[i // n]
            echoes[i] = p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=False)
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": engine.model_id}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    spelling = Spelling(engine.tokenizer) if req.logprobs is not None else None

    def logprobs(tokens: list[tuple[Sampled, int]], offset: int) -> dict[str, Any] | None:
        return spelling.completion(tokens, offset) if spelling is not None else None

    async def collect() -> dict[str, Any]:
        texts = await choices.collect()
        return {**head, "system_fingerprint": None, "usage": choices.usage, "choices": [
            {"text": echoes[i] + text, "index": i, "logprobs": logprobs(choices.items[i].sampled, len(echoes[i])),
             "finish_reason": choices.items[i].finish_reason}
            for i, text in enumerate(texts)]}

    def chunk(i: int, text: str, finish: str | None = None, tokens: list[tuple[Sampled, int]] | None = None) -> bytes:
        lp = logprobs(tokens, len(echoes[i])) if tokens else None
        event: dict[str, Any] = {**head, "choices": [
            {"text": text, "index": i, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            event["usage"] = None
        return sse(event)

    async def events() -> AsyncGenerator[bytes, None]:
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        pending: dict[int, list[tuple[Sampled, int]]] = {}
        async for i, piece, sampled in choices.events():
            pending.setdefault(i, []).extend(sampled)
            if piece is None:
                yield chunk(i, "", choices.items[i].finish_reason, pending.pop(i, []))
            elif piece:
                yield chunk(i, piece, None, pending.pop(i, []))
        if include_usage:
            yield sse({**head, "choices": [], "usage": choices.usage})

    def stream() -> AsyncGenerator[bytes, None]:
        return guarded(events(), choices, completion_id, error_event=lambda e: sse(e.to_json()), done=sse("[DONE]"))

    return await respond(request, choices, completion_id, stream=stream if req.stream else None, collect=collect)
