"""The README's batching blocks (``python -m mesh bench --concurrency`` and
``python -m mesh bench-batching``), rendered for ``mesh.tools.publish``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh.tools.benchstats import Sample, compare, from_block, sample
from mesh.tools.publish_text import Selection, _cell, _format_label, _get, _n_cell, _status, _table, caption


def render_batching(sel: Selection, path: str) -> str:
    """``python -m mesh bench --concurrency ...``: per node count and concurrency, the aggregate
    throughput against concurrency 1 on as many nodes in the same run, per-request rates, and
    the decode rate in all (concurrency x the median request's decode tokens/s: the streams'
    decode speed together, prefill left out, as transformers' ``generate()`` baseline counts
    it) against concurrency 1."""
    return _batching_table(sel, path, (("nodes", lambda c: str(c.get("nodes")), "r"),))


def render_batching_lengths(sel: Selection, path: str) -> str:
    """``python -m mesh bench --nodes 1 --quantize default,none --new-tokens ... --concurrency
    1,8``: the batching table per weight format and output length, each row against
    concurrency 1 with the same weights and length."""
    return _batching_table(sel, path, (("weights", _format_label, "l"),
                                       ("new tokens", lambda c: str(c.get("new_tokens")), "r"),
                                       ("nodes", lambda c: str(c.get("nodes")), "r")))


def _batching_table(sel: Selection, path: str, lead: tuple[tuple[str, Callable[[dict[str, Any]], str], str], ...]) -> str:
    """The batching rows of ``sel``'s bench runs, grouped by the ``lead`` columns (header, cell of
    a run's config, alignment); each row against the concurrency-1 run of its group."""
    def group(run: dict[str, Any]) -> tuple[str, ...]:
        return tuple(cell(run.get("config") or {}) for _, cell, _ in lead)

    def order(run: dict[str, Any]) -> tuple[Any, ...]:
        return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in group(run)) + (
            _get(run, "config", "concurrency") or 0,)

    runs = [r for r in sel.records if r.get("kind") == "run"]
    single: dict[tuple[str, ...], tuple[Sample | None, Sample | None]] = {}
    for run in runs:
        if _get(run, "config", "concurrency") == 1:
            single[group(run)] = (from_block(_get(run, "results", "throughput")),
                                  from_block(_get(run, "results", "decode_tok_s")))
    rows = []
    for run in sorted(runs, key=order):
        c = run.get("config") or {}
        ttft, rate = from_block(_get(run, "results", "ttft_s")), from_block(_get(run, "results", "decode_tok_s"))
        tpot = from_block(_get(run, "results", "tpot_s"))
        thru = from_block(_get(run, "results", "throughput"))
        together = _times(rate, c.get("concurrency"))
        alone = single.get(group(run), (None, None))
        versus, decode_versus = compare(thru, alone[0]), compare(together, alone[1])
        first = c.get("concurrency") == 1
        rows.append([*group(run), str(c.get("concurrency")), _n_cell(ttft, rate), _cell(ttft, 1000, 0),
                     _cell(rate), _cell(tpot, 1000, 1), _cell(together),
                     decode_versus.fmt() if decode_versus and not first else "1.00x", _cell(thru),
                     versus.fmt() if versus and not first else "1.00x", _status(run)])
    return (caption(sel, path, "Measured") + "\n\n" +
            _table((*(header for header, _, _ in lead), "concurrent", "n", "TTFT ms", "decode tok/s per request",
                    "TPOT ms", "decode tok/s in all", "decode in all vs 1 request", "throughput tok/s",
                    "throughput vs 1 request", "status"), rows, "".join(a for _, _, a in lead) + "rrrrrrrrrl") + "\n")


def _times(s: Sample | None, k: Any) -> Sample | None:
    """``s`` with every statistic multiplied by ``k`` (None unless ``k`` is a positive int)."""
    if s is None or type(k) is not int or k < 1:
        return None
    return Sample(n=s.n, median=s.median * k, low=s.low * k, high=s.high * k, q1=s.q1 * k, q3=s.q3 * k)


def render_batching_scenarios(sel: Selection, path: str) -> str:
    """``python -m mesh bench-batching``: a running stream's gaps while a long prompt arrives, per
    prefill chunk size; the batched ``generate()`` baseline."""
    by_chunk: dict[int, list[dict[str, Any]]] = {}
    for r in sel.records:
        if r.get("kind") == "long-prompt":
            by_chunk.setdefault(int(_get(r, "config", "prefill_chunk") or 0), []).append(r)
    rows = []
    for chunk, recs in sorted(by_chunk.items()):
        ok = [r for r in recs if r.get("status") == "ok"]
        cells = [sample(_get(r, "results", key) for r in ok) for key in
                 ("gap_p50_before_s", "gap_max_s", "gap_ratio", "long_ttft_s")]
        prompt = _get(recs[0], "config", "long_prompt_tokens")
        rows.append([str(chunk) + (" (the whole prompt: unchunked)" if isinstance(prompt, int) and chunk >= prompt
                                   else ""), f"{len(ok)} of {len(recs)}", _cell(cells[0], 1000, 0),
                     _cell(cells[1], 1000, 0), _cell(cells[2], 1, 1), _cell(cells[3], 1, 2),
                     "ok" if len(ok) == len(recs) else _status(next(r for r in recs if r.get("status") != "ok"))])
    turns: dict[int, list[dict[str, Any]]] = {}
    for r in sel.records:
        if r.get("kind") == "multi-turn":
            turns.setdefault(int(_get(r, "config", "prefix_cache_mb") or 0), []).append(r)
    chat_rows = []
    off = sample(_get(r, "results", "last_ttft_s") for r in turns.get(0, []) if r.get("status") == "ok")
    for budget, recs in sorted(turns.items(), reverse=True):
        ok = [r for r in recs if r.get("status") == "ok"]
        last = sample(_get(r, "results", "last_ttft_s") for r in ok)
        first_turn = sample(_get(r, "results", "ttft_s", 0) for r in ok)
        versus = compare(last, off, higher_is_better=False) if budget else None
        chat_rows.append([f"{budget} MiB" if budget else "off", f"{len(ok)} of {len(recs)}",
                          str(_get(ok[0], "results", "prompt_tokens_last")) if ok else "-", _cell(first_turn, 1, 2),
                          _cell(last, 1, 2), versus.fmt() if versus else "-",
                          "ok" if len(ok) == len(recs) else _status(next(r for r in recs if r.get("status") != "ok"))])
    chat = ""
    if chat_rows:
        t = next(iter(turns.values()))[0]
        chat = (f"\n\nA chat of {_get(t, 'config', 'turns')} turns (a system prompt of about 600 tokens, answers of "
                f"{_get(t, 'config', 'answer_tokens')} tokens), each turn sent with the whole conversation, on one "
                "node with the prefix cache on and off (`--prefix-cache-mb`):\n\n" +
                _table(("prefix cache", "chats ok", "last turn's prompt tokens", "first turn TTFT s",
                        "last turn TTFT s", "last turn speedup vs off", "status"), chat_rows, "lrrrrrl"))
    first = next(iter(by_chunk.values()), [{}])[0]
    lines = []
    for r in sel.records:
        if r.get("kind") == "baseline":
            if r.get("status") != "ok":
                lines.append(f"{r.get('name')} FAILED: {r.get('error')}")
                continue
            if r.get("name") == "backend_batch_step":
                one, many = from_block(_get(r, "results", "step_s_batch1")), from_block(_get(r, "results",
                                                                                           "step_s_batch"))
                lines.append(f"the torch backend alone ({_get(r, 'results', 'weights')} weights, bf16), a decode step "
                             f"of {_get(r, 'results', 'batch')} requests: {_cell(many, 1000, 1)} ms against "
                             f"{_cell(one, 1000, 1)} ms for one ({_get(r, 'results', 'ratio'):.2f}x the tokens/s)")
                continue
            one, many = from_block(_get(r, "results", "decode_tok_s_batch1")), from_block(_get(r, "results",
                                                                                                "decode_tok_s_batch"))
            lines.append(f"transformers' generate() in f32, batch {_get(r, 'results', 'batch')}: {_cell(many)} tok/s "
                         f"in all against {_cell(one)} at batch 1 ({_get(r, 'results', 'ratio'):.2f}x)")
    head = (f"A stream of {_get(first, 'config', 'stream_tokens')} tokens runs on one node; after its 10th text piece "
            f"a {_get(first, 'config', 'long_prompt_tokens')}-token prompt arrives.")
    return (caption(sel, path, "Measured") + " " + head + ("\n\nBaseline in the same run: " + "; ".join(lines) + "."
                                                          if lines else "") + "\n\n" +
            _table(("--prefill-chunk", "runs ok", "stream's median gap before ms", "longest gap ms",
                    "longest / median", "long prompt TTFT s", "status"), rows, "lrrrrrl") + chat + "\n")
