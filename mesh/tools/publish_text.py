"""The text the README's published blocks are made of (``mesh.tools.publish``): which records
a block shows, their captions, cells and tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.tools.benchstats import Sample


@dataclass(frozen=True, slots=True)
class Selection:
    """The records a block publishes: all of one commit, measured on a clean tree."""

    commit: str
    records: list[dict[str, Any]]
    skipped_dirty: int  # records of newer or other commits measured on a dirty tree


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in order. Raises ``OSError`` when unreadable and
    ``ValueError`` naming the line for a line that is not a JSON object."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(value)
    return records


def _machine(record: dict[str, Any]) -> dict[str, Any]:
    machine = record.get("machine")
    return machine if isinstance(machine, dict) else {}


def select(records: Sequence[dict[str, Any]]) -> Selection | None:
    """The records of the newest commit (by the order records were appended) that was
    measured on a clean tree; None when there is none."""
    clean = [r for r in records if _machine(r).get("commit") and _machine(r).get("dirty") is False]
    if not clean:
        return None
    commit = str(_machine(clean[-1])["commit"])
    chosen = [r for r in clean if _machine(r).get("commit") == commit]
    return Selection(commit=commit, records=chosen, skipped_dirty=sum(1 for r in records if _machine(r).get("dirty")))


def _get(record: Any, *keys: str | int) -> Any:
    for key in keys:
        if isinstance(record, dict) and isinstance(key, str):
            record = record.get(key)
        elif isinstance(record, list) and isinstance(key, int) and -len(record) <= key < len(record):
            record = record[key]
        else:
            return None
    return record


def caption(sel: Selection, path: str, what: str) -> str:
    """One line naming the data, the commit, the dates and the machine of a block."""
    machine = _machine(sel.records[0])
    if machine.get("role") == "client":  # --url: the figures are the cluster's, not this machine's
        members = _get(sel.records[0], "config", "members") or []
        return (f"*{what} on a remote cluster ({len(members)} members: "
                f"{', '.join(str(m.get('backend')) for m in members if isinstance(m, dict))}): data `{path}` "
                f"({len(sel.records)} records), commit `{sel.commit}`; client {machine.get('cpu', '?')}.*")
    dates = sorted({str(_machine(r).get("date") or r.get("timestamp") or "")[:10] for r in sel.records} - {""})
    memory = machine.get("memory_bytes")
    parts = [f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"]
    if isinstance(memory, int | float):
        parts.append(f"{memory / 2**30:.1f} GiB")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return (f"*{what}: data `{path}` ({len(sel.records)} records), commit `{sel.commit}`, "
            f"{', '.join(dates) or 'date unknown'}; {', '.join(parts)}.*")


def _cell(s: Sample | None, scale: float = 1.0, digits: int = 1) -> str:
    return s.fmt(scale, digits) if s is not None else "-"


def _n_cell(*samples: Sample | None) -> str:
    ns = sorted({s.n for s in samples if s is not None})
    return "/".join(str(n) for n in ns) or "0"


def _table(heads: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    lines = ["| " + " | ".join(heads) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _status(record: dict[str, Any]) -> str:
    status = record.get("status", "?")
    res = record.get("results") or {}
    if status == "ok":
        return "ok"
    if status == "partial":
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((res.get("failures") or {}).items()))
        return f"partial: {res.get('failed_requests')} of {res.get('requests')} failed ({kinds})"
    return f"FAILED: {' '.join(str(record.get('error') or '').split())[:120]}"


# -- python -m mesh bench ----------------------------------------------------------------------


def _format_label(config: dict[str, Any]) -> str:
    """The node flags a bench run set for its weights (``--dtype``, ``--quantize``), or
    ``defaults``; without ``--dtype``, the dtype the node chose (spec N19)."""
    flags = [f"--{k} {config[k]}" for k in ("dtype", "quantize") if config.get(k)]
    chosen = f" (computes in {config['node_dtype']})" if config.get("node_dtype") and not config.get("dtype") else ""
    return (" ".join(flags) or "defaults") + chosen
