"""``python -m mesh bench``: a matrix of configurations on local multi-process clusters (or a
running cluster with ``--url``), every run appended as one JSON line, failures included.

Axes (comma-separated lists): ``--backend``, ``--transport``, ``--nodes``, ``--placement``,
``--objective``, ``--prefill-nodes`` (how many nodes run ``--role prefill``: a disaggregated
plan), ``--kv-replica-mb`` (the failover KV replica's budget; 0 turns it off), ``--prompt-tokens``, ``--new-tokens``, ``--concurrency``. For each cluster
configuration (backend x transport x nodes x placement x objective x prefill nodes x replica
budget, fewer prefill nodes than nodes) a fresh loopback cluster
is started once; each (prompt, new tokens, concurrency) run on it sends one warm-up batch,
then ``--repeats`` batches of ``concurrency`` concurrent greedy streamed requests whose chat
prompt is exactly ``prompt`` tokens long (the model's own template counted). A run records
TTFT, per-request decode tokens/s and TPOT (p50, mean, min, max and every value), the
aggregate throughput, each stage's compute time per token against the rest of the step
(transfer and queueing, from the coordinator's ``GET /v1/cluster``), and the cost model's
prediction for the plan.

Baselines measured in the same run, so results read as ratios on a shared, noisy machine:
transformers' ``generate()`` on the same dequantized weights (per prompt length), mlx-lm's
``generate_step`` when MLX is installed and an mlx run is in the matrix, and a raw TCP
socket round trip on loopback with a decode step's hidden states.

Record schema (``schema: 2``; ``python -m mesh report`` renders them): ``{"kind": "run" |
"baseline", "suite": "mesh-bench", "schema", "timestamp", "commit", "machine", "config",
"status": "ok" | "partial" | "failed", "error", "results"}``; see ``run_once`` and the baseline
functions for the fields of ``results``. Figures are stats blocks (``n``, ``p50``, ``mean``,
``min``, ``max``, ``runs``: every value). A run is ``partial`` when any request failed, ended
without ``[DONE]`` or came back short of its tokens (``results.failures`` counts them by
kind), and ``failed`` when none succeeded: its medians cover only the requests that worked.

With ``--url`` the cluster is somebody else's machines: the records name this machine as the
``client`` and list the cluster's members as ``/v1/cluster`` reports them, and the baselines
(which would measure this machine, not the cluster) are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from mesh.models import Model, resolve_model
from mesh.tools.benchstats import from_block, stats_block
from mesh.tools.benchutil import (
    append_jsonl,
    exact_chat_content,
    exact_prompt,
    machine_profile,
    stream_request,
)

SCHEMA = 2
_stats = stats_block


def _record(kind: str, machine: dict[str, Any], config: dict[str, Any], status: str, error: str | None,
            results: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "suite": "mesh-bench", "schema": SCHEMA,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": machine.get("commit"), "machine": machine, "config": config, "status": status,
            "error": error, "results": results, **extra}


# -- baselines ---------------------------------------------------------------------------------
def reference_model(model: Model) -> Any:
    """transformers' own model of ``model`` in f32 (a GGUF file dequantized), for the baselines."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if model.ref.gguf_file:
        kwargs["gguf_file"] = model.ref.gguf_file
    return AutoModelForCausalLM.from_pretrained(str(model.ref.path), **kwargs).eval()


def generate_s(reference: Any, model: Model, ids: Any, n: int) -> float:
    """Seconds of one greedy ``generate()`` of exactly ``n`` new tokens after ``ids`` (a
    ``[batch, prompt]`` tensor without padding)."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=model.config.eos_token_id)
    return time.perf_counter() - start


def transformers_baseline(model: Model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """transformers' ``generate()`` on the same dequantized weights, greedy: TTFT (a 1-token
    generate) and decode tokens/s ((N - 1) / (time of N tokens - TTFT)), ``repeats`` of each
    after a warm-up, as stats blocks."""
    import torch

    reference = reference_model(model)
    ids = torch.tensor([exact_prompt(model, prompt_tokens)])
    generate_s(reference, model, ids, 2)  # warm-up
    ttfts, rates = [], []
    for _ in range(repeats):
        ttft = generate_s(reference, model, ids, 1)
        total = generate_s(reference, model, ids, new_tokens)
        ttfts.append(ttft)
        rates.append((new_tokens - 1) / max(total - ttft, 1e-9))
    return {"ttft_s": _stats(ttfts), "decode_tok_s": _stats(rates)}


def llama_cpp_baseline(model: Model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """llama.cpp (``llama-cpp-python``) on the same GGUF file, the same prompt token ids and as
    many threads as torch uses, greedy: TTFT (evaluating the prompt and sampling one token) and
    decode tokens/s, ``repeats`` runs after a warm-up. Raises ImportError when llama-cpp-python
    is not installed and ModelError for a model that is not a GGUF file."""
    import torch
    from llama_cpp import Llama

    from mesh.errors import ModelError

    if not model.ref.gguf_file:
        raise ModelError(f"{model.model_id} is not a GGUF file; llama.cpp reads GGUF")
    threads = torch.get_num_threads()
    llm = Llama(model_path=str(model.ref.path / model.ref.gguf_file), n_ctx=max(512, prompt_tokens + new_tokens + 8),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = exact_prompt(model, prompt_tokens)

    def run(n: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = llm.sample(temp=0.0)
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return first - start, (n - 1) / max(time.perf_counter() - first, 1e-9)

    run(2)  # warm-up
    ttfts, rates = zip(*(run(new_tokens) for _ in range(repeats)), strict=True)
    return {"ttft_s": _stats(list(ttfts)), "decode_tok_s": _stats(list(rates)), "threads": threads}


def mlx_lm_baseline(model: Model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """mlx-lm's ``generate_step`` on the MLX backend's whole-model module (same weights), greedy;
    stats blocks of ``repeats`` runs after a warm-up."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from backends.mlx import MlxBackend

    backend = MlxBackend(dtype="f32")
    backend.load(model, 0, model.num_layers)
    prompt = mx.array(exact_prompt(model, prompt_tokens))

    def once() -> tuple[float, float]:
        start, first = time.perf_counter(), 0.0
        for i, _ in enumerate(generate_step(prompt, backend._model, max_tokens=new_tokens,
                                            sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))):
            if i == 0:
                first = time.perf_counter()
        return first - start, (new_tokens - 1) / (time.perf_counter() - first)

    once()
    runs = [once() for _ in range(repeats)]
    return {"ttft_s": _stats([r[0] for r in runs]), "decode_tok_s": _stats([r[1] for r in runs])}


def raw_socket_baseline(nbytes: int, round_trips: int = 300) -> dict[str, Any]:
    """Round trips (s) of ``nbytes`` over a plain loopback TCP socket (echoed back): the floor
    under a pipeline hop's transfer of a decode step's hidden states. ``round_trip_s`` is the
    median; ``round_trip`` its n, p50, quartiles, min and max (not every value)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    payload = b"\0" * nbytes
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(round_trips):
            start = time.perf_counter()
            client.sendall(payload)
            got = 0
            while got < nbytes:
                got += len(client.recv(nbytes - got))
            times.append(time.perf_counter() - start)
    listener.close()
    thread.join(timeout=5)
    rtt = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return {"round_trip_s": rtt, "round_trip": {"n": len(times), "p50": rtt, "q1": q1, "q3": q3,
                                                 "min": min(times), "max": max(times)},
            "bytes": nbytes, "throughput_bytes_per_s": 2 * nbytes / rtt}


# -- runs --------------------------------------------------------------------------------------
def _cluster_view(url: str, api_key: str | None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=30) as client:
        reply = client.get(url + "/v1/cluster", headers=headers)
        reply.raise_for_status()
        return dict(reply.json())


def run_once(url: str, model_id: str, content: str, new_tokens: int, concurrency: int, repeats: int,
             api_key: str | None = None) -> dict[str, Any]:
    """A warm-up batch, then ``repeats`` batches of ``concurrency`` concurrent requests; the
    ``results`` of a run record (see the module docstring), plus ``errors``."""
    def batch() -> tuple[list[dict[str, Any]], float]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            outs = list(pool.map(lambda _: stream_request(url, model_id, content, new_tokens, api_key=api_key),
                                 range(concurrency)))
        return outs, time.perf_counter() - start

    batch()
    outs: list[dict[str, Any]] = []
    throughputs = []
    for _ in range(repeats):
        got, wall = batch()
        outs += got
        throughputs.append(sum(o["tokens"] for o in got if o["ok"]) / wall)
    ok = [o for o in outs if o["ok"]]
    failures: dict[str, int] = {}
    for o in outs:
        if not o["ok"]:
            failures[o["failure"]] = failures.get(o["failure"], 0) + 1
    results: dict[str, Any] = {
        "requests": len(outs), "failed_requests": len(outs) - len(ok), "failures": failures,
        "prompt_tokens": ok[0]["prompt_tokens"] if ok else None,
        "ttft_s": _stats([o["ttft_s"] for o in ok]),
        "decode_tok_s": _stats([o["decode_tok_s"] for o in ok if o["decode_tok_s"]]),
        "tpot_s": _stats([1 / o["decode_tok_s"] for o in ok if o["decode_tok_s"]]),
        "throughput_tok_s": statistics.median(throughputs) if throughputs else None,
        "throughput": _stats(throughputs),
        "errors": sorted({str(o["error"]) for o in outs if not o["ok"]}),
    }
    try:  # what each stage spent computing, from the coordinator's recent requests
        info = _cluster_view(url, api_key)
        results.update(_stage_breakdown(info, len(outs)))
        predicted = (info.get("performance") or {}).get("predicted")
        results["predicted"] = {"ttft_s": predicted["ttft_s"], "decode_tok_s": predicted["decode_tokens_per_s"],
                                "prompt_tokens": predicted.get("prompt_tokens"),
                                "new_tokens": predicted.get("new_tokens")} if predicted else None
    except Exception as exc:  # noqa: BLE001 - a run's figures stand without the breakdown
        results["breakdown_error"] = f"{type(exc).__name__}: {exc}"
    return results


def run_status(results: dict[str, Any]) -> str:
    """``ok`` when every request succeeded, ``failed`` when none did, else ``partial``."""
    if results["failed_requests"] == 0:
        return "ok"
    return "failed" if results["failed_requests"] >= results["requests"] else "partial"


def _stage_breakdown(info: dict[str, Any], count: int) -> dict[str, Any]:
    """Mean per-stage compute s/token and transfer s/token over the last ``count`` requests."""
    recent = [r for r in (info.get("local") or {}).get("recent", []) if r.get("phase") == "finished"][:count]
    members = {m["id"]: m for m in info.get("members", [])}
    per_member: dict[str, list[float]] = {}
    prefill: dict[str, list[float]] = {}
    transfers = [r["transfer_s_per_token"] for r in recent if r.get("transfer_s_per_token") is not None]
    for r in recent:
        for s in r.get("stages", []):
            if s.get("decode_compute_s_per_token") is not None:
                per_member.setdefault(s["member"], []).append(s["decode_compute_s_per_token"])
            if s.get("prefill_compute_s") is not None:
                prefill.setdefault(s["member"], []).append(s["prefill_compute_s"])
    stages = []
    for member in dict.fromkeys([*prefill, *per_member]):
        m = members.get(member, {})
        stages.append({"member": member, "layers": [m.get("layer_start"), m.get("layer_end")],
                       "backend": m.get("backend"), "role": m.get("role"),
                       "prefill_compute_s": statistics.fmean(prefill[member]) if member in prefill else None,
                       "decode_compute_s_per_token": statistics.fmean(per_member[member])
                       if member in per_member else None})
    return {"stages": stages, "transfer_s_per_token": statistics.fmean(transfers) if transfers else None}


def _axis(text: str, kind: type, name: str, valid: tuple[str, ...] | None = None) -> list[Any]:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--{name} {text!r}: {exc}") from exc
    if not values:
        raise ConfigError(f"--{name} is empty")
    if valid is not None and any(v not in valid for v in values):
        raise ConfigError(f"--{name} {text!r}: valid values are {', '.join(valid)}")
    if kind is int and any(v < 1 for v in values):
        raise ConfigError(f"--{name} {text!r}: values must be >= 1")
    return values


def run_bench(args: argparse.Namespace) -> int:
    status = 0
    for name in [m.strip() for m in args.model.split(",") if m.strip()]:
        status |= _run_model(args, name)
    return status


def _run_model(args: argparse.Namespace, model_arg: str) -> int:
    """The whole matrix (and its baselines) for one ``--model``."""
    from tqdm import tqdm

    from mesh import registry

    backends = _axis(args.backend, str, "backend", tuple(registry.names("backend")))
    dtypes = _axis(args.dtype, str, "dtype", ("default", "f32", "f16", "bf16"))
    quantizes = _axis(args.quantize, str, "quantize", ("default", "none", "int8", "int4"))
    transports = _axis(args.transport, str, "transport", tuple(registry.names("transport")))
    nodes = _axis(args.nodes, int, "nodes")
    placements = _axis(args.placement, str, "placement", ("memory", "solver"))
    objectives = _axis(args.objective, str, "objective", ("ttft", "decode", "goodput"))
    prefill_nodes = [int(v) for v in args.prefill_nodes.split(",") if v.strip()] if args.prefill_nodes else [0]
    replicas = _axis(args.kv_replica_mb, float, "kv-replica-mb")
    prompts = _axis(args.prompt_tokens, int, "prompt-tokens")
    news = [max(2, n) for n in _axis(args.new_tokens, int, "new-tokens")]
    concurrencies = _axis(args.concurrency, int, "concurrency")
    model = Model(resolve_model(model_arg))
    machine = machine_profile()
    if args.url:  # the figures are the cluster's; this machine only sends the requests
        machine["role"] = "client"
    out: Path = args.out
    contents = {p: exact_chat_content(model, p) for p in prompts}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.1f} GiB; "
          f"commit {machine['commit']}; {machine['date']}; results -> {out}")
    summary: list[dict[str, Any]] = []

    def baseline(name: str, config: dict[str, Any], fn: Any) -> None:
        try:
            record = _record("baseline", machine, config, "ok", None, fn(), name=name)
        except Exception as exc:  # noqa: BLE001 - recorded, like a failed run
            record = _record("baseline", machine, config, "failed", f"{type(exc).__name__}: {exc}", None, name=name)
        append_jsonl(out, record)
        summary.append(record)

    if args.url and not args.no_baselines:
        print("baselines skipped: with --url they would measure this machine, not the cluster's")
    elif not args.no_baselines:
        for p in prompts:
            cfg = {"model": model.model_id, "prompt_tokens": p, "new_tokens": news[0]}
            baseline("transformers_generate", cfg, lambda p=p: transformers_baseline(model, p, news[0], args.repeats))
            if "mlx" in backends:
                baseline("mlx_lm_generate", cfg, lambda p=p: mlx_lm_baseline(model, p, news[0], args.repeats))
            if model.ref.gguf_file and importlib.util.find_spec("llama_cpp") is not None:
                baseline("llama_cpp", cfg, lambda p=p: llama_cpp_baseline(model, p, news[0], args.repeats))
        hidden_bytes = int(model.config.hidden_size) * 4
        baseline("raw_socket", {"bytes": hidden_bytes}, lambda: raw_socket_baseline(hidden_bytes))

    clusters = [None] if args.url else [c for c in itertools.product(backends, transports, nodes, placements, objectives,
                                                                      prefill_nodes, replicas, dtypes, quantizes)
                                         if c[5] < c[2]]
    runs = list(itertools.product(prompts, news, concurrencies))
    bar = tqdm(total=len(clusters) * len(runs), desc="bench", unit="run", disable=args.quiet)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        if not args.url:  # measured once, alone: nodes of one machine measuring at once get each other's load
            from mesh.placement.profile import load_or_measure_profile

            load_or_measure_profile(Path(tmp) / "profile", budget_s=1.0)
        for cluster_cfg in clusters:
            summary += _run_cluster(args, cluster_cfg, runs, model, model_arg, contents, machine, out, Path(tmp), bar)
    bar.close()
    _print_summary(summary)
    return 0 if all(r["status"] == "ok" for r in summary) else 1


def _run_cluster(args: argparse.Namespace, cluster_cfg: tuple[Any, ...] | None, runs: list[tuple[int, int, int]],
                 model: Model, model_arg: str, contents: dict[int, tuple[str, int]], machine: dict[str, Any], out: Path,
                 tmp: Path, bar: Any) -> list[dict[str, Any]]:
    """Every run on one cluster configuration (started here unless ``--url``); failures are records."""
    from mesh.testing.cluster import LocalCluster

    records = []
    cluster = None
    error = None
    base: dict[str, Any] = {"target": "url" if cluster_cfg is None else "local"}
    try:
        if cluster_cfg is None:
            url = args.url.rstrip("/")
            info = _cluster_view(url, args.api_key)
            base = {"backend": "+".join(sorted({m["backend"] for m in info["members"]})),
                    "transport": (info.get("security") or {}).get("transport"), "nodes": len(info["members"]),
                    "placement": None, "objective": None, "target": "url",
                    "members": [{k: m.get(k) for k in ("id", "backend", "role", "layer_start", "layer_end",
                                                       "memory_bytes", "address")} for m in info["members"]]}
        else:
            backend, transport, n, placement, objective, prefill, replica_mb, dtype, quantize = cluster_cfg
            base = {"backend": backend, "transport": transport, "nodes": n, "placement": placement,
                    "objective": objective, "prefill_nodes": prefill, "kv_replica_mb": replica_mb, "target": "local"}
            flags = []
            if dtype != "default":
                base["dtype"], flags = dtype, [*flags, "--dtype", dtype]
            if quantize != "default":
                base["quantize"], flags = quantize, [*flags, "--quantize", quantize]
            name = f"{backend}-{transport}-{n}-{placement}-{objective}-{prefill}-{replica_mb:g}-{dtype}-{quantize}"
            cluster = LocalCluster(n, tmp / name / model.model_id, model=model_arg, placement=placement,
                                   profile=tmp / "profile" / "profile.json",
                                   extra_args=["--backend", backend, "--transport", transport, "--objective", objective,
                                               "--kv-replica-mb", f"{replica_mb:g}", *flags],
                                   node_args=[["--role", "prefill"] if i < prefill else [] for i in range(n)])
            cluster.start()
            cluster.wait_ready(timeout_s=300)
            url = cluster.nodes[-1].api_url
            base["node_dtype"] = (_cluster_view(url, None).get("local") or {}).get("dtype")  # the node's choice
    except Exception as exc:  # noqa: BLE001 - a cluster that does not start fails its runs
        error = f"{type(exc).__name__}: {exc}"
    try:
        for prompt, new, concurrency in runs:
            config = {"model": model.model_id, **base, "prompt_tokens": prompt, "new_tokens": new,
                      "concurrency": concurrency}
            if error is not None:
                record = _record("run", machine, config, "failed", error, None)
            else:
                content, exact = contents[prompt]
                results = run_once(url, model.model_id, content, new, concurrency, args.repeats, args.api_key)
                results["prompt_tokens_exact"] = exact == prompt
                if cluster is not None:  # each node process's peak resident memory so far
                    results["node_peak_rss_bytes"] = [peak_rss_bytes(node.process.pid) for node in cluster.nodes]
                status = run_status(results)
                record = _record("run", machine, config, status,
                                 "; ".join(results["errors"]) if status != "ok" else None, results)
            append_jsonl(out, record)
            records.append(record)
            bar.update(1)
    finally:
        if cluster is not None:
            cluster.stop()
    return records


def peak_rss_bytes(pid: int) -> int | None:
    """A process's peak resident set size (``VmHWM`` of ``/proc/PID/status``, Linux), in bytes;
    None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _print_summary(records: list[dict[str, Any]]) -> None:
    print(f"{'configuration':<58} {'TTFT ms':>9} {'tok/s':>7} {'thru':>7}  status")
    for r in records:
        c, res = r["config"], r.get("results") or {}
        if r["kind"] == "baseline":
            label = f"baseline {r['name']} " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "model")
            ttft_sample = from_block(res.get("ttft_s")) or from_block(res.get("round_trip_s"))
            rate_sample = from_block(res.get("decode_tok_s"))
            ttft = ttft_sample.median if ttft_sample else None
            rate = rate_sample.median if rate_sample else None
            thru = None
        else:
            pd = f" pd{c['prefill_nodes']}" if c.get("prefill_nodes") else ""
            pd += " norep" if c.get("kv_replica_mb") == 0 else ""
            pd += f" {c['dtype']}" if c.get("dtype") else ""
            pd += f" q={c['quantize']}" if c.get("quantize") else ""
            label = (f"{c.get('backend')}/{c.get('transport')} x{c.get('nodes')}{pd} {c.get('placement')} "
                     f"p={c.get('prompt_tokens')} n={c.get('new_tokens')} c={c.get('concurrency')}")
            ttft = (res.get("ttft_s") or {}).get("p50")
            rate = (res.get("decode_tok_s") or {}).get("p50")
            thru = res.get("throughput_tok_s")

        def fmt(v: float | None, scale: float = 1.0, width: int = 7, digits: int = 1) -> str:
            return f"{v * scale:>{width}.{digits}f}" if isinstance(v, int | float) else f"{'-':>{width}}"
        status = r["status"] if r["status"] == "ok" else f"{r['status'].upper()}: {str(r.get('error'))[:60]}"
        print(f"{label[:58]:<58} {fmt(ttft, 1000, 9)} {fmt(rate)} {fmt(thru)}  {status}")
