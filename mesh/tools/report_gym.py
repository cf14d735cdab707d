"""The training gym's section of ``python -m mesh report`` (specs/gym.md G10): for each topology,
eval loss against simulated time and against bytes on the wire, one line per algorithm (and
options), from ``mesh-gym`` records.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.figure import Figure

SUITE = "mesh-gym"


def is_gym(record: dict[str, Any]) -> bool:
    return record.get("suite") == SUITE and record.get("kind") == "gym"


def _label(record: dict[str, Any]) -> str:
    config = record.get("config") or {}
    options = config.get("options") or {}
    shown = {k: v for k, v in options.items() if k in ("h", "p", "topk", "chunk", "lr", "outer_lr")}
    return f"{config.get('algorithm', '?')} " + " ".join(f"{k}={v}" for k, v in shown.items())


def gym_section(records: Sequence[dict[str, Any]], svg: Callable[[Figure, str], str],
                figure: Callable[[str | None, str, str], str]) -> str:
    """HTML for the gym records (``svg``/``figure``: the report's own figure helpers)."""
    runs = [r for r in records if is_gym(r) and r.get("status") == "ok" and (r.get("results") or {}).get("curve")]
    if not runs:
        return ""
    topologies = sorted({str((r.get("config") or {}).get("topology")) for r in runs})
    parts = ["<h2>Training gym</h2>",
             "<table><tr><th>topology</th><th>algorithm</th><th>final eval loss</th><th>wire MB</th>"
             "<th>simulated s</th><th>steps</th><th>commit</th></tr>"]
    for r in runs:
        res, config = r["results"], r.get("config") or {}
        parts.append(f"<tr><td>{html.escape(str(config.get('topology')))}</td><td>{html.escape(_label(r))}</td>"
                     f"<td>{res.get('final_eval_loss', float('nan')):.3f}</td>"
                     f"<td>{res.get('wire_bytes', 0) / 1e6:.1f}</td><td>{res.get('sim_time_s', 0):.2f}</td>"
                     f"<td>{res.get('steps')}</td><td>{html.escape(str((r.get('machine') or {}).get('commit')))}</td>"
                     "</tr>")
    parts.append("</table>")
    for n, topo in enumerate(topologies):
        mine = [r for r in runs if str((r.get("config") or {}).get("topology")) == topo]
        for m, (key, xlabel, scale) in enumerate((("sim_time_s", "simulated seconds", 1.0),
                                                  ("wire_bytes", "MB on the wire (all nodes)", 1e-6))):
            fig = Figure(figsize=(6.4, 3.6))
            ax = fig.subplots()
            for r in mine:
                curve = r["results"]["curve"]
                ax.plot([p[key] * scale for p in curve], [p["eval_loss"] for p in curve], marker=".",
                        label=_label(r))
            if key == "wire_bytes":
                ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval loss (nats/token)")
            ax.legend(fontsize="small")
            parts.append(figure(svg(fig, f"gym{n}{m}"), f"Eval loss against {xlabel} on {topo}.", "no curve"))
    return "\n".join(parts)
