"""End to end, by the nodes' own counters: mechanisms that equal output text alone cannot prove
(a silent fallback gives the same text). Real node processes on 127.0.0.1.

- A failover after SIGKILL of the middle stage resumed from the coordinator's KV replica
  (specs/faults.md FO8): ``mesh_kv_resumes_total{outcome="resumed"}`` went up by one; with the
  replica off (``--kv-replica-mb 0``) the same failover re-prefills and counts no resume.
- A plan change reused the layers a survivor held (specs/backend.md B9, specs/node.md N14):
  ``mesh_layers_loaded_total{how="reused"}`` went up by the layers the old and new ranges share.

A disaggregated request's KV hand-over (``mesh_kv_handovers_total{outcome="moved"}``, none
``recomputed``) is already asserted by tests/test_e2e_disaggregation.py (spec N13).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.runtime.metrics import NodeMetrics
from mesh.testing.cluster import LocalCluster, NodeProcess, http_json

MODEL = "smollm2-135m"
# long enough that the replica's prefix is worth resuming from (~300 tokens), short enough for
# a 2-core machine; the fault suite's kill-middle-long-prompt uses ~1.7k tokens
PROMPT = ("Summarise the following notes in one sentence. " +
          "The river rises in the hills, runs past the mill and the old bridge, and reaches the sea "
          "after two days; farmers along it grow wheat, barley and apples, and trade at the market "
          "town each week. " * 8)
MAX_TOKENS = 10
KILL_AFTER = 4  # tokens streamed before the SIGKILL


def _stream(url: str, prompt: str, *, on_token: Callable[[int], None] | None = None) -> str:
    """A greedy streaming chat request; ``on_token(n)`` after the n-th token chunk arrived."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "stream": True}
    text: list[str] = []
    n = 0
    with httpx.Client(timeout=180) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            pieces = [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
            text += pieces
            if any(pieces):
                n += 1
                if on_token is not None:
                    on_token(n)
    return "".join(text)


def _counter(url: str, name: str, label: str = "") -> dict[str, float]:
    """The ``<name>_total`` samples of a node's /metrics, by the value of ``label``."""
    with httpx.Client(timeout=10) as client:
        families = text_string_to_metric_families(client.get(url + "/metrics").text)
    return {s.labels.get(label, ""): s.value for f in families if f.name == name for s in f.samples
            if s.name.endswith("_total")}


def _ranges(cluster: LocalCluster) -> dict[int, tuple[int, int]]:
    """Node index -> its layer range in the current plan (live nodes that hold one)."""
    live = [n for n in cluster.nodes if n.process.poll() is None]
    _, info = http_json(live[0].api_url + "/v1/cluster")
    by_address = {m["address"]: (m["layer_start"], m["layer_end"]) for m in info["members"]}
    return {n.index: by_address[f"127.0.0.1:{n.port}"] for n in live if f"127.0.0.1:{n.port}" in by_address}


def _wait_one_stage_each(cluster: LocalCluster, timeout_s: float = 30.0) -> None:
    """Wait until every member holds only its current plan's stage: the stages of the plans
    the cluster went through while it formed are retired a little after the switch (N21)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, info = http_json(cluster.nodes[0].api_url + "/v1/cluster")
        if all(len(m.get("held", [])) == 1 for m in info["members"]):
            return
        time.sleep(0.3)
    raise AssertionError(f"members still hold several stages after {timeout_s} s: {info['members']}")


def _middle(ranges: dict[int, tuple[int, int]]) -> int:
    """The node holding neither the first nor the last layer."""
    last = max(end for _, end in ranges.values())
    middle = [i for i, (start, end) in ranges.items() if start > 0 and end < last]
    assert len(middle) == 1, ranges
    return middle[0]


def _kill_once(cluster: LocalCluster, index: int) -> Callable[[int], None]:
    def on_token(n: int) -> None:
        if n == KILL_AFTER:
            cluster.kill(index)
    return on_token


def _wait_layers_counted(node: NodeProcess, want_total: float, timeout_s: float = 30.0) -> dict[str, float]:
    """/metrics of ``node`` once its loads counted ``want_total`` layers (reused + read)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = _counter(node.api_url, "mesh_layers_loaded", "how")
        if sum(got.values()) >= want_total or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.spec("N14")
def test_layer_counter_splits_reused_from_read() -> None:
    metrics = NodeMetrics(lambda: {})
    text = metrics.text().decode()
    assert 'mesh_layers_loaded_total{how="reused"} 0.0' in text and 'mesh_layers_loaded_total{how="read"} 0.0' in text
    metrics.stage_loaded(layers=15, reused=10)
    metrics.stage_loaded(layers=30, reused=0)
    metrics.stage_loaded(layers=5, reused=99)  # clamped: a stage cannot reuse more than it holds
    got = {s.labels["how"]: s.value for f in text_string_to_metric_families(metrics.text().decode())
           if f.name == "mesh_layers_loaded" for s in f.samples if s.name.endswith("_total")}
    assert got == {"reused": 15.0, "read": 35.0}


@pytest.mark.slow
@pytest.mark.spec("FO8", "FO3")
@pytest.mark.parametrize("replica", ["on", "off"])
def test_killed_middle_stage_failover_counts_its_kv_resume(tmp_path: Path, replica: str) -> None:
    """The same text as a fault-free run; with the replica the coordinator counts one
    ``resumed`` failover (none ``reprefill``); without it, one failover and no resume."""
    extra = ["--kv-replica-mb", "0"] if replica == "off" else []
    with LocalCluster(3, tmp_path, extra_args=extra) as cluster:
        cluster.wait_ready()
        victim = _middle(_ranges(cluster))
        via = cluster.nodes[min(i for i in range(3) if i != victim)]  # the coordinator survives
        expected = _stream(via.api_url, PROMPT)  # fault-free, same cluster
        resumes = _counter(via.api_url, "mesh_kv_resumes", "outcome")
        failovers = _counter(via.api_url, "mesh_failovers").get("", 0.0)
        text = _stream(via.api_url, PROMPT, on_token=_kill_once(cluster, victim))
        assert cluster.nodes[victim].process.poll() is not None  # the fault did happen mid-stream
        assert text == expected and len(text) > 10
        after = _counter(via.api_url, "mesh_kv_resumes", "outcome")
        assert _counter(via.api_url, "mesh_failovers").get("", 0.0) == failovers + 1
        print(f"replica {replica}: mesh_kv_resumes_total before {resumes} after {after}; "
              f"failovers {failovers} -> {failovers + 1}")
        if replica == "on":
            assert after.get("resumed", 0.0) == resumes.get("resumed", 0.0) + 1
            assert after.get("reprefill", 0.0) == resumes.get("reprefill", 0.0)
        else:  # no replica: the new attempt re-prefilled from 0 without trying a resume
            assert after.get("resumed", 0.0) == resumes.get("resumed", 0.0) == 0.0


@pytest.mark.slow
@pytest.mark.spec("N14", "B9")
def test_survivors_reuse_the_layers_they_held_after_a_stage_is_killed(tmp_path: Path) -> None:
    with LocalCluster(3, tmp_path) as cluster:
        cluster.wait_ready()
        _wait_one_stage_each(cluster)  # a stage of an earlier plan still held would serve as is (N21)
        before_ranges = _ranges(cluster)
        victim = _middle(before_ranges)
        before = {i: _counter(cluster.nodes[i].api_url, "mesh_layers_loaded", "how") for i in before_ranges}
        cluster.kill(victim)
        cluster.wait_ready(timeout_s=90, members=2)
        after_ranges = _ranges(cluster)
        assert sorted(after_ranges) == sorted(i for i in before_ranges if i != victim)
        grew = reused = 0
        for i, (start, end) in after_ranges.items():
            old_start, old_end = before_ranges[i]
            shared = max(0, min(end, old_end) - max(start, old_start))
            want = {"reused": before[i]["reused"] + shared, "read": before[i]["read"] + (end - start - shared)}
            got = _wait_layers_counted(cluster.nodes[i], sum(want.values()))
            print(f"node {i}: [{old_start},{old_end}) -> [{start},{end}); mesh_layers_loaded_total "
                  f"before {before[i]} after {got}")
            assert got == want
            grew += (end - start) > (old_end - old_start)
            reused += int(got["reused"] - before[i]["reused"])
        assert grew >= 1 and reused >= 1  # some survivor took the victim's layers, and reused what it held
