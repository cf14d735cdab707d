"""The README's tensor-parallel block (``python -m mesh bench-tp``), rendered for
``mesh.tools.publish``."""

from __future__ import annotations

from mesh.tools.benchstats import compare, from_block
from mesh.tools.publish_text import Selection, _cell, _get, _status, _table, caption


def render_tensor_parallel(sel: Selection, path: str) -> str:
    """Per library (torch, MLX) and group size: the measured decode step (median over repeats)
    and tokens/s against one device of that library in the same run, the cost model's predicted step and the error (on the loopback
    link as measured, and with the all-reduce the group measured), the group's own
    all-reduce of one token's hidden state (back to back, and inside the decode steps) against
    the cost model's ring formula on the measured loopback link, and what the all-reduces cost
    per token inside the steps (2 per layer)."""
    def library(run: dict) -> str:
        return str(_get(run, "config", "backend") or "torch")  # records before MLX groups are torch's

    runs = sorted((r for r in sel.records if r.get("kind") == "tp"),
                  key=lambda r: (library(r) != "torch", library(r), _get(r, "config", "size") or 0))
    ones = {library(r): from_block(_get(r, "results", "step_s")) for r in runs if _get(r, "config", "size") == 1}
    rows = []
    for run in runs:
        c, res = run.get("config") or {}, run.get("results") or {}
        one = ones.get(library(run))
        step, reduce = from_block(res.get("step_s")), from_block(res.get("allreduce_s"))
        inside = from_block(res.get("allreduce_in_steps_s"))
        layers = _get(c, "dimensions", "num_hidden_layers") or 0
        versus = compare(one, step) if c.get("size") != 1 else None
        predicted, error = res.get("predicted_step_s"), res.get("error")
        calibrated, error_cal = res.get("predicted_calibrated_step_s"), res.get("error_calibrated")
        per_token = f"{2 * layers * inside.median * 1e3:.1f}" if inside is not None and layers else "-"
        rows.append([library(run), str(c.get("size")), f"{c.get('threads')}{' (oversubscribed)' if c.get('oversubscribed') else ''}",
                     _cell(step, 1000, 1), f"{1 / step.median:.1f}" if step is not None else "-",
                     versus.fmt() if versus is not None else "1.00x",
                     f"{predicted * 1e3:.1f}" if isinstance(predicted, int | float) else "-",
                     f"{error * 100:+.0f} %" if isinstance(error, int | float) else "-",
                     f"{calibrated * 1e3:.1f} ({error_cal * 100:+.0f} %)" if isinstance(calibrated, int | float)
                     and isinstance(error_cal, int | float) else "-",
                     _cell(reduce, 1e6, 0), _cell(inside, 1e6, 0), f"{res['predicted_allreduce_s'] * 1e6:.0f}"
                     if isinstance(res.get("predicted_allreduce_s"), int | float) and c.get("size") != 1 else "-",
                     per_token, _status(run)])
    model = _get(runs[0], "config", "model") if runs else "?"
    dtype = _get(runs[0], "config", "dtype") if runs else "?"
    return (caption(sel, path, f"Measured, {model} in {dtype}") + "\n\n" +
            _table(("library", "group size", "threads per member", "decode step ms", "tok/s", "vs one device", "predicted ms",
                    "error", "predicted with the measured all-reduce ms (error)", "all-reduce alone us",
                    "all-reduce in steps us", "predicted all-reduce us", "all-reduces per token ms", "result"),
                   rows, "lrlrrrrrrrrrrl") + "\n")
