"""The runner of ``python -m mesh faults``: runs scenarios of the catalogue
(``mesh/tools/faults/scenarios.py``) after the fault-free reference run, keeps a failed or
slow scenario's node logs, prints the table and writes the JSON record (``--json``, ``--out``).

It imports the harness and the catalogue and neither imports it back. Spec: specs/faults.md
F16 (the command, its table and record), F17 (a crashed scenario is a failed row).
"""

from __future__ import annotations

import datetime
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mesh.tools.faults.harness import Context, ScenarioResult
from mesh.tools.faults.scenarios import QUICK, SCENARIOS

SCHEMA = 2  # of the --out / --json record


def run_suite(names: list[str], *, model: str = "smollm2-135m", workdir: Path | None = None,
              log: Callable[[str], None] = print) -> list[ScenarioResult]:
    """Run the named scenarios of ``SCENARIOS`` in order, after the fault-free reference run;
    ``log`` gets progress lines. Raises ValueError naming the valid scenarios when a name is
    unknown, and RuntimeError when the reference run fails."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; valid: {sorted(SCENARIOS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="mesh-faults-") as tmp:
        ctx = Context(workdir or Path(tmp), model=model)
        log("measuring the reference (fault-free, 1 node) ...")
        ctx.prepare()
        for name in names:
            log(f"scenario {name} ...")
            result = SCENARIOS[name].run(ctx)  # never raises: a crash is a failed row (run_scenario)
            results.append(result)
            log(format_row(result))
            if not result.passed or (result.recovery_s_max or 0.0) > SLOW_RECOVERY_S:
                _keep_logs(ctx.workdir / name, name, log)
    return results


SLOW_RECOVERY_S = 10.0  # a scenario whose recovery took longer keeps its node logs


def _keep_logs(root: Path, name: str, log: Callable[[str], None]) -> None:
    """Copy a failed or slow scenario's node logs to ``$MESH_ARTIFACTS/faults/<name>`` (default
    ``./artifacts``), so what happened can be read after the temporary directory is gone."""
    import os
    import shutil

    target = Path(os.environ.get("MESH_ARTIFACTS", "artifacts")) / "faults" / name
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in root.glob("*.log"):
            shutil.copy2(path, target / path.name)
        log(f"  node logs of {name} kept in {target}")
    except OSError as exc:
        log(f"  cannot keep the node logs of {name}: {exc}")


HEADER = (f"{'scenario':<34} {'sent':>4} {'att':>4} {'ref':>4} {'done':>4} {'aband':>5} {'clean':>5} "
          f"{'lost':>4} {'mism':>4} {'gap':>5} {'rec p50/max':>11} {'ttft-af p50/max':>15} {'target':>10} {'s':>5}  result")


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_target(r: ScenarioResult) -> str:
    """``<=5.0 ok``, ``<=5.0 MISS``, ``<=5.0 ?`` (not measured) or ``-`` (no target)."""
    if r.recovery_target_s is None:
        return "-"
    verdict = {True: "ok", False: "MISS", None: "?"}[r.target_met]
    return f"<={r.recovery_target_s:.1f} {verdict}"


def format_row(r: ScenarioResult) -> str:
    rec = f"{_sec(r.recovery_s_p50)}/{_sec(r.recovery_s_max)}"
    ttft = f"{_sec(r.ttft_after_fault_s_p50)}/{_sec(r.ttft_after_fault_s_max)}"
    failure = ("CRASHED; " if r.crashed else "") + "; ".join(r.notes[-2:])
    return (f"{r.name:<34} {r.sent:>4} {r.attempts:>4} {r.refused:>4} {r.completed:>4} {r.abandoned:>5} "
            f"{r.failed_clean:>5} {r.lost:>4} {r.mismatches:>4} {_sec(r.longest_gap_s):>5} {rec:>11} {ttft:>15} {format_target(r):>10} "
            f"{r.seconds:>5.0f}  {'pass' if r.passed else 'FAIL: ' + failure}")


def suite_record(results: list[ScenarioResult], *, quick: bool, machine: dict[str, Any],
                 scenario_set: str | None = None) -> dict[str, Any]:
    """The JSON record of one suite run (``--out`` appends it as a line, ``--json`` prints it);
    ``set``: ``full``, ``quick`` or ``only`` (scenarios picked with ``--only``)."""
    return {"suite": "mesh-faults", "schema": SCHEMA,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine, "quick": quick, "set": scenario_set or ("quick" if quick else "full"),
            "scenarios": [asdict(r) for r in results]}


def run_faults_command(*, quick: bool, as_json: bool, only: list[str] | None, model: str,
                       out: Path | None = None) -> int:
    """Run the suite; print a table (or, with ``as_json``, the record); with ``out``, append
    the record to that file as one JSON line. Exit status 0 only when every row passed."""
    from mesh.tools.benchutil import machine_profile

    names = only or (list(QUICK) if quick else list(SCENARIOS))
    quiet = (lambda _line: None) if as_json else print
    results = run_suite(names, model=model, log=quiet)
    record = suite_record(results, quick=quick and not only, machine=machine_profile(),
                          scenario_set="only" if only else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if as_json:
        print(json.dumps({**record, "date": record["timestamp"]}))  # "date": the field of schema 1
    else:
        print()
        print(HEADER)
        for r in results:
            print(format_row(r))
        if out is not None:
            print(f"\nappended to {out}")
    return 0 if all(r.passed for r in results) else 1
