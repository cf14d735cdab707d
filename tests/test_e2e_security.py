"""End to end over real node processes on 127.0.0.1: QUIC and TCP clusters give the same
completions; a node without the cluster key, or a plaintext one, never becomes a member;
link measurements reach /v1/cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from mesh.security import format_cluster_key
from mesh.testing.cluster import LocalCluster, free_port, http_json, node_env
from tests.conftest import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def _texts(cluster: LocalCluster, node: int) -> list[str]:
    client = OpenAI(base_url=cluster.nodes[node].api_url + "/v1", api_key="unused", timeout=120, max_retries=0)
    out = []
    for prompt in PROMPTS:
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=24, stream=True)
        out.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    return out


def _wait(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.spec("S3", "T14", "L2", "L3", "P16")
def test_quic_and_tcp_clusters_give_identical_completions(tmp_path: Path) -> None:
    with LocalCluster(2, tmp_path / "tcp") as cluster:
        cluster.wait_ready()
        tcp = _texts(cluster, 1)
    with LocalCluster(2, tmp_path / "quic", extra_args=["--transport", "quic"]) as cluster:
        cluster.wait_ready()
        quic = _texts(cluster, 1)
        assert quic == tcp and all(len(t) > 10 for t in quic)
        # Both links are measured and published: RTT from pings, throughput from a probe.
        def measured() -> list[dict] | None:
            _, info = http_json(cluster.nodes[0].api_url + "/v1/cluster")
            links = [link for link in info["links"] if link["throughput_bytes_per_s"]]
            return links if len({(link["from"], link["to"]) for link in links}) == 2 else None

        links = _wait(measured, 60, "both links' measurements in /v1/cluster")
        ids = {m["id"] for m in http_json(cluster.nodes[0].api_url + "/v1/cluster")[1]["members"]}
        for link in links:
            assert link["transport"] == "quic" and {link["from"], link["to"]} == ids
            assert 0 < link["rtt_p50_s"] <= link["rtt_p99_s"] < 5 and link["samples"] >= 1
            assert link["throughput_bytes_per_s"] > 0
        _, info = http_json(cluster.nodes[1].api_url + "/v1/cluster")
        assert info["security"] == {"authenticated": True, "cluster": info["security"]["cluster"], "transport": "quic"}
        # spec P16: the cost model's figures for this plan beside what node 1 measured
        _wait(lambda: http_json(cluster.nodes[1].api_url + "/v1/cluster")[1]["performance"]["predicted"], 60,
              "a prediction from both members' profiles")
        performance = http_json(cluster.nodes[1].api_url + "/v1/cluster")[1]["performance"]
        assert performance["measured"]["requests"] == len(PROMPTS) and performance["measured"]["ttft_s"] > 0
        assert performance["predicted"]["ttft_s"] > 0 and performance["predicted"]["decode_tokens_per_s"] > 0
        # spec L3: a member declared dead takes its links' figures with it
        cluster.kill(1)
        _wait(lambda: not http_json(cluster.nodes[0].api_url + "/v1/cluster")[1]["links"], 60,
              "the dead member's link figures to be removed")


@pytest.mark.spec("S2", "S4", "S6")
def test_a_node_without_the_key_never_becomes_a_member(tmp_path: Path) -> None:
    with LocalCluster(1, tmp_path / "a") as cluster:
        cluster.wait_ready()
        first = cluster.nodes[0]
        intruders = []
        try:
            for name, flags in (("wrong-key", ["--cluster-key", format_cluster_key(os.urandom(32))]),
                                ("plaintext", ["--insecure"])):
                log_path = tmp_path / f"{name}.log"
                args = [sys.executable, "-m", "mesh", "node", "--host", "127.0.0.1", "--port", str(free_port()), "--api-port",
                        str(free_port()), "--data-dir", str(tmp_path / name), "--memory-bytes", str(4 << 30),
                        "--peer", f"127.0.0.1:{first.port}", "--discovery", "off", *flags]
                env = node_env()
                with open(log_path, "wb") as log_file:
                    intruders.append((name, log_path, subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                                                       env=env, start_new_session=True)))
            # The first node logs each rejection and keeps serving; neither intruder is a member.
            # (rejections are logged once a minute per source host, with a count: both come from 127.0.0.1)
            _wait(lambda: "rejected a link from" in first.log_text(), 90, "the rejection logged")
            wrong_key_log = tmp_path / "wrong-key.log"
            _wait(lambda: "check --cluster-key" in wrong_key_log.read_text(errors="replace"), 90,
                  "the wrong-key node to say why it was refused")
            _, info = http_json(first.api_url + "/v1/cluster")
            assert [m["id"] for m in info["members"]] == [info["local"]["id"]] and info["ready"]
            assert len(_texts(cluster, 0)) == len(PROMPTS)
            for name, log_path, process in intruders:
                assert process.poll() is None, f"{name} exited: {log_path.read_text()[-2000:]}"
                text = log_path.read_text(errors="replace")
                assert "link up" not in text
                if name == "plaintext":
                    assert "PLAINTEXT and UNAUTHENTICATED" in text
            events = http_json(first.api_url + "/v1/cluster")[1]["kernel"]["version_vector"]
            assert set(events) == {info["local"]["id"]}  # no intruder ever issued an event here
        finally:
            for _, _, process in intruders:
                process.kill()
                process.wait(timeout=30)
