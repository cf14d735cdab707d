"""``python -m mesh report RESULTS.jsonl [MORE.jsonl ...] -o report.html``: a static HTML report
of benchmark results that opens offline.

Input is JSON lines as ``python -m mesh bench`` writes them: ``{"kind": "run", ...}`` and
``{"kind": "baseline", ...}`` records (see specs/report.md). Any other JSON object goes to an
"Other records" section; blank lines and lines that are not JSON objects are skipped and counted.
``render_report`` is pure: records in, one HTML document out, with every plot drawn by
matplotlib (Agg) as SVG and inlined, inline CSS, no script and no external reference.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from mesh.tools.benchstats import (  # noqa: E402
    Sample,
    compare,
    from_block,
    pick_baseline,
    record_time,
)
from mesh.tools.report_gym import gym_section, is_gym  # noqa: E402

DEFAULT_TITLE = "mesh benchmark report"
# config field -> (column head, prefix in plot labels)
CONFIG = {"model": ("model", ""), "backend": ("backend", ""), "transport": ("transport", ""), "nodes": ("nodes", "n="),
          "placement": ("placement", ""), "objective": ("objective", "obj="),
          "prefill_nodes": ("prefill nodes", "pd="), "kv_replica_mb": ("KV replica MiB", "rep="),
          "prompt_tokens": ("prompt", "p="),
          "new_tokens": ("new tokens", "new="), "concurrency": ("concurrency", "c=")}
CONFIG_FIELDS, CONFIG_HEADS = tuple(CONFIG), tuple(head for head, _ in CONFIG.values())
MPL_RC = {"svg.fonttype": "none", "svg.hashsalt": "mesh-report", "font.size": 9,
          "font.family": "sans-serif", "axes.grid": True, "grid.alpha": 0.3}
SVG_METADATA: dict[str, Any] = {"Date": None, "Creator": None, "Format": None, "Type": None}
CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fde8e8}.bad{color:#b00020;font-weight:bold}.err{color:#b00020;font-size:12px}
figure{margin:1em 0 2em}figcaption{font-size:13px;color:#444;max-width:60em}.nodata{color:#777;font-style:italic}
pre{background:#f7f7f7;padding:.5em;overflow:auto;font-size:12px}svg{max-width:100%;height:auto}"""


def load_records(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, list[int]]]:
    """Records of every file, in order, with per-source record counts and skipped line numbers
    (blank or not a JSON object). Raises ``OSError`` for a file that cannot be read."""
    records: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    skipped: dict[str, list[int]] = {}
    for path in dict.fromkeys(paths):  # a file named twice is read once
        text, name = path.read_text(encoding="utf-8", errors="replace"), str(path)
        counts[name], skipped[name] = 0, []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                value = json.loads(line) if line.strip() else None
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                records.append(value)
                counts[name] += 1
            else:
                skipped[name].append(number)
    return records, counts, skipped


def run_report(args: argparse.Namespace) -> int:
    """Read ``args.results``, write the report to ``args.output``; 2 on unreadable input."""
    try:
        records, counts, skipped = load_records(args.results)
    except OSError as exc:
        print(f"mesh: error: cannot read {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    page = render_report(records, list(counts), title=args.title, counts=counts, skipped=skipped)
    try:
        args.output.write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"mesh: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    runs, baselines, other = _split(records)
    failed = sum(1 for r in runs if r.get("status") not in ("ok", "partial"))
    partial = sum(1 for r in runs if r.get("status") == "partial")
    print(f"wrote {args.output}: {len(runs)} runs ({partial} partial, {failed} failed), {len(baselines)} baselines, "
          f"{len(other)} other records, {sum(len(v) for v in skipped.values())} skipped lines")
    return 0


def _get(record: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _stat(run: dict[str, Any], metric: str) -> tuple[float | None, float | None, float | None]:
    """(p50, min, max) of a per-request metric; min/max from ``runs`` when present."""
    block = _get(run, "results", metric)
    raw = _get(block, "runs")
    values = [v for v in map(_num, raw) if v is not None] if isinstance(raw, list) else []
    low = min(values) if values else _num(_get(block, "min"))
    high = max(values) if values else _num(_get(block, "max"))
    return _num(_get(block, "p50")), low, high


def _sample(record: dict[str, Any], metric: str) -> Sample | None:
    """The recorded figure ``results.<metric>`` as a sample (a stats block or a bare number)."""
    try:
        return from_block(_get(record, "results", metric))
    except (TypeError, ValueError, OverflowError):
        return None


def _spread(record: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max), n=N`` of a recorded figure, or a dash."""
    got = _sample(record, metric)
    return _e(got.fmt(scale, digits, with_n=True)) if got is not None else "—"


# suites of the other benchmark commands -> the published block that renders them (mesh/tools/publish.py)
SUITE_BLOCKS = {"mesh-bench-backends": "backends", "mesh-bench-kernel": "kernel", "mesh-bench-transport": "transports",
                "mesh-bench-placement": "placement", "mesh-bench-placement-measured": "placement-measured",
                "mesh-faults": "faults"}


def _markdown_html(text: str) -> str:
    """The Markdown that ``mesh.tools.publish`` renders (paragraphs and pipe tables) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            heads, body = rows[0], rows[2:]
            out.append(_table(heads, (("failed" if any(c.startswith(("FAIL", "partial")) for c in r) else "",
                                       [html.escape(c) for c in r]) for r in body)))
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line.strip().strip('*'))}</p>")
    flush()
    return "\n".join(out)


def _other_suites(records: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Sections for the records of the other benchmark commands (one per suite and commit, the
    dirty ones marked), and the records left over."""
    from mesh.tools.publish import RENDERERS, Selection

    groups: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    rest = []
    for record in records:
        suite = record.get("suite")
        if suite in SUITE_BLOCKS:
            key = (str(suite), str(_get(record, "machine", "commit")), bool(_get(record, "machine", "dirty")))
            groups.setdefault(key, []).append(record)
        else:
            rest.append(record)
    parts = []
    for (suite, commit, dirty), group in groups.items():
        name = SUITE_BLOCKS[suite]
        try:
            body = _markdown_html(RENDERERS[name](Selection(commit=commit, records=group, skipped_dirty=0), suite))
        except Exception as exc:  # noqa: BLE001 - a record of another shape is shown raw below, not a crash
            rest += group
            parts.append(f'<p class="err">{_e(suite)} at {_e(commit)}: cannot render ({_e(type(exc).__name__)}: '
                         f'{_e(exc)}); its records are under "Other records".</p>')
            continue
        mark = ' <span class="bad">(dirty tree: not publishable)</span>' if dirty else ""
        parts.append(f"<h3>{_e(name)} (commit {_e(commit)}){mark}</h3>{body}")
    return "\n".join(parts), rest


def _split(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                         list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"run": [], "baseline": [], "other": []}
    for record in records:
        kind = record.get("kind")
        out[kind if kind in ("run", "baseline") else "other"].append(record)
    return out["run"], out["baseline"], out["other"]


def _sort_key(value: Any) -> tuple[int, float, str]:
    number = _num(value)
    if number is not None:
        return (0, number, "")
    return (1, 0.0, str(value)) if value is not None else (2, 0.0, "")


def _config_key(run: dict[str, Any]) -> tuple[Any, ...]:
    return (*(_sort_key(_get(run, "config", f)) for f in CONFIG_FIELDS), str(run.get("timestamp") or ""))


def _ok(run: dict[str, Any]) -> bool:
    return run.get("status") == "ok" and isinstance(run.get("results"), dict)


def _usable(run: dict[str, Any]) -> bool:
    """An ok or partial run with results: its figures are of the requests that worked."""
    return run.get("status") in ("ok", "partial") and isinstance(run.get("results"), dict)


def _failures(run: dict[str, Any]) -> str:
    """``2 of 10 (short 1, truncated 1)`` for a run with failed requests, else ``0 of N``."""
    total, failed = _get(run, "results", "requests"), _get(run, "results", "failed_requests")
    if not isinstance(total, int):
        return "—"
    kinds = _get(run, "results", "failures")
    detail = ", ".join(f"{_e(k)} {_e(v)}" for k, v in sorted(kinds.items())) if isinstance(kinds, dict) else ""
    return f"{_e(failed)} of {_e(total)}" + (f" ({detail})" if detail else "")


def _e(value: Any) -> str:
    return html.escape("—" if value is None else str(value))


def _f(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def _bad(status: Any, error: Any) -> str:
    return f'<span class="bad">FAILED</span> ({_e(status)})<div class="err">{_e(error)}</div>'


def _table(heads: Sequence[str], rows: Iterable[tuple[str, Sequence[str]]]) -> str:
    """Rows are (tr class, pre-escaped cells); numeric-looking cells are right-aligned."""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>"]
    for cls, cells in rows:
        tds = "".join(f'<td class="n">{c}</td>' if re.fullmatch(r"-?[\d.]+×?", c) else f"<td>{c}</td>"
                      for c in cells)
        out.append(f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>")
    return "\n".join(out) + "</table>"


def _label_safe(text: str) -> str:
    return text.replace("$", r"\$")


def _labels(runs: Sequence[dict[str, Any]]) -> tuple[list[str], str]:
    """Short per-run labels from the config fields that differ between ``runs``, and a
    description of the fields they share."""
    varying = [f for f in CONFIG_FIELDS if len({json.dumps(_get(r, "config", f), default=str) for r in runs}) > 1]
    common = [f"{f}={_get(runs[0], 'config', f)}" for f in CONFIG_FIELDS if f not in varying] if runs else []
    labels: list[str] = []
    for run in runs:
        base = " ".join(f"{CONFIG[f][1]}{_get(run, 'config', f)}" for f in varying) or str(_get(run, "config", "model"))
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base} #{n}"
        labels.append(label)
    return [_label_safe(x) for x in labels], ", ".join(common)


def _svg(fig: Figure, prefix: str) -> str:
    """The figure as inline SVG: no XML prolog, no namespace URLs, ids prefixed per figure."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=SVG_METADATA, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    return re.sub(r'(\bid="|url\(#|href="#)', rf"\g<1>{prefix}-", text)


def _figure(svg: str | None, caption: str, nodata: str) -> str:
    body = svg if svg is not None else f'<p class="nodata">No data for this plot: {html.escape(nodata)}</p>'
    return f"<figure>{body}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _bars(runs: Sequence[dict[str, Any]], metric: str, scale: float, xlabel: str, prefix: str) -> str | None:
    rows = [(r, *_stat(r, metric)) for r in runs if _stat(r, metric)[0] is not None]
    if not rows:
        return None
    labels, _ = _labels([r for r, *_ in rows])
    mids = [p * scale for _, p, _, _ in rows]  # type: ignore[operator]
    err = [[max(0.0, m - (lo * scale if lo is not None else m)) for m, (_, _, lo, _) in zip(mids, rows)],
           [max(0.0, (hi * scale if hi is not None else m) - m) for m, (_, _, _, hi) in zip(mids, rows)]]
    fig = Figure(figsize=(8, 1.0 + 0.28 * len(rows)))
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), mids, xerr=err, color="#4c72b0", capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    return _svg(fig, prefix)


def _stages_plot(runs: Sequence[dict[str, Any]], prefix: str) -> str | None:
    rows = [r for r in runs if isinstance(_get(r, "results", "stages"), list) and _get(r, "results", "stages")]
    if not rows:
        return None
    labels, _ = _labels(rows)
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"]
    bars: list[list[tuple[float, str, str, str]]] = []
    for run in rows:
        segments = []
        for i, stage in enumerate(_get(run, "results", "stages")):
            ms = _num(_get(stage, "decode_compute_s_per_token"))
            if ms is not None:
                layers = _get(stage, "layers")
                span = f" L{layers[0]}-{layers[1]}" if isinstance(layers, list) and len(layers) == 2 else ""
                segments.append((ms * 1000, colors[i % len(colors)], f"stage {i + 1}",
                                 _label_safe(f"{str(_get(stage, 'member') or '?')[:8]}{span}")))
        transfer = _num(_get(run, "results", "transfer_s_per_token"))
        if transfer is not None:
            segments.append((transfer * 1000, "#aaaaaa", "transfer", "transfer"))
        bars.append(segments)
    width_max = max((sum(s[0] for s in segs) for segs in bars), default=0.0) or 1.0
    fig = Figure(figsize=(8, 1.2 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    for y, segments in enumerate(bars):
        left = 0.0
        for width, color, legend, text in segments:
            ax.barh(y, width, left=left, color=color, edgecolor="white", label=legend)
            if width > 0.08 * width_max:  # a label only where it fits
                ax.text(left + width / 2, y, text, ha="center", va="center", fontsize=6)
            left += width
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, width_max * 1.05)
    ax.set_xlabel("decode ms per token (compute per stage + transfer)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(sorted(zip(names, handles), key=lambda nh: (nh[0] == "transfer", len(nh[0]), nh[0])))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _svg(fig, prefix)


def _scaling_plot(runs: Sequence[dict[str, Any]], prefix: str) -> tuple[str | None, list[str]]:
    groups: dict[tuple[Any, ...], dict[int, list[tuple[float | None, float | None]]]] = {}
    for run in runs:
        nodes = _get(run, "config", "nodes")
        if not isinstance(nodes, int) or isinstance(nodes, bool):
            continue
        key = tuple(v if isinstance(v, str | int | float | None) else json.dumps(v) for v in
                    (_get(run, "config", f) for f in ("model", "backend", "transport", "prompt_tokens", "concurrency")))
        groups.setdefault(key, {}).setdefault(nodes, []).append(
            (_stat(run, "decode_tok_s")[0], _stat(run, "ttft_s")[0]))
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if not groups:
        return None, []
    models = {k[0] for k in groups}
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    names = []
    for key, by_nodes in sorted(groups.items(), key=lambda kv: [_sort_key(x) for x in kv[0]]):
        model, backend, transport, prompt, conc = key
        name = f"{backend}/{transport} p={prompt} c={conc}" + (f" {model}" if len(models) > 1 else "")
        names.append(name)
        xs = sorted(by_nodes)
        for ax, idx, scale in ((axes[0], 0, 1.0), (axes[1], 1, 1000.0)):
            pts = [(x, statistics.median(v for v in (p[idx] for p in by_nodes[x]) if v is not None) * scale)
                   for x in xs if any(p[idx] is not None for p in by_nodes[x])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label_safe(name))
    axes[0].set_ylabel("decode tokens/s (p50)")
    axes[1].set_ylabel("TTFT ms (p50)")
    for ax in axes:
        ax.set_xlabel("nodes")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    return _svg(fig, prefix), names


def _predicted_plot(runs: Sequence[dict[str, Any]], prefix: str) -> tuple[str | None, int, int]:
    """The scatter of predicted against measured; a prediction made for another prompt length
    than the run's (the node predicts for its recent requests) is left out and counted."""
    pairs: list[list[tuple[float, float]]] = [[], []]
    used = skipped = 0
    for run in runs:
        pred = _get(run, "results", "predicted")
        if not isinstance(pred, dict):
            continue
        measured_prompt = _get(run, "results", "prompt_tokens") or _get(run, "config", "prompt_tokens")
        if pred.get("prompt_tokens") is not None and pred.get("prompt_tokens") != measured_prompt:
            skipped += 1
            continue
        used += 1
        for i, (metric, scale) in enumerate((("ttft_s", 1000.0), ("decode_tok_s", 1.0))):
            p, m = _num(pred.get(metric)), _stat(run, metric)[0]
            if p is not None and m is not None:
                pairs[i].append((p * scale, m * scale))
    if not any(pairs):
        return None, 0, skipped
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    for ax, pts, what in zip(axes, pairs, ("TTFT ms", "decode tokens/s")):
        ax.set_xlabel(f"predicted {what}")
        ax.set_ylabel(f"measured {what} (p50)")
        if not pts:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.scatter([p for p, _ in pts], [m for _, m in pts], s=18, color="#c44e52", zorder=3)
        top = max(max(p, m) for p, m in pts) * 1.1 or 1.0
        ax.plot([0, top], [0, top], "--", color="#666", linewidth=0.8, label="y = x")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend(fontsize=7)
    return _svg(fig, prefix), used, skipped


_when = record_time


def _header(records: Sequence[dict[str, Any]], sources: Sequence[str], counts: Mapping[str, int] | None,
            skipped: Mapping[str, Sequence[int]] | None) -> str:
    out = ["<h2>Sources</h2><ul>"]
    for name in sources:
        n_skip = len((skipped or {}).get(name, []))
        lines = ", ".join(str(x) for x in list((skipped or {}).get(name, []))[:10])
        more = f" (line {lines}{', …' if n_skip > 10 else ''})" if n_skip else ""
        count = f"{counts[name]} records, " if counts and name in counts else ""
        out.append(f"<li>{_e(name)}: {count}{n_skip} skipped lines{more}</li>")
    out.append(f"</ul><p>{len(records)} records in all.</p>")
    machines = sorted({(_e(_get(r, "machine", "cpu")), _e(_get(r, "machine", "cores")),
                        _f(_num(_get(r, "machine", "memory_bytes")), 1 / 2**30),
                        _e(_get(r, "machine", "platform"))) for r in records if isinstance(r.get("machine"), dict)})
    if machines:
        out.append("<h3>Machines</h3>" + _table(("cpu", "cores", "memory GiB", "platform"),
                                               (("", m) for m in machines)))
    commits = sorted({str(r["commit"]) for r in records if r.get("commit")})
    stamps = sorted((_when(r), str(r["timestamp"])) for r in records if r.get("timestamp"))
    if commits or stamps:
        span = f"{_e(stamps[0][1])} … {_e(stamps[-1][1])}" if stamps else "—"
        out.append(f"<p>Commits: {_e(', '.join(commits) or '—')}. Timestamps: {span}.</p>")
    return "\n".join(out)


def _runs_table(runs: Sequence[dict[str, Any]]) -> str:
    if not runs:
        return "<p><b>There are no runs in the input.</b></p>"
    fields, heads = _present(runs)
    rows = []
    for run in runs:
        if _ok(run):
            status = _e(run.get("status"))
        elif run.get("status") == "ok":
            status = 'ok, <span class="bad">no results</span>'
        elif run.get("status") == "partial":
            status = f'<span class="bad">PARTIAL</span><div class="err">{_e(run.get("error"))}</div>'
        else:
            status = _bad(run.get("status"), run.get("error"))
        dirty = ' <span class="bad">(dirty tree)</span>' if _get(run, "machine", "dirty") else ""
        rows.append(("" if _ok(run) else "failed", [*(_e(_get(run, "config", f)) for f in fields),
                     _spread(run, "ttft_s", 1000, 0), _spread(run, "decode_tok_s"),
                     _spread(run, "throughput"), _failures(run), status, _e(run.get("commit")) + dirty]))
    failed = sum(1 for r in runs if r.get("status") not in ("ok", "partial"))
    partial = sum(1 for r in runs if r.get("status") == "partial")
    return f"<p>{len(runs)} runs, {partial} partial, {failed} failed.</p>" + _table(
        (*heads, "TTFT ms median (min-max), n", "decode tok/s per request", "throughput tok/s per batch",
         "failed requests", "status", "commit"), rows)


def _present(runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The config fields (and their column heads) that some run has: older records lack the
    newer axes, and a column nobody fills says nothing."""
    fields = [f for f in CONFIG_FIELDS if any(isinstance(r.get("config"), dict) and f in r["config"] for r in runs)]
    return fields, [CONFIG[f][0] for f in fields]


def _baselines_section(runs: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]]) -> str:
    out = []
    if baselines:
        rows = []
        for b in sorted(baselines, key=lambda b: (str(b.get("name")), _when(b))):
            ok = b.get("status") == "ok"
            thr = _num(_get(b, "results", "throughput_bytes_per_s"))
            rtt = _get(b, "results", "round_trip") or _get(b, "results", "round_trip_s")
            rows.append(("" if ok else "failed", [
                _e(b.get("name")), _e(_get(b, "config", "model")), _e(_get(b, "config", "prompt_tokens")),
                _e(_get(b, "config", "new_tokens")), _spread(b, "ttft_s", 1000, 0), _spread(b, "decode_tok_s"),
                _e(from_block(rtt).fmt(1000, 3, with_n=True)) if from_block(rtt) else "—",
                _e(_get(b, "results", "bytes")), _f(thr, 1e-6), _e(b.get("commit")), _e(b.get("timestamp")),
                _e(b.get("status")) if ok else _bad(b.get("status"), b.get("error"))]))
        out.append(_table(("name", "model", "prompt", "new tokens", "TTFT ms", "decode tok/s", "round trip ms p50",
                           "bytes", "MB/s", "commit", "timestamp", "status"), rows))
    else:
        out.append("<p>No baselines in the input.</p>")
    ok_runs = [r for r in runs if _usable(r)]
    if ok_runs:
        fields, heads = _present(ok_runs)
        rows = []
        for run in ok_runs:
            mine, base = _sample(run, "decode_tok_s"), pick_baseline(run, baselines)
            theirs = _sample(base, "decode_tok_s") if base else None
            if base:
                used = f"{_e(base.get('name'))} (commit {_e(base.get('commit'))}, {_e(base.get('timestamp'))})"
            elif _get(run, "config", "target") == "url":
                used = "none: a remote cluster (a baseline would measure the client's machine)"
            else:
                used = (f"none: no ok baseline for {_e(_get(run, 'config', 'model'))} at "
                        f"{_e(_get(run, 'config', 'prompt_tokens'))} prompt tokens")
            versus = compare(mine, theirs)
            rows.append(("" if _ok(run) else "failed", [
                *(_e(_get(run, "config", f)) for f in fields), _e(mine.fmt(with_n=True)) if mine else "—", used,
                _e(theirs.fmt(with_n=True)) if theirs else "—", _e(versus.fmt()) if versus else "—"]))
        out.append("<h3>Runs vs baselines (decode tokens/s)</h3><p>Ratio of medians; \"within noise\" when the "
                   "medians differ by no more than the larger min-max spread of the two.</p>" + _table(
            (*heads, "decode tok/s median (min-max), n", "baseline used", "baseline tok/s", "ratio"), rows))
    return "\n".join(out)


def render_report(records: list[dict[str, Any]], sources: list[str], *, title: str = DEFAULT_TITLE,
                  counts: Mapping[str, int] | None = None, skipped: Mapping[str, Sequence[int]] | None = None,
                  now: datetime | None = None) -> str:
    """The report as one HTML document. ``counts``/``skipped``: records and skipped line
    numbers per source name, when known."""
    runs, baselines, other = _split(records)
    runs.sort(key=_config_key)
    ok_runs = [r for r in runs if _ok(r)]
    _, common = _labels(ok_runs)
    scope = f"{len(ok_runs)} ok runs of {len(runs)}" + (f"; shared config: {common}" if common else "")
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1><p>Generated {_e(stamp)}.</p>",
             _header(records, sources, counts, skipped), "<h2>Every run</h2>", _runs_table(runs),
             "<h2>Baselines</h2>", _baselines_section(runs, baselines), "<h2>Plots</h2>"]
    with matplotlib.rc_context(MPL_RC):  # type: ignore[arg-type]
        decode, ttft = _bars(ok_runs, "decode_tok_s", 1.0, "decode tokens/s per request (p50; bars: min–max)",
                             "pa"), _bars(ok_runs, "ttft_s", 1000.0, "TTFT ms (p50; bars: min–max)", "pb")
        stages, (scaling, groups), (predicted, n_pred, n_other) = (
            _stages_plot(ok_runs, "pc"), _scaling_plot(ok_runs, "pd"), _predicted_plot(ok_runs, "pe"))
    n_stages = sum(1 for r in ok_runs if _get(r, "results", "stages"))
    parts += [
        _figure(decode, f"Decode tokens/s per configuration, p50 with min–max over the timed requests ({scope}).",
                "no ok run has decode tokens/s."),
        _figure(ttft, f"Time to first token per configuration, p50 with min–max ({scope}).", "no ok run has a TTFT."),
        _figure(stages, f"Decode compute per stage (segment: member id and layers) plus transfer (step time not spent "
                f"computing), ms per token; {n_stages} ok runs with stage timings; stages without a timing are left "
                f"out.", "no ok run has stage timings."),
        _figure(scaling, "Decode tokens/s and TTFT (p50, median over repeated runs) against the number of nodes, one "
                f"line per (backend, transport, prompt tokens, concurrency) with at least two node counts: "
                f"{'; '.join(groups) or 'none'}.", "no group has runs at two node counts."),
        _figure(predicted, f"Predicted (cost model) against measured TTFT and decode tokens/s, with the y = x line; "
                f"{n_pred} ok runs with a prediction for their own prompt length; {n_other} left out whose prediction "
                f"was made for another prompt length.", "no ok run has a prediction for its prompt length.")]
    with matplotlib.rc_context(MPL_RC):  # type: ignore[arg-type]
        parts.append(gym_section(other, _svg, _figure))
    other = [r for r in other if not is_gym(r)]
    suites, other = _other_suites(other)
    if suites:
        parts += ["<h2>Other benchmarks</h2>", suites]
    parts.append("<h2>Other records</h2>")
    if other:
        parts.append(f"<p>{len(other)} record(s) that are neither runs nor baselines.</p>")
        for i, rec in enumerate(other, 1):
            keys = ", ".join(str(k) for k in list(rec)[:8])
            parts.append(f"<details><summary>record {i}: {_e(keys)}</summary>"
                         f"<pre>{_e(json.dumps(rec, indent=2, sort_keys=True, default=str))}</pre></details>")
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
