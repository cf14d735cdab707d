"""``python -m mesh bench-placement --measured``: the cost model against real clusters.

For 1, 2 and 3 nodes on 127.0.0.1 (memory-proportional split: 1, 2 and 3 pipeline stages) and
two prompt lengths, a fresh cluster is started; once every stage has published its calibration
(``mesh/placement/calibrate.py``) and re-timed itself, a warm-up and ``repeats`` greedy streaming requests
run through node 0. Reported per configuration: the prediction ``/v1/cluster`` shows for the
plan (``performance.predicted``), the medians node 0 measured as coordinator
(``performance.measured``), the medians the HTTP client saw, and predicted / measured ratios
(target: within 25 %, i.e. a ratio in [0.75, 1.25]). One profile, measured once before any node
starts, is shared by every node: nodes of one host measuring at once would see each other.
This is a program, not a test: figures are of this machine at this time.
"""

from __future__ import annotations

import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mesh.node.perf import RECALIBRATE_AFTER_S, RECALIBRATIONS
from mesh.tools.benchstats import stats_block
from mesh.tools.benchutil import FILLER, machine_profile, stream_request

SIZES = (1, 2, 3)
PROMPTS = {"short": 1, "long": 12}  # copies of FILLER: about 30 and 330 prompt tokens
TARGET = 0.25


def _performance(url: str) -> dict[str, Any] | None:
    from mesh.testing.cluster import http_json

    status, info = http_json(url + "/v1/cluster", timeout_s=10)
    return info.get("performance") if status == 200 and isinstance(info, dict) else None


def measure_configuration(n: int, copies: int, *, model: str, new_tokens: int, repeats: int, workdir: Path,
                          profile: Path) -> dict[str, Any]:
    """One fresh n-node cluster, one prompt length; see the module docstring."""
    from mesh.testing.cluster import LocalCluster

    content = FILLER * copies
    with LocalCluster(n, workdir, model=model, profile=profile) as cluster:
        cluster.wait_ready(members=n)
        url = cluster.nodes[0].api_url
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            perf = _performance(url)
            if perf and perf.get("predicted") and perf["predicted"].get("calibrated"):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{n}-node cluster: no calibrated prediction within 120 s")
        time.sleep(2 * RECALIBRATE_AFTER_S * RECALIBRATIONS + 2)  # every stage re-times itself while idle
        _timed(url, model, content, new_tokens)  # warm-up, also counted by the coordinator
        client = [_timed(url, model, content, new_tokens) for _ in range(repeats)]
        perf = _performance(url) or {}
    predicted, measured = perf.get("predicted") or {}, perf.get("measured") or {}
    row: dict[str, Any] = {
        "nodes": n, "prompt_tokens": client[0][2], "new_tokens": new_tokens,
        "predicted": {k: predicted.get(k) for k in ("ttft_s", "decode_tokens_per_s")},
        "coordinator": {k: measured.get(k) for k in ("ttft_s", "decode_tokens_per_s")},
        "client": {"ttft_s": statistics.median(c[0] for c in client),
                   "decode_tokens_per_s": statistics.median(c[1] for c in client),
                   "ttft": stats_block([c[0] for c in client]), "decode": stats_block([c[1] for c in client])},
    }
    row["ratio"] = {k: _ratio(row["predicted"][k], row["coordinator"][k]) for k in ("ttft_s", "decode_tokens_per_s")}
    return row


def _ratio(predicted: float | None, measured: float | None) -> float | None:
    return predicted / measured if predicted and measured else None


def _within(ratio: float | None) -> bool:
    return ratio is not None and abs(ratio - 1) <= TARGET


def run_measured_bench(*, model: str, new_tokens: int, repeats: int, json_path: Path | None) -> int:
    from mesh.placement.profile import load_or_measure_profile

    machine = machine_profile()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
          f"commit {machine['commit']}; {machine['date']}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-measured-") as tmp:
        root = Path(tmp)
        load_or_measure_profile(root / "profile", budget_s=1.0)
        for n in SIZES:
            for name, copies in PROMPTS.items():
                try:
                    row = measure_configuration(n, copies, model=model, new_tokens=new_tokens, repeats=repeats,
                                                workdir=root / f"{n}-{name}",
                                                profile=root / "profile" / "profile.json")
                except Exception as exc:  # noqa: BLE001 - a configuration that fails is a row of its own
                    row = {"nodes": n, "prompt": name, "error": f"{type(exc).__name__}: {exc}"}
                    print(f"{n} node(s), {name} prompt: FAILED: {row['error']}")
                else:
                    _print_row(row)
                rows.append(row)
    met = all("error" not in r and _within(r["ratio"][k]) for r in rows for k in ("ttft_s", "decode_tokens_per_s"))
    print(f"predicted within {TARGET:.0%} of measured on every configuration: {'yes' if met else 'NO'}")
    if json_path:
        result = {"suite": "mesh-bench-placement-measured", "schema": 2, "bench": "placement-measured",
                  "machine": machine, "model": model, "rows": rows, "target_met": met,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        with open(json_path, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


def _print_row(row: dict[str, Any]) -> None:
    p, c, h, r = row["predicted"], row["coordinator"], row["client"], row["ratio"]

    def fmt(x: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
        return "-" if x is None else format(x * scale, spec)

    print(f"{row['nodes']} node(s), prompt {row['prompt_tokens']:>4} tokens: "
          f"TTFT predicted {fmt(p['ttft_s'], 1e3)} ms, measured {fmt(c['ttft_s'], 1e3)} ms "
          f"(client {fmt(h['ttft_s'], 1e3)}), ratio {fmt(r['ttft_s'], spec='.2f')}; "
          f"decode predicted {fmt(p['decode_tokens_per_s'])} tok/s, measured {fmt(c['decode_tokens_per_s'])} "
          f"(client {fmt(h['decode_tokens_per_s'])}), ratio {fmt(r['decode_tokens_per_s'], spec='.2f')}")


def _timed(url: str, model: str, content: str, new_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, decode tokens/s, prompt tokens) of one request; RuntimeError when it fails."""
    out = stream_request(url, model, content, new_tokens)
    if not out["ok"] or out["decode_tok_s"] is None:
        raise RuntimeError(f"a request failed: {out['error']}")
    return out["ttft_s"], out["decode_tok_s"], out["prompt_tokens"]
