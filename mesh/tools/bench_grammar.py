"""``python -m mesh bench-grammar``: what structured output costs and whether it always holds
(specs/api.md A27).

Two parts, both on the default model's tokenizer (SmolLM2, 49,152 tokens) unless ``--model``:

- ``kind: "grammar-library"``: the grammar engines side by side on one JSON schema, outside
  any node: compile time, and per token the time to fill the next-token mask and consume the
  token, walking the tokens of a valid document (``--repeats`` walks, medians). llguidance
  (what mesh uses) and xgrammar when installed (``pip install xgrammar``; it needs torch).
- ``kind: "grammar-node"``: a real node (``python -m mesh node`` on 127.0.0.1) serving the
  model; ``--requests`` chat requests with ``response_format`` ``json_schema`` (seeds 0..n-1,
  temperature 0.7) and the same requests without it, run one after the other, alternating.
  streamed. Recorded: the fraction whose answer parses and validates against the schema
  (jsonschema), finish reasons, and the time per output token of both (TPOT: from the first
  text to the last, over the tokens between; prefill left out, as the constrained answers are
  shorter); ``cost`` = constrained median TPOT / unconstrained - 1, the same-run baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mesh.tools.benchstats import stats_block
from mesh.tools.benchutil import append_jsonl, machine_profile

SUITE = "mesh-bench-grammar"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome", "Lima"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    "member": {"type": "boolean"}},
    "required": ["name", "age", "city", "hobbies", "member"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "city": "Paris", "hobbies": ["mathematics", "poetry"], "member": True}
PROMPT = ("Invent a person and describe them as JSON with the fields name, age, city (Paris, Oslo, Rome or Lima), "
          "hobbies (up to three) and member (true or false).")


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _walk(fill_and_consume: Any, ids: list[int]) -> list[float]:
    times = []
    for token in ids:
        started = time.perf_counter()
        fill_and_consume(token)
        times.append(time.perf_counter() - started)
    return times


def library_record(tokenizer: Any, repeats: int) -> dict[str, Any]:
    """Compile and per-token mask times of the grammar engines installed (see module)."""
    text = json.dumps(SCHEMA)
    ids = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    out: dict[str, Any] = {}
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    tokenizer_s = time.perf_counter() - started
    compile_s, per_token = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(text),
                                                                defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s.append(time.perf_counter() - started)
        mask = lnp.allocate_token_bitmask(1, lltok.vocab_size)

        def step(token: int, matcher: Any = matcher, mask: Any = mask) -> None:
            lnp.fill_next_token_bitmask(matcher, mask, 0)
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")

        per_token += _walk(step, ids)
    out["llguidance"] = {"version": _version("llguidance"),
                         "tokenizer_s": tokenizer_s, "compile_s": stats_block(compile_s),
                         "mask_s": stats_block(per_token), "tokens": len(ids)}
    try:
        import xgrammar
    except ImportError:
        out["xgrammar"] = None
    else:
        started = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        tokenizer_s = time.perf_counter() - started
        compile_s, per_token = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
            matcher = xgrammar.GrammarMatcher(compiled)
            compile_s.append(time.perf_counter() - started)
            bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

            def xstep(token: int, matcher: Any = matcher, bitmask: Any = bitmask) -> None:
                matcher.fill_next_token_bitmask(bitmask)
                if not matcher.accept_token(token):
                    raise RuntimeError(f"xgrammar refused token {token}")

            per_token += _walk(xstep, ids)
        out["xgrammar"] = {"version": _version("xgrammar"), "tokenizer_s": tokenizer_s,
                           "compile_s": stats_block(compile_s), "mask_s": stats_block(per_token), "tokens": len(ids)}
    return out


def client_models(api_url: str) -> list[str]:
    from mesh.testing.cluster import http_json

    _, listing = http_json(api_url + "/v1/models")
    return [m["id"] for m in listing["data"]]


def node_record(model: str, requests: int, max_tokens: int, workdir: Path) -> dict[str, Any]:
    """Constrained against unconstrained requests on a live node (see module)."""
    import jsonschema
    from openai import OpenAI

    from mesh.testing.cluster import LocalCluster

    with LocalCluster(1, workdir, model=model, extra_args=["--prefix-cache-mb", "0"]) as cluster:
        cluster.wait_ready(timeout_s=300)
        model = json.loads(json.dumps(client_models(cluster.nodes[0].api_url)))[0]
        client = OpenAI(base_url=cluster.nodes[0].api_url + "/v1", api_key="unused", timeout=300, max_retries=0)
        messages = [{"role": "user", "content": PROMPT}]
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
        client.chat.completions.create(model=model, messages=messages, max_tokens=8)  # warm up
        tpot: dict[str, list[float]] = {"constrained": [], "free": []}
        valid, finishes, tokens = 0, {}, {"constrained": 0, "free": 0}
        for seed in range(requests):
            for kind in ("constrained", "free"):
                extra = {"response_format": fmt} if kind == "constrained" else {}
                text, finish, n, first, last = "", None, 0, None, None
                stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=0.7, seed=seed, stream=True,
                                                        stream_options={"include_usage": True}, **extra)
                for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            last = time.perf_counter()
                            first = first or last
                            text += choice.delta.content
                        finish = choice.finish_reason or finish
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                tokens[kind] += n
                if first is not None and last is not None and n > 2:
                    tpot[kind].append((last - first) / (n - 2))  # decode only: first text to last, EOS left out
                if kind == "constrained":
                    finishes[str(finish)] = finishes.get(str(finish), 0) + 1
                    try:
                        jsonschema.validate(json.loads(text), SCHEMA)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        pass
        medians = {k: statistics.median(v) for k, v in tpot.items() if v}
        return {"requests": requests, "valid": valid, "valid_fraction": valid / requests, "finish_reasons": finishes,
                "tokens": tokens, "tpot_s": {k: stats_block(v) for k, v in tpot.items()},
                "cost": medians["constrained"] / medians["free"] - 1 if len(medians) == 2 else None}


def run_grammar_bench(args: argparse.Namespace) -> int:
    from mesh.models import Model, resolve_model

    model = Model(resolve_model(args.model))
    base = {"suite": SUITE, "schema": 2, "machine": machine_profile(), "status": "ok", "error": None}
    config = {"model": args.model, "schema": SCHEMA, "repeats": args.repeats}
    lib = library_record(model.tokenizer, args.repeats)
    append_jsonl(args.json, {**base, "kind": "grammar-library", "timestamp": base["machine"]["date"],
                             "config": config, "results": lib})
    for name, got in lib.items():
        if got:
            print(f"{name}: compile {got['compile_s']['p50'] * 1e3:.1f} ms, mask+consume "
                  f"{got['mask_s']['p50'] * 1e6:.0f} us/token (p50), max {got['mask_s']['max'] * 1e6:.0f} us")
    if args.requests:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-grammar-") as tmp:
            node = node_record(args.model, args.requests, args.max_tokens, Path(tmp))
        append_jsonl(args.json, {**base, "kind": "grammar-node", "timestamp": machine_profile()["date"],
                                 "config": {**config, "requests": args.requests, "max_tokens": args.max_tokens,
                                            "temperature": 0.7}, "results": node})
        print(f"node: {node['valid']}/{node['requests']} valid, finish {node['finish_reasons']}, TPOT constrained "
              f"{node['tpot_s']['constrained']['p50'] * 1e3:.1f} ms vs free {node['tpot_s']['free']['p50'] * 1e3:.1f} ms "
              f"(cost {node['cost']:+.1%})")
    return 0


def add_parser(sub: Any, add: Any, add_switch: Any, positive_int: Any) -> None:
    """The ``bench-grammar`` subcommand (``add``: the CLI's flag helper)."""
    p = sub.add_parser("bench-grammar", help="structured output: grammar engines' per-token cost, and a live node's "
                       "constrained requests (validity, TPOT against unconstrained)")
    add(p, "--model", default="smollm2-135m", help="model (name or directory)")
    add(p, "--repeats", type=positive_int, default=5, help="walks of the document per grammar engine")
    add(p, "--requests", type=int, default=50, help="constrained requests on a live node (0: library part only)")
    add(p, "--max-tokens", type=positive_int, default=160, help="max_tokens of each request")
    add(p, "--json", type=Path, default=Path("benchmarks/grammar.jsonl"), help="append the records here")
    add(p, "--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="log verbosity")
