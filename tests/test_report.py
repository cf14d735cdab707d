"""``python -m mesh report``: the static HTML report of bench results (specs/report.md)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.tools.report import load_records, pick_baseline, render_report

ROOT = Path(__file__).resolve().parent.parent
XSS = "<script>alert(1)</script>"
MACHINE = {"cpu": "Test CPU 9000", "cores": 8, "memory_bytes": 16 * 2**30, "platform": "Linux-6.1-x86_64",
           "python": "3.12.1", "torch": "2.5.0"}
MODEL = "smollm2-135m"


def _stat(p50: float, runs: list[float]) -> dict[str, Any]:
    return {"p50": p50, "mean": sum(runs) / len(runs), "min": min(runs), "max": max(runs), "runs": runs}


def _run(backend: str, nodes: int, decode: float, ttft: float, *, prompt: int = 64, concurrency: int = 1,
         transport: str = "tcp", predicted: bool = True) -> dict[str, Any]:
    stages = [{"member": f"{backend}-member-{i:02d}-abcdef", "layers": [i * 30 // nodes, (i + 1) * 30 // nodes],
               "backend": backend, "prefill_compute_s": 0.01, "decode_compute_s_per_token": 0.8 / decode / nodes}
              for i in range(nodes)]
    return {
        "kind": "run", "suite": "mesh-bench", "schema": 1, "timestamp": f"2026-11-30T02:{10 + nodes:02d}:00+00:00",
        "commit": "abc1234", "machine": MACHINE,
        "config": {"model": MODEL, "backend": backend, "transport": transport, "nodes": nodes,
                   "placement": "memory", "objective": "goodput", "prompt_tokens": prompt, "new_tokens": 32,
                   "concurrency": concurrency, "target": "local"},
        "status": "ok", "error": None,
        "results": {"requests": 3, "failed_requests": 0,
                    "ttft_s": _stat(ttft, [ttft * 0.9, ttft, ttft * 1.2]),
                    "decode_tok_s": _stat(decode, [decode * 0.95, decode, decode * 1.05]),
                    "tpot_s": _stat(1 / decode, [1 / decode] * 3),
                    "throughput_tok_s": decode * concurrency * 0.9, "stages": stages,
                    "transfer_s_per_token": 0.2 / decode,
                    "predicted": {"ttft_s": ttft * 1.1, "decode_tok_s": decode * 0.9} if predicted else None},
    }


def _baseline(name: str, decode: float, *, prompt: int = 64) -> dict[str, Any]:
    results = ({"round_trip_s": 0.00004, "bytes": 16 * 2**20, "throughput_bytes_per_s": 2.5e9}
               if name == "raw_socket" else {"ttft_s": 0.05, "decode_tok_s": decode})
    return {"kind": "baseline", "suite": "mesh-bench", "schema": 1, "timestamp": "2026-11-30T02:05:00+00:00",
            "commit": "abc1234", "machine": MACHINE, "name": name,
            "config": {"model": MODEL, "prompt_tokens": prompt, "new_tokens": 32},
            "status": "ok", "error": None, "results": results}


FAILED = {"kind": "run", "suite": "mesh-bench", "schema": 1, "timestamp": "2026-11-30T02:40:00+00:00",
          "commit": "abc1234", "machine": MACHINE,
          "config": {"model": MODEL, "backend": "torch", "transport": "quic", "nodes": 3, "placement": "solver",
                     "objective": "ttft", "prompt_tokens": 512, "new_tokens": 32, "concurrency": 2,
                     "target": "local"},
          "status": "failed", "error": f"node 2 did not start: {XSS}", "results": None}
OLD = {"ratios": {"decode": 0.93}, "machine": {"cpu": "old box"}, "tokens_per_s": 41.5}


def records() -> list[dict[str, Any]]:
    runs = [_run("torch", n, decode=40.0 / n ** 0.3, ttft=0.08 * n) for n in (1, 2, 3)]
    runs += [_run("mlx", n, decode=55.0 / n ** 0.3, ttft=0.06 * n, predicted=False) for n in (1, 2)]
    runs.append(_run("torch", 2, decode=30.0, ttft=0.3, prompt=512, concurrency=2, transport="quic"))
    baselines = [_baseline("transformers_generate", 50.0), _baseline("mlx_lm_generate", 60.0),
                 _baseline("raw_socket", 0.0)]
    return [*runs, FAILED, *baselines, OLD]


def write_jsonl(path: Path, recs: list[dict[str, Any]]) -> Path:
    lines = [json.dumps(r) for r in recs]
    lines.insert(2, "")  # a blank line
    lines.insert(5, "this is not json {")  # a garbage line
    lines.append("[1, 2, 3]")  # JSON, but not an object
    path.write_text("\n".join(lines) + "\n")
    return path


def mesh_report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", "report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.spec("RP1", "RP2", "RP3")
def test_report_command_writes_a_complete_offline_report(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "results.jsonl", records())
    out = tmp_path / "out.html"
    proc = mesh_report(str(src), "-o", str(out), "--title", "nightly <bench>")
    assert proc.returncode == 0, proc.stderr
    assert "7 runs (0 partial, 1 failed), 3 baselines, 1 other records, 3 skipped lines" in proc.stdout
    page = out.read_text()
    assert "<title>nightly &lt;bench&gt;</title>" in page
    assert page.count("<svg") == 5  # all five plots have data
    assert "no data for this plot" not in page.lower()
    assert "11 records, 3 skipped lines (line 3, 6, 14)" in page  # RP1: skipped lines counted
    assert "Test CPU 9000" in page and "16.0" in page  # machine, memory in GiB


@pytest.mark.spec("RP1")
def test_every_record_appears_and_failed_runs_are_marked() -> None:
    page = render_report(records(), ["results.jsonl"])
    rows = re.findall(r"<tr[^>]*>.*?</tr>", page, re.S)
    failed = [r for r in rows if 'class="failed"' in r]
    assert len(failed) == 1
    assert "quic" in failed[0] and "solver" in failed[0] and "512" in failed[0] and "FAILED" in failed[0]
    assert "node 2 did not start" in failed[0]
    assert "7 runs, 0 partial, 1 failed." in page
    for name in ("transformers_generate", "mlx_lm_generate", "raw_socket"):
        assert f"<td>{name}</td>" in page
    assert "Other records" in page and "&quot;tokens_per_s&quot;: 41.5" in page and "<details>" in page


@pytest.mark.spec("RP1", "RP2")
def test_data_strings_are_escaped() -> None:
    recs = records()
    recs[0]["config"]["model"] = "evil $x$ & <b>model</b>"
    page = render_report(recs, [f"dir/{XSS}.jsonl"])
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>model</b>" not in page
    assert "<script" not in page.lower()


@pytest.mark.spec("RP2")
def test_no_external_references() -> None:
    page = render_report(records(), ["results.jsonl"])
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"<script\b[^>]*\bsrc", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert "@import" not in page and "@font-face" not in page and "url(http" not in page
    assert "http://" not in page and "https://" not in page  # not even SVG namespace URLs
    assert re.search(r"<text\b[^>]*font-family:[^>]*sans-serif", page)  # text stays text, generic family
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the inlined SVGs do not share ids


@pytest.mark.spec("RP3")
def test_ratio_against_the_matching_baseline() -> None:
    recs = records()
    page = render_report(recs, ["results.jsonl"])
    section = page[page.index("Runs vs baselines"):page.index("<h2>Plots")]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in re.findall(r"<tr>.*?</tr>", section, re.S)]
    rows = [r for r in rows if r]  # not the header
    torch1 = recs[0]
    expected = f"{torch1['results']['decode_tok_s']['p50'] / 50.0:.2f}x"
    row = next(r for r in rows if r[1:4] == ["torch", "tcp", "1"])  # backend, transport, nodes
    assert row[-1].startswith(expected) and row[-3].startswith("transformers_generate (commit abc1234")
    mlx2 = recs[4]
    assert mlx2["config"]["backend"] == "mlx" and mlx2["config"]["nodes"] == 2
    expected = f"{mlx2['results']['decode_tok_s']['p50'] / 60.0:.2f}x"
    row = next(r for r in rows if r[1:4] == ["mlx", "tcp", "2"])
    assert row[-1].startswith(expected) and row[-3].startswith("mlx_lm_generate")
    row = next(r for r in rows if r[6] == "512")  # no baseline at 512 prompt tokens
    assert row[-1] == "—"
    assert row[-3].startswith("none: no ok baseline")


@pytest.mark.spec("RP3")
def test_baseline_choice() -> None:
    run = _run("mlx", 1, 50.0, 0.1)
    tf, mlx = _baseline("transformers_generate", 40.0), _baseline("mlx_lm_generate", 45.0)
    assert pick_baseline(run, [tf, mlx]) is mlx
    assert pick_baseline(run, [tf]) is tf  # mlx falls back to transformers
    assert pick_baseline(_run("torch", 1, 50.0, 0.1), [tf, mlx]) is tf
    other_commit = copy.deepcopy(tf)
    other_commit["commit"] = "fff0000"
    assert pick_baseline(_run("torch", 1, 50.0, 0.1), [other_commit, tf]) is tf  # the same commit first
    failed = {**tf, "status": "failed", "results": None}
    assert pick_baseline(_run("torch", 1, 50.0, 0.1), [failed]) is None
    assert pick_baseline(_run("torch", 1, 50.0, 0.1, prompt=512), [tf]) is None


@pytest.mark.spec("RP2")
def test_plots_without_data_say_so() -> None:
    recs = [_run("torch", 2, 30.0, 0.2, predicted=False), FAILED]
    recs[0]["results"]["stages"] = []
    page = render_report(recs, ["x.jsonl"])
    assert page.count("<svg") == 2  # decode and TTFT bars
    assert page.count("No data for this plot") == 3  # stages, scaling, predicted


@pytest.mark.spec("RP4")
def test_missing_file_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = mesh_report(str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.html"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mesh: error:") and "nope.jsonl" in proc.stderr
    assert not (tmp_path / "out.html").exists()


@pytest.mark.spec("RP4")
def test_empty_and_garbage_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\xff\xfe nope\n{\"a\": \n\n" + b"[" * 100_000 + b"\n\"str\"\n")
    recs, counts, skipped = load_records([empty, garbage])
    assert recs == [] and counts == {str(empty): 0, str(garbage): 0}
    assert skipped == {str(empty): [], str(garbage): [1, 2, 3, 4, 5]}
    out = tmp_path / "out.html"
    proc = mesh_report(str(empty), str(garbage), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "There are no runs in the input." in page
    assert "0 records, 5 skipped lines" in page
    assert page.count("No data for this plot") == 5


@pytest.mark.spec("RP1")
def test_two_hundred_records_render() -> None:
    recs = []
    for i in range(200):
        rec = _run(("torch", "mlx")[i % 2], 1 + i % 3, 20.0 + i % 17, 0.05 + (i % 11) / 100, prompt=64 * (1 + i % 4),
                   concurrency=1 + i % 2)
        if i % 25 == 0:
            rec = {**rec, "status": "failed", "error": f"failure {i}", "results": None}
        recs.append(rec)
    page = render_report(recs, ["big.jsonl"])
    assert "200 runs, 0 partial, 8 failed." in page
    assert page.count("<svg") == 5


@pytest.mark.spec("RP4")
def test_odd_field_types_do_not_crash() -> None:
    weird: list[dict[str, Any]] = [
        {"kind": ["run"]},  # unhashable kind: another record
        {"kind": "run", "status": "ok", "config": [1], "results": "x"},
        {"kind": "run", "status": "ok", "config": {"nodes": True, "backend": None, "model": {"a": 1}},
         "results": {"decode_tok_s": {"p50": 10**400, "runs": "no"}, "ttft_s": {"p50": float("nan")},
                     "stages": [1, {"layers": "x", "decode_compute_s_per_token": "1"}], "predicted": {"ttft_s": "a"}}},
        {"kind": "baseline", "name": 3, "config": None, "results": [], "timestamp": 5},
        {"kind": "run", "status": "ok", "timestamp": "garbage", "machine": "m",
         "config": {"nodes": 2, "model": "m $x$ $", "backend": "mlx"},
         "results": {"decode_tok_s": {"p50": 5.0}, "ttft_s": {"p50": 0.1, "min": 0.2},
                     "stages": [{"member": None, "layers": [0, 1], "decode_compute_s_per_token": 0.01}]}},
    ]
    page = render_report(weird, ["weird.jsonl"])
    assert "3 runs, 0 partial, 0 failed." in page and "1 record(s) that are neither" in page
    assert page.count("<svg") == 3  # decode, TTFT, stages from the last run
