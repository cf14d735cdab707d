"""``python -m mesh bench``: decode tokens/s and TTFT, as ratios to baselines run alongside.

Three measurements, each after a warm-up and repeated (median reported):

1. in-process, the torch backend alone (one stage, all layers) vs transformers'
   ``generate()`` on the same dequantized weights, same prompt, greedy;
2. a real 1-node cluster (``python -m mesh node`` on 127.0.0.1) over HTTP streaming;
3. a real 2-node cluster on loopback (two stages) over HTTP streaming, as a ratio to (2).

TTFT is the time to the first generated token; decode tokens/s is (N - 1) / (time from the
first to the N-th token). Results print as a table and, with ``--json FILE``, are appended
as one JSON line with the machine, commit and date. This is a program, not a test: the
machine is shared and noisy, so only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.models import Model, resolve_model

FILLER = ("The quick brown fox jumps over the lazy dog while the river runs past old stone "
          "bridges and the wind moves through tall grass near the quiet village. ")


def machine_profile() -> dict[str, Any]:
    """Cores, memory, CPU model, Python/torch versions, commit and date of this run."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def exact_prompt(model: Model, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids of plain English text (no chat template)."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids = model.tokenizer.encode(FILLER * (1 + n_tokens // 8), add_special_tokens=False)
    return ids[:n_tokens]


def _logits(out: Any) -> Any:
    if out.logits is None:
        raise RuntimeError("a single stage over every layer must return logits")
    return out.logits


def _median_runs(fn: Callable[[], tuple[float, float]], repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    runs = [fn() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def bench_in_process(model: Model, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """(TTFT s, decode tok/s) of the torch backend and of transformers' generate()."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from backends.torch import TorchBackend

    backend = TorchBackend(device="cpu")
    backend.load(model, 0, model.num_layers)

    def ours() -> tuple[float, float]:
        cache = backend.new_cache()
        start = time.perf_counter()
        token = int(np.argmax(_logits(backend.forward(cache, start_pos=0, token_ids=prompt))))
        first = time.perf_counter()
        pos = len(prompt)
        for _ in range(new_tokens - 1):
            token = int(np.argmax(_logits(backend.forward(cache, start_pos=pos, token_ids=[token]))))
            pos += 1
        end = time.perf_counter()
        return first - start, (new_tokens - 1) / (end - first)

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if model.ref.gguf_file:
        kwargs["gguf_file"] = model.ref.gguf_file
    reference = AutoModelForCausalLM.from_pretrained(str(model.ref.path), **kwargs).eval()
    ids = torch.tensor([prompt])

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=model.config.eos_token_id)
        return time.perf_counter() - start

    def theirs() -> tuple[float, float]:
        ttft = generate(1)
        total = generate(new_tokens)
        return ttft, (new_tokens - 1) / max(total - ttft, 1e-9)

    ours_ttft, ours_tps = _median_runs(ours, repeats)
    ref_ttft, ref_tps = _median_runs(theirs, repeats)
    return {"torch_backend": {"ttft_s": ours_ttft, "decode_tok_s": ours_tps},
            "transformers_generate": {"ttft_s": ref_ttft, "decode_tok_s": ref_tps}}


def _stream_once(url: str, model_id: str, content: str, new_tokens: int) -> tuple[float, float, int]:
    import httpx

    body = {"model": model_id, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": new_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    stamps: list[float] = []
    prompt_tokens = completion = 0
    with httpx.Client(timeout=300) as client:
        start = time.perf_counter()
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                    completion = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        stamps.append(time.perf_counter())
    if completion < 2 or not stamps:
        raise RuntimeError("the stream produced fewer than 2 tokens")
    # Text pieces can hold several tokens (held back UTF-8 / stop checks): rate over tokens.
    return stamps[0] - start, (completion - 1) / max(stamps[-1] - stamps[0], 1e-9), prompt_tokens


def bench_cluster(n_nodes: int, model: Model, model_arg: str, content: str, new_tokens: int,
                  repeats: int, workdir: Path, extra_args: list[str] | None = None, tag: str = "") -> dict[str, Any]:
    from mesh.testing.cluster import LocalCluster

    with LocalCluster(n_nodes, workdir / f"cluster{n_nodes}{tag}", model=model_arg, extra_args=extra_args) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[-1].api_url
        prompt_tokens = 0

        def once() -> tuple[float, float]:
            nonlocal prompt_tokens
            ttft, tps, prompt_tokens = _stream_once(url, model.model_id, content, new_tokens)
            return ttft, tps

        ttft, tps = _median_runs(once, repeats)
    return {"nodes": n_nodes, "ttft_s": ttft, "decode_tok_s": tps, "prompt_tokens": prompt_tokens}


def run_bench(args: argparse.Namespace) -> int:
    model = Model(resolve_model(args.model))
    prompt = exact_prompt(model, args.prompt_tokens)
    content = model.tokenizer.decode(exact_prompt(model, max(1, args.prompt_tokens - 30)))
    profile = machine_profile()
    print(f"machine: {profile['cpu']}, {profile['cores']} cores, {profile['memory_bytes'] / 2**30:.1f} GiB, "
          f"torch {profile['torch']} ({profile['torch_threads']} threads); commit {profile['commit']}; {profile['date']}")
    print(f"model {model.model_id}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats} runs after a warm-up")
    results: dict[str, Any] = {"machine": profile, "model": model.model_id, "prompt_tokens": args.prompt_tokens,
                               "new_tokens": args.new_tokens, "repeats": args.repeats}
    local = bench_in_process(model, prompt, args.new_tokens, args.repeats)
    results.update(local)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        results["loopback_1_node"] = bench_cluster(1, model, args.model, content, args.new_tokens, args.repeats, Path(tmp))
        results["loopback_2_nodes"] = bench_cluster(2, model, args.model, content, args.new_tokens, args.repeats, Path(tmp))
        if args.kv_replica:  # spec FO8: what keeping the KV replica costs a request with no fault
            for tag, mib in (("off", "0"), ("on", "512")):
                results[f"loopback_3_nodes_replica_{tag}"] = bench_cluster(
                    3, model, args.model, content, args.new_tokens, args.repeats, Path(tmp),
                    extra_args=["--kv-replica-mb", mib], tag=f"-replica-{tag}")
    ours, ref = results["torch_backend"], results["transformers_generate"]
    one, two = results["loopback_1_node"], results["loopback_2_nodes"]
    results["ratios"] = {
        "torch_vs_generate_decode": ours["decode_tok_s"] / ref["decode_tok_s"],
        "torch_vs_generate_ttft": ref["ttft_s"] / ours["ttft_s"],
        "two_stages_vs_single_node_decode": two["decode_tok_s"] / one["decode_tok_s"],
        "two_stages_vs_single_node_ttft": one["ttft_s"] / two["ttft_s"],
    }
    rows = [
        ("transformers generate() (baseline)", ref, 1.0),
        ("torch backend, 1 stage, in-process", ours, results["ratios"]["torch_vs_generate_decode"]),
        ("1 node over HTTP (baseline)", one, 1.0),
        ("2 stages on loopback over HTTP", two, results["ratios"]["two_stages_vs_single_node_decode"]),
    ]
    if args.kv_replica:
        off, on = results["loopback_3_nodes_replica_off"], results["loopback_3_nodes_replica_on"]
        results["ratios"]["replica_on_vs_off_decode"] = on["decode_tok_s"] / off["decode_tok_s"]
        results["ratios"]["replica_on_vs_off_ttft"] = off["ttft_s"] / on["ttft_s"]
        rows += [("3 stages, KV replica off (baseline)", off, 1.0),
                 ("3 stages, KV replica on", on, results["ratios"]["replica_on_vs_off_decode"])]
    print(f"{'configuration':<38} {'TTFT ms':>9} {'decode tok/s':>13} {'ratio':>7}")
    for name, row, ratio in rows:
        print(f"{name:<38} {row['ttft_s'] * 1000:>9.1f} {row['decode_tok_s']:>13.1f} {ratio:>6.2f}x")
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(results) + "\n")
        print(f"appended to {args.json}")
    return 0
