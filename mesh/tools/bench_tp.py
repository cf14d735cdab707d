"""``python -m mesh bench-tp``: tensor-parallel decode on loopback against one device, with the
cost model's prediction beside each size (specs/backend.md B19, specs/placement.md P10, P19).

For each group size k (``--sizes``, 1 = one device alone) and repeat, on this machine:

- ``k = 1``: a whole-model stage of ``--backend`` (torch or mlx) in a process of its own with
  every core (``threads`` = the machine's cores), decode steps after a ``--prompt``-token
  prompt: the median step.
- ``k >= 2``: that library's group (``TorchGroupBackend`` or ``MlxGroupBackend``, B19/B20) led
  from this process, its k member processes on 127.0.0.1 with ``cores // k`` threads each (as
  k machines of that many cores would; more threads than cores when k does not divide them,
  which the record says; MLX takes no thread count: its members share the cores as the
  system gives them), the same steps through the leader, and the group's own all-reduce of
  one token's hidden state, timed (``probe``). This is the runtime's whole path: pipe to the
  leader, the command to the members, the split layers and their all-reduces, the head on
  every member.

The prediction is the cost model's (``mesh.placement.costmodel.predict``) on a topology of k
devices, each this machine's profile (FLOP/s, bandwidth) scaled to its threads and
calibrated by timing a whole stage at that many threads (``time_stage`` and
``fit_calibration``, as a node does), linked by this machine's loopback TCP as measured here
(median round trip / 2, throughput of a bulk transfer). The predicted all-reduce is the cost
model's ring formula on that link. ``error`` = measured / predicted step - 1. A second
prediction, ``predicted_calibrated_step_s`` (``error_calibrated``), takes the link latency
from the all-reduces as the group's decode steps ran them (``allreduce_in_steps_s``: their
mean time inside the steps, waiting for the slowest member included; ``allreduce_s`` is the
same collective run back to back; MLX's lazy steps do not time their collectives apart, so
an MLX group's calibrated prediction takes the back-to-back figure) instead (``probed_link``): the compute model and the
all-reduce term's form checked against the whole step, the collective's cost measured as a
node's calibration measures its layers.

Records (``suite: "mesh-bench-tp"``, ``schema: 2``, ``kind: "tp"``), one per size, in
``--json``: ``config`` (model dimensions, dtype, prompt, steps, k, threads per member, cores,
``oversubscribed``), ``results`` (``step_s`` and ``allreduce_s`` stats blocks over repeats,
``tok_s``, ``predicted_step_s``, ``predicted_allreduce_s``, ``error``, the link figures).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mesh.tools.benchstats import stats_block
from mesh.tools.benchutil import append_jsonl, machine_profile

SUITE = "mesh-bench-tp"
# a Llama-shaped model of about 110M parameters whose heads split 2, 3 and 6 ways (the default
# model's 9 heads and 3 KV heads split only 3 ways); random weights: the speed is the shape's
DIMENSIONS = dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=6, vocab_size=32000, max_position_embeddings=4096)


def build_model(folder: Path, dtype: str) -> Path:
    """Write the benchmark's random-weight model (``DIMENSIONS``) to ``folder`` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.torch import TORCH_DTYPES

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DIMENSIONS, tie_word_embeddings=False)).to(TORCH_DTYPES[dtype])
    model.save_pretrained(folder)
    return folder


def decode_steps(backend: Any, prompt: int, steps: int) -> float:
    """The median seconds of ``steps`` decode steps after a ``prompt``-token prefill (the first
    three left out: they warm the caches up)."""
    cache = backend.new_cache()
    backend.forward(cache, start_pos=0, token_ids=[5 + i % 100 for i in range(prompt)])
    times = []
    for i in range(steps + 3):
        started = time.perf_counter()
        backend.forward(cache, start_pos=prompt + i, token_ids=[7])
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def _alone(folder: str, threads: int, dtype: str, prompt: int, steps: int, flops: float, bandwidth: float,
           queue: Any, library: str = "torch") -> None:
    """A spawned process: one whole-model stage of ``library`` on ``threads`` threads (torch);
    puts (median decode step s, calibration dict) on ``queue``, or ("error", text)."""
    try:
        import torch

        torch.set_num_threads(threads)
        from mesh.models import Model, resolve_model
        from mesh.placement.calibrate import fit_calibration, time_stage
        from mesh.placement.costmodel import head_s
        from mesh.placement.planner import model_spec

        model = Model(resolve_model(folder))
        backend = _whole(library, dtype)
        backend.load(model, 0, model.num_layers)
        step = decode_steps(backend, prompt, steps)
        spec = model_spec(model.config, model.model_id, dtype)
        prefill, decode, head = time_stage(backend, hidden_size=int(model.config.hidden_size))
        cal = fit_calibration(model=spec, layers=model.num_layers, prefill_s=prefill, decode_s=decode,
                              head_s=head_s(spec, flops, bandwidth), flops=flops, measured_head_s=head)
        queue.put((step, cal.to_wire()))
    except Exception as exc:  # noqa: BLE001 - the bench records what failed
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _whole(library: str, dtype: str) -> Any:
    """A single-device CPU stage of ``library`` (``torch`` or ``mlx``), float weights."""
    if library == "mlx":
        from backends.mlx import MlxBackend

        return MlxBackend(device="cpu", dtype=dtype, quantize="none")
    from backends.torch import TorchBackend

    return TorchBackend(device="cpu", dtype=dtype, quantize="none")


def alone(folder: Path, threads: int, dtype: str, prompt: int, steps: int, flops: float,
          bandwidth: float, library: str = "torch") -> tuple[float, dict[str, Any]]:
    """``_alone`` in a fresh process (its own OpenMP pool, as a node's); raises RuntimeError."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_alone, args=(str(folder), threads, dtype, prompt, steps, flops, bandwidth, queue,
                                               library))
    process.start()
    try:
        got = queue.get(timeout=600)
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    if got[0] == "error":
        raise RuntimeError(got[1])
    return got


def group(folder: Path, k: int, threads: int, dtype: str, prompt: int, steps: int,
          library: str = "torch") -> tuple[float, float, float | None]:
    """(median decode step s, median all-reduce s back to back, mean all-reduce s inside the
    decode steps or None where the library does not say) of a k-member group of ``library``
    on 127.0.0.1."""
    from backends.group import GroupMember, GroupSpec
    from backends.group_wire import parse_rendezvous
    from mesh.models import Model, resolve_model
    from mesh.node.groups import LIBRARIES

    backend_class = LIBRARIES[library]

    model = Model(resolve_model(str(folder)))
    members: list[GroupMember] = []

    def join(rendezvous: str) -> None:
        host, port, secret = parse_rendezvous(rendezvous)  # type: ignore[misc]
        for rank in range(1, k):
            member = backend_class.member(GroupSpec(rank=rank, world=k, address=host, port=port, threads=threads,
                                           timeout_s=60, secret=secret), model, 0, model.num_layers, dtype)
            member.start()
            members.append(member)
            threading.Thread(target=member.ready, daemon=True).start()

    backend = backend_class(group=GroupSpec(rank=0, world=k, address="127.0.0.1", threads=threads, timeout_s=60,
                                                secret=secrets.token_hex(16)), dtype=dtype, rendezvous=join)
    try:
        backend.load(model, 0, model.num_layers)
        backend.allreduce_s(1)  # clears the load's and warm-up's collectives
        step = decode_steps(backend, prompt, steps)
        alone, in_steps = backend.allreduce_s(200)
        return step, alone, in_steps
    finally:
        backend.unload()
        for member in members:
            member.process.join(10)
            member.stop()


def loopback_link() -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of this machine's loopback TCP: half the median round
    trip of a 64-byte message, and the rate of 4 MiB echoed back (``bench.raw_socket_baseline``).
    Why not the mesh link's own probe: a group's collectives run on plain TCP (gloo), not on
    the mesh's TLS links."""
    from mesh.tools.bench import raw_socket_baseline

    small, bulk = raw_socket_baseline(64, round_trips=400), raw_socket_baseline(4 << 20, round_trips=10)
    return small["round_trip_s"] / 2, bulk["throughput_bytes_per_s"]


def probed_link(k: int, allreduce: float, nbytes: int, bandwidth: float) -> tuple[float, float]:
    """The link (latency s, bandwidth bytes/s) under which the cost model's ring all-reduce of
    ``nbytes`` among k takes ``allreduce`` seconds, bandwidth kept: what a group's measured
    collectives say of its link (software included: gloo's per-message work dwarfs loopback's
    round trip)."""
    latency = (allreduce - 2 * (k - 1) / k * nbytes / bandwidth) / (2 * (k - 1))
    return max(latency, 0.0), bandwidth


def predict_step(k: int, threads: int, cores: int, profile: Any, dtype: str, calibration: dict[str, Any],
                 spec: Any, link: tuple[float, float], prompt: int, steps: int) -> tuple[float, float]:
    """(predicted decode step s, predicted all-reduce s) of k members of ``threads`` threads
    each on this machine (its profile scaled by threads / cores), calibrated as measured."""
    from mesh.placement.costmodel import (
        Calibration,
        Device,
        Link,
        PlacementPlan,
        StagePlan,
        Topology,
        allreduce_s,
        predict,
    )

    share = threads / cores
    cal = Calibration(**calibration)
    devices = tuple(Device(id=f"m{i}", memory_bytes=1 << 40, flops=profile.flops[dtype] * share,
                           memory_bandwidth_bytes_per_s=profile.memory_bandwidth_bytes_per_s * share,
                           calibration=cal) for i in range(k))
    links = tuple(Link(a=a.id, b=b.id, latency_s=link[0], bandwidth_bytes_per_s=link[1])
                  for i, a in enumerate(devices) for b in devices[i + 1:])
    plan = PlacementPlan(stages=(StagePlan(devices=tuple(d.id for d in devices), layer_start=0,
                                           layer_end=spec.num_layers),))
    p = predict(plan, Topology(devices=devices, links=links), spec, prompt_tokens=prompt, new_tokens=steps)
    return 1.0 / p.decode_tokens_per_s, allreduce_s(k, spec.hidden_bytes, link[1], link[0])


def run_tp_bench(args: argparse.Namespace) -> int:
    from mesh.identity import host_dir
    from mesh.models import Model, resolve_model
    from mesh.placement.planner import model_spec
    from mesh.placement.profile import load_or_measure_profile

    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="mesh-bench-tp-") as tmp:
        folder = Path(args.model) if args.model else build_model(Path(tmp) / "tp-bench", args.dtype)
        model = Model(resolve_model(str(folder)))
        spec = model_spec(model.config, model.model_id, args.dtype)
        # the machine's roofline figures are measured with torch (profiles are torch's: P7); the
        # calibration below times the library's own stage, which is what fits its speed
        profile = load_or_measure_profile(Path(tmp), backend="torch", device="cpu", memory_fraction=0.8,
                                          budget_s=1.0, shared_dir=host_dir())
        link = loopback_link()
        print(f"loopback link: {link[0] * 1e6:.0f} us, {link[1] / 1e9:.2f} GB/s; profile {args.dtype} "
              f"{profile.flops[args.dtype] / 1e9:.0f} GFLOP/s, {profile.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s")
        failures = 0
        for k in sizes:
            threads = max(1, cores // k)
            steps_s, reduces, in_steps, cals = [], [], [], []  # in_steps: torch only
            error = None
            try:
                for _ in range(args.repeats):
                    share = threads / cores
                    step, cal = alone(folder, threads, args.dtype, args.prompt, args.steps,
                                      profile.flops[args.dtype] * share, profile.memory_bandwidth_bytes_per_s * share,
                                      args.backend)
                    cals.append(cal)
                    if k == 1:
                        steps_s.append(step)
                    else:
                        step, reduce, inside = group(folder, k, threads, args.dtype, args.prompt, args.steps,
                                                     args.backend)
                        steps_s.append(step)
                        reduces.append(reduce)
                        if inside is not None:
                            in_steps.append(inside)
            except Exception as exc:  # noqa: BLE001 - recorded, and the other sizes still run
                error, failures = f"{type(exc).__name__}: {exc}", failures + 1
            results = None
            if steps_s:
                fastest = min(cals, key=lambda c: c["decode_layer_s"])  # a busy moment only slows a timing
                predicted, predicted_reduce = predict_step(k, threads, cores, profile, args.dtype, fastest, spec,
                                                           link, args.prompt, args.steps)
                measured = statistics.median(steps_s)
                results = {"step_s": stats_block(steps_s), "tok_s": 1.0 / measured,
                           "allreduce_s": stats_block(reduces), "allreduce_in_steps_s": stats_block(in_steps),
                           "predicted_step_s": predicted,
                           "predicted_allreduce_s": predicted_reduce if k > 1 else 0.0,
                           "error": measured / predicted - 1, "calibration": fastest,
                           "link": {"latency_s": link[0], "bandwidth_bytes_per_s": link[1]}}
                if reduces:  # the same model, its all-reduce term as the group measured it (in its steps: torch)
                    probed = probed_link(k, statistics.median(in_steps or reduces), spec.hidden_bytes, link[1])
                    calibrated, _ = predict_step(k, threads, cores, profile, args.dtype, fastest, spec, probed,
                                                 args.prompt, args.steps)
                    results |= {"predicted_calibrated_step_s": calibrated, "error_calibrated": measured / calibrated - 1}
                print(f"k={k}: decode step {measured * 1e3:.1f} ms ({1 / measured:.1f} tok/s), predicted "
                      f"{predicted * 1e3:.1f} ms ({(measured / predicted - 1) * 100:+.0f} %)"
                      + (f"; all-reduce {statistics.median(reduces) * 1e6:.0f} us alone, "
                         + (f"{statistics.median(in_steps) * 1e6:.0f} us in steps, " if in_steps else "")
                         + f"predicted "
                         f"{predicted_reduce * 1e6:.0f} us; with the measured all-reduce: predicted "
                         f"{results['predicted_calibrated_step_s'] * 1e3:.1f} ms "
                         f"({results['error_calibrated'] * 100:+.0f} %)" if reduces else ""))
            append_jsonl(args.json, {
                "suite": SUITE, "schema": 2, "kind": "tp",
                "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "machine": machine_profile(),
                "config": {"model": model.model_id if args.model else "random llama (bench-tp DIMENSIONS)",
                           "dimensions": {k2: int(getattr(model.config, k2)) for k2 in DIMENSIONS},
                           "backend": args.backend, "dtype": args.dtype, "prompt": args.prompt, "steps": args.steps, "size": k,
                           "threads": threads, "cores": cores, "oversubscribed": k * threads > cores,
                           "repeats": args.repeats},
                "status": "ok" if error is None else ("partial" if results else "failed"), "error": error,
                "results": results})
    return 1 if failures else 0


def add_parser(sub: Any, add: Any, add_switch: Any, positive_int: Any) -> None:
    """The ``bench-tp`` subcommand (``add``/``add_switch``: the CLI's flag helpers)."""
    p = sub.add_parser("bench-tp", help="tensor-parallel decode on loopback (groups of --sizes) against one device, "
                       "with the cost model's prediction beside each")
    add(p, "--model", help="a model directory (default: a random-weight 110M Llama whose heads split 2 and 3 ways)")
    add(p, "--sizes", default="1,2,3", help="comma-separated group sizes (1: one device alone)")
    add(p, "--backend", default="torch", choices=("torch", "mlx"), help="the library of the stages and groups")
    add(p, "--dtype", default="bf16", choices=("f32", "bf16"), help="compute dtype")
    add(p, "--prompt", type=positive_int, default=64, help="prompt tokens before the decode steps")
    add(p, "--steps", type=positive_int, default=40, help="decode steps timed per run")
    add(p, "--repeats", type=positive_int, default=3, help="runs per size")
    add(p, "--json", type=Path, default=Path("benchmarks/tensor-parallel.jsonl"), help="append the records here")
    add(p, "--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="log verbosity")
