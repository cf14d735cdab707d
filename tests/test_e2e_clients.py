"""End to end: real clients against a live ``python -m mesh node`` (spec A20-A25).

The official ``openai`` and ``anthropic`` SDKs and LangChain's ``ChatOpenAI`` drive one node
serving a tiny random llama with a Hermes-style chat template. A tiny random model cannot
call tools, so the node runs the ``scripted`` backend (mesh/testing/scripted_backend.py): the
real torch backend whose logits are overridden to spell a scripted answer when the prompt
matches a rule. Template, sampler, detokenizer, tool-call parser and streaming are the node's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from mesh.testing.cluster import LocalCluster
from mesh.testing.tiny import tiny_model
from mesh.testing.tokenizers import HERMES_TEMPLATE

pytestmark = pytest.mark.slow

MODEL = "llama"
CALLS = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>')
ANSWER = "Paris is sunny; Oslo has snow."
RULES = [
    {"when": "<tool_response>", "reply": ANSWER},  # first: a round trip's prompt holds the question too
    {"when": "weather in Paris and Oslo", "reply": CALLS},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
QUESTION = "What is the weather in Paris and Oslo?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    folder = tiny_model("llama", tmp_path_factory.mktemp("model") / MODEL, max_position_embeddings=4096)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = HERMES_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def node(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    work = tmp_path_factory.mktemp("clients")
    script = work / "script.json"
    script.write_text(json.dumps(RULES))
    with LocalCluster(1, work / "cluster", model=str(folder), memory_bytes=1 << 30,
                      extra_args=["--backend", "scripted", "--dtype", "f32", "--prefix-cache-mb", "0"],
                      env={"MESH_SCRIPT": str(script)}) as cluster:
        cluster.wait_ready(timeout_s=120)
        yield cluster.nodes[0]


def _openai(node: Any) -> OpenAI:
    return OpenAI(base_url=node.api_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _check_calls(calls: list[Any]) -> None:
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris", "days": 2},
                                                                 {"city": "Oslo", "days": 1}]
    assert len({c.id for c in calls}) == 2


@pytest.mark.spec("A21", "A22")
def test_openai_sdk_tool_round_trip(node: Any) -> None:
    client = _openai(node)
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=300)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check both."
    _check_calls(choice.message.tool_calls)
    # streamed: many argument fragments, which the SDK's accumulator puts back together
    fragments = 0
    with client.chat.completions.stream(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=300) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                fragments += 1
        final = stream.get_final_completion()
    _check_calls(final.choices[0].message.tool_calls)
    assert fragments >= 10
    # the results go back and the model answers
    messages.append(choice.message.model_dump(exclude_none=True))
    for call, result in zip(choice.message.tool_calls, ["sunny", "snow"], strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=100)
    assert answer.choices[0].message.content == ANSWER and answer.choices[0].finish_reason == "stop"


@pytest.mark.spec("A25")
def test_anthropic_sdk_tool_round_trip(node: Any) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=node.api_url, api_key="unused", timeout=60, max_retries=0)
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    with client.messages.stream(model=MODEL, max_tokens=300, tools=[tool], messages=messages) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [u.input for u in uses] == [{"city": "Paris", "days": 2}, {"city": "Oslo", "days": 1}]
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]})
    messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": r}
                                                 for u, r in zip(uses, ["sunny", "snow"], strict=True)]})
    answer = client.messages.create(model=MODEL, max_tokens=100, tools=[tool], messages=messages)
    assert answer.content[0].text == ANSWER and answer.stop_reason == "end_turn"


@pytest.mark.spec("A21")
def test_langchain_agent_loop(node: Any) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, days: int = 1) -> str:
        """The weather in a city."""
        return {"Paris": "sunny", "Oslo": "snow"}[city]

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=node.api_url + "/v1", api_key="unused",
                                      max_retries=0, timeout=60, max_tokens=300)
    agent = llm.bind_tools([get_weather])
    history: list[Any] = [HumanMessage(QUESTION)]
    first = agent.invoke(history)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                                  ("get_weather", {"city": "Oslo", "days": 1})]
    history.append(first)
    for call in first.tool_calls:
        history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    assert agent.invoke(history).content == ANSWER
    streamed = None
    for chunk in agent.stream([HumanMessage(QUESTION)]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and [c["args"]["city"] for c in streamed.tool_calls] == ["Paris", "Oslo"]


@pytest.mark.spec("A20", "A24")
def test_completions_and_n_choices_on_the_real_model(node: Any) -> None:
    client = _openai(node)
    first = client.completions.create(model=MODEL, prompt=["Once upon", "a time"], n=2, max_tokens=8, seed=5,
                                      echo=True)
    again = client.completions.create(model=MODEL, prompt=["Once upon", "a time"], n=2, max_tokens=8, seed=5,
                                      echo=True)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert first.choices[0].text.startswith("Once upon") and first.choices[2].text.startswith("a time")
    assert 4 <= first.usage.completion_tokens <= 4 * 8
    streamed = {0: "", 1: "", 2: "", 3: ""}
    for chunk in client.completions.create(model=MODEL, prompt=["Once upon", "a time"], n=2, max_tokens=8, seed=5,
                                           echo=True, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in first.choices]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                          max_tokens=6, seed=11)
    single = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, seed=11)
    assert single.choices[0].message.content == chat.choices[0].message.content
    assert len({c.message.content for c in chat.choices}) > 1  # sampled at temperature 1: they differ


@pytest.mark.spec("A26")
def test_logprobs_are_identical_with_and_without_a_pipeline_split(folder: Path, tmp_path: Path) -> None:
    def run(n: int) -> tuple[Any, Any]:
        # one thread per node in both runs: a matmul's sums run in the same order, so the split's
        # logits are the single node's bit for bit, and so are the logprobs computed from them
        with LocalCluster(n, tmp_path / f"nodes{n}", model=str(folder), memory_bytes=1 << 30,
                          extra_args=["--dtype", "f32"], env={"OMP_NUM_THREADS": "1"}) as cluster:
            cluster.wait_ready(timeout_s=120)
            client = _openai(cluster.nodes[-1])
            stages = len(client.get("/cluster", cast_to=object)["members"])  # type: ignore[index]
            assert stages == n
            text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                              logprobs=3).choices[0].logprobs
            chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, seed=3, logprobs=True, top_logprobs=4)
            return text, chat.choices[0].logprobs.content

    (one_text, one_chat), (two_text, two_chat) = run(1), run(2)
    assert len(one_text.tokens) == 6 and all(1 <= len(t) <= 3 for t in one_text.top_logprobs)  # {text: logprob}
    assert (one_text.tokens, one_text.token_logprobs, one_text.top_logprobs) == (
        two_text.tokens, two_text.token_logprobs, two_text.top_logprobs)
    assert [e.model_dump() for e in one_chat] == [e.model_dump() for e in two_chat]
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 4 for e in one_chat)


@pytest.mark.spec("A27")
def test_structured_output_from_the_live_node_always_validates(node: Any) -> None:
    """A random tiny model writes whatever its logits say; under the schema's mask every answer
    still parses and validates, through the SDK's own structured-output helper as well."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=120)
        city: Literal["Paris", "Oslo", "Rome"]
        member: bool

    jsonschema = pytest.importorskip("jsonschema")
    client = _openai(node)
    schema = Person.model_json_schema()
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A person, please."}], seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        document = json.loads(reply.choices[0].message.content)
        jsonschema.validate(document, schema)
        assert list(document) == ["name", "age", "city", "member"]  # in the schema's order
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Someone."}],
                                           response_format=Person, seed=9, max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    anything = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON!"}], seed=1,
                                              max_tokens=40, response_format={"type": "json_object"},
                                              temperature=0.2)
    assert anything.choices[0].message.content.startswith("{")
    if anything.choices[0].finish_reason == "stop":  # an object of random size may not close in 40 tokens
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
