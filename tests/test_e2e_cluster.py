"""End to end: real `python -m mesh node` processes on 127.0.0.1, driven by the openai client."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from mesh.testing.cluster import LocalCluster, http_json
from tests.conftest import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def _chat(client: OpenAI, prompt: str, *, stream: bool, max_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _client(node) -> OpenAI:
    return OpenAI(base_url=node.api_url + "/v1", api_key="unused", timeout=120, max_retries=0)


# spec N24: a chat whose system prompt spans whole prefill chunks (128 tokens), and its second turn
SYSTEM = " ".join(f"Rule {i}: answer briefly, in plain words, and name the unit of every number." for i in range(20))
TURN1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How far is the Moon?"}]
TURN2 = [*TURN1, {"role": "assistant", "content": "About 384,400 km."},
         {"role": "user", "content": "And the Sun?"}]


def _chat_messages(client: OpenAI, messages: list[dict[str, str]]) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def single_node_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    with LocalCluster(1, tmp_path_factory.mktemp("single")) as cluster:
        cluster.wait_ready()
        client = _client(cluster.nodes[0])
        texts = {p: _chat(client, p, stream=False) for p in PROMPTS}
        texts["turn2"] = _chat_messages(client, TURN2)  # cold: nothing of it is cached yet
        return texts


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(2, tmp_path_factory.mktemp("pair")) as cluster:
        cluster.wait_ready()
        yield cluster


@pytest.mark.spec("N3", "N6")
def test_two_nodes_stream_equals_single_node(two_nodes: LocalCluster, single_node_texts: dict[str, str]) -> None:
    second = two_nodes.nodes[1]
    for prompt in PROMPTS:
        text = _chat(_client(second), prompt, stream=True)
        assert text == single_node_texts[prompt] and len(text) > 10
    status, info = http_json(second.api_url + "/v1/cluster")
    assert status == 200 and info["model"] == MODEL and info["num_layers"] == 30
    members = sorted(info["members"], key=lambda m: m["layer_start"])
    assert len(members) == 2
    assert [(m["layer_start"], m["layer_end"]) for m in members] == [(0, 15), (15, 30)]
    assert {m["address"] for m in members} == {f"127.0.0.1:{n.port}" for n in two_nodes.nodes}
    # the node offers its memory less the prefix cache's budget (spec N24)
    assert all(m["backend"] == "torch" and m["memory_bytes"] == (4 << 30) - (256 << 20) for m in members)
    # both nodes agree on the plan and each loaded only its own range
    _, other = http_json(two_nodes.nodes[0].api_url + "/v1/cluster")
    assert other["plan_id"] == info["plan_id"]
    # (node 0 may have begun loading its solo plan [0, 30) just before node 1 linked up; what
    # counts is that the last range each node loaded is its own share of the final plan)
    by_address = {m["address"]: (m["layer_start"], m["layer_end"]) for m in members}
    for node in two_nodes.nodes:
        loaded = re.findall(r"backend: loaded layers \[(\d+), (\d+)\)", node.log_text())  # not "has not loaded"
        assert loaded and tuple(map(int, loaded[-1])) == by_address[f"127.0.0.1:{node.port}"]


@pytest.mark.spec("G5")
def test_the_gym_times_training_on_a_live_clusters_measured_topology(two_nodes: LocalCluster) -> None:
    """``GET /v1/cluster`` carries the members' measured profiles and links in the topology-file
    format; ``python -m mesh gym --topology URL`` (and ``plan``) read it."""
    from mesh.gym.simclock import SimClock
    from mesh.tools.gym_cmd import load_named_topology

    deadline = time.monotonic() + 60
    while True:
        topo = load_named_topology(two_nodes.nodes[0].api_url)
        if len(topo.devices) == 2 and topo.links or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(topo.devices) == 2 and len(topo.links) == 1, topo
    assert all(d.flops > 0 and d.memory_bytes > 0 for d in topo.devices)
    clock = SimClock(topo, 2)
    assert clock.sync("all-reduce", 1e6, [0, 1]).seconds > 0


@pytest.mark.spec("A17")
def test_metrics_count_requests_and_show_link_rtt(two_nodes: LocalCluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    node = two_nodes.nodes[0]
    _chat(_client(node), PROMPTS[0], stream=False, max_tokens=4)
    deadline = time.monotonic() + 30
    while True:
        with httpx.Client(timeout=10) as client:
            text = client.get(node.api_url + "/metrics").text
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        if "mesh_link_rtt_seconds" in samples or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert samples["mesh_requests_total"].labels == {"outcome": "finished"} and samples["mesh_requests_total"].value >= 1
    assert samples["mesh_generated_tokens_total"].value >= 4 and samples["mesh_ttft_seconds_count"].value >= 1
    assert samples["mesh_placement_changes_total"].value >= 1
    assert 0 < samples["mesh_link_rtt_seconds"].value < 1.0  # the loopback link to the other node


@pytest.mark.spec("N7", "N22")
def test_concurrent_requests_keep_separate_caches(two_nodes: LocalCluster, single_node_texts: dict[str, str]) -> None:
    """Six concurrent greedy requests through a 2-node pipeline, batched at both stages, give
    each the text a single node gives it alone."""
    before = [http_json(n.api_url + "/v1/cluster")[1]["local"] for n in two_nodes.nodes]
    async def run() -> list[str]:
        clients = [AsyncOpenAI(base_url=n.api_url + "/v1", api_key="x", timeout=120, max_retries=0) for n in two_nodes.nodes]

        async def one(i: int, prompt: str) -> str:
            reply = await clients[i % 2].chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24)
            return reply.choices[0].message.content or ""

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS * 2)))
        finally:
            for c in clients:
                await c.close()

    texts = asyncio.run(run())
    assert texts == [single_node_texts[p] for p in PROMPTS * 2]
    after = [http_json(n.api_url + "/v1/cluster")[1]["local"] for n in two_nodes.nodes]
    for a, b in zip(before, after, strict=True):  # both stages ran batches of several requests' steps
        assert b["batched_steps"] - a["batched_steps"] > b["batches"] - a["batches"] > 0


@pytest.mark.spec("N24")
def test_the_next_turn_of_a_chat_starts_from_the_prefix_cache_with_the_cold_runs_text(
        two_nodes: LocalCluster, single_node_texts: dict[str, str]) -> None:
    """Turn 1 through one node, turn 2 through the other: the stages kept turn 1's whole prompt
    chunks, turn 2 starts from them and gives the text of a cold run."""
    first, second = two_nodes.nodes
    _chat_messages(_client(first), TURN1)  # the stages keep its prompt's whole chunks once prefilled
    before = http_json(second.api_url + "/v1/cluster")[1]["local"]["prefix_cache"]
    assert _chat_messages(_client(second), TURN2) == single_node_texts["turn2"]
    after = http_json(second.api_url + "/v1/cluster")[1]["local"]["prefix_cache"]
    assert after["hits"] == before["hits"] + 1 and after["tokens"] - before["tokens"] >= 256
    assert after["entries"] >= 1 and after["bytes"] > 0


def _kv_caches(node) -> int:
    _, info = http_json(node.api_url + "/v1/cluster")
    return int(info["local"]["kv_caches"])


@pytest.mark.spec("N8")
def test_client_disconnect_frees_kv_cache_on_every_node(two_nodes: LocalCluster) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "temperature": 0, "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", two_nodes.nodes[1].api_url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            # Keep the line iterator referenced: breaking out of a for loop would close it, and
            # with it the connection, before the caches are counted.
            lines = response.iter_lines()
            seen = 0
            while seen < 4:
                if next(lines).startswith("data: {"):
                    seen += 1
            assert [_kv_caches(n) for n in two_nodes.nodes] == [1, 1]  # the request holds a cache on each stage
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_kv_caches(n) for n in two_nodes.nodes):
        time.sleep(0.1)
    assert [_kv_caches(n) for n in two_nodes.nodes] == [0, 0]
    # the cancelled request did not run to max_tokens
    ends = [line for line in two_nodes.nodes[1].log_text().splitlines() if " end: " in line]
    assert ends and int(ends[-1].split(" end: ")[1].split()[0]) < 2000


@pytest.mark.spec("N10", "T4")
def test_malformed_frame_closes_only_that_link(two_nodes: LocalCluster, single_node_texts: dict[str, str]) -> None:
    first = two_nodes.nodes[0]
    with socket.create_connection(("127.0.0.1", first.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 64)
        sock.settimeout(10)
        closed = False
        try:
            while sock.recv(4096):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        assert closed
    status, _ = http_json(first.api_url + "/health")
    assert status == 200
    assert _chat(_client(first), PROMPTS[0], stream=False) == single_node_texts[PROMPTS[0]]


@pytest.mark.spec("N4", "P5")
def test_health_is_503_with_reason_when_the_model_cannot_be_placed(tmp_path: Path) -> None:
    with LocalCluster(1, tmp_path, memory_bytes=64 << 20) as cluster:
        node = cluster.nodes[0]
        deadline = time.monotonic() + 120
        status, body = 0, None
        while time.monotonic() < deadline:
            try:
                status, body = http_json(node.api_url + "/health")
                if "the node is starting" not in json.dumps(body):  # spec N4: 503 at once while it starts
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert status == 503 and "placement failed" in json.dumps(body)
        with httpx.Client(timeout=30) as client:
            reply = client.post(node.api_url + "/v1/chat/completions",
                                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 503 and "error" in reply.json()


@pytest.mark.spec("N9", "P6", "FO3", "FO6", "B9")
def test_losing_a_stage_mid_stream_the_stream_goes_on_with_the_same_text(
        tmp_path: Path, single_node_texts: dict[str, str]) -> None:
    """The first stage dies after 5 streamed chunks; the survivor re-places every layer on
    itself (reusing the ones it holds), re-prefills, and the stream continues to the text a
    fault-free single node gives."""
    prompt = PROMPTS[0]
    with LocalCluster(2, tmp_path) as cluster:
        cluster.wait_ready()
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": 24, "stream": True}
        events: list[str] = []
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", cluster.nodes[1].api_url + "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if len(events) == 5:
                        cluster.kill(0)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), [e for e in events if "error" in e]
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1] if json.loads(e).get("choices"))
        assert text == single_node_texts[prompt]
        _, info = http_json(cluster.nodes[1].api_url + "/v1/cluster")
        assert [(m["layer_start"], m["layer_end"]) for m in info["members"]] == [(0, 30)]
        assert info["local"]["recovery_s"] and info["local"]["kv_caches"] == 0
        assert re.search(r"loaded layers \[0, 30\) of 30 on cpu \(15 reused, 15 read\)", cluster.nodes[1].log_text())


@pytest.mark.spec("N5")
def test_http_and_heartbeats_served_while_computing(two_nodes: LocalCluster) -> None:
    """While a long generation computes, both nodes keep answering /health (the event loop is
    never blocked by compute); the bound is a liveness bound, not a speed target."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "temperature": 0, "max_tokens": 60, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", two_nodes.nodes[1].api_url + "/v1/chat/completions", json=body) as response:
            checks = 0
            for line in response.iter_lines():
                if line.startswith("data: {") and checks < 5:
                    for node in two_nodes.nodes:
                        status, _ = http_json(node.api_url + "/health", timeout_s=5.0)
                        assert status == 200
                    checks += 1
    assert checks == 5


@pytest.mark.spec("P17", "P19")
def test_solver_placement_leaves_out_a_member_that_would_only_slow_the_pipeline(
        tmp_path: Path, single_node_texts: dict[str, str]) -> None:
    """Two equal members and a model one of them holds: a pipeline only adds a hop per token
    (batch 1), so the solver places every layer on one member; the other still serves."""
    from mesh.placement.profile import load_or_measure_profile

    load_or_measure_profile(tmp_path / "profile", budget_s=1.0)
    with LocalCluster(2, tmp_path / "solver", placement="solver",
                      profile=tmp_path / "profile" / "profile.json") as cluster:
        cluster.wait_ready()

        def one_stage() -> dict | None:
            _, info = http_json(cluster.nodes[1].api_url + "/v1/cluster")
            placed = [m for m in info["members"] if m["layer_start"] is not None]
            return info if len(info["members"]) == 2 and len(placed) == 1 and info["ready"] else None

        deadline = time.monotonic() + 120
        while (info := one_stage()) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert info is not None, "the solver's one-stage plan never became ready"
        assert [(m["layer_start"], m["layer_end"]) for m in info["members"] if m["layer_start"] is not None] == [(0, 30)]
        assert info["performance"]["predicted"] is not None  # both profiles published
        # spec P19: the placed member timed its stage before serving, and published it
        deadline = time.monotonic() + 30
        while not info["performance"]["predicted"]["calibrated"] and time.monotonic() < deadline:
            time.sleep(0.5)
            _, info = http_json(cluster.nodes[1].api_url + "/v1/cluster")
        assert info["performance"]["predicted"]["calibrated"]
        placed = next(n for n in cluster.nodes if "calibration: decode" in n.log_text())
        assert "could not calibrate" not in placed.log_text()
        prompt = PROMPTS[0]
        for node in cluster.nodes:  # the idle member coordinates through the placed one
            assert _chat(_client(node), prompt, stream=True) == single_node_texts[prompt]


@pytest.mark.spec("N19", "B15")
def test_a_node_computes_in_bf16_with_int4_weights_where_its_profile_measured_bf16_fast(
        tmp_path: Path, default_model) -> None:
    """No --dtype, and a profile whose bf16 matmuls are twice f32's: the node computes in bf16,
    says so in /v1/cluster, keeps the GGUF's Q4_1 matrices as int4 and its Q8_0 head as int8 (the default
    --quantize), and answers with the greedy text of that stage run in this process."""
    from backends.torch import TorchBackend
    from mesh.placement.profile import load_or_measure_profile
    from mesh.testing.pipeline import greedy_generate

    load_or_measure_profile(tmp_path / "profile", budget_s=0.5)
    path = tmp_path / "profile" / "profile.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "flops": {"f32": 1.0e11, "bf16": 2.0e11}}))
    prompt = PROMPTS[0]
    stage = TorchBackend(device="cpu", dtype="bf16")
    stage.load(default_model, 0, 30)
    tokens = greedy_generate([stage], default_model.encode_chat([{"role": "user", "content": prompt}]), 12)
    special = set(default_model.tokenizer.all_special_ids)
    tokens = tokens[:next((i for i, t in enumerate(tokens) if t in special), len(tokens))]
    with LocalCluster(1, tmp_path / "node", profile=path) as cluster:
        cluster.wait_ready()
        node = cluster.nodes[0]
        _, info = http_json(node.api_url + "/v1/cluster")
        assert info["local"]["dtype"] == "bf16"
        assert "int4+int8 weight-only" in node.log_text()
        text = _chat(_client(node), prompt, stream=False, max_tokens=12)
    assert text == default_model.tokenizer.decode(tokens, skip_special_tokens=True) and len(text) > 5


@pytest.mark.spec("N20")
def test_a_stopping_node_lets_its_running_stream_finish_and_refuses_new_requests(tmp_path: Path) -> None:
    """SIGTERM mid-stream: the stream ends with all its tokens and [DONE], not an error; a new
    request meanwhile gets a 503 that says the node is leaving, and so does /health; then the
    node exits."""
    import signal

    with LocalCluster(1, tmp_path) as cluster:
        cluster.wait_ready()
        node = cluster.nodes[0]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                "temperature": 0, "max_tokens": 48, "stream": True, "stream_options": {"include_usage": True}}
        events: list[str] = []
        refused = None
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", node.api_url + "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if len(events) == 3 and refused is None:
                        cluster.send_signal(0, signal.SIGTERM)
                        for _ in range(50):  # the signal is handled asynchronously
                            refused = client.post(node.api_url + "/v1/chat/completions", json={
                                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                            if refused.status_code != 200:
                                break
                            time.sleep(0.05)
                        health = client.get(node.api_url + "/health")  # a load balancer stops sending here
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        usage = next(json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage"))
        assert usage["completion_tokens"] == 48 or any(json.loads(e)["choices"][0].get("finish_reason") == "stop"
                                                      for e in events[:-1] if json.loads(e).get("choices"))
        assert refused is not None and refused.status_code == 503 and "leaving" in refused.text
        assert health.status_code == 503 and "leaving" in health.text
        node.process.wait(timeout=30)
        assert "stopping: running requests may finish" in node.log_text()
