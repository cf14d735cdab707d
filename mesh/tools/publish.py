"""``python -m mesh publish``: the README's benchmark tables, generated from committed data.

Every figure the README publishes comes from a JSON-lines file under ``benchmarks/``, written
by a benchmark command of this package (``bench``, ``bench-backends``, ``bench-kernel``,
``bench-transport``, ``bench-placement [--measured]``, ``faults --out``). The README marks each
generated block with ``<!-- published:NAME -->`` ... ``<!-- /published:NAME -->``; this module
renders the block from ``benchmarks/NAME.jsonl`` and writes it back (``--check``: exit 1 and
name the blocks that differ, write nothing). ``tests/test_published.py`` runs the check, so a
README table that disagrees with its data fails the tests (spec RP5).

Which records a block shows: those of the newest commit that has a record measured on a
clean tree (``machine.dirty`` false); a record from a dirty tree is never published, since
its commit does not hold the code that measured it. Several records of that commit are
aggregated (the kernel and transport benchmarks are run n times; each figure is then the
median with its min-max over the runs). Every figure carries n, median and spread; a ratio
reads "within noise" by the rule of ``mesh.tools.benchstats`` (spec RP6). Failed and partial runs
are shown with their counts, never dropped.

Pure text in, text out apart from ``run_publish``; one renderer per block below.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mesh.tools.benchstats import Sample, compare, from_block, pick_baseline, sample
from mesh.tools.publish_batching import render_batching, render_batching_lengths, render_batching_scenarios
from mesh.tools.publish_grammar import render_grammar
from mesh.tools.publish_gym import render_gym
from mesh.tools.publish_text import (  # noqa: F401  (this module's surface)
    Selection,
    _cell,
    _format_label,
    _get,
    _machine,
    _n_cell,
    _status,
    _table,
    caption,
    read_jsonl,
    select,
)
from mesh.tools.publish_tp import render_tensor_parallel

BLOCK = re.compile(r"(<!-- published:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /published:(?P=name) -->)", re.S)


def _stages_cell(run: dict[str, Any]) -> str:
    stages = _get(run, "results", "stages") or []
    values = [s.get("decode_compute_s_per_token") for s in stages if isinstance(s, dict)]
    return " + ".join(f"{v * 1000:.1f}" for v in values if isinstance(v, int | float)) or "-"


def render_bench_matrix(sel: Selection, path: str) -> str:
    """The bench matrix: one row per run, against ``generate()`` at the same prompt length."""
    recs = sel.records
    runs = sorted((r for r in recs if r.get("kind") == "run"),
                  key=lambda r: tuple(_get(r, "config", k) or 0 for k in
                                      ("nodes", "prefill_nodes", "kv_replica_mb", "prompt_tokens", "concurrency")))
    rows = []
    for run in runs:
        c = run.get("config") or {}
        ttft, rate = from_block(_get(run, "results", "ttft_s")), from_block(_get(run, "results", "decode_tok_s"))
        thru = from_block(_get(run, "results", "throughput")) or from_block(_get(run, "results", "throughput_tok_s"))
        base = pick_baseline(run, [r for r in recs if r.get("kind") == "baseline"])
        versus = compare(rate, from_block(_get(base, "results", "decode_tok_s"))) if base else None
        transfer = _get(run, "results", "transfer_s_per_token")
        rows.append([str(c.get("nodes")), str(c.get("prompt_tokens")), str(c.get("concurrency")), _n_cell(ttft, rate),
                     _cell(ttft, 1000, 0), _cell(rate), _cell(thru), versus.fmt() if versus else "-",
                     _stages_cell(run), f"{transfer * 1000:.1f}" if isinstance(transfer, int | float) else "-",
                     _status(run)])
    table = _table(("nodes", "prompt", "concurrent", "n", "TTFT ms", "decode tok/s per request", "throughput tok/s",
                    "decode vs baseline", "compute ms/token per stage (mean)", "transfer ms/token (mean)", "status"),
                   rows, "rrrrrrrrlrl")
    lines = []
    for r in recs:
        if r.get("kind") != "baseline":
            continue
        if r.get("status") != "ok":
            lines.append(f"baseline {r.get('name')} FAILED: {r.get('error')}")
        elif r.get("name") == "raw_socket":
            rtt = from_block(_get(r, "results", "round_trip")) or from_block(_get(r, "results", "round_trip_s"))
            lines.append(f"raw loopback TCP round trip of {_get(r, 'results', 'bytes')} bytes (a decode step's hidden "
                         f"states): {_cell(rtt, 1000, 3)} ms, n={rtt.n if rtt else 0}")
        else:
            ttft, rate = from_block(_get(r, "results", "ttft_s")), from_block(_get(r, "results", "decode_tok_s"))
            lines.append(f"{r.get('name')} at {_get(r, 'config', 'prompt_tokens')} prompt tokens: decode "
                         f"{_cell(rate)} tok/s, TTFT {_cell(ttft, 1000, 0)} ms, n={_n_cell(ttft, rate)}")
    return (caption(sel, path, "Measured") + "\n\nBaselines in the same run: " + "; ".join(lines) +
            ".\n\n" + table + "\n")


def _named_baseline(recs: Sequence[dict[str, Any]], name: str, prompt: Any) -> dict[str, Any] | None:
    return next((r for r in recs if r.get("kind") == "baseline" and r.get("name") == name and r.get("status") == "ok"
                 and _get(r, "config", "prompt_tokens") == prompt), None)


def render_formats(sel: Selection, path: str) -> str:
    """The default model held in each weight format (``mesh bench --dtype ... --quantize ...``
    on one node): TTFT, decode tokens/s, the node's peak resident memory, and decode against
    transformers' ``generate()`` (f32) and llama.cpp on the same GGUF, all from one run."""
    recs = sel.records
    rows = []
    for run in sorted((r for r in recs if r.get("kind") == "run"),
                      key=lambda r: (str(_get(r, "config", "backend")), _format_label(r.get("config") or {}))):
        c = run.get("config") or {}
        ttft, rate = from_block(_get(run, "results", "ttft_s")), from_block(_get(run, "results", "decode_tok_s"))
        cells = []
        for name in ("transformers_generate", "llama_cpp"):
            base = _named_baseline(recs, name, c.get("prompt_tokens"))
            versus = compare(rate, from_block(_get(base, "results", "decode_tok_s"))) if base else None
            cells.append(versus.fmt() if versus else "-")
        rss = [v for v in (_get(run, "results", "node_peak_rss_bytes") or []) if isinstance(v, int)]
        rows.append([str(c.get("backend")), _format_label(c), _n_cell(ttft, rate), _cell(ttft, 1000, 0), _cell(rate),
                     *cells, f"{sum(rss) / 2**20:.0f}" if rss else "-", _status(run)])
    table = _table(("backend", "node flags", "n", "TTFT ms", "decode tok/s", "vs generate() f32", "vs llama.cpp",
                    "node peak RSS MiB", "status"), rows, "llrrrrrrl")
    lines = []
    for r in recs:
        if r.get("kind") == "baseline" and r.get("name") != "raw_socket":
            ttft, rate = from_block(_get(r, "results", "ttft_s")), from_block(_get(r, "results", "decode_tok_s"))
            lines.append(f"{r.get('name')}: decode {_cell(rate)} tok/s, TTFT {_cell(ttft, 1000, 0)} ms"
                         if r.get("status") == "ok" else f"{r.get('name')} FAILED: {r.get('error')}")
    return (caption(sel, path, "Measured") + "\n\nBaselines in the same run: " + "; ".join(lines) +
            ".\n\n" + table + "\n")


def render_kv_replica(sel: Selection, path: str) -> str:
    """The KV replica's cost: each configuration with the replica on against off."""
    runs = [r for r in sel.records if r.get("kind") == "run"]
    key = lambda r: (_get(r, "config", "nodes"), _get(r, "config", "prefill_nodes"),  # noqa: E731
                     _get(r, "config", "prompt_tokens"), _get(r, "config", "concurrency"))
    rows = []
    for run in sorted(runs, key=lambda r: (*map(lambda v: v or 0, key(r)), _get(r, "config", "kv_replica_mb") or 0)):
        c = run.get("config") or {}
        ttft, rate = from_block(_get(run, "results", "ttft_s")), from_block(_get(run, "results", "decode_tok_s"))
        off = next((r for r in runs if key(r) == key(run) and _get(r, "config", "kv_replica_mb") == 0), None)
        on = bool(c.get("kv_replica_mb"))
        vs_ttft = vs_rate = None
        if on and off is not None:
            vs_ttft = compare(ttft, from_block(_get(off, "results", "ttft_s")), higher_is_better=False)
            vs_rate = compare(rate, from_block(_get(off, "results", "decode_tok_s")))
        plan = (f"{c.get('prefill_nodes')} prefill + {int(c.get('nodes') or 0) - int(c.get('prefill_nodes') or 0)} "
                f"decode" if c.get("prefill_nodes") else f"{c.get('nodes')}-stage pipeline")
        rows.append([plan, str(c.get("prompt_tokens")), "on" if on else "off", _n_cell(ttft, rate),
                     _cell(ttft, 1000, 0), _cell(rate), vs_ttft.fmt() if vs_ttft else "-",
                     vs_rate.fmt() if vs_rate else "-", _status(run)])
    return caption(sel, path, "Measured") + "\n\n" + _table(
        ("plan", "prompt", "replica", "n", "TTFT ms", "decode tok/s", "TTFT on vs off", "decode on vs off", "status"),
        rows, "lrlrrrrrl") + "\n"


# -- python -m mesh bench-backends -------------------------------------------------------------
def render_backends(sel: Selection, path: str) -> str:
    """MLX against mlx-lm, the mixed pipeline and P/D against their baselines (last record)."""
    rec = sel.records[-1]
    local, clusters = rec.get("in_process") or {}, rec.get("clusters") or {}

    def figures(row: dict[str, Any] | None) -> tuple[Sample | None, Sample | None]:
        if not isinstance(row, dict):
            return None, None
        return (from_block(row.get("ttft")) or from_block(row.get("ttft_s")),
                from_block(row.get("decode")) or from_block(row.get("decode_tok_s")))

    spec = [("mlx-lm `generate_step` on the same module (baseline)", local.get("mlx_lm_generate_step"), None),
            ("MLX backend, 1 stage", local.get("mlx_backend"), local.get("mlx_lm_generate_step")),
            ("torch backend, 1 stage (reference)", local.get("torch_backend"), None),
            ("2 nodes torch + torch (baseline)", clusters.get("torch+torch"), None),
            ("2 nodes mlx + torch (mixed pipeline)", clusters.get("mlx+torch"), clusters.get("torch+torch")),
            ("3 nodes, plain 3-stage pipeline (baseline)", clusters.get("plain 3 stages"), None),
            ("3 nodes, 1 prefill + 2 decode", clusters.get("1 prefill + 2 decode"), clusters.get("plain 3 stages"))]
    rows = []
    for label, row, base in spec:
        if isinstance(row, dict) and row.get("error"):
            rows.append([label, "-", "FAILED", "-", "-", "-", str(row["error"])[:80]])
            continue
        ttft, rate = figures(row)
        b_ttft, b_rate = figures(base)
        vs_rate = compare(rate, b_rate) if base is not None else None
        vs_ttft = compare(ttft, b_ttft, higher_is_better=False) if base is not None else None
        rows.append([label, _n_cell(ttft, rate), _cell(ttft, 1000, 0), _cell(rate),
                     vs_ttft.fmt() if vs_ttft else "-", vs_rate.fmt() if vs_rate else "-", "ok"])
    pred = rec.get("predicted") or {}
    note = ""
    if pred.get("plain") and pred.get("disaggregated"):
        p, d = pred["plain"], pred["disaggregated"]
        note = (f"\n\nPredicted by the cost model, not measured ({pred.get('profile')}, {pred.get('model')}, "
                f"{pred.get('prompt_tokens')}-token prompt, {pred.get('new_tokens')} new tokens): disaggregated "
                f"{d['e2e_s']:.2f} s per request (decode {d['decode_tok_s']:.1f} tok/s, TTFT {d['ttft_s']:.2f} s) "
                f"against {p['e2e_s']:.2f} s for the best plain plan (decode {p['decode_tok_s']:.1f} tok/s, TTFT "
                f"{p['ttft_s']:.2f} s): {p['e2e_s'] / d['e2e_s']:.2f}x.")
    head = (caption(sel, path, "Measured") + f" {rec.get('prompt_tokens')}-token prompt, {rec.get('new_tokens')} "
            f"new tokens, greedy, {rec.get('repeats')} timed runs after a warm-up.\n\n")
    return head + _table(("configuration", "n", "TTFT ms", "decode tok/s", "TTFT vs baseline", "decode vs baseline",
                          "status"), rows, "lrrrrrl") + note + "\n"


# -- python -m mesh bench-kernel ---------------------------------------------------------------
def render_kernel(sel: Selection, path: str) -> str:
    """The kernel's figures, each the median (min-max) over the runs of one commit."""
    recs = sel.records

    def s(*keys: str, scale: float = 1.0, digits: int = 0) -> str:
        got = sample(_get(r, *keys) for r in recs)
        return _cell(got, scale, digits)

    rows = [
        ["events applied per second, arriving one by one from a peer", s("apply", "events_per_s")],
        ["catch-up of a fresh node from a 150,000-event history (149,000 status heartbeats), with compaction",
         f"{s('catch_up', 'bytes_sent')} bytes in {s('catch_up', 'seconds', digits=3)} s, peak "
         f"{s('catch_up', 'peak_memory_bytes', scale=2**-20, digits=1)} MiB (live state: "
         f"{s('catch_up', 'live_entries')} entries)"],
        ["the same catch-up replaying the whole history (no compaction; the baseline)",
         f"{s('catch_up_without_compaction', 'bytes_sent', scale=1e-6, digits=1)} MB in "
         f"{s('catch_up_without_compaction', 'seconds', digits=1)} s, peak "
         f"{s('catch_up_without_compaction', 'peak_memory_bytes', scale=2**-20, digits=0)} MiB"],
        ["32 replicas converging after a partition heals (one random anti-entropy exchange per replica per round)",
         f"{s('partition', 'rounds')} rounds (seeded: the same every run): about "
         f"{s('partition', 'seconds_at_1s_rounds')} s at the default 1 s interval, "
         f"{s('partition', 'compute_seconds', digits=2)} s of compute"],
    ]
    return (caption(sel, path, "Measured") + f" Each figure: median (min-max) over n = {len(recs)} runs.\n\n" +
            _table(("measurement", "result"), rows, "ll") + "\n")


# -- python -m mesh bench-transport ------------------------------------------------------------
def render_transports(sel: Selection, path: str) -> str:
    """Each transport's RTT and throughput against the raw socket, over the runs of one commit."""
    recs = sel.records
    first = recs[0]
    keys = [(r["transport"], r["tls"]) for r in first.get("results", []) if isinstance(r, dict)]

    def fig(transport: str, tls: bool, field: str) -> Sample | None:
        return sample(next((x.get(field) for x in rec.get("results", [])
                            if x.get("transport") == transport and x.get("tls") == tls), None) for rec in recs)

    raw_rtt = sample(_get(r, "raw", "rtt_p50_us") for r in recs)
    raw_p99 = sample(_get(r, "raw", "rtt_p99_us") for r in recs)
    raw_tp = sample(_get(r, "raw", "throughput_gb_per_s") for r in recs)
    rows = [["raw asyncio socket (baseline)", "no", _cell(raw_rtt, 1, 0), _cell(raw_p99, 1, 0), "1.00x",
             _cell(raw_tp, 1, 2), "1.00x", ""]]
    for transport, tls in keys:
        rtt, p99, tp = fig(transport, tls, "rtt_p50_us"), fig(transport, tls, "rtt_p99_us"), \
            fig(transport, tls, "throughput_gb_per_s")
        cost = ""
        if tls:
            plain_rtt, plain_tp = fig(transport, False, "rtt_p50_us"), fig(transport, False, "throughput_gb_per_s")
            c_rtt = compare(rtt, plain_rtt, higher_is_better=False)
            c_tp = compare(tp, plain_tp)
            cost = f"{c_rtt.fmt() if c_rtt else '-'} / {c_tp.fmt() if c_tp else '-'}"
        vs_rtt, vs_tp = compare(rtt, raw_rtt, higher_is_better=False), compare(tp, raw_tp)
        rows.append([transport, "yes" if tls else "no", _cell(rtt, 1, 0), _cell(p99, 1, 0),
                     vs_rtt.fmt() if vs_rtt else "-", _cell(tp, 1, 3 if (tp and tp.median < 0.1) else 2),
                     vs_tp.fmt() if vs_tp else "-", cost])
    head = (caption(sel, path, "Measured") + f" {first.get('round_trips')} round trips of a 64-byte message and "
            f"{first.get('large_count')} one-way messages of {int(first.get('large_message_bytes', 0)) >> 20} MiB "
            f"per transport and run; each figure: median (min-max) over n = {len(recs)} runs. Speed ratios are ours "
            f"over raw (RTT: raw / ours), so below 1 is slower; TLS speed = TLS over plaintext, same transport.\n\n")
    return head + _table(("transport", "TLS", "RTT p50 us", "RTT p99 us", "RTT speed vs raw", "GB/s", "GB/s vs raw",
                          "TLS speed (RTT / GB/s)"), rows, "llrrrrrr") + "\n"


# -- python -m mesh bench-placement ------------------------------------------------------------
def _pred(p: Any) -> str:
    if not isinstance(p, dict):
        return "-"
    return f"{p['ttft_s']:.2f} s / {p['decode_tokens_per_s']:.1f} tok/s / {p['e2e_s']:.1f} s"


def render_placement(sel: Selection, path: str) -> str:
    """The solver's plans against the memory split and the best single device: predictions
    (deterministic) of the last record; solve times over every record of the commit."""
    recs = sel.records
    rec = recs[-1]
    rows = []
    for profile in rec.get("profiles", []):
        for i, case in enumerate(profile.get("cases", [])):
            solve = sample(t for r in recs for p in r.get("profiles", []) if p.get("profile") == profile["profile"]
                           for t in (_get(p, "cases", i, "solve_ms_all") or []))
            ours = case.get("ours")
            req = case.get("request") or {}
            speed_base, speed_single = case.get("speedup_vs_baseline"), case.get("speedup_vs_best_single")
            best = case.get("best_single")
            rows.append([f"{profile['profile']} ({profile.get('devices')} devices)",
                         f"{case['model']} f16, {req.get('prompt_tokens')}-token prompt, {req.get('new_tokens')} new, "
                         f"{case['objective']}",
                         (f"{ours['plan']}: {_pred(ours['predicted'])}" if ours else f"none: {case.get('error')}"),
                         f"{speed_base:.2f}x" if isinstance(speed_base, int | float) else "infeasible",
                         (f"{best['device']} {speed_single:.2f}x" if best and isinstance(speed_single, int | float)
                          else "none fits"),
                         f"{_cell(solve, 1, 1)}, n={solve.n if solve else 0}"])
    targets = rec.get("targets") or {}
    spark = next((p.get("vs_mac_studio_alone") for p in rec.get("profiles", []) if p.get("vs_mac_studio_alone")), None)
    notes = "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()) + "."
    if any("+" in str(_get(c, "ours", "plan") or "") for p in rec.get("profiles", []) for c in p.get("cases", [])):
        notes += (" A plan written `a+b[...]` is a tensor-parallel group: nodes run it where its members offer a "
                  "trusted link (`--tp-address`) and run one library: MLX, or torch with float weights (README "
                  "\"Tensor parallelism\").")
    if spark and spark.get("speedup") is not None:
        exo = spark.get("published") or {}
        notes += (f" Predicted: the Spark + Mac Studio pair {spark['speedup']:.2f}x faster end to end than the Mac "
                  f"Studio alone. Third-party figure, not verified by us: EXO Labs report "
                  f"{exo.get('speedup_vs_mac_studio_alone')}x for that setup (their blog post).")
    return (caption(sel, path, "Predicted by the cost model from published device figures (solve times measured)") +
            " \"x\" = the row's objective score over ours (> 1: ours faster); solve ms: median (min-max) over every "
            "solve of the runs.\n\n" +
            _table(("cluster", "model, request, objective", "ours: plan, TTFT / decode / end to end",
                    "memory split (x)", "best single device (x)", "solve ms"), rows, "llllll") + "\n\n" + notes + "\n")


def render_placement_measured(sel: Selection, path: str) -> str:
    """Predicted against measured on loopback clusters (last record of the commit)."""
    rec = sel.records[-1]
    rows = []
    for row in rec.get("rows", []):
        if row.get("error"):
            rows.append([str(row.get("nodes")), str(row.get("prompt")), "FAILED", str(row["error"])[:80],
                         "-", "-", "-", "-", "0"])
            continue
        p, c, h, r = row["predicted"], row["coordinator"], row["client"], row["ratio"]
        ttft, rate = from_block(h.get("ttft")), from_block(h.get("decode"))

        def ratio(x: Any) -> str:
            if not isinstance(x, int | float):
                return "-"
            return f"{x:.2f}" + ("" if abs(x - 1) <= 0.25 else " (missed)")

        rows.append([str(row["nodes"]), str(row["prompt_tokens"]),
                     f"{p['ttft_s'] * 1000:.0f} / {c['ttft_s'] * 1000:.0f} ms" if p.get("ttft_s") and c.get("ttft_s")
                     else "-", ratio(r.get("ttft_s")),
                     f"{p['decode_tokens_per_s']:.1f} / {c['decode_tokens_per_s']:.1f}"
                     if p.get("decode_tokens_per_s") and c.get("decode_tokens_per_s") else "-",
                     ratio(r.get("decode_tokens_per_s")), _cell(ttft, 1000, 0), _cell(rate), _n_cell(ttft, rate)])
    return (caption(sel, path, "Measured") + " Ratio = predicted / measured by the coordinator (its medians); target "
            "within 25 %. The client columns: what the HTTP client saw, median (min-max).\n\n" +
            _table(("nodes (stages)", "prompt tokens", "TTFT predicted / coordinator's median", "ratio",
                    "decode tok/s predicted / coordinator's median", "ratio", "client TTFT ms",
                    "client decode tok/s", "n"),
                   rows, "rrrrrrrrr") + "\n")


# -- python -m mesh faults --out ---------------------------------------------------------------
def render_faults(sel: Selection, path: str) -> str:
    """Every scenario of the newest full suite run of the commit (else its newest run, named)."""
    full = [r for r in sel.records if r.get("set", "quick" if r.get("quick") else "full") == "full"]
    rec = (full or sel.records)[-1]
    which = rec.get("set", "quick" if rec.get("quick") else "full")
    rows = []
    for s in rec.get("scenarios", []):
        def sec(a: Any, b: Any) -> str:
            if a is None and b is None:
                return "-"
            return f"{a:.2f} / {b:.2f}" if isinstance(a, int | float) and isinstance(b, int | float) else "-"

        target = s.get("recovery_target_s")
        met = s.get("target_met")
        target_cell = "-" if target is None else f"<= {target:g} s: " + ("met" if met else "MISSED" if met is False
                                                                         else "no recovery measured")
        result = "pass" if s.get("passed") else "FAIL" + (" (crashed)" if s.get("crashed") else "")
        rows.append([s.get("name"), *(str(s.get(k, "-")) for k in ("sent", "attempts", "refused", "completed",
                                                                     "abandoned", "failed_clean", "lost", "mismatches")),
                     f"{s['longest_gap_s']:.2f}" if isinstance(s.get("longest_gap_s"), int | float) else "-",
                     sec(s.get("recovery_s_p50"), s.get("recovery_s_max")),
                     sec(s.get("ttft_after_fault_s_p50"), s.get("ttft_after_fault_s_max")), target_cell, result])
    failed = [s.get("name") for s in rec.get("scenarios", []) if not s.get("passed")]
    summary = (f"{len(rec.get('scenarios', []))} scenarios, {len(failed)} failed"
               + (f": {', '.join(map(str, failed))}" if failed else "") + ".")
    return (caption(sel, path, {"full": "Measured, full set", "quick": "Measured, quick set only"}.get(
        which, "Measured, selected scenarios only")) +
            " " + summary + "\n\n" +
            _table(("scenario", "sent", "attempts", "refused (503)", "completed", "abandoned", "failed clean", "lost",
                    "mismatches", "longest gap s", "recovery p50 / max s",
                    "first token after the fault p50 / max s", "recovery target", "result"), rows,
                   "lrrrrrrrrrrrll") + "\n")


# -- continuous batching ----------------------------------------------------------------------
RENDERERS: dict[str, Callable[[Selection, str], str]] = {
    "bench-matrix": render_bench_matrix,
    "kv-replica": render_kv_replica,
    "backends": render_backends,
    "kernel": render_kernel,
    "transports": render_transports,
    "placement": render_placement,
    "placement-measured": render_placement_measured,
    "faults": render_faults,
    "formats": render_formats,
    "batching": render_batching,
    "batching-lengths": render_batching_lengths,
    "batching-scenarios": render_batching_scenarios,
    "tensor-parallel": render_tensor_parallel,
    "gym": render_gym,
    "grammar": render_grammar,
}


def render_block(name: str, data_dir: Path, root: Path | None = None) -> str:
    """The text of block ``name`` from ``data_dir/NAME.jsonl``. Raises ``ValueError`` for an
    unknown block, a missing or unreadable file, or a file with no clean record."""
    if name not in RENDERERS:
        raise ValueError(f"unknown published block {name!r}; known: {', '.join(RENDERERS)}")
    path = data_dir / f"{name}.jsonl"
    try:
        records = read_jsonl(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"block {name!r}: cannot read {path}: {exc}") from exc
    sel = select(records)
    if sel is None:
        raise ValueError(f"block {name!r}: {path} has no record measured on a clean tree (machine.dirty false)")
    shown = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.as_posix()
    # runs of a command that failed as a whole (no "kind": the bench matrix marks each run itself)
    failed = [r for r in sel.records if "kind" not in r and r.get("status") == "failed"]
    ok = Selection(commit=sel.commit, records=[r for r in sel.records if r not in failed],
                   skipped_dirty=sel.skipped_dirty)
    note = ""
    if failed:
        errors = "; ".join(sorted({str(r.get("error"))[:120] for r in failed}))
        note = f"\n**{len(failed)} run(s) of this commit FAILED and are not in the table:** {errors}\n"
    if not ok.records:
        return caption(sel, shown, "Measured") + "\n" + note
    try:
        return RENDERERS[name](ok, shown) + note
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise ValueError(f"block {name!r}: cannot render {path} ({type(exc).__name__}: {exc}); "
                         f"a record of another shape?") from exc


def regenerate(text: str, data_dir: Path, root: Path | None = None) -> tuple[str, list[str]]:
    """``text`` with every published block rendered anew, and the names of the blocks that
    changed. Raises ``ValueError`` (see ``render_block``)."""
    changed: list[str] = []

    def replace(m: re.Match[str]) -> str:
        body = render_block(m.group("name"), data_dir, root)
        if body != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(replace, text), changed


def run_publish(args: argparse.Namespace) -> int:
    """Regenerate (or with ``--check`` verify) the published blocks of ``args.readme``."""
    readme: Path = args.readme
    try:
        text = readme.read_text(encoding="utf-8")
        new, changed = regenerate(text, args.data, readme.resolve().parent)
    except (OSError, ValueError) as exc:
        print(f"mesh: error: {exc}", file=sys.stderr)
        return 2
    names = [m.group("name") for m in BLOCK.finditer(text)]
    if args.check:
        if changed:
            print(f"{readme}: out of date with {args.data}: {', '.join(changed)} (run python -m mesh publish)")
            return 1
        print(f"{readme}: {len(names)} published blocks match {args.data}")
        return 0
    if changed:
        readme.write_text(new, encoding="utf-8")
    print(f"{readme}: {len(names)} published blocks, {len(changed)} rewritten" +
          (f" ({', '.join(changed)})" if changed else ""))
    return 0
