"""The README's training-gym block (``python -m mesh gym --json``), rendered for
``mesh.tools.publish``: per topology and algorithm, the final eval loss, bytes on the wire and
simulated time, each against DDP on the same topology in the same commit's runs."""

from __future__ import annotations

from mesh.tools.publish_text import Selection, _get, _status, _table, caption


def _label(run: dict) -> str:
    options = _get(run, "config", "options") or {}
    shown = [f"{k}={options[k]}" for k in ("h", "momentum", "p", "chunk", "topk") if k in options]
    return f"{_get(run, 'config', 'algorithm')}" + (f" ({', '.join(shown)})" if shown else "")


def render_gym(sel: Selection, path: str) -> str:
    runs = sorted((r for r in sel.records if r.get("kind") == "gym"),
                  key=lambda r: (str(_get(r, "config", "topology")), _get(r, "config", "algorithm") != "ddp",
                                 _label(r)))
    def same(r: dict) -> tuple:  # what a DDP baseline must share with the run it is compared with
        return tuple(str(_get(r, "config", k)) for k in ("topology", "steps", "nodes", "model_size", "batch",
                                                        "seq_len", "seed", "schedule"))

    ddp = {same(r): r["results"] for r in runs if _get(r, "config", "algorithm") == "ddp" and r.get("status") == "ok"}
    rows = []
    for run in runs:
        res, topo = run.get("results") or {}, str(_get(run, "config", "topology"))
        base = ddp.get(same(run))
        loss, wire, sim = res.get("final_eval_loss"), res.get("wire_bytes"), res.get("sim_time_s")
        ok = run.get("status") == "ok" and all(isinstance(x, int | float) for x in (loss, wire, sim))
        vs_loss = f"{(loss / base['final_eval_loss'] - 1) * 100:+.1f} %" if ok and base else "-"
        fewer = ("-" if not (ok and base and wire) else "same" if base["wire_bytes"] == wire
                 else f"{base['wire_bytes'] / wire:.0f}x fewer")
        faster = f"{base['sim_time_s'] / sim:.1f}x" if ok and base and sim else "-"
        rows.append([topo, _label(run), f"{loss:.3f}" if ok else "-", vs_loss,
                     f"{wire / 1e9:.2f}" if ok else "-", fewer, f"{sim / 3600:.4f}" if ok else "-",
                     f"{sim:.1f}" if ok else "-", faster, str(res.get("steps", "-")), str(res.get("tokens", "-")),
                     _status(run)])
    first = runs[0] if runs else {}
    what = (f"Measured, {_get(first, 'config', 'nodes')} nodes, model {_get(first, 'config', 'model_size')} "
            f"({_get(first, 'results', 'params')} parameters), {_get(first, 'config', 'corpus')}, seed "
            f"{_get(first, 'config', 'seed')}")
    return (caption(sel, path, what) + "\n\n" +
            _table(("topology", "algorithm", "final eval loss", "vs DDP", "GB on the wire", "bytes vs DDP",
                    "simulated hours", "simulated s", "faster than DDP", "steps", "tokens", "result"),
                   rows, "llrrrrrrrrrl") + "\n")
