"""A node's metrics in the Prometheus text format (``GET /metrics``), by ``prometheus_client``.

Each node has its own ``CollectorRegistry`` (several nodes may share a process in tests).
Counted where things happen: requests by outcome, generated tokens, TTFT and TPOT (time per
output token after the first) histograms, failed attempts (failovers) and recovery times by the
coordinator; placement changes, and the decoder layers each load took from the backend it
replaced (reused) or read from the model files (read), by the node. Sampled at scrape time from
the node: KV caches held, requests in flight, waiting for a turn and refused (HTTP 429), the
stage's batches and the steps in them (their ratio: the mean batch size), the prefix cache's
hits, misses, reused positions and bytes, and each link's RTT
(p50 of the link's own measurements, seconds).
Spec: specs/api.md A17, specs/node.md N14.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a fast GPU's few ms to a CPU prefill of a long prompt
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class NodeMetrics:
    """The metrics of one node; ``sample()`` gives the gauges read at scrape time:
    ``{"kv_caches": int, "active_requests": int, "links": [(peer, rtt_p50_s), ...]}``."""

    def __init__(self, sample: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mesh_requests", "Generation requests coordinated here, by outcome",
                                ["outcome"], registry=r)
        self.tokens = Counter("mesh_generated_tokens", "Tokens generated for requests coordinated here",
                              registry=r)
        self.ttft = Histogram("mesh_ttft_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("mesh_tpot_seconds", "Time per output token after the first (decode)",
                              buckets=TPOT_BUCKETS, registry=r)
        self.failovers = Counter("mesh_failovers", "Attempts of requests that failed and were retried on a new plan",
                                 registry=r)
        self.recovery = Histogram("mesh_recovery_seconds", "From a stage failure to the request's next token",
                                  buckets=RECOVERY_BUCKETS, registry=r)
        self.kv_resumes = Counter("mesh_kv_resumes", "Failovers that resumed from the KV replica (resumed) or "
                                  "re-prefilled from position 0 (reprefill)", ["outcome"], registry=r)
        self.kv_handovers = Counter("mesh_kv_handovers", "Prefills of a disaggregated plan whose KV cache reached "
                                    "the decode stages (moved) or was recomputed there (recomputed)", ["outcome"],
                                    registry=r)
        self.placement_changes = Counter("mesh_placement_changes", "Times this node's plan changed", registry=r)
        self.layers_loaded = Counter("mesh_layers_loaded", "Decoder layers this node's loads took from the stage "
                                     "they replaced (reused) or read from the model files (read)", ["how"],
                                     registry=r)
        for how in ("reused", "read"):  # both series from the start: a scraper sees 0, not nothing
            self.layers_loaded.labels(how=how)
        r.register(_Sampled(sample))

    def request_finished(self, *, outcome: str, tokens: int, ttft_s: float | None, decode_s: float | None) -> None:
        """One request ended (finished, failed or cancelled) after ``tokens`` tokens."""
        self.requests.labels(outcome=outcome).inc()
        self.tokens.inc(tokens)
        if ttft_s is not None and ttft_s > 0:
            self.ttft.observe(ttft_s)
        if decode_s is not None and tokens > 1:
            self.tpot.observe(decode_s / (tokens - 1))

    def stage_loaded(self, *, layers: int, reused: int) -> None:
        """A load of ``layers`` decoder layers succeeded, ``reused`` of them taken from the
        backend it replaced (spec N14); the count is clamped to [0, layers]."""
        reused = max(0, min(reused, layers))
        self.layers_loaded.labels(how="reused").inc(reused)
        self.layers_loaded.labels(how="read").inc(layers - reused)

    def text(self) -> bytes:
        """The exposition, Prometheus text format 0.0.4."""
        return generate_latest(self.registry)


class _Sampled(Collector):
    def __init__(self, sample: Callable[[], dict[str, Any]]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        values = self._sample()
        yield GaugeMetricFamily("mesh_kv_caches", "Per-request KV caches this node's stage holds",
                                value=values.get("kv_caches", 0))
        yield GaugeMetricFamily("mesh_active_requests", "Requests this node coordinates now",
                                value=values.get("active_requests", 0))
        rtt = GaugeMetricFamily("mesh_link_rtt_seconds", "Median round-trip time of the link to a peer",
                                labels=["peer"])
        for peer, seconds in values.get("links", []):
            rtt.add_metric([peer], seconds)
        yield rtt
        yield GaugeMetricFamily("mesh_queued_requests", "Requests waiting for a turn to run on this coordinator",
                                value=values.get("queued_requests", 0))
        yield CounterMetricFamily("mesh_refused_requests", "Requests refused with HTTP 429: the queue was full",
                                  value=values.get("refused_requests", 0))
        yield CounterMetricFamily("mesh_stage_batches", "Batched steps this node's stage ran (continuous batching)",
                                  value=values.get("batches", 0))
        yield CounterMetricFamily("mesh_stage_batched_steps", "Request steps in those batches (divided by "
                                  "mesh_stage_batches_total: the mean batch size)", value=values.get("batched_steps", 0))
        prefix = values.get("prefix") or {}
        yield CounterMetricFamily("mesh_prefix_cache_hits", "Requests coordinated here whose prompt started from "
                                  "the prefix cache", value=prefix.get("hits", 0))
        yield CounterMetricFamily("mesh_prefix_cache_misses", "Requests coordinated here that offered cached "
                                  "prefixes none of which the stages held", value=prefix.get("misses", 0))
        yield CounterMetricFamily("mesh_prefix_cache_reused_tokens", "Prompt positions taken from the prefix cache "
                                  "instead of prefilled", value=prefix.get("tokens", 0))
        yield GaugeMetricFamily("mesh_prefix_cache_bytes", "Bytes of prompt-prefix KV cache this node's stage keeps",
                                value=prefix.get("bytes", 0))
        yield GaugeMetricFamily("mesh_kv_replica_bytes", "Bytes of KV cache replicas this node keeps for the "
                                "requests it coordinates", value=values.get("kv_replica_bytes", 0))
