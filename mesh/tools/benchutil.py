"""Pieces the benchmarks share: the machine profile recorded with every result (with the
commit and whether the tree was dirty), prompts of an exact token length, timing a streamed
chat request (the benchmarks' result shape over the shared client of ``mesh/tools/sse.py``),
and appending JSON lines."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.models import Model
from mesh.tools.sse import chat_body, chat_chunks, open_chat_stream

FILLER = ("The quick brown fox jumps over the lazy dog while the river runs past old stone "
          "bridges and the wind moves through tall grass near the quiet village. ")


def machine_profile() -> dict[str, Any]:
    """Cores, memory, CPU model, Python/torch versions, commit and date of this run."""
    import psutil

    try:
        import torch
        torch_version, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, threads = None, None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit, dirty = git_state()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": threads,
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _not_code(path: str) -> bool:
    """Uncommitted changes to these do not change what a benchmark measures: its own data
    files (appended to during a publishing session) and prose."""
    return (path.startswith("benchmarks/") and path.endswith(".jsonl")) or path.startswith("docs/") \
        or path == "README.md"


def git_state() -> tuple[str | None, bool | None]:
    """(short commit of HEAD, whether the checkout this module runs from differs from it) in
    anything but benchmark data and prose: a tracked file changed, or a file git does not
    ignore added; (None, None) outside a git checkout. A figure measured on a dirty tree
    cannot be reproduced from its commit, so ``python -m mesh publish`` refuses it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=root, timeout=10).stdout.strip() or None
        if commit is None:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"],
                                capture_output=True, text=True, cwd=root, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    entries = status.split("\0")
    changed: list[str] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            changed.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy is followed by its source path
                i += 1
        i += 1
    return commit, any(not _not_code(path) for path in changed)


def exact_prompt(model: Model, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids of plain English text (no chat template)."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids = model.tokenizer.encode(FILLER * (1 + n_tokens // 8), add_special_tokens=False)
    return ids[:n_tokens]


def exact_chat_content(model: Model, n_tokens: int) -> tuple[str, int]:
    """A user message whose chat prompt (the model's own template applied) is ``n_tokens``
    long, or as close above it as token boundaries allow: (content, prompt tokens)."""
    overhead = len(model.encode_chat([{"role": "user", "content": ""}]))
    want = max(1, n_tokens - overhead)
    best: tuple[str, int] | None = None
    for _ in range(8):  # token merges at the template's edges move the count by a few
        content = model.tokenizer.decode(exact_prompt(model, want))
        got = len(model.encode_chat([{"role": "user", "content": content}]))
        if best is None or abs(got - n_tokens) < abs(best[1] - n_tokens):
            best = (content, got)
        if got == n_tokens:
            break
        want = max(1, want + (n_tokens - got))
    assert best is not None
    return best


def timed_runs(fn: Callable[[], tuple[float, float]], repeats: int) -> dict[str, Any]:
    """Run ``fn`` (returning TTFT s, decode tokens/s) once to warm up, then ``repeats`` times:
    ``{"ttft_s": median, "decode_tok_s": median, "ttft": stats, "decode": stats}`` with the
    stats blocks of ``mesh.tools.benchstats.stats_block`` (every value kept)."""
    from mesh.tools.benchstats import stats_block

    fn()
    runs = [fn() for _ in range(repeats)]
    ttfts, rates = [r[0] for r in runs], [r[1] for r in runs]
    return {"ttft_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates),
            "ttft": stats_block(ttfts), "decode": stats_block(rates)}


def stream_request(url: str, model_id: str, content: str, new_tokens: int, *, timeout_s: float = 300.0,
                   api_key: str | None = None, stamps: list[float] | None = None) -> dict[str, Any]:
    """One greedy streamed chat request, ``new_tokens`` long (``ignore_eos``), through the
    shared client (``mesh.tools.sse``). Returns ``{"ok", "failure", "error", "ttft_s",
    "decode_tok_s", "tokens", "prompt_tokens", "wall_s"}`` (times in seconds, rate in tokens
    per second); never raises for a failed request (the failure is the result). ``ok`` only
    for a stream that ended with ``[DONE]`` after exactly ``new_tokens`` tokens; otherwise
    ``failure`` says why: ``http`` (a status other than 200), ``error_event`` (an SSE error),
    ``transport`` (the connection failed or timed out, or a ``data:`` line was malformed),
    ``truncated`` (no ``[DONE]``), ``short`` (fewer tokens than asked, or no usage chunk to
    count them) or ``empty`` (no text at all). ``stamps``, if given, receives the
    ``time.perf_counter()`` of each text piece as it arrives."""
    import httpx

    body = chat_body(model_id, content, new_tokens, include_usage=True)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, Any] = {"ok": False, "failure": None, "error": None, "ttft_s": None, "decode_tok_s": None,
                           "tokens": 0, "prompt_tokens": None, "wall_s": None}

    def fail(kind: str, error: str) -> dict[str, Any]:
        out["failure"], out["error"] = kind, error
        return out

    stamps = stamps if stamps is not None else []
    done = False
    start = time.perf_counter()
    try:
        with open_chat_stream(url, body, timeout=timeout_s, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                return fail("http", f"HTTP {response.status_code}: {response.text[:300]}")
            for chunk in chat_chunks(response.iter_lines()):
                if chunk.done:
                    done = True
                    break
                if chunk.error is not None:
                    return fail("error_event", chunk.error)
                if chunk.completion_tokens is not None:
                    out["tokens"], out["prompt_tokens"] = chunk.completion_tokens, chunk.prompt_tokens
                stamps.extend(time.perf_counter() for _ in chunk.pieces)
    except (httpx.HTTPError, ValueError) as exc:
        return fail("transport", f"{type(exc).__name__}: {exc}")
    out["wall_s"] = time.perf_counter() - start
    if stamps:
        out["ttft_s"] = stamps[0] - start
        if out["tokens"] >= 2 and stamps[-1] > stamps[0]:
            # text pieces can hold several tokens (held-back UTF-8, stop checks): rate over tokens
            out["decode_tok_s"] = (out["tokens"] - 1) / (stamps[-1] - stamps[0])
    if not done:
        return fail("truncated", f"the stream ended without [DONE] after {len(stamps)} text chunks")
    if not stamps:
        return fail("empty", "the stream produced no text")
    if out["tokens"] != new_tokens:
        return fail("short", f"{out['tokens']} of {new_tokens} tokens")
    out["ok"] = True
    return out


def run_recorded(suite: str, json_path: Path | None, bench: Callable[[], int]) -> int:
    """Run a benchmark command that appends one record to ``json_path`` when it works; when it
    raises, append a ``{"suite", "schema": 2, "timestamp", "machine", "status": "failed",
    "error"}`` record instead (a failure is a result too, spec RP7), say so and return 1."""
    import sys

    try:
        return bench()
    except Exception as exc:  # noqa: BLE001 - whatever broke is recorded, not lost
        error = f"{type(exc).__name__}: {exc}"
        print(f"mesh: error: {suite} failed: {error}", file=sys.stderr)
        if json_path is not None:
            append_jsonl(json_path, {"suite": suite, "schema": 2,
                                     "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                     "machine": machine_profile(), "status": "failed", "error": error})
        return 1


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the file is created when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
