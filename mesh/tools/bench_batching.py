"""``python -m mesh bench-batching``: what chunked prefill does for running streams, what the
prefix cache does for a chat's later turns, and the batched ``generate()`` baseline that
``python -m mesh bench --concurrency`` compares with.

Records (``suite: "mesh-bench-batching"``, ``schema: 2``), one JSON line each in ``--json``:

- ``kind: "long-prompt"``, one per (``--prefill-chunk`` value, repeat): a one-node loopback
  cluster started with that chunk size; a greedy stream of ``--stream-tokens`` tokens runs;
  after its 10th text piece a prompt of ``--long-prompt-tokens`` tokens arrives (1 new token).
  ``results``: the stream's gaps between text pieces (seconds): ``gap_p50_before_s`` (before
  the long prompt was sent), ``gap_p50_s`` (all), ``gap_max_s`` (the longest) and
  ``gap_ratio`` (longest over the p50 before); ``long_ttft_s`` (the long prompt's time to
  first token). A chunk as large as the prompt is the unchunked baseline of the same run.
- ``kind: "multi-turn"``, one per (prefix cache on or off, repeat): a one-node cluster with
  ``--prefix-cache-mb`` 256 or 0; a chat of ``--turns`` turns (a system prompt of about 600
  tokens, each user message about 60, each answer the model's own ``--answer-tokens`` tokens,
  greedy) sent turn after turn, each with the whole conversation. ``results.ttft_s``: each
  turn's time to first token; ``last_ttft_s`` the last turn's.
- ``kind: "baseline"``, ``name: "transformers_generate_batch"``: transformers' ``generate()`` in
  f32 on the same (dequantized) weights at batch 1 and ``--batch`` (the same prompt in every
  row, no padding): decode tokens/s in all, ``repeats`` of each, and their ratio.
- ``kind: "baseline"``, ``name: "backend_batch_step"``, one per weight format (``quantize``:
  ``default`` keeps the files' format, e.g. a GGUF's int4 weights; ``none`` dequantizes): the
  torch backend alone (one whole-model stage in bf16, no node, no sockets) running decode
  steps of 1 and ``--batch`` requests through ``forward_batch`` at a context of 100 positions:
  ``step_s_batch1`` / ``step_s_batch`` (seconds per step, ``repeats`` medians of 8 steps) and
  ``ratio`` (tokens/s at ``--batch`` over tokens/s at 1). No serving stack can batch better
  than its backend's own step: this is the ceiling the node's batching is read against.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mesh.models import Model, resolve_model
from mesh.tools.benchstats import stats_block
from mesh.tools.benchutil import (
    append_jsonl,
    exact_chat_content,
    exact_prompt,
    git_state,
    machine_profile,
    stream_request,
)

SUITE = "mesh-bench-batching"
ARRIVE_AFTER = 10  # text pieces of the stream before the long prompt is sent


def _record(kind: str, config: dict[str, Any], status: str, error: str | None, results: dict[str, Any] | None,
            **extra: Any) -> dict[str, Any]:
    import datetime

    return {"suite": SUITE, "schema": 2, "kind": kind, **extra,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine_profile(), "config": config, "status": status, "error": error, "results": results}


def long_prompt_run(url: str, model: Model, stream_content: str, long_content: str, stream_tokens: int) -> dict[str, Any]:
    """One stream with a long prompt arriving mid-way (see the module docstring)."""
    stamps: list[float] = []
    out: dict[str, Any] = {}

    def stream() -> None:
        out["stream"] = stream_request(url, model.model_id, stream_content, stream_tokens, stamps=stamps)

    runner = threading.Thread(target=stream)
    runner.start()
    deadline = time.monotonic() + 120
    while len(stamps) < ARRIVE_AFTER and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    sent_at = time.perf_counter()
    long = stream_request(url, model.model_id, long_content, 1)
    runner.join(600)
    first = out.get("stream") or {"ok": False, "error": "the stream did not end"}
    if not first.get("ok") or not long.get("ok"):
        raise RuntimeError(f"stream: {first.get('error')}; long prompt: {long.get('error')}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    before = [g for g, at in zip(gaps, stamps[1:], strict=False) if at <= sent_at]
    p50_before = statistics.median(before) if before else statistics.median(gaps)
    during = [g for g, at in zip(gaps, stamps[1:], strict=False) if at > sent_at]
    return {"gap_p50_before_s": p50_before, "gap_p50_s": statistics.median(gaps), "gap_max_s": max(gaps),
            "gap_ratio": max(gaps) / p50_before, "gaps_after_arrival": len(during),
            "long_ttft_s": long["ttft_s"], "stream_pieces": len(stamps)}


def chat_turn(url: str, model_id: str, messages: list[dict[str, str]], new_tokens: int) -> tuple[float, str]:
    """One greedy streamed chat request with ``messages``: (its TTFT in seconds, its text).
    Raises RuntimeError for a failed request."""
    from mesh.tools.sse import chat_chunks, open_chat_stream

    body = {"model": model_id, "messages": messages, "temperature": 0, "max_tokens": new_tokens, "stream": True}
    pieces: list[str] = []
    first = None
    start = time.perf_counter()
    with open_chat_stream(url, body, timeout=600) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        for chunk in chat_chunks(response.iter_lines()):
            if chunk.error is not None:
                raise RuntimeError(chunk.error)
            if chunk.done:
                break
            if chunk.pieces and first is None:
                first = time.perf_counter() - start
            pieces.extend(chunk.pieces)
    if first is None:
        raise RuntimeError("no text")
    return first, "".join(pieces)


def multi_turn_run(url: str, model: Model, turns: int, answer_tokens: int, chat: int = 0) -> dict[str, Any]:
    """A chat of ``turns`` turns, each sent with the whole conversation (see the module docstring);
    ``chat`` starts its system prompt, so no two chats share a cached prefix."""
    system, _ = exact_chat_content(model, 600)
    messages = [{"role": "system", "content": f"Conversation {chat}. {system}"}]
    ttfts = []
    for turn in range(turns):
        question, _ = exact_chat_content(model, 60 + turn)
        messages.append({"role": "user", "content": question})
        ttft, text = chat_turn(url, model.model_id, messages, answer_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": text})
    return {"ttft_s": ttfts, "last_ttft_s": ttfts[-1],
            "prompt_tokens_last": len(model.encode_chat(messages[:-1]))}


def generate_batch_baseline(model: Model, prompt_tokens: int, new_tokens: int, batch: int,
                            repeats: int) -> dict[str, Any]:
    """transformers' ``generate()`` (f32) at batch 1 and ``batch``: decode tokens/s in all."""
    import torch

    from mesh.tools.bench import generate_s, reference_model

    reference = reference_model(model)
    prompt = exact_prompt(model, prompt_tokens)

    def rate(rows: int) -> float:
        ids = torch.tensor([prompt] * rows)
        first, total = generate_s(reference, model, ids, 1), generate_s(reference, model, ids, new_tokens)
        return rows * (new_tokens - 1) / max(total - first, 1e-9)

    rate(1)  # warm-up
    ones, many = [], []
    for _ in range(repeats):
        ones.append(rate(1))
        many.append(rate(batch))
    return {"batch": batch, "decode_tok_s_batch1": stats_block(ones), "decode_tok_s_batch": stats_block(many),
            "ratio": statistics.median(many) / statistics.median(ones)}


def backend_batch_baseline(model: Model, quantize: str, batch: int, repeats: int,
                           context: int = 100) -> dict[str, Any]:
    """Decode steps of the torch backend alone (bf16, ``quantize`` None keeps the files' format)
    at batch 1 and ``batch``, each request with ``context`` cached positions: seconds per step
    (``repeats`` medians of 8 steps each) and the tokens/s ratio ``batch * t1 / t_batch``."""
    from backends.base import BatchItem
    from backends.torch import TorchBackend

    backend = TorchBackend(device="cpu", dtype="bf16", quantize=None if quantize == "default" else quantize)
    backend.load(model, 0, model.num_layers)
    weights = backend.weight_format or "bf16"
    try:
        caches = [backend.new_cache() for _ in range(batch)]
        for cache in caches:
            backend.forward(cache, start_pos=0, token_ids=list(range(10, 10 + context)))
        positions = [context] * batch

        def steps(rows: int) -> float:
            times = []
            for _ in range(8):
                items = [BatchItem(cache=caches[i], start_pos=positions[i], token_ids=[42]) for i in range(rows)]
                start = time.perf_counter()
                outputs = backend.forward_batch(items)
                times.append(time.perf_counter() - start)
                failed = [o for o in outputs if isinstance(o, Exception)]
                if failed:
                    raise failed[0]
                for i in range(rows):
                    positions[i] += 1
            return statistics.median(times)

        steps(1), steps(batch)  # warm-up
        ones, many = [], []
        for _ in range(repeats):
            ones.append(steps(1))
            many.append(steps(batch))
    finally:
        backend.unload()
    return {"batch": batch, "weights": weights, "context": context,
            "step_s_batch1": stats_block(ones), "step_s_batch": stats_block(many),
            "ratio": batch * statistics.median(ones) / statistics.median(many)}


def run_batching_bench(args: argparse.Namespace) -> int:
    from mesh.testing.cluster import LocalCluster

    model = Model(resolve_model(args.model))
    out = Path(args.json)
    commit, dirty = git_state()
    print(f"commit {commit}{' (dirty tree)' if dirty else ''}; results -> {out}")
    stream_content, _ = exact_chat_content(model, 32)
    long_content, exact = exact_chat_content(model, args.long_prompt_tokens)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mesh-bench-batching-") as tmp:
        def scenario(kind: str, config: dict[str, Any], flags: list[str], run: Any, say: Any) -> int:
            """``args.repeats`` runs of ``run(url, repeat)`` on a fresh one-node cluster started with
            ``flags``: one record each, failures included; returns how many failed."""
            failed = 0
            try:
                with LocalCluster(1, Path(tmp) / f"{kind}-{'-'.join(flags)}", model=args.model,
                                  extra_args=flags) as cluster:
                    cluster.wait_ready(timeout_s=300)
                    url = cluster.nodes[0].api_url
                    stream_request(url, model.model_id, stream_content, 4)  # warm-up
                    for repeat in range(args.repeats):
                        try:
                            results = run(url, repeat)
                            record = _record(kind, config, "ok", None, results)
                            print(say(results))
                        except Exception as exc:  # noqa: BLE001 - a failed run is a record too
                            failed += 1
                            record = _record(kind, config, "failed", f"{type(exc).__name__}: {exc}", None)
                        append_jsonl(out, record)
            except Exception as exc:  # noqa: BLE001 - a cluster that does not start fails its runs
                append_jsonl(out, _record(kind, config, "failed", f"{type(exc).__name__}: {exc}", None))
                return failed + 1
            return failed

        for chunk in [int(c) for c in str(args.prefill_chunk).split(",")]:
            config = {"model": model.model_id, "nodes": 1, "prefill_chunk": chunk, "stream_tokens": args.stream_tokens,
                      "long_prompt_tokens": args.long_prompt_tokens, "long_prompt_exact": exact == args.long_prompt_tokens}
            failures += scenario(
                "long-prompt", config, ["--prefill-chunk", str(chunk)],
                lambda url, _: long_prompt_run(url, model, stream_content, long_content, args.stream_tokens),
                lambda r, chunk=chunk: (f"chunk {chunk}: longest gap {r['gap_max_s'] * 1000:.0f} ms = "
                                        f"{r['gap_ratio']:.1f}x the median before ({r['gap_p50_before_s'] * 1000:.0f} "
                                        f"ms); long prompt TTFT {r['long_ttft_s']:.2f} s"))
        for budget in (256, 0):
            config = {"model": model.model_id, "nodes": 1, "prefix_cache_mb": budget, "turns": args.turns,
                      "answer_tokens": args.answer_tokens}
            failures += scenario(
                "multi-turn", config, ["--prefix-cache-mb", str(budget)],
                lambda url, chat: multi_turn_run(url, model, args.turns, args.answer_tokens, chat),
                lambda r, budget=budget: (f"prefix cache {budget} MiB: turn {args.turns} TTFT {r['last_ttft_s']:.2f} s "
                                          f"({r['prompt_tokens_last']} prompt tokens)"))
    if not args.no_baselines:
        config = {"model": model.model_id, "prompt_tokens": 64, "new_tokens": 32, "batch": args.batch}
        try:
            results = generate_batch_baseline(model, 64, 32, args.batch, args.repeats)
            append_jsonl(out, _record("baseline", config, "ok", None, results, name="transformers_generate_batch"))
            print(f"generate() f32: batch {args.batch} gives {results['ratio']:.2f}x the tokens/s of batch 1")
        except Exception as exc:  # noqa: BLE001
            failures += 1
            append_jsonl(out, _record("baseline", config, "failed", f"{type(exc).__name__}: {exc}", None,
                                      name="transformers_generate_batch"))
        for quantize in ("default", "none"):
            config = {"model": model.model_id, "dtype": "bf16", "quantize": quantize, "batch": args.batch}
            try:
                results = backend_batch_baseline(model, quantize, args.batch, args.repeats + 1)
                append_jsonl(out, _record("baseline", config, "ok", None, results, name="backend_batch_step"))
                print(f"torch backend alone, {results['weights']} weights: a decode step of {args.batch} requests "
                      f"gives {results['ratio']:.2f}x the tokens/s of one")
            except Exception as exc:  # noqa: BLE001
                failures += 1
                append_jsonl(out, _record("baseline", config, "failed", f"{type(exc).__name__}: {exc}", None,
                                          name="backend_batch_step"))
    return 1 if failures else 0


def add_parser(sub: Any, add: Any, add_switch: Any, positive_int: Any) -> None:
    """The ``bench-batching`` subcommand (``add``/``add_switch``: the CLI's flag helpers, env names
    included; ``positive_int``: its integer type)."""
    p = sub.add_parser("bench-batching", help="chunked prefill: a running stream's gaps while a long prompt "
                       "arrives; a multi-turn chat's TTFT with and without the prefix cache; the batched "
                       "generate() baseline")
    add(p, "--model", default="smollm2-135m", help="model name or path")
    add(p, "--prefill-chunk", default="128,65536", help="comma-separated node --prefill-chunk values (one as large "
        "as the prompt is the unchunked baseline)")
    add(p, "--long-prompt-tokens", type=positive_int, default=4096, help="the long prompt's tokens (chat template "
        "included)")
    add(p, "--stream-tokens", type=positive_int, default=160, help="tokens of the running stream")
    add(p, "--turns", type=positive_int, default=5, help="turns of the multi-turn chat")
    add(p, "--answer-tokens", type=positive_int, default=48, help="tokens of each answer in the chat")
    add(p, "--batch", type=positive_int, default=8, help="the generate() baseline's batch")
    add(p, "--repeats", type=positive_int, default=2, help="runs per chunk size, and of the baseline")
    add(p, "--json", type=Path, default=Path("benchmarks/batching-scenarios.jsonl"), help="append the records here")
    add_switch(p, "--no-baselines", help="skip the generate() baseline")
    add(p, "--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="log verbosity")
