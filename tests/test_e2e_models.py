"""End to end: mixture-of-experts and other architectures served by `python -m mesh node`
processes on 127.0.0.1 (tiny random models with a tokenizer and chat template), alone and split
over nodes with the same text (specs/node.md N6, N17; specs/backend.md B14)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from mesh.testing.cluster import LocalCluster, http_json
from mesh.testing.tiny import tiny_model

pytestmark = pytest.mark.slow
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def _chat(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello, tell me a story"}], "temperature": 0,
            "max_tokens": 12}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _serve(n: int, folder: Path, workdir: Path, backend: str = "torch") -> tuple[str, list[tuple[int, int]]]:
    with LocalCluster(n, workdir, model=str(folder), memory_bytes=1 << 30, extra_args=["--backend", backend]) as c:
        c.wait_ready(timeout_s=120, members=n)
        text = _chat(c.nodes[-1].api_url, folder.name)
        _, info = http_json(c.nodes[0].api_url + "/v1/cluster")
        ranges = sorted((m["layer_start"], m["layer_end"]) for m in info["members"] if m["layer_end"] is not None and m["layer_end"] > m["layer_start"])
        return text, ranges


@pytest.mark.spec("N6", "B14")
def test_a_moe_model_split_over_three_nodes_gives_the_single_node_text(tmp_path: Path) -> None:
    folder = tiny_model("deepseek_v3", tmp_path / "deepseek_v3")  # MLA attention, a dense first layer
    alone, one = _serve(1, folder, tmp_path / "one")
    split, three = _serve(3, folder, tmp_path / "three")
    assert one == [(0, 5)] and len(three) == 3
    assert split == alone and len(alone) > 3


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.spec("N17")
def test_members_that_cannot_load_their_range_are_placed_around(tmp_path: Path) -> None:
    """mlx-lm's gemma3_text cannot run the [4, 5) stage a 3-node memory split gives (B14): that
    member reports the failure, the cluster re-places around it and serves the same text."""
    folder = tiny_model("gemma3_text", tmp_path / "gemma3_text")
    alone, _ = _serve(1, folder, tmp_path / "one", backend="mlx")
    text, ranges = _serve(3, folder, tmp_path / "three", backend="mlx")
    assert text == alone and len(ranges) < 3 and ranges[-1][1] == 5
