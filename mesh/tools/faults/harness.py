"""The harness of ``python -m mesh faults``: what a scenario uses to send requests and count
what became of them. The prompts and the fault-free reference run (``Context``), the streamed
chat client (``stream_chat``, the suite's result shape over ``mesh/tools/sse.py``) and its
503-retrying ``request``, the nodes' fault control files (``set_faults``), the tally of
outcomes (``Tally``) and ``run_scenario``. It imports neither the scenario catalogue
(``mesh/tools/faults/scenarios.py``) nor the runner (``mesh/tools/faults/run.py``).

Every scenario starts its own cluster of ``python -m mesh node`` processes on 127.0.0.1 (each
node's links wrapped by ``--fault-plan``, ``mesh/node/fault_hooks.py``), streams greedy chat
requests through it, injects its fault (process signals, or a change of the nodes' fault
plans) and classifies every request (specs/faults.md F16-F18):

- **sent**: requests; **attempts**: HTTP requests actually sent for them, retries included;
  **refused**: 503 answers the client retried (a request retried while the cluster is between
  plans), so ``attempts == sent + refused``;
- **completed**: the stream ended with ``[DONE]`` and no error;
- **abandoned**: the client left on purpose after a few chunks (not completed; its text must
  be a prefix of the reference);
- **failed_clean**: an HTTP error with OpenAI's error JSON, a final SSE error event, or (only
  where the scenario kills the node holding the connection) a connection the client sees cut;
- **lost**: anything else: a silent cut, a stream without ``[DONE]``, a hang past the
  request timeout, resources (KV caches, requests) left behind where a check asks, or the
  scenario itself raising (``crashed``; its tally so far is kept);
- **mismatches**: completed (or abandoned) streams whose text differs from (is not a prefix
  of) a fault-free single-node run; a request the reference run did not cover is a mismatch.

Times, all from the client's monotonic clock:

- ``recovery_s_p50/max``: for each completed stream the fault hit, its longest gap between two
  text chunks;
- ``ttft_after_fault_s_p50/max``: for each request whose first attempt was sent at or after the
  fault (``Tally.mark_fault``), the time from that FIRST attempt to its first text chunk, 503
  retries included; for each hit stream (sent before the fault, hit by it), the time from the
  fault to its first chunk after the fault. Requests with no chunk add nothing.

Targets (F18): a scenario may have a recovery target; the longest client wait after the fault,
``max(recovery_s_max, ttft_after_fault_s_max)``, must not exceed it. Stage SIGKILLs and a
restart: 5 s (default model, loopback). A stage silent for ``pause`` seconds (SIGSTOP,
partitions): the pause plus the detection time ``--dead-after-s`` (3 s): the stream either
waits for the heal or resumes on the survivors once the stage is declared dead. Others: none.
A missed target fails the row (``target_met`` false): the short-prompt stage-kill recoveries
measured on a 2-core VM are 1.6-2.5 s (benchmarks/faults.jsonl), so 5 s leaves room for a
noisy machine; the re-prefill of the no-replica long prompt alone takes most of its 5 s, so
that row is the first to miss on a busy machine. The row also fails with no
measurement where a target applies (``target_met`` null then, with a note).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.tools.sse import chat_body, chat_chunks, error_message, open_chat_stream

REQUEST_TIMEOUT_S = 180.0  # a request still running after this is a hang
MAX_TOKENS = 24
PROMPTS = ("Name three colours of the rainbow.", "What is the capital of France?", "Count from one to five.")
LONG_PROMPT = ("Summarise the following notes in one sentence. " +
               "The river rises in the hills, runs past the mill and the old bridge, and reaches the sea "
               "after two days; farmers along it grow wheat, barley and apples, and trade at the market "
               "town each week. " * 40)
# every (prompt, max_tokens) a scenario sends: the fault-free single-node run covers them all (F17)
REFERENCE_REQUESTS: tuple[tuple[str, int], ...] = (
    *((prompt, n) for prompt in PROMPTS for n in (MAX_TOKENS, 12)), (LONG_PROMPT, 12))
STAGE_KILL_TARGET_S = 5.0  # recovery target after a stage SIGKILL (default model, loopback)
DEAD_AFTER_S = 3.0  # the nodes' default --dead-after-s: how long a silent stage takes to be declared dead


def pause_target_s(pause_s: float) -> float:
    """Recovery target of a stage silent for ``pause_s`` (SIGSTOP, partition): the pause plus
    the detection time (spec F18)."""
    return pause_s + DEAD_AFTER_S


@dataclass
class Outcome:
    """One request as the client saw it (over all its attempts)."""

    kind: str  # completed | abandoned | failed_clean | cut | lost
    text: str = ""
    error: str | None = None
    stamps: list[float] = field(default_factory=list)  # monotonic time of each text chunk
    started: float = 0.0  # monotonic time the FIRST attempt was sent
    attempts: int = 1  # HTTP requests sent, retries included
    refused: int = 0  # 503 answers that were retried
    refusal: str | None = None  # the first retried 503's message

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)), default=0.0)


@dataclass
class ScenarioResult:
    """A scenario's row of the table (the JSON fields of ``--json`` and ``--out``)."""

    name: str
    sent: int = 0
    attempts: int = 0
    refused: int = 0
    completed: int = 0
    abandoned: int = 0
    failed_clean: int = 0
    lost: int = 0
    mismatches: int = 0
    recovery_s_p50: float | None = None
    recovery_s_max: float | None = None
    ttft_after_fault_s_p50: float | None = None
    ttft_after_fault_s_max: float | None = None
    recovery_target_s: float | None = None
    longest_gap_s: float | None = None  # the longest wait between two chunks of any completed stream
    target_met: bool | None = None
    crashed: bool = False
    notes: list[str] = field(default_factory=list)
    passed: bool = False
    seconds: float = 0.0


def stream_chat(url: str, prompt: str, *, max_tokens: int = MAX_TOKENS, model: str = "smollm2-135m",
                on_chunk: Callable[[int], None] | None = None, stop_after: int | None = None,
                timeout_s: float = REQUEST_TIMEOUT_S) -> Outcome:
    """Stream one greedy chat completion from ``url`` (one HTTP attempt, through the shared
    client of ``mesh/tools/sse.py``); ``on_chunk(n)`` runs after the n-th text chunk;
    ``stop_after``: the client goes away after that many chunks (the outcome is then
    ``abandoned``); ``timeout_s``: seconds without progress before the request is a hang.
    Raises ValueError for a malformed ``data:`` line (the scenario then crashes, spec F17)."""
    import httpx

    out = Outcome(kind="lost", started=time.monotonic())
    done = errored = False
    try:
        with open_chat_stream(url, chat_body(model, prompt, max_tokens),
                              timeout=httpx.Timeout(timeout_s, connect=10.0)) as response:
            if response.status_code >= 400:
                response.read()
                message = error_message(response)
                if message is not None:
                    out.kind, out.error = "failed_clean", f"HTTP {response.status_code}: {message}"
                else:
                    out.error = f"HTTP {response.status_code} without error JSON"
                return out
            for chunk in chat_chunks(response.iter_lines()):
                if chunk.done:
                    done = True
                    break
                if chunk.error is not None:
                    # a final error event is a clean failure only if [DONE] still follows (spec FO4)
                    errored, out.error = True, chunk.error
                    continue
                for piece in chunk.pieces:
                    out.text += piece
                    out.stamps.append(time.monotonic())
                    if on_chunk is not None:
                        on_chunk(len(out.stamps))
                if stop_after is not None and len(out.stamps) >= stop_after:
                    out.kind = "abandoned"  # the client chose to leave: not completed, nothing lost
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


def is_transient_refusal(out: Outcome) -> bool:
    """A 503 while the cluster is between plans (re-placing, loading, linking): worth a retry;
    a 503 that names a placement failure is final."""
    error = out.error or ""
    return out.kind == "failed_clean" and error.startswith("HTTP 503") and "placement failed" not in error


def request(url: str, prompt: str, *, retry_s: float = 60.0, **kwargs: Any) -> Outcome:
    """``stream_chat``, retried every 0.5 s for up to ``retry_s`` while the node answers a
    transient 503, as OpenAI clients retry a 503. The outcome is the last attempt's, with
    ``started`` set to the first attempt's start and every attempt counted (spec F17)."""
    first = time.monotonic()
    deadline = first + retry_s
    attempts, refused, refusal = 0, 0, None
    while True:
        out = stream_chat(url, prompt, **kwargs)
        attempts += 1
        if not is_transient_refusal(out) or time.monotonic() >= deadline:
            out.started, out.attempts, out.refused, out.refusal = first, attempts, refused, refusal
            return out
        refused += 1
        refusal = refusal or out.error
        time.sleep(0.5)


class Context:
    """What scenarios share: a work dir, the shared device profile and reference texts."""

    def __init__(self, workdir: Path, *, model: str = "smollm2-135m") -> None:
        self.workdir = workdir
        self.model = model
        self.profile = workdir / "profile" / "profile.json"
        self.reference: dict[tuple[str, int], str] = {}

    def prepare(self) -> None:
        """The fault-free single-node run every scenario is compared with: every (prompt,
        max_tokens) of ``REFERENCE_REQUESTS`` (spec F17)."""
        from mesh.placement.profile import load_or_measure_profile
        from mesh.testing.cluster import LocalCluster

        measured = load_or_measure_profile(self.profile.parent, budget_s=1.0)
        if not self.profile.exists():  # measured on a busy machine: not cached, but the clusters need one
            self.profile.parent.mkdir(parents=True, exist_ok=True)
            self.profile.write_text(json.dumps(measured.to_wire()))
        with LocalCluster(1, self.workdir / "reference", model=self.model, profile=self.profile) as cluster:
            cluster.wait_ready()
            for prompt, n in REFERENCE_REQUESTS:
                out = stream_chat(cluster.nodes[0].api_url, prompt, max_tokens=n, model=self.model)
                if out.kind != "completed":
                    raise RuntimeError(f"the fault-free reference run failed: {out.error}")
                self.reference[(prompt, n)] = out.text

    def cluster(self, name: str, n: int = 3, *, memory_bytes: int | list[int] = 4 << 30,
                extra_args: list[str] | None = None, node_args: dict[int, list[str]] | None = None,
                initial: int | None = None) -> Any:
        """An n-node cluster (start it with ``with``: ``initial`` nodes, all by default; ``add()``
        starts the next) whose node i follows ``<dir>/faults-<i>.json``."""
        from mesh.testing.cluster import LocalCluster

        root = self.workdir / name
        root.mkdir(parents=True, exist_ok=True)
        args = [["--fault-plan", str(root / f"faults-{i}.json"), "--fault-label", f"n{i}",
                 *(node_args or {}).get(i, [])] for i in range(n)]
        cluster = LocalCluster(n, root, model=self.model, profile=self.profile, memory_bytes=memory_bytes,
                               node_args=args, extra_args=extra_args, initial=initial)
        cluster.fault_files = [root / f"faults-{i}.json" for i in range(n)]  # type: ignore[attr-defined]
        return cluster


def set_faults(cluster: Any, index: int, plan: dict[str, Any], *, reset: int = 0, seed: int = 0) -> None:
    """Write node ``index``'s fault control file (atomically: the node polls it)."""
    path: Path = cluster.fault_files[index]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"plan": plan, "reset": reset, "seed": seed + index}))
    tmp.replace(path)


class Tally:
    """Counts outcomes into a ``ScenarioResult``; thread-safe. The runner creates it before the
    scenario runs, so what was counted survives the scenario raising (spec F17)."""

    def __init__(self, ctx: Context, name: str, *, expect_failed_clean: int = 0,
                 recovery_target_s: float | None = None, refusals_fail: bool = False) -> None:
        self.ctx = ctx
        self.result = ScenarioResult(name=name, recovery_target_s=recovery_target_s)
        self.expect_failed_clean = expect_failed_clean
        self.refusals_fail = refusals_fail  # a 503 fails the row (membership changes, spec N21)
        self.fault_at: float | None = None  # monotonic time the fault was injected
        self._lock = threading.Lock()
        self._recoveries: list[float] = []
        self._ttfts: list[float] = []
        self._refusals: list[str] = []

    def mark_fault(self, at: float | None = None) -> None:
        """The fault strikes now (or at ``at``); the earliest mark counts."""
        at = time.monotonic() if at is None else at
        with self._lock:
            if self.fault_at is None or at < self.fault_at:
                self.fault_at = at

    def add(self, outcome: Outcome, prompt: str, *, max_tokens: int = MAX_TOKENS, cut_is_clean: bool = False,
            hit: bool = False) -> None:
        """Count one request; ``hit``: the fault struck during it (its longest gap counts as a
        recovery); an ``abandoned`` outcome's text must be a prefix of the reference."""
        r = self.result
        with self._lock:
            r.sent += 1
            r.attempts += outcome.attempts
            r.refused += outcome.refused
            if outcome.refusal:
                self._refusals.append(outcome.refusal)
            self._time_after_fault(outcome, hit)
            kind = outcome.kind
            if kind == "cut":
                kind = "failed_clean" if cut_is_clean else "lost"
            if kind in ("completed", "abandoned"):
                if kind == "completed":
                    r.completed += 1
                    r.longest_gap_s = max(r.longest_gap_s or 0.0, outcome.longest_gap_s)
                    if hit:
                        self._recoveries.append(outcome.longest_gap_s)
                else:
                    r.abandoned += 1
                self._compare(outcome.text, prompt, max_tokens, prefix=kind == "abandoned")
            elif kind == "failed_clean":
                r.failed_clean += 1
                r.notes.append(f"clean failure: {(outcome.error or '')[:120]}")
            else:
                r.lost += 1
                r.notes.append(f"lost: {(outcome.error or '')[:160]}")

    def _compare(self, text: str, prompt: str, max_tokens: int, *, prefix: bool) -> None:
        """Against the fault-free single-node run; no reference text is a mismatch, never a pass."""
        r = self.result
        expected = self.ctx.reference.get((prompt, max_tokens))
        if expected is None:
            r.mismatches += 1
            r.notes.append(f"mismatch: no reference for {prompt[:40]!r} at {max_tokens} tokens")
        elif not (expected.startswith(text) if prefix else text == expected):
            r.mismatches += 1
            r.notes.append(f"mismatch{' (not a prefix)' if prefix else ''}: {text[:60]!r} vs {expected[:60]!r}")

    def _time_after_fault(self, outcome: Outcome, hit: bool) -> None:
        if self.fault_at is None or not outcome.stamps:
            return
        if outcome.started >= self.fault_at:  # sent after the fault: first attempt -> first chunk
            self._ttfts.append(outcome.stamps[0] - outcome.started)
        elif hit:  # in flight when the fault struck: the fault -> its first chunk after it
            after = next((s for s in outcome.stamps if s >= self.fault_at), None)
            if after is not None:
                self._ttfts.append(after - self.fault_at)

    def lose(self, why: str) -> None:
        with self._lock:
            self.result.lost += 1
            self.result.notes.append(f"lost: {why}")

    def crash(self, exc: BaseException) -> None:
        """The scenario raised: counted as 1 lost, the tally so far kept."""
        with self._lock:
            self.result.crashed = True
            self.result.lost += 1
            self.result.notes.append(f"scenario error: {exc!r}"[:300])

    def finish(self, started: float, *, expect_failed_clean: int | None = None) -> ScenarioResult:
        r = self.result
        expected = self.expect_failed_clean if expect_failed_clean is None else expect_failed_clean
        with self._lock:
            if self._recoveries:
                r.recovery_s_p50 = statistics.median(self._recoveries)
                r.recovery_s_max = max(self._recoveries)
            if self._ttfts:
                r.ttft_after_fault_s_p50 = statistics.median(self._ttfts)
                r.ttft_after_fault_s_max = max(self._ttfts)
            r.seconds = time.monotonic() - started
            if r.refused:
                r.notes.insert(0, f"{r.refused} attempt(s) refused with 503 and retried "
                               f"(first: {self._refusals[0][:100] if self._refusals else '?'})")
            r.target_met = None
            if r.recovery_target_s is not None:
                waits = [w for w in (r.recovery_s_max, r.ttft_after_fault_s_max) if w is not None]
                if waits:
                    r.target_met = max(waits) <= r.recovery_target_s
                    if not r.target_met:
                        r.notes.append(f"recovery target missed: waited {max(waits):.2f} s for a token after "
                                       f"the fault, target {r.recovery_target_s:.1f} s")
                else:
                    r.notes.append(f"recovery target {r.recovery_target_s:.1f} s not measured: no stream "
                                   "got a token after the fault")
            r.passed = (r.lost == 0 and r.mismatches == 0 and r.failed_clean == expected and not r.crashed
                        and (r.recovery_target_s is None or r.target_met is True)
                        and not (self.refusals_fail and r.refused))
            if self.refusals_fail and r.refused:
                r.notes.append(f"{r.refused} request(s) refused with 503: a membership change must open no 503 window")
            if r.failed_clean != expected:
                r.notes.append(f"expected {expected} clean failure(s), got {r.failed_clean}")
        return r


def run_scenario(ctx: Context, name: str, body: Callable[[Context, Tally], None], *,
                 expect_failed_clean: int = 0, recovery_target_s: float | None = None,
                 refusals_fail: bool = False) -> ScenarioResult:
    """Run ``body(ctx, tally)`` with a tally made here, so a scenario that raises keeps what it
    counted: its row records the crash (1 lost, ``crashed``) and fails (spec F17)."""
    started = time.monotonic()
    tally = Tally(ctx, name, expect_failed_clean=expect_failed_clean, recovery_target_s=recovery_target_s,
                  refusals_fail=refusals_fail)
    try:
        body(ctx, tally)
    except Exception as exc:  # a scenario that breaks is a failed row, not a crashed suite
        tally.crash(exc)
    return tally.finish(started)
