"""End to end: `python -m mesh node --backend mlx` alone and beside a torch node in one
pipeline (specs/backend.md B12): real processes on 127.0.0.1, the text of a torch node."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from mesh.testing.cluster import LocalCluster, http_json
from tests.conftest import PROMPTS

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
TOKENS = 16
F32 = ["--dtype", "f32"]  # torch nodes: a CPU with fast bf16 would pick bf16 (spec N19); MLX computes in f32


def _chat(url: str, prompt: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": TOKENS, "stream": True}
    parts = []
    with httpx.Client(timeout=300) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
    return "".join(parts)


@pytest.fixture(scope="module")
def torch_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    with LocalCluster(1, tmp_path_factory.mktemp("torch"), extra_args=F32) as cluster:
        cluster.wait_ready()
        return {p: _chat(cluster.nodes[0].api_url, p) for p in PROMPTS[:2]}


# CI time: the two tests below run MLX stages (decode with their KV cache, the first token of a
# prefill) against the same torch text, so this one (about 40 s) is in the opt-in full set
@pytest.mark.full
@pytest.mark.skipif(os.environ.get("MESH_FULL") != "1", reason="a slow case (about 40 s): set MESH_FULL=1")
@pytest.mark.spec("B12")
def test_an_mlx_node_alone_gives_the_torch_text(tmp_path: Path, torch_texts: dict[str, str]) -> None:
    with LocalCluster(1, tmp_path, extra_args=["--backend", "mlx"]) as cluster:
        cluster.wait_ready()
        for prompt, text in torch_texts.items():
            assert _chat(cluster.nodes[0].api_url, prompt) == text and len(text) > 5
        _, info = http_json(cluster.nodes[0].api_url + "/v1/cluster")
        assert [m["backend"] for m in info["members"]] == ["mlx"]


@pytest.mark.spec("B12")
def test_an_mlx_node_and_a_torch_node_serve_one_model_together(tmp_path: Path, torch_texts: dict[str, str]) -> None:
    with LocalCluster(2, tmp_path, node_args=[["--backend", "mlx"], F32]) as cluster:
        cluster.wait_ready()
        _, info = http_json(cluster.nodes[1].api_url + "/v1/cluster")
        placed = sorted((m["backend"], m["layer_start"], m["layer_end"]) for m in info["members"])
        assert [b for b, _, _ in placed] == ["mlx", "torch"] and {(s, e) for _, s, e in placed} == {(0, 15), (15, 30)}
        for prompt, text in torch_texts.items():
            assert _chat(cluster.nodes[1].api_url, prompt) == text


@pytest.mark.spec("B12", "N13")
def test_an_mlx_node_prefills_and_a_torch_node_decodes_with_the_kv_cache_moved(
        tmp_path: Path, torch_texts: dict[str, str]) -> None:
    """Disaggregation across backends: the KV cache an MLX stage built is imported by a torch
    stage (the wire format of specs/backend.md), and the text is the torch node's."""
    from prometheus_client.parser import text_string_to_metric_families

    with LocalCluster(2, tmp_path, node_args=[["--backend", "mlx", "--role", "prefill"], F32]) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[1].api_url
        for prompt, text in torch_texts.items():
            assert _chat(url, prompt) == text
        with httpx.Client(timeout=10) as client:
            families = text_string_to_metric_families(client.get(url + "/metrics").text)
        handovers = {s.labels["outcome"]: s.value for f in families if f.name == "mesh_kv_handovers"
                     for s in f.samples if s.name.endswith("_total")}
        assert handovers == {"moved": float(len(torch_texts))}
