"""The README's structured-output block (``python -m mesh bench-grammar``), rendered for
``mesh.tools.publish``: the grammar engines' per-token cost on one schema, and a live node's
constrained requests (how many validate, and TPOT against the same requests unconstrained)."""

from __future__ import annotations

from mesh.tools.publish_text import Selection, _get, _status, _table, caption


def render_grammar(sel: Selection, path: str) -> str:
    rows = []
    for run in (r for r in sel.records if r.get("kind") == "grammar-library"):
        for engine, got in sorted((run.get("results") or {}).items()):
            if not got:
                continue
            mask = got["mask_s"]
            rows.append([f"{engine} {got.get('version') or ''}".strip(), "engine alone",
                         f"{got['compile_s']['p50'] * 1e3:.1f}", f"{mask['p50'] * 1e6:.0f}", f"{mask['max'] * 1e6:.0f}",
                         "-", "-", "-", _status(run)])
    for run in (r for r in sel.records if r.get("kind") == "grammar-node"):
        res = run.get("results") or {}
        tpot = res.get("tpot_s") or {}
        finishes = ", ".join(f"{k} {v}" for k, v in sorted((res.get("finish_reasons") or {}).items()))
        cost = res.get("cost")
        rows.append(["llguidance in a node", f"{res.get('requests')} requests ({finishes})", "-", "-", "-",
                     f"{res.get('valid')}/{res.get('requests')}",
                     f"{tpot['constrained']['p50'] * 1e3:.1f} vs {tpot['free']['p50'] * 1e3:.1f}"
                     if tpot.get("constrained") and tpot.get("free") else "-",
                     f"{cost * 100:+.1f} %" if isinstance(cost, int | float) else "-", _status(run)])
    model = _get(sel.records[0], "config", "model") if sel.records else "?"
    return (caption(sel, path, f"Measured, {model}'s tokenizer, one JSON schema") + "\n\n" +
            _table(("engine", "what", "compile ms", "mask + consume us/token (p50)", "max us", "valid",
                    "TPOT ms constrained vs free (p50)", "cost per token", "result"), rows, "llrrrrrrl") + "\n")
