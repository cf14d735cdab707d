"""`python -m mesh bench`: the matrix runner's pieces, and one small real run (spec N12 for
the per-stage timings it reads)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.runtime.reqstats import RequestLog
from mesh.tools import bench

REPO = Path(__file__).resolve().parents[1]


def test_axes_parse_and_name_the_field_and_valid_values() -> None:
    assert bench._axis("1, 2,3", int, "nodes") == [1, 2, 3]
    with pytest.raises(ConfigError, match="--nodes"):
        bench._axis("1,x", int, "nodes")
    with pytest.raises(ConfigError, match="valid values are memory, solver"):
        bench._axis("memory,fast", str, "placement", ("memory", "solver"))
    with pytest.raises(ConfigError, match=">= 1"):
        bench._axis("0", int, "concurrency")


@pytest.mark.spec("N12")
def test_request_log_keeps_per_stage_compute_and_the_rest_as_transfer() -> None:
    log = RequestLog()
    stats = log.start("r1", prompt_tokens=10)
    stats.step([["a", 0.5], ["b", 0.25]], wall_s=0.9, prefill=True)
    stats.token()
    for _ in range(4):
        stats.step([["a", 0.01], ["b", 0.03], "junk", ["c", True]], wall_s=0.05, prefill=False)
        stats.token()
    live = log.to_wire()["active"][0]
    assert live["phase"] == "decode" and live["tokens"] == 5 and live["tokens_per_s"] is not None
    log.end(stats, "finished")
    wire = log.to_wire()
    assert wire["active"] == [] and len(wire["recent"]) == 1
    done = wire["recent"][0]
    assert done["phase"] == "finished" and done["prompt_tokens"] == 10
    stages = {s["member"]: s for s in done["stages"]}
    assert stages["a"]["prefill_compute_s"] == 0.5 and stages["b"]["decode_compute_s_per_token"] == pytest.approx(0.03)
    assert done["transfer_s_per_token"] == pytest.approx(0.05 - 0.04)


def test_stage_breakdown_averages_the_runs_requests() -> None:
    info = {"members": [{"id": "a", "layer_start": 0, "layer_end": 15, "backend": "torch", "role": "both"},
                        {"id": "b", "layer_start": 15, "layer_end": 30, "backend": "mlx", "role": "both"}],
            "local": {"recent": [
                {"phase": "finished", "transfer_s_per_token": 0.002,
                 "stages": [{"member": "a", "prefill_compute_s": 1.0, "decode_compute_s_per_token": 0.01},
                            {"member": "b", "prefill_compute_s": 2.0, "decode_compute_s_per_token": 0.03}]},
                {"phase": "finished", "transfer_s_per_token": 0.004,
                 "stages": [{"member": "a", "prefill_compute_s": 3.0, "decode_compute_s_per_token": 0.02}]},
                {"phase": "finished", "transfer_s_per_token": 9.0, "stages": []}]}}  # an older request
    out = bench._stage_breakdown(info, count=2)
    assert out["transfer_s_per_token"] == pytest.approx(0.003)
    a, b = out["stages"]
    assert (a["member"], a["layers"], a["backend"]) == ("a", [0, 15], "torch")
    assert a["prefill_compute_s"] == 2.0 and a["decode_compute_s_per_token"] == pytest.approx(0.015)
    assert b["decode_compute_s_per_token"] == pytest.approx(0.03)


def test_raw_socket_baseline_measures_a_round_trip() -> None:
    out = bench.raw_socket_baseline(4096, round_trips=20)
    assert out["bytes"] == 4096 and 0 < out["round_trip_s"] < 1 and out["throughput_bytes_per_s"] > 0


def test_a_cluster_that_does_not_start_fails_each_of_its_runs_as_a_record(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.testing.cluster as cluster_module

    class Broken:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("no room for a node")

    monkeypatch.setattr(cluster_module, "LocalCluster", Broken)
    out = tmp_path / "r.jsonl"
    args = argparse.Namespace(url=None, model="smollm2-135m", repeats=1, api_key=None)

    class Bar:
        def update(self, n: int) -> None:
            pass

    model = type("M", (), {"model_id": "m"})()
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "profile.json").write_text("{}")
    records = bench._run_cluster(args, ("torch", "tcp", 2, "memory", "goodput", 0, 512.0, "default", "int8"),  # type: ignore[arg-type]
                                 [(16, 4, 1), (64, 4, 2)], model, "smollm2-135m", {16: ("x", 16), 64: ("y", 64)},
                                 {"commit": "c"}, out, tmp_path, Bar())
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("no room for a node" in r["error"] and r["results"] is None for r in records)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["config"]["nodes"], r["config"]["concurrency"]) for r in lines] == [("run", 2, 1), ("run", 2, 2)]
    assert all(r["config"]["quantize"] == "int8" and "dtype" not in r["config"] for r in lines)


@pytest.mark.slow
@pytest.mark.spec("N12")
def test_a_small_matrix_runs_end_to_end_and_appends_every_run(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mesh", "bench", "--nodes", "2", "--prompt-tokens", "40",
                           "--new-tokens", "6", "--concurrency", "1,2", "--repeats", "1", "--out", str(out), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    llama = ["llama_cpp"] if importlib.util.find_spec("llama_cpp") else []  # a baseline only where installed
    assert [r["name"] for r in records if r["kind"] == "baseline"] == ["transformers_generate", *llama, "raw_socket"]
    runs = [r for r in records if r["kind"] == "run"]
    assert [r["config"]["concurrency"] for r in runs] == [1, 2]
    for r in runs:
        assert r["status"] == "ok" and r["schema"] == 2 and r["machine"]["cores"] and r["commit"] is not None
        assert r["machine"]["dirty"] in (True, False)
        res = r["results"]
        assert res["prompt_tokens"] == 40 and res["prompt_tokens_exact"]
        assert res["failed_requests"] == 0 and res["requests"] == r["config"]["concurrency"]
        assert res["ttft_s"]["p50"] > 0 and res["decode_tok_s"]["p50"] > 0 and res["throughput_tok_s"] > 0
        assert sorted(s["layers"] for s in res["stages"]) == [[0, 15], [15, 30]]
        assert all(s["decode_compute_s_per_token"] > 0 for s in res["stages"])
        assert res["transfer_s_per_token"] is not None and res["transfer_s_per_token"] >= 0


@pytest.mark.slow
@pytest.mark.spec("RP7")
def test_bench_against_a_running_cluster_reads_its_shape_and_stage_timings(tmp_path: Path) -> None:
    from mesh.testing.cluster import LocalCluster

    out = tmp_path / "url.jsonl"
    with LocalCluster(2, tmp_path / "cluster") as cluster:
        cluster.wait_ready()
        proc = subprocess.run([sys.executable, "-m", "mesh", "bench", "--url", cluster.nodes[0].api_url,
                               "--prompt-tokens", "30", "--new-tokens", "5", "--concurrency", "1", "--repeats", "2",
                               "--no-baselines", "--out", str(out), "--quiet"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert run["status"] == "ok" and run["config"]["target"] == "url"
    # spec RP7: the figures are the cluster's; this machine only sent the requests
    assert run["machine"]["role"] == "client" and len(run["config"]["members"]) == 2
    assert (run["config"]["nodes"], run["config"]["backend"], run["config"]["transport"]) == (2, "torch", "tcp")
    assert run["results"]["requests"] == 2 and len(run["results"]["stages"]) == 2


def test_the_backend_batch_baseline_times_one_and_many_decode_steps(default_model) -> None:
    """``bench-batching``'s backend baseline: the torch backend alone, a decode step of 1 and of
    ``batch`` requests, the ceiling the node's batching is read against."""
    from mesh.tools.bench_batching import backend_batch_baseline

    r = backend_batch_baseline(default_model, "default", batch=2, repeats=1, context=8)
    assert r["batch"] == 2 and r["context"] == 8 and r["weights"] == "int4+int8"
    one, two = r["step_s_batch1"], r["step_s_batch"]
    assert one["n"] == 1 and two["n"] == 1 and 0 < one["p50"] and 0 < two["p50"]
    assert r["ratio"] == pytest.approx(2 * one["p50"] / two["p50"])
