"""``python -m mesh faults``: fault-injection scenarios on real multi-process clusters.

Every scenario starts its own cluster of ``python -m mesh node`` processes on 127.0.0.1 (each
node's links wrapped by ``--fault-plan``, ``mesh/fault_hooks.py``), streams greedy chat
requests through it, injects its fault (process signals, or a change of the nodes' fault
plans) and classifies every request:

- **completed**: the stream ended with ``[DONE]`` and no error;
- **failed_clean**: an HTTP error with OpenAI's error JSON, a final SSE error event, or (only
  where the scenario kills the node holding the connection) a connection the client sees cut;
- **lost**: anything else: a silent cut, a stream without ``[DONE]``, a hang past the
  request timeout, or resources (KV caches, requests) left behind where a check asks;
- **mismatches**: completed streams whose text differs from a fault-free single-node run.

Recovery time: for a stream the fault hit, its longest gap between two tokens. Targets:
0 lost, 0 mismatches, 0 hangs; recovery after a stage SIGKILL <= 5 s (default model, loopback).
Scenario definitions are in ``mesh/faults_scenarios.py``. Spec: specs/faults.md F16.
"""

from __future__ import annotations

import datetime
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REQUEST_TIMEOUT_S = 180.0  # a request still running after this is a hang
MAX_TOKENS = 24
PROMPTS = ("Name three colours of the rainbow.", "What is the capital of France?", "Count from one to five.")


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str  # completed | failed_clean | cut | lost
    text: str = ""
    error: str | None = None
    stamps: list[float] = field(default_factory=list)  # monotonic time of each text chunk
    started: float = 0.0  # monotonic time the request was sent

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)), default=0.0)


@dataclass
class ScenarioResult:
    """A scenario's row of the table (the JSON fields of ``--json``)."""

    name: str
    sent: int = 0
    completed: int = 0
    failed_clean: int = 0
    lost: int = 0
    mismatches: int = 0
    recovery_s_p50: float | None = None
    recovery_s_max: float | None = None
    notes: list[str] = field(default_factory=list)
    passed: bool = False
    seconds: float = 0.0


def stream_chat(url: str, prompt: str, *, max_tokens: int = MAX_TOKENS, model: str = "smollm2-135m",
                on_chunk: Callable[[int], None] | None = None, stop_after: int | None = None,
                timeout_s: float = REQUEST_TIMEOUT_S) -> Outcome:
    """Stream one greedy chat completion from ``url``; ``on_chunk(n)`` runs after the n-th
    text chunk; ``stop_after``: the client goes away after that many chunks."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    out = Outcome(kind="lost", started=time.monotonic())
    done = errored = False
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
            with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        message = response.json()["error"]["message"]
                        return Outcome(kind="failed_clean", error=f"HTTP {response.status_code}: {message}")
                    except (ValueError, KeyError, TypeError):
                        return Outcome(kind="lost", error=f"HTTP {response.status_code} without error JSON")
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        errored, out.error = True, str(chunk["error"].get("message"))
                        continue
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            out.text += piece
                            out.stamps.append(time.monotonic())
                            if on_chunk is not None:
                                on_chunk(len(out.stamps))
                    if stop_after is not None and len(out.stamps) >= stop_after:
                        out.kind = "completed"  # the client chose to leave: nothing was lost
                        return out
    except httpx.TimeoutException as exc:
        out.error = f"hang: {exc!r}"
        return out
    except (httpx.TransportError, httpx.StreamError) as exc:
        out.kind, out.error = "cut", repr(exc)
        return out
    if done:
        out.kind = "failed_clean" if errored else "completed"
    elif out.error is None:
        out.error = "the stream ended without [DONE]"
    return out


def request(url: str, prompt: str, *, retry_s: float = 60.0, **kwargs: Any) -> Outcome:
    """``stream_chat``, retried every 0.5 s for up to ``retry_s`` while the node answers 503
    because the cluster is between plans (re-placing, loading, linking), as OpenAI clients
    retry a 503; a 503 that names a placement failure is final."""
    deadline = time.monotonic() + retry_s
    while True:
        out = stream_chat(url, prompt, **kwargs)
        transient = out.kind == "failed_clean" and (out.error or "").startswith("HTTP 503") \
            and "placement failed" not in (out.error or "")
        if not transient or time.monotonic() >= deadline:
            return out
        time.sleep(0.5)


class Context:
    """What scenarios share: a work dir, the shared device profile and reference texts."""

    def __init__(self, workdir: Path, *, model: str = "smollm2-135m") -> None:
        self.workdir = workdir
        self.model = model
        self.profile = workdir / "profile" / "profile.json"
        self.reference: dict[tuple[str, int], str] = {}

    def prepare(self) -> None:
        from mesh.profile import load_or_measure_profile
        from mesh.testing.cluster import LocalCluster

        load_or_measure_profile(self.profile.parent, budget_s=1.0)
        with LocalCluster(1, self.workdir / "reference", model=self.model, profile=self.profile) as cluster:
            cluster.wait_ready()
            for prompt in PROMPTS:
                for n in (MAX_TOKENS, 12):
                    out = stream_chat(cluster.nodes[0].api_url, prompt, max_tokens=n, model=self.model)
                    if out.kind != "completed":
                        raise RuntimeError(f"the fault-free reference run failed: {out.error}")
                    self.reference[(prompt, n)] = out.text

    def cluster(self, name: str, n: int = 3, *, memory_bytes: int | list[int] = 4 << 30,
                extra_args: list[str] | None = None, node_args: dict[int, list[str]] | None = None) -> Any:
        """An n-node cluster (start it with ``with``) whose node i follows ``<dir>/faults-<i>.json``."""
        from mesh.testing.cluster import LocalCluster

        root = self.workdir / name
        root.mkdir(parents=True, exist_ok=True)
        args = [["--fault-plan", str(root / f"faults-{i}.json"), "--fault-label", f"n{i}",
                 *(node_args or {}).get(i, [])] for i in range(n)]
        cluster = LocalCluster(n, root, model=self.model, profile=self.profile, memory_bytes=memory_bytes,
                               node_args=args, extra_args=extra_args)
        cluster.fault_files = [root / f"faults-{i}.json" for i in range(n)]  # type: ignore[attr-defined]
        return cluster


def set_faults(cluster: Any, index: int, plan: dict[str, Any], *, reset: int = 0, seed: int = 0) -> None:
    """Write node ``index``'s fault control file (atomically: the node polls it)."""
    path: Path = cluster.fault_files[index]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"plan": plan, "reset": reset, "seed": seed + index}))
    tmp.replace(path)


class Tally:
    """Counts outcomes into a ``ScenarioResult``; thread-safe."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.result = ScenarioResult(name=name)
        self._lock = threading.Lock()
        self._recoveries: list[float] = []

    def add(self, outcome: Outcome, prompt: str, *, max_tokens: int = MAX_TOKENS, cut_is_clean: bool = False,
            hit: bool = False, partial: bool = False) -> None:
        """Count one request; ``partial``: the client left early (its text is a prefix);
        ``hit``: the fault struck during it (its longest gap counts as a recovery)."""
        r = self.result
        with self._lock:
            r.sent += 1
            kind = outcome.kind
            if kind == "cut":
                kind = "failed_clean" if cut_is_clean else "lost"
            if kind == "completed":
                r.completed += 1
                expected = self.ctx.reference.get((prompt, max_tokens))
                if expected is not None and not (expected.startswith(outcome.text) if partial
                                                 else outcome.text == expected):
                    r.mismatches += 1
                    r.notes.append(f"mismatch: {outcome.text[:60]!r} vs {expected[:60]!r}")
                if hit:
                    self._recoveries.append(outcome.longest_gap_s)
            elif kind == "failed_clean":
                r.failed_clean += 1
                r.notes.append(f"clean failure: {(outcome.error or '')[:120]}")
            else:
                r.lost += 1
                r.notes.append(f"lost: {(outcome.error or '')[:160]}")

    def lose(self, why: str) -> None:
        with self._lock:
            self.result.lost += 1
            self.result.notes.append(f"lost: {why}")

    def finish(self, started: float, *, expect_failed_clean: int = 0) -> ScenarioResult:
        r = self.result
        if self._recoveries:
            r.recovery_s_p50 = statistics.median(self._recoveries)
            r.recovery_s_max = max(self._recoveries)
        r.seconds = time.monotonic() - started
        r.passed = r.lost == 0 and r.mismatches == 0 and r.failed_clean == expect_failed_clean
        if r.failed_clean != expect_failed_clean:
            r.notes.append(f"expected {expect_failed_clean} clean failure(s), got {r.failed_clean}")
        return r


def run_suite(names: list[str], *, model: str = "smollm2-135m", workdir: Path | None = None,
              log: Callable[[str], None] = print) -> list[ScenarioResult]:
    """Run the named scenarios (``mesh.faults_scenarios.SCENARIOS``) in order."""
    from mesh.faults_scenarios import SCENARIOS

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
            started = time.monotonic()
            try:
                result = SCENARIOS[name].run(ctx)
            except Exception as exc:  # a scenario that breaks is a failed row, not a crashed suite
                result = ScenarioResult(name=name, notes=[f"scenario error: {exc!r}"[:300]],
                                        seconds=time.monotonic() - started)
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


HEADER = (f"{'scenario':<34} {'sent':>4} {'done':>4} {'clean':>5} {'lost':>4} {'mism':>4} "
          f"{'rec p50':>8} {'rec max':>8} {'s':>5}  result")


def format_row(r: ScenarioResult) -> str:
    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    return (f"{r.name:<34} {r.sent:>4} {r.completed:>4} {r.failed_clean:>5} {r.lost:>4} {r.mismatches:>4} "
            f"{sec(r.recovery_s_p50):>8} {sec(r.recovery_s_max):>8} {r.seconds:>5.0f}  "
            f"{'pass' if r.passed else 'FAIL: ' + '; '.join(r.notes[-2:])}")


def run_faults_command(*, quick: bool, as_json: bool, only: list[str] | None, model: str) -> int:
    from mesh.benchutil import machine_profile
    from mesh.faults_scenarios import QUICK, SCENARIOS

    names = only or (list(QUICK) if quick else list(SCENARIOS))
    quiet = (lambda _line: None) if as_json else print
    results = run_suite(names, model=model, log=quiet)
    if as_json:
        machine = machine_profile()
        print(json.dumps({"machine": {k: machine.get(k) for k in ("cpu", "cores", "commit", "date")},
                          "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                          "scenarios": [asdict(r) for r in results]}))
    else:
        print()
        print(HEADER)
        for r in results:
            print(format_row(r))
    return 0 if all(r.passed for r in results) else 1
