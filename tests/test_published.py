"""The README's benchmark tables against the committed data in benchmarks/ (spec RP5), the
noise rule (RP6) and failures that must show (RP7)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mesh.tools.bench import run_status
from mesh.tools.benchstats import compare, from_block, sample, stats_block
from mesh.tools.publish import (
    BLOCK,
    RENDERERS,
    regenerate,
    render_block,
    run_publish,
    select,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.spec("RP5")
def test_every_readme_table_matches_its_committed_data() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [m.group("name") for m in BLOCK.finditer(text)]
    assert sorted(names) == sorted(RENDERERS), "each benchmark has exactly one published block in the README"
    _, changed = regenerate(text, ROOT / "benchmarks", ROOT)
    assert changed == [], f"README blocks out of date with benchmarks/: {changed} (run python -m mesh publish)"


@pytest.mark.spec("RP5")
def test_every_data_file_is_published_from_a_commit_of_this_history() -> None:
    files = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.jsonl"))
    assert files == sorted(RENDERERS)
    git = shutil.which("git")
    for name in files:
        lines = (ROOT / "benchmarks" / f"{name}.jsonl").read_text().splitlines()
        sel = select([json.loads(line) for line in lines if line.strip()])
        assert sel is not None, name
        if git is not None and (ROOT / ".git").exists() and subprocess.run(
                [git, "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True,
                timeout=30).stdout.strip() == "false":  # the figures' code is in this history
            ancestor = subprocess.run([git, "merge-base", "--is-ancestor", sel.commit, "HEAD"], cwd=ROOT,
                                      capture_output=True, timeout=30)
            assert ancestor.returncode == 0, f"{name}: commit {sel.commit} is not an ancestor of HEAD"
        if name == "faults":  # spec F16: the published fault table is a full run, not the quick set
            from mesh.tools.faults.scenarios import SCENARIOS

            assert sel.records[-1]["set"] == "full" and len(sel.records[-1]["scenarios"]) == len(SCENARIOS)


@pytest.mark.spec("RP7")
def test_a_benchmark_that_fails_as_a_whole_is_recorded_and_shown(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.tools.benchutil import run_recorded

    out = tmp_path / "kernel.jsonl"

    def broken() -> int:
        raise RuntimeError("the catch-up never converged")

    assert run_recorded("mesh-bench-kernel", out, broken) == 1
    assert "the catch-up never converged" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["status"] == "failed" and record["suite"] == "mesh-bench-kernel" and "machine" in record
    record["machine"]["dirty"] = False
    out.write_text(json.dumps(record) + "\n")
    text = render_block("kernel", tmp_path)
    assert "1 run(s) of this commit FAILED" in text and "never converged" in text
    measured = {"suite": "mesh-bench-placement-measured", "machine": record["machine"],
                "rows": [{"nodes": 2, "prompt": "long", "error": "RuntimeError: a request failed"}]}
    (tmp_path / "placement-measured.jsonl").write_text(json.dumps(measured) + "\n")
    assert "| 2 | long | FAILED | RuntimeError: a request failed |" in render_block("placement-measured", tmp_path)
    (tmp_path / "transports.jsonl").write_text(json.dumps({**measured, "results": [{"tls": True}]}) + "\n")
    with pytest.raises(ValueError, match="cannot render"):
        render_block("transports", tmp_path)


def _machine(commit: str, dirty: bool) -> dict[str, Any]:
    return {"cpu": "test cpu", "cores": 2, "memory_bytes": 2**34, "commit": commit, "dirty": dirty,
            "date": "2026-12-04T00:00:00+00:00"}


def _run(commit: str, dirty: bool, *, nodes: int = 1, failed: int = 0, rate: float = 20.0) -> dict[str, Any]:
    results = {"requests": 5, "failed_requests": failed, "failures": {"short": failed} if failed else {},
               "ttft_s": stats_block([0.2, 0.21, 0.22, 0.2, 0.3]),
               "decode_tok_s": stats_block([rate, rate + 1, rate - 1, rate, rate]),
               "throughput": stats_block([19.0, 20.0]), "stages": [], "transfer_s_per_token": 0.001}
    return {"kind": "run", "suite": "mesh-bench", "machine": _machine(commit, dirty), "commit": commit,
            "config": {"nodes": nodes, "prompt_tokens": 64, "concurrency": 1, "prefill_nodes": 0,
                       "kv_replica_mb": 512.0},
            "status": run_status(results), "error": "1 of 5 tokens" if failed else None, "results": results}


@pytest.mark.spec("RP5")
def test_records_of_a_dirty_tree_are_never_published(tmp_path: Path) -> None:
    clean, dirty = _run("aaa1111", False, rate=20.0), _run("bbb2222", True, rate=99.0)
    sel = select([clean, dirty])
    assert sel is not None and sel.commit == "aaa1111" and sel.records == [clean] and sel.skipped_dirty == 1
    assert select([dirty]) is None
    from mesh.tools.benchutil import _not_code

    assert _not_code("benchmarks/kernel.jsonl") and _not_code("README.md") and _not_code("docs/images/a.png")
    assert not _not_code("benchmarks/run-all.sh") and not _not_code("mesh/tools/bench.py")
    (tmp_path / "bench-matrix.jsonl").write_text(json.dumps(dirty) + "\n")
    with pytest.raises(ValueError, match="no record measured on a clean tree"):
        render_block("bench-matrix", tmp_path)
    with pytest.raises(ValueError, match="unknown published block"):
        render_block("nonsense", tmp_path)


@pytest.mark.spec("RP5")
def test_publish_rewrites_a_stale_block_and_check_reports_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "benchmarks"
    data.mkdir()
    (data / "bench-matrix.jsonl").write_text(json.dumps(_run("aaa1111", False)) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- published:bench-matrix -->\n| stale |\n<!-- /published:bench-matrix -->\nend\n")
    args = argparse.Namespace(readme=readme, data=data, check=True)
    assert run_publish(args) == 1 and "bench-matrix" in capsys.readouterr().out
    assert "| stale |" in readme.read_text()  # --check writes nothing
    assert run_publish(argparse.Namespace(readme=readme, data=data, check=False)) == 0
    text = readme.read_text()
    assert "| stale |" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "`benchmarks/bench-matrix.jsonl`" in text and "commit `aaa1111`" in text
    assert run_publish(args) == 0
    (data / "bench-matrix.jsonl").write_text("not json\n")
    assert run_publish(args) == 2 and "cannot read" in capsys.readouterr().err


@pytest.mark.spec("RP6")
def test_a_difference_inside_the_spread_is_within_noise() -> None:
    a, b = sample([20.0, 21.0, 19.0, 20.5, 20.0]), sample([19.5, 20.5, 21.5, 19.0, 20.0])
    assert a is not None and b is not None
    c = compare(a, b)
    assert c is not None and c.within_noise and c.fmt().endswith("(within noise)")
    far = sample([30.0, 30.5, 29.5])
    c = compare(far, a)
    assert c is not None and not c.within_noise and c.fmt() == "1.50x"
    slower = compare(sample([0.4, 0.41]), sample([0.2, 0.21]), higher_is_better=False)  # times: lower is better
    assert slower is not None and round(slower.ratio, 2) == 0.51 and not slower.within_noise
    assert compare(sample([1.0]), sample([1.1])) is not None and not compare(sample([1.0]), sample([1.1])).within_noise
    assert compare(None, a) is None and compare(a, sample([0.0])) is None
    assert a.fmt() == "20.0 (19.0-21.0)" and a.fmt(with_n=True).endswith("n=5")
    block = from_block({"p50": 2.0, "min": 1.0, "max": 3.0, "n": 4})
    assert block is not None and (block.n, block.median, block.low, block.high) == (4, 2.0, 1.0, 3.0)
    assert block.iqr == 2.0  # no quartiles recorded: the range stands in
    # one outlier widens the range, not the interquartile range: a 25 % difference stays a difference
    outlier, steady = sample([20.0, 20.0, 20.0, 20.0, 40.0]), sample([25.0, 25.0, 25.0, 25.0, 25.0])
    assert outlier is not None and outlier.spread == 20.0 and outlier.iqr == 0.0
    c = compare(outlier, steady)
    assert c is not None and not c.within_noise and c.fmt() == "0.80x"
    assert from_block(3.0) == sample([3.0]) and from_block("x") is None and sample([float("nan")]) is None


@pytest.mark.spec("RP7")
def test_partial_and_failed_runs_show_in_the_published_table(tmp_path: Path) -> None:
    ok, partial = _run("aaa1111", False), _run("aaa1111", False, nodes=2, failed=1)
    assert ok["status"] == "ok" and partial["status"] == "partial"
    assert run_status({"requests": 5, "failed_requests": 5}) == "failed"
    failed = {**_run("aaa1111", False, nodes=3), "status": "failed", "error": "cluster did not start", "results": None}
    baseline = {"kind": "baseline", "name": "transformers_generate", "status": "ok",
                "machine": _machine("aaa1111", False), "config": {"prompt_tokens": 64},
                "results": {"ttft_s": stats_block([0.1, 0.11]), "decode_tok_s": stats_block([20.0, 20.5, 19.5])}}
    (tmp_path / "bench-matrix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (baseline, ok, partial, failed)))
    table = render_block("bench-matrix", tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert rows[0].endswith("| ok |") and "(within noise)" in rows[0] and "| 5 |" in rows[0]
    assert "partial: 1 of 5 failed (short 1)" in rows[1]
    assert "FAILED: cluster did not start" in rows[2]
    assert "transformers_generate at 64 prompt tokens: decode 20.0 (19.5-20.5) tok/s" in table


@pytest.mark.spec("RP1")
def test_the_report_renders_every_committed_benchmark() -> None:
    from mesh.tools.report import SUITE_BLOCKS, load_records, render_report

    paths = sorted((ROOT / "benchmarks").glob("*.jsonl"))
    records, counts, skipped = load_records(paths)
    page = render_report(records, [str(p) for p in paths], counts=counts, skipped=skipped)
    assert "cannot render" not in page and sum(len(v) for v in skipped.values()) == 0
    for block in SUITE_BLOCKS.values():
        assert f"<h3>{block} (commit " in page


def test_a_formats_row_says_which_dtype_a_node_chose() -> None:
    from mesh.tools.publish import _format_label

    assert _format_label({}) == "defaults"
    assert _format_label({"node_dtype": "bf16"}) == "defaults (computes in bf16)"
    assert _format_label({"quantize": "int4", "node_dtype": "f32"}) == "--quantize int4 (computes in f32)"
    assert _format_label({"dtype": "f32", "node_dtype": "f32"}) == "--dtype f32"


def test_the_batching_table_puts_the_decode_rate_in_all_beside_the_throughput(tmp_path: Path) -> None:
    """The batching block shows concurrency x the median request's decode rate, against
    concurrency 1 on as many nodes, beside the throughput (TTFT included) against it."""
    one, eight = _run("aaa1111", False, rate=20.0), _run("aaa1111", False, rate=10.0)
    eight["config"] = {**eight["config"], "concurrency": 8}
    eight["results"] = {**eight["results"], "throughput": stats_block([38.0, 40.0])}
    (tmp_path / "batching.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (one, eight)))
    rows = [line.split(" | ") for line in render_block("batching", tmp_path).splitlines()
            if line.startswith("| 1 |")]
    assert [row[1] for row in rows] == ["1", "8"]
    assert rows[0][6:10] == ["20.0 (19.0-21.0)", "1.00x", "19.5 (19.0-20.0)", "1.00x"]
    assert rows[1][6:10] == ["80.0 (72.0-88.0)", "4.00x", "39.0 (38.0-40.0)", "2.00x"]


def test_the_batching_lengths_table_compares_each_row_with_its_own_weights_and_length(tmp_path: Path) -> None:
    """Rows of the lengths block are grouped by weight format and output length; each one is
    read against concurrency 1 with the same weights and length, not another group's."""
    runs = []
    for quantize, new_tokens, concurrency, rate, thru in ((None, 32, 1, 20.0, 19.0), (None, 32, 8, 10.0, 40.0),
                                                           (None, 128, 1, 18.0, 17.0), (None, 128, 8, 9.0, 60.0),
                                                           ("none", 32, 1, 10.0, 9.0), ("none", 32, 8, 8.0, 45.0)):
        run = _run("aaa1111", False, rate=rate)
        run["config"] = {**run["config"], "quantize": quantize, "new_tokens": new_tokens, "concurrency": concurrency,
                         "node_dtype": "bf16"}
        run["results"] = {**run["results"], "throughput": stats_block([thru])}
        runs.append(run)
    (tmp_path / "batching-lengths.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = [line.strip("| ").split(" | ") for line in render_block("batching-lengths", tmp_path).splitlines()
            if line.startswith("| defaults") or line.startswith("| --quantize")]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("--quantize none (computes in bf16)", "32", "1"), ("--quantize none (computes in bf16)", "32", "8"),
        ("defaults (computes in bf16)", "32", "1"), ("defaults (computes in bf16)", "32", "8"),
        ("defaults (computes in bf16)", "128", "1"), ("defaults (computes in bf16)", "128", "8")]
    assert rows[1][10] == "45.0" and rows[1][11] == "5.00x"  # 45 against its own 9, not 19
    assert rows[5][11] == "3.53x"  # 60 against 17 (128 tokens), not 19 (32 tokens)


def test_the_scenarios_block_shows_the_backend_alone_beside_generate(tmp_path: Path) -> None:
    """The batching-scenarios caption gives the torch backend's own batched step beside
    transformers' ``generate()``: the ceiling no serving stack passes."""
    base = {"suite": "mesh-bench-batching", "kind": "baseline", "machine": _machine("aaa1111", False),
            "status": "ok", "error": None, "config": {}}
    records = [{**base, "name": "transformers_generate_batch",
                "results": {"batch": 8, "decode_tok_s_batch1": stats_block([17.0]),
                            "decode_tok_s_batch": stats_block([102.0]), "ratio": 6.0}},
               {**base, "name": "backend_batch_step",
                "results": {"batch": 8, "weights": "int4+int8", "context": 100, "step_s_batch1": stats_block([0.02]),
                            "step_s_batch": stats_block([0.04]), "ratio": 4.0}}]
    (tmp_path / "batching-scenarios.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = render_block("batching-scenarios", tmp_path)
    assert "transformers' generate() in f32, batch 8: 102.0" in text
    assert ("the torch backend alone (int4+int8 weights, bf16), a decode step of 8 requests: 40.0 ms "
            "against 20.0 ms for one (4.00x the tokens/s)") in text
