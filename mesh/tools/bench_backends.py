"""``python -m mesh bench-backends``: the MLX backend, mixed-backend pipelines and
disaggregated prefill/decode, each as a ratio to a baseline measured in the same run.

1. in process, the MLX backend over every layer vs mlx-lm's own ``generate_step`` driving the
   very same mlx-lm module (same weights; greedy): our per-step overhead (target >= 0.95x
   decode tokens/s); the torch backend alongside for reference;
2. 2-node loopback clusters over HTTP: torch + torch (baseline) vs mlx + torch (a mixed
   pipeline);
3. 3-node loopback clusters: a plain 3-stage pipeline (baseline) vs one prefill node and two
   decode nodes (``--role prefill``, spec N13), TTFT and decode tokens/s;
4. predicted by the placement cost model (``mesh.placement.costmodel.predict``, not measured): the
   FLOP-rich + bandwidth-rich pair of ``bench-placement`` (DGX Spark + M3 Ultra Mac Studio,
   10 GbE, Llama-3.1 8B f16, 8192-token prompt), the solver's best plain plan vs its best
   disaggregated plan.

A program, not a test: this machine is shared and noisy, so only same-run ratios mean
anything. Prints a table; ``--json FILE`` appends one JSON line with the machine and commit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mesh.models import Model, resolve_model
from mesh.tools.benchutil import (
    append_jsonl,
    exact_prompt,
    machine_profile,
    stream_request,
    timed_runs,
)


def bench_mlx_in_process(model: Model, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """(TTFT s, decode tok/s) of the MLX backend, of mlx-lm's generate_step on the same
    module, and of the torch backend."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from backends.mlx import MlxBackend
    from backends.torch import TorchBackend

    def backend_run(backend: Any) -> tuple[float, float]:
        cache = backend.new_cache()
        start = time.perf_counter()
        out = backend.forward(cache, start_pos=0, token_ids=prompt)
        first = time.perf_counter()
        token, pos = int(np.argmax(out.logits)), len(prompt)
        for _ in range(new_tokens - 1):
            token = int(np.argmax(backend.forward(cache, start_pos=pos, token_ids=[token]).logits))
            pos += 1
        return first - start, (new_tokens - 1) / (time.perf_counter() - first)

    mlx_backend = MlxBackend(device="cpu", dtype="f32")
    mlx_backend.load(model, 0, model.num_layers)
    module = mlx_backend._model  # the whole mlx-lm model: embeddings, every layer, norm and head

    def upstream() -> tuple[float, float]:
        start = time.perf_counter()
        first = 0.0
        steps = generate_step(mx.array(prompt), module, max_tokens=new_tokens,
                              sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
        for i, (_token, _) in enumerate(steps):
            if i == 0:
                first = time.perf_counter()
        return first - start, (new_tokens - 1) / (time.perf_counter() - first)

    torch_backend = TorchBackend(device="cpu", dtype="f32")
    torch_backend.load(model, 0, model.num_layers)
    rows = {}
    for name, fn in (("mlx_lm_generate_step", upstream), ("mlx_backend", lambda: backend_run(mlx_backend)),
                     ("torch_backend", lambda: backend_run(torch_backend))):
        rows[name] = timed_runs(fn, repeats)
    return rows


def bench_cluster(name: str, n: int, node_args: list[list[str]], model: Model, model_arg: str, content: str,
                  new_tokens: int, repeats: int, workdir: Path) -> dict[str, Any]:
    """TTFT and decode tok/s over HTTP of an n-node loopback cluster (medians and every run, see
    ``timed_runs``); a failed request fails the configuration, recorded with its error."""
    from mesh.testing.cluster import LocalCluster

    try:
        with LocalCluster(n, workdir / name, model=model_arg, node_args=node_args) as cluster:
            cluster.wait_ready(timeout_s=300)
            url = cluster.nodes[-1].api_url
            prompt_tokens = 0

            def once() -> tuple[float, float]:
                nonlocal prompt_tokens
                out = stream_request(url, model.model_id, content, new_tokens)
                if not out["ok"] or out["decode_tok_s"] is None:
                    raise RuntimeError(f"a request failed: {out['error']}")
                prompt_tokens = out["prompt_tokens"]
                return out["ttft_s"], out["decode_tok_s"]

            figures = timed_runs(once, repeats)
        return {"nodes": n, "node_args": node_args, **figures, "prompt_tokens": prompt_tokens}
    except Exception as exc:  # noqa: BLE001 - a failed configuration is a result too
        return {"nodes": n, "node_args": node_args, "error": f"{type(exc).__name__}: {exc}"}


def predicted_disaggregation() -> dict[str, Any]:
    """The cost model's plain vs disaggregated plans for the FLOP-rich + bandwidth-rich pair."""
    from mesh.placement.solver import solve
    from mesh.tools.bench_placement import PROFILES
    from mesh.tools.plan_cmd import model_spec

    profile = next(p for p in PROFILES if p.name == "spark+studio")
    topology, spec = profile.build(0), model_spec(profile.models[0], "f16")
    out: dict[str, Any] = {"profile": profile.description, "model": profile.models[0],
                           "prompt_tokens": profile.request.prompt_tokens, "new_tokens": profile.request.new_tokens}
    for key, disaggregation in (("plain", False), ("disaggregated", True)):
        solution = solve(topology, spec, profile.request, objective="goodput", disaggregation=disaggregation,
                         tensor_parallel=False)
        p = solution.predicted
        out[key] = {"ttft_s": p.ttft_s, "decode_tok_s": p.decode_tokens_per_s, "e2e_s": p.e2e_s,
                    "plan": [[list(s.devices), s.layer_start, s.layer_end, s.role] for s in solution.plan.stages]}
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str, higher_better: bool) -> float | None:
    if "error" in a or "error" in b:
        return None
    return a[key] / b[key] if higher_better else b[key] / a[key]


def run_backends_bench(args: argparse.Namespace) -> int:
    model = Model(resolve_model(args.model))
    prompt = exact_prompt(model, args.prompt_tokens)
    content = model.tokenizer.decode(exact_prompt(model, max(1, args.prompt_tokens - 30)))
    profile = machine_profile()
    print(f"machine: {profile['cpu']}, {profile['cores']} cores; commit {profile['commit']}; {profile['date']}")
    print(f"model {model.model_id}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats} runs after a warm-up")
    results: dict[str, Any] = {"suite": "mesh-bench-backends", "schema": 2, "machine": profile,
                               "model": model.model_id, "prompt_tokens": args.prompt_tokens,
                               "new_tokens": args.new_tokens, "repeats": args.repeats}
    results["in_process"] = bench_mlx_in_process(model, prompt, args.new_tokens, args.repeats)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-backends-") as tmp:
        clusters: dict[str, tuple[int, list[list[str]]]] = {
            "torch+torch": (2, [[], []]),
            "mlx+torch": (2, [["--backend", "mlx"], []]),
            "plain 3 stages": (3, [[], [], []]),
            "1 prefill + 2 decode": (3, [["--role", "prefill"], [], []]),
        }
        results["clusters"] = {name: bench_cluster(name.replace(" ", "_").replace("+", "-"), n, node_args, model,
                                                   args.model, content, args.new_tokens, args.repeats, Path(tmp))
                               for name, (n, node_args) in clusters.items()}
    results["predicted"] = predicted_disaggregation()
    local, c, pred = results["in_process"], results["clusters"], results["predicted"]
    results["ratios"] = {
        "mlx_backend_vs_mlx_lm_decode": local["mlx_backend"]["decode_tok_s"] / local["mlx_lm_generate_step"]["decode_tok_s"],
        "mlx_backend_vs_mlx_lm_ttft": local["mlx_lm_generate_step"]["ttft_s"] / local["mlx_backend"]["ttft_s"],
        "mixed_vs_torch_decode": _ratio(c["mlx+torch"], c["torch+torch"], "decode_tok_s", True),
        "mixed_vs_torch_ttft": _ratio(c["mlx+torch"], c["torch+torch"], "ttft_s", False),
        "pd_vs_plain_decode": _ratio(c["1 prefill + 2 decode"], c["plain 3 stages"], "decode_tok_s", True),
        "pd_vs_plain_ttft": _ratio(c["1 prefill + 2 decode"], c["plain 3 stages"], "ttft_s", False),
        "predicted_pd_vs_plain_e2e": pred["plain"]["e2e_s"] / pred["disaggregated"]["e2e_s"],
    }
    r = results["ratios"]
    rows: list[tuple[str, dict[str, Any], float | None]] = [
        ("mlx-lm generate_step (baseline)", local["mlx_lm_generate_step"], 1.0),
        ("MLX backend, 1 stage", local["mlx_backend"], r["mlx_backend_vs_mlx_lm_decode"]),
        ("torch backend, 1 stage (reference)", local["torch_backend"], None),
        ("2 nodes torch+torch (baseline)", c["torch+torch"], 1.0),
        ("2 nodes mlx+torch", c["mlx+torch"], r["mixed_vs_torch_decode"]),
        ("3 nodes plain pipeline (baseline)", c["plain 3 stages"], 1.0),
        ("3 nodes: 1 prefill + 2 decode", c["1 prefill + 2 decode"], r["pd_vs_plain_decode"]),
    ]
    print(f"{'configuration':<40} {'TTFT ms':>9} {'decode tok/s':>13} {'ratio':>7}")
    for name, row, ratio in rows:
        if "error" in row:
            print(f"{name:<40} failed: {row['error'][:80]}")
            continue
        tail = f"{ratio:>6.2f}x" if ratio is not None else "      -"
        print(f"{name:<40} {row['ttft_s'] * 1000:>9.1f} {row['decode_tok_s']:>13.1f} {tail}")
    print(f"predicted ({pred['profile']}, {pred['model']}, {pred['prompt_tokens']}-token prompt):")
    for key in ("plain", "disaggregated"):
        p = pred[key]
        print(f"  {key:<14} TTFT {p['ttft_s']:.2f} s, decode {p['decode_tok_s']:.1f} tok/s, request {p['e2e_s']:.2f} s: "
              + ", ".join(f"{'+'.join(d)}[{a},{b}) {role}" for d, a, b, role in p["plan"]))
    if args.json:
        append_jsonl(args.json, results)
        print(f"appended to {args.json}")
    return 0
