"""``GET /metrics`` in the Prometheus text format (specs/api.md A17)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.api.app import create_app
from mesh.runtime.engine import SamplingParams
from mesh.runtime.metrics import NodeMetrics
from mesh.testing.fake_engine import FakeEngine, FakeStatus
from mesh.testing.minicluster import MiniCluster


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.spec("A17")
def test_counts_and_gauges_parse_with_the_prometheus_parser() -> None:
    metrics = NodeMetrics(lambda: {"kv_caches": 3, "active_requests": 1, "links": [("peer-a", 0.002)]})
    metrics.request_finished(outcome="finished", tokens=11, ttft_s=0.2, decode_s=0.5)
    metrics.request_finished(outcome="failed", tokens=0, ttft_s=None, decode_s=None)
    metrics.failovers.inc()
    metrics.recovery.observe(1.4)
    metrics.placement_changes.inc()
    got = _samples(metrics.text().decode())
    assert got[("mesh_requests_total", (("outcome", "finished"),))] == 1
    assert got[("mesh_requests_total", (("outcome", "failed"),))] == 1
    assert got[("mesh_generated_tokens_total", ())] == 11
    assert got[("mesh_ttft_seconds_count", ())] == 1 and got[("mesh_ttft_seconds_sum", ())] == 0.2
    assert got[("mesh_tpot_seconds_count", ())] == 1 and abs(got[("mesh_tpot_seconds_sum", ())] - 0.05) < 1e-12
    assert got[("mesh_failovers_total", ())] == 1 and got[("mesh_recovery_seconds_count", ())] == 1
    assert got[("mesh_placement_changes_total", ())] == 1
    assert got[("mesh_kv_caches", ())] == 3 and got[("mesh_active_requests", ())] == 1
    assert got[("mesh_link_rtt_seconds", (("peer", "peer-a"),))] == 0.002


@pytest.mark.spec("A17")
def test_a_coordinator_counts_its_requests_and_failovers() -> None:
    async def go() -> bytes:
        cluster = MiniCluster(3)
        metrics = NodeMetrics(lambda: {})
        coordinator = cluster.nodes["m0"].coordinator
        coordinator.metrics = metrics
        try:
            params = SamplingParams(max_tokens=6, temperature=0.0)
            out = []
            async for token in coordinator.generate([1, 2, 3], params):
                out.append(token)
                if len(out) == 3:
                    cluster.kill("m1")
            return metrics.text()
        finally:
            await cluster.close()

    got = _samples(asyncio.run(go()).decode())
    assert got[("mesh_requests_total", (("outcome", "finished"),))] == 1
    assert got[("mesh_generated_tokens_total", ())] == 6
    assert got[("mesh_failovers_total", ())] == 1 and got[("mesh_recovery_seconds_count", ())] == 1


@pytest.mark.spec("A17")
async def test_the_route_serves_the_engine_metrics_or_404() -> None:
    engine, status = FakeEngine(script=[5, 6]), FakeStatus()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine, status)),
                                 base_url="http://t") as c:
        r = await c.get("/metrics")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    metrics = NodeMetrics(lambda: {"kv_caches": 0})
    status.metrics = metrics.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine, status, api_key="k")),
                                 base_url="http://t") as c:
        assert (await c.get("/metrics")).status_code == 401
        r = await c.get("/metrics", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert _samples(r.text)[("mesh_kv_caches", ())] == 0
