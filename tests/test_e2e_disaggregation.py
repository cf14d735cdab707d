"""End to end: a disaggregated cluster of real node processes on 127.0.0.1 (specs/node.md N13):
one node asks to prefill, two decode; the text equals a single node's, and the KV cache moved."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.testing.cluster import LocalCluster, http_json
from tests.conftest import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def _stream(url: str, prompt: str, max_tokens: int = 24) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    text = []
    with httpx.Client(timeout=120) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk
                text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
    return "".join(text)


def _counter(url: str, name: str) -> dict[str, float]:
    with httpx.Client(timeout=10) as client:
        families = text_string_to_metric_families(client.get(url + "/metrics").text)
    return {s.labels.get("outcome", ""): s.value for f in families if f.name == name for s in f.samples
            if s.name.endswith("_total")}


@pytest.mark.spec("N13")
def test_prefill_on_one_node_decode_on_two_gives_the_single_node_text(tmp_path: Path) -> None:
    with LocalCluster(1, tmp_path / "single") as single:
        single.wait_ready()
        expected = {p: _stream(single.nodes[0].api_url, p) for p in PROMPTS}
    with LocalCluster(3, tmp_path / "pd", node_args=[["--role", "prefill"], [], []]) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[2].api_url
        _, info = http_json(url + "/v1/cluster")
        roles = sorted((m["role"], m["layer_start"], m["layer_end"]) for m in info["members"])
        assert roles == [("decode", 0, 15), ("decode", 15, 30), ("prefill", 0, 30)]
        prefill = next(m for m in info["members"] if m["role"] == "prefill")
        assert prefill["address"] == f"127.0.0.1:{cluster.nodes[0].port}"
        for prompt in PROMPTS:
            assert _stream(url, prompt) == expected[prompt]
        assert _counter(url, "mesh_kv_handovers") == {"moved": float(len(PROMPTS))}
        for node in cluster.nodes:  # every KV cache freed: the prefill copies and the decode ones
            _, info = http_json(node.api_url + "/v1/cluster")
            assert info["local"]["kv_caches"] == 0
