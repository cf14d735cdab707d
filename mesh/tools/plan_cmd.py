"""``python -m mesh plan``: the placement solver on a topology file, from the command line.

Contract (kept stable; used from outside)::

    python -m mesh plan --topology FILE.json --model NAME_OR_DIR [--objective ttft|decode|goodput]
                        [--context N] [--bits B | --quantize none|int8|int4] [--json]

The topology file: ``{"devices": [{"id": str, "memory_bytes": int, "flops": float,
"memory_bandwidth_bytes_per_s": float, "backend": str}], "links": [{"a": id, "b": id,
"latency_s": float, "bandwidth_bytes_per_s": float}]}`` (a missing link: no direct link).
With ``--json`` one object is printed: ``{"feasible", "error", "stages": [{"devices",
"layer_start", "layer_end" (exclusive), "role"}], "memory_bytes": {id: int}, "predicted":
{"ttft_s", "decode_tokens_per_s", ...}, "baseline": {...the same for the memory-proportional
split, or null}}``. Exit status 0 when feasible, 2 when not (or on bad input).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mesh.errors import ConfigError, MeshError, PlacementError
from mesh.placement import planner
from mesh.placement.costmodel import Device, Link, ModelSpec, Topology
from mesh.placement.solver import OBJECTIVES, Request, Solution, solve

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}

# Published configs (config.json on the Hugging Face Hub) of models often placed, so plans
# can be made without the weights at hand.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(num_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-70b": dict(num_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-7b": dict(num_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064),
}


QUANTIZE_BITS = {"none": None, **planner.QUANTIZE_BITS}  # as a node loads them


def model_spec(name: str, dtype: str, bits: float | None = None) -> ModelSpec:
    """A known model by name, or any model ``mesh.models.resolve_model`` understands; a
    directory needs only its config.json (no weights are read). Matrices take ``bits`` per
    weight when given, else what an MLX-quantized config declares, else the dtype's bytes;
    a mixture-of-experts model keeps every expert resident and reads per token the experts it
    is routed to (``ModelSpec.from_counts``). Raises ConfigError naming ``--model``."""
    dtype_bytes = DTYPE_BYTES[dtype]
    if name in KNOWN_MODELS:
        spec = ModelSpec.from_dimensions(name=name, dtype_bytes=dtype_bytes, **KNOWN_MODELS[name])
        if bits is not None:  # a dense layer: its matrices are almost all of it
            spec = replace(spec, layer_bytes=int(spec.layer_bytes * bits / 8 / dtype_bytes),
                           embed_bytes=int(spec.embed_bytes * bits / 8 / dtype_bytes),
                           head_bytes=int(spec.head_bytes * bits / 8 / dtype_bytes))
        return spec
    from mesh.models import Model, resolve_model
    from mesh.placement.pipeline import quantization_bits

    try:
        model = Model(resolve_model(name, config_only=True))
        config = model.config
        return ModelSpec.from_counts(config, name=model.model_id, dtype_bytes=dtype_bytes,
                                     weight_bits=bits if bits is not None else quantization_bits(config))
    except (MeshError, ValueError) as exc:
        raise ConfigError(f"--model {name!r}: {exc}; known names for planning: {', '.join(KNOWN_MODELS)}") from exc


def _number(record: dict[str, Any], key: str, where: str, kind: type = float) -> Any:
    value = record.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise ConfigError(f"topology: {where}.{key} must be a {'whole' if kind is int else ''} number >= 0, "
                          f"got {value!r}".replace("a  number", "a number"))
    return value


def load_topology(path: Path) -> Topology:
    """Parse a topology file (see the module docstring). Raises ConfigError naming the field."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--topology {path}: cannot read it as JSON: {exc}") from exc
    return parse_topology(data)


def parse_topology(data: Any) -> Topology:
    """A topology from its JSON form (a file's content, or ``GET /v1/cluster``'s ``topology``).
    Raises ConfigError naming the field."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or not data["devices"]:
        raise ConfigError("topology: needs a non-empty \"devices\" list")
    devices = []
    for i, d in enumerate(data["devices"]):
        where = f"devices[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not d["id"]:
            raise ConfigError(f"topology: {where}.id must be a non-empty string")
        devices.append(Device(id=d["id"], memory_bytes=_number(d, "memory_bytes", where, int),
                              flops=float(_number(d, "flops", where)),
                              memory_bandwidth_bytes_per_s=float(_number(d, "memory_bandwidth_bytes_per_s", where)),
                              backend=str(d.get("backend", "torch"))))
    links = []
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        raise ConfigError("topology: \"links\" must be a list")
    for i, link in enumerate(raw_links):
        where = f"links[{i}]"
        if not isinstance(link, dict) or not isinstance(link.get("a"), str) or not isinstance(link.get("b"), str):
            raise ConfigError(f"topology: {where} needs device ids \"a\" and \"b\"")
        links.append(Link(a=link["a"], b=link["b"], latency_s=float(_number(link, "latency_s", where)),
                          bandwidth_bytes_per_s=float(_number(link, "bandwidth_bytes_per_s", where))))
    try:
        return Topology(devices=tuple(devices), links=tuple(links))
    except PlacementError as exc:
        raise ConfigError(f"topology: {exc}") from exc


def group_sizes(name: str) -> tuple[int, ...]:
    """The tensor-parallel group sizes model ``name`` splits into (``tensor_parallel_sizes``),
    pairs only when its config cannot be read here."""
    from mesh.models import Model, resolve_model, tensor_parallel_sizes

    if name in KNOWN_MODELS:
        return tensor_parallel_sizes(SimpleNamespace(**KNOWN_MODELS[name]))
    try:
        return tensor_parallel_sizes(Model(resolve_model(name, config_only=True)).config)
    except (MeshError, ValueError):
        return (2,)


def result_json(solution: Solution | None, error: str | None) -> dict[str, Any]:
    """The ``--json`` object of the contract."""
    if solution is None:
        return {"feasible": False, "error": error, "stages": [], "memory_bytes": {}, "predicted": None,
                "baseline": None}
    baseline = None
    if solution.baseline is not None and solution.baseline_predicted is not None:
        baseline = {"stages": solution.baseline.to_wire(), "predicted": solution.baseline_predicted.to_wire()}
    return {"feasible": True, "error": None, "stages": solution.plan.to_wire(), "memory_bytes": solution.memory_bytes,
            "predicted": solution.predicted.to_wire(), "baseline": baseline}


def run_plan(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology)
    if args.bits is not None and args.quantize is not None:
        raise ConfigError("give --bits or --quantize, not both")
    bits = args.bits if args.bits is not None else QUANTIZE_BITS.get(args.quantize or "none")
    model = model_spec(args.model, args.dtype, bits)
    context = args.context
    prompt = args.prompt_tokens if args.prompt_tokens is not None else max(1, min(context, context // 2))
    request = Request(context_tokens=context, prompt_tokens=min(prompt, context), new_tokens=args.new_tokens)
    start = time.perf_counter()
    try:
        solution: Solution | None = solve(topology, model, request, objective=args.objective,
                                          group_sizes=group_sizes(args.model))
        error = None
    except PlacementError as exc:
        solution, error = None, str(exc)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(result_json(solution, error)))
    elif solution is None:
        print(f"infeasible: {error}")
    else:
        p = solution.predicted
        print(f"plan for {model.name} ({model.num_layers} layers), objective {args.objective}, context {context}, "
              f"prompt {request.prompt_tokens}, {request.new_tokens} new tokens ({elapsed * 1000:.0f} ms, "
              f"{solution.candidates} candidates)")
        for s in solution.plan.stages:
            group = f" (a tensor-parallel group of {len(s.devices)})" if len(s.devices) > 1 else ""
            print(f"  {s.role:<8} layers [{s.layer_start:>3}, {s.layer_end:>3})  on {' + '.join(s.devices)}{group}")
        for d, nbytes in solution.memory_bytes.items():
            print(f"  memory {d}: {nbytes / 2**30:.2f} GiB of {topology.device(d).memory_bytes / 2**30:.2f} GiB")
        print(f"  predicted: TTFT {p.ttft_s:.3f} s, decode {p.decode_tokens_per_s:.1f} tok/s, "
              f"end to end {p.e2e_s:.3f} s")
        b = solution.baseline_predicted
        if b is not None:
            print(f"  memory-proportional split: TTFT {b.ttft_s:.3f} s, decode {b.decode_tokens_per_s:.1f} tok/s, "
                  f"end to end {b.e2e_s:.3f} s")
    return 0 if solution is not None else 2


def add_parser(sub: Any, add: Any, positive_int: Any) -> None:
    """Register ``plan`` on the CLI's subparsers (``add`` is the CLI's env-aware flag helper)."""
    plan = sub.add_parser("plan", help="place a model on a topology file and predict TTFT and tokens/s")
    add(plan, "--topology", type=Path, help="JSON file of devices and links (see `mesh/tools/plan_cmd.py`)")
    add(plan, "--model", default="smollm2-135m",
        help=f"a model name or directory ({', '.join(KNOWN_MODELS)} need no weights)")
    add(plan, "--objective", default="goodput", choices=OBJECTIVES,
        help="ttft: first token soonest; decode: most tokens/s; goodput: a whole request soonest")
    add(plan, "--context", type=positive_int, default=8192, help="context length in tokens to budget KV cache for")
    add(plan, "--prompt-tokens", type=positive_int, help="prompt length the plan is judged on (default: context / 2)")
    add(plan, "--new-tokens", type=positive_int, default=256, help="tokens generated per request")
    add(plan, "--dtype", default="f16", choices=tuple(DTYPE_BYTES), help="compute dtype of the weights")
    add(plan, "--bits", type=float, help="bits per weight the layers' matrices are stored in, scales included "
        "(e.g. 4.5 for 4-bit groups of 64; default: what the model's config declares, else the dtype's)")
    add(plan, "--quantize", choices=tuple(QUANTIZE_BITS),
        help="what `mesh node --quantize` would load: int8 (8.5 bits), int4 (5 bits), none (the dtype)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (the stable contract)")
