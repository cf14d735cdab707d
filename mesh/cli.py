"""Command line: ``python -m mesh node | key | plan | gym | plugins | faults | bench | bench-batching | bench-tp | bench-grammar | bench-backends | bench-kernel |
bench-transport | bench-placement | report``.

Every flag can also be set by an environment variable ``MESH_<FLAG>`` (dashes become
underscores, e.g. ``--api-port`` -> ``MESH_API_PORT``; a repeatable flag takes a
comma-separated list). A flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError, MeshError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _env_name(flag: str) -> str:
    return "MESH_" + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, *, help: str, type: Callable[[str], Any] = str,
         default: Any = None, repeat: bool = False, choices: Sequence[str] | None = None,
         short: str | None = None, hidden: bool = False) -> None:
    """Add ``flag`` whose default comes from ``MESH_<FLAG>`` when that is set; ``hidden``: a
    test-only flag, accepted but left out of ``--help`` (README "Flags" lists it)."""
    env = _env_name(flag)
    raw = os.environ.get(env)
    value = default
    if raw is not None and raw != "":
        try:
            value = [type(x.strip()) for x in raw.split(",") if x.strip()] if repeat else type(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{env}={raw!r} is invalid for {flag}: {exc}") from exc
        if choices is not None and not repeat and value not in choices:
            raise ConfigError(f"{env}={raw!r} is invalid for {flag}; valid: {', '.join(choices)}")
    if repeat:  # argparse's append would extend the env list; the command line replaces it
        parser.set_defaults(**{flag.lstrip("-").replace("-", "_") + "_env": value})
        value = None
    parser.add_argument(
        *([short] if short else []),
        flag,
        type=type,
        default=value,
        action="append" if repeat else "store",
        choices=choices,
        help=argparse.SUPPRESS if hidden else f"{help} [env {env}; default: {'none' if default in (None, []) else default}]",
    )


def _add_switch(parser: argparse.ArgumentParser, flag: str, *, help: str) -> None:
    """An on/off flag; ``MESH_<FLAG>`` = 1/true/yes/on (or 0/false/no/off) sets its default."""
    env = _env_name(flag)
    raw = os.environ.get(env, "").strip().lower()
    if raw and raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError(f"{env}={raw!r} is invalid for {flag}; valid: 1, true, yes, on, 0, false, no, off")
    parser.add_argument(flag, action="store_true", default=raw in ("1", "true", "yes", "on"),
                        help=f"{help} [env {env}; default: off]")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:  # argparse names the type by __name__ in its errors
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


_port.__name__ = "port"
_positive_int.__name__ = "positive integer"
_positive_float.__name__ = "positive number"


def build_parser() -> argparse.ArgumentParser:
    from mesh import registry
    from mesh.models import DEFAULT_MODEL
    from mesh.runtime.admission import MAX_QUEUED, MAX_RUNNING
    from mesh.runtime.batcher import MAX_BATCH, PREFILL_BATCH, PREFILL_CHUNK
    from mesh.runtime.prefix import PREFIX_CACHE_MB

    parser = argparse.ArgumentParser(prog="python -m mesh", description="mesh: one AI cluster from the devices you own")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a node: join the cluster, load a share of the model, serve the API")
    _add(node, "--host", default="0.0.0.0", help="address the mesh link listens on (links are authenticated "
         "and encrypted unless --insecure; discovery runs when this is not loopback)")
    _add(node, "--port", type=_port, default=7600, help="mesh link port (0 = any free port)")
    _add(node, "--api-host", default="127.0.0.1", help="address the HTTP API binds to")
    _add(node, "--api-port", type=_port, default=8000, help="HTTP API port")
    _add(node, "--peer", repeat=True, default=[], help="HOST:PORT of another node's mesh link (repeatable)")
    _add(node, "--model", default=DEFAULT_MODEL, help="built-in model name or a model directory / .gguf path")
    _add(node, "--backend", default="torch", choices=registry.names("backend") or None,
         help="compute backend (see `python -m mesh plugins`)")
    _add(node, "--transport", default="tcp", choices=registry.names("transport") or None, help="link transport")
    _add(node, "--data-dir", type=Path, default=Path("~/.mesh"), help="where the identity key, cluster key, node id and event log live")
    _add(node, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")
    _add(node, "--memory-bytes", type=int, help="memory this node offers, in bytes (default: available x fraction)")
    _add(node, "--memory-fraction", type=float, default=0.8, help="fraction of available memory to offer, in (0, 1]")
    _add(node, "--context", type=int, help="context length in tokens to budget KV cache for (default: the model's)")
    _add(node, "--heartbeat-s", type=_positive_float, default=0.5, help="seconds between heartbeats")
    _add(node, "--dead-after-s", type=_positive_float, default=3.0,
         help="seconds of silence before a link, and a member with no other link, is declared dead")
    _add(node, "--fault-plan", type=Path, help="fault injection for tests: links follow this JSON control file "
         "(mesh/node/fault_hooks.py); never on a real cluster", hidden=True)
    _add(node, "--fault-label", help="this node's name in --fault-plan partitions (default: its id)", hidden=True)
    _add(node, "--clock-offset-s", type=float, default=0.0, help="fault injection for tests: run this node's "
         "event clock this many seconds ahead of the wall clock", hidden=True)
    _add(node, "--drain-s", type=float, default=30.0, help="on SIGTERM or the first Ctrl-C, seconds the requests "
         "in flight may take to finish before the node exits (new ones are refused; a second signal exits at once)")
    _add(node, "--recovery-s", type=_positive_float, default=60.0,
         help="seconds a request may take, from a stage failure to its next token, to find a working plan")
    _add(node, "--role", default="any", choices=("any", "prefill", "decode"),
         help="prefill: this node prefills prompts and hands the KV cache to the decode members; decode: "
         "it decodes; any: the placement decides (a plan is disaggregated when a member asks for prefill)")
    _add(node, "--kv-replica-mb", type=float, default=512.0,
         help="MiB this node may keep of KV cache replicas of the requests it coordinates, so a request "
         "that loses a stage resumes instead of re-prefilling (0: off)")
    _add(node, "--max-running", type=int, default=MAX_RUNNING, help="requests this node coordinates at once; "
         "the next ones wait in order (continuous batching shares each stage among the running ones)")
    _add(node, "--max-queued", type=int, default=MAX_QUEUED, help="requests that may wait for a turn; beyond "
         "them a request is refused with HTTP 429 and Retry-After")
    _add(node, "--prefix-cache-mb", type=float, default=float(PREFIX_CACHE_MB), help="MiB of KV cache each stage keeps "
         "of prompt prefixes after a request ends, so a later request starting with the same tokens (the next "
         "turn of a chat, a shared system prompt) skips their prefill; counted off the memory placement uses (0: off)")
    _add(node, "--max-batch", type=int, default=MAX_BATCH, help="steps of different requests one batch at a "
         "stage may hold")
    _add(node, "--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens per prefill chunk: a long "
         "prompt goes in chunks between the running requests' decode steps, so they stall about one chunk")
    _add(node, "--prefill-batch", type=int, default=PREFILL_BATCH, help="prompt tokens one batch at a stage may "
         "hold (several chunks of one prompt run in one forward while nothing else runs; beside running "
         "requests a stage holds only what keeps their gap under about twice its usual length)")
    _add(node, "--api-key", help="if set, HTTP requests need 'Authorization: Bearer KEY'")
    _add(node, "--device", help="backend device, e.g. cpu, cuda, mps (default: the backend's choice)")
    _add(node, "--dtype", choices=("f32", "f16", "bf16"),
         help="compute dtype (default: f16 on GPU; on CPU bf16 where the device profile measured bf16 "
         "matmuls >= 1.5x f32 and the backend is torch, else f32)")
    _add(node, "--quantize", choices=("none", "int8", "int4"),
         help="weight-only quantization of a float model's linear layers as the stage loads (torch: torchao; "
         "mlx: mlx's own); none: dequantize what the files hold (default: keep the files' format where the "
         "backend runs it)")
    _add(node, "--cluster-key", help="the cluster's key (from `python -m mesh key` on the first node); "
         "links are authenticated with it (default: the key stored in --data-dir, made on first start)")
    _add_switch(node, "--remeasure", help="measure this device's profile again instead of using the cached one "
                "(after a hardware change, or when it was measured on a busy machine)")
    _add_switch(node, "--insecure", help="plaintext, unauthenticated links: for debugging only, never on a shared network")
    _add(node, "--discovery", default="on", choices=("on", "off"),
         help="announce this node and find peers by UDP multicast on every non-loopback interface")
    _add(node, "--discovery-port", type=_port, default=7601, help="UDP port of discovery announcements")
    _add(node, "--interface", help="advertise this interface's address to peers (default: one on a subnet "
         "shared with each peer; container and VPN interfaces only when pinned here)")

    _add(node, "--placement", default="solver", choices=("memory", "solver", "tensor"),
         help="solver: the placement solver on the members' measured profiles (leaves a member idle when it "
              "would only slow the pipeline); memory: layers in proportion to memory; tensor: one "
              "tensor-parallel group of the members with --tp-address (torch backend, float weights)")
    _add(node, "--tp-address", help="this host's IP address on a link you trust (e.g. a direct Thunderbolt or "
         "Ethernet cable): it may join tensor-parallel groups there, whose collectives (torch.distributed's gloo) "
         "are plaintext and unauthenticated; they listen on this address only (default: no tensor parallelism)")
    _add(node, "--objective", default="goodput", choices=("ttft", "decode", "goodput"),
         help="what the placement solver optimises")
    _add(node, "--replan-margin", type=float, default=0.15,
         help="a new solver plan for the same members replaces the serving one only when predicted at least "
              "this much better (a fraction), plus the cost of loading the layers that move")

    key = sub.add_parser("key", help="print this node's cluster key (made on first use) to give to other nodes")
    _add(key, "--data-dir", type=Path, default=Path("~/.mesh"), help="the node's data dir")

    sub.add_parser("plugins", help="list installed transports and backends with their distribution and version")

    bench = sub.add_parser("bench", help="run a matrix of configurations on loopback clusters (or --url) and "
                           "append every run, failures included, to a JSON-lines file")
    _add(bench, "--model", default=DEFAULT_MODEL, help="comma-separated built-in model names or model directories / "
         ".gguf paths")
    _add(bench, "--backend", default="torch", help="comma-separated backends, e.g. torch,mlx")
    _add(bench, "--dtype", default="default", help="comma-separated node --dtype values (f32, f16, bf16; default: "
         "the node's choice)")
    _add(bench, "--quantize", default="default", help="comma-separated node --quantize values (none, int8, int4; "
         "default: keep the files' format)")
    _add(bench, "--transport", default="tcp", help="comma-separated transports, e.g. tcp,quic")
    _add(bench, "--nodes", default="1,2,3", help="comma-separated cluster sizes")
    _add(bench, "--placement", default="memory", help="comma-separated placements: memory, solver")
    _add(bench, "--objective", default="goodput", help="comma-separated solver objectives: ttft, decode, goodput")
    _add(bench, "--prefill-nodes", default="0", help="comma-separated numbers of nodes started with --role prefill "
         "(0: a plain pipeline; k > 0: a disaggregated plan, k prefill nodes, the rest decode)")
    _add(bench, "--kv-replica-mb", default="512", help="comma-separated KV replica budgets of the nodes in MiB "
         "(0: off), to measure what the failover replica costs")
    _add(bench, "--prompt-tokens", default="64,512", help="comma-separated prompt lengths (chat template included)")
    _add(bench, "--new-tokens", default="32", help="comma-separated output lengths")
    _add(bench, "--concurrency", default="1,2", help="comma-separated numbers of concurrent requests")
    _add(bench, "--repeats", type=_positive_int, default=5, help="timed batches per run (after one warm-up batch)")
    _add(bench, "--url", help="bench a running cluster at this API URL instead of starting local ones")
    _add(bench, "--api-key", help="API key for --url")
    _add(bench, "--out", type=Path, default=Path("bench-results.jsonl"), help="JSON-lines file to append to")
    _add_switch(bench, "--no-baselines", help="skip the baselines (transformers, mlx-lm, llama.cpp, raw socket)")
    _add_switch(bench, "--quiet", help="no progress bar")
    _add(bench, "--log-level", default="warning", choices=LOG_LEVELS, help="log verbosity")

    bbench = sub.add_parser("bench-backends", help="measure the MLX backend against mlx-lm, a mixed mlx+torch "
                            "pipeline, and disaggregated prefill/decode against a plain pipeline")
    _add(bbench, "--model", default=DEFAULT_MODEL, help="built-in model name or a model directory / .gguf path")
    _add(bbench, "--prompt-tokens", type=_positive_int, default=128, help="prompt length in tokens")
    _add(bbench, "--new-tokens", type=_positive_int, default=32, help="tokens to generate per run")
    _add(bbench, "--repeats", type=_positive_int, default=5, help="timed runs per configuration (after one warm-up)")
    _add(bbench, "--json", type=Path, help="append results as one JSON line to this file")
    _add(bbench, "--log-level", default="warning", choices=LOG_LEVELS, help="log verbosity")
    kbench = sub.add_parser("bench-kernel", help="measure the kernel: apply rate, catch-up, convergence after a partition")
    _add(kbench, "--events", type=int, default=50_000, help="events for the apply-rate measurement")
    _add(kbench, "--json", type=Path, help="append results as one JSON line to this file")
    pbench = sub.add_parser("bench-placement", help="price the placement solver's plans against the "
                            "memory-proportional split and the best single device on cluster profiles")
    _add(pbench, "--seed", type=int, default=0, help="seed of the random cluster profiles")
    _add(pbench, "--json", type=Path, help="append results as one JSON line to this file")
    _add_switch(pbench, "--measured", help="instead, start 1-, 2- and 3-node clusters on 127.0.0.1 "
         "and compare the cost model's predictions with measured TTFT and decode tokens/s")
    _add(pbench, "--model", default="smollm2-135m", help="model for --measured (name or directory)")
    _add(pbench, "--new-tokens", type=_positive_int, default=32, help="tokens per request for --measured")
    _add(pbench, "--repeats", type=_positive_int, default=5, help="timed requests per configuration for --measured")
    from mesh.tools.bench_batching import add_parser as add_bench_batching
    from mesh.tools.bench_grammar import add_parser as add_bench_grammar
    from mesh.tools.bench_tp import add_parser as add_bench_tp
    from mesh.tools.gym_cmd import add_parser as add_gym
    from mesh.tools.plan_cmd import add_parser as add_plan

    add_bench_batching(sub, _add, _add_switch, _positive_int)
    add_bench_tp(sub, _add, _add_switch, _positive_int)
    add_bench_grammar(sub, _add, _add_switch, _positive_int)
    add_plan(sub, _add, _positive_int)
    add_gym(sub, _add, _add_switch, _positive_int)

    faults = sub.add_parser("faults", help="run the fault-injection scenarios on real clusters on 127.0.0.1 "
                            "and print what survived")
    _add_switch(faults, "--quick", help="only the quick set (what CI runs)")
    _add_switch(faults, "--json", help="print one JSON object with a 'scenarios' list instead of a table")
    _add(faults, "--only", repeat=True, help="run only this scenario (repeatable)")
    _add(faults, "--model", default="smollm2-135m", help="model the clusters serve (name or directory)")
    _add(faults, "--out", type=Path, help="append one JSON line per suite run to this file ({'suite': "
         "'mesh-faults', 'schema': 2, 'timestamp', 'machine', 'quick', 'scenarios': [rows]})")
    _add(faults, "--log-level", default="warning", choices=LOG_LEVELS, help="log verbosity")

    tbench = sub.add_parser("bench-transport", help="measure each transport's RTT and throughput on loopback "
                            "against a raw asyncio socket, plaintext and with TLS")
    _add(tbench, "--round-trips", type=int, default=2000, help="small-message ping-pongs per transport")
    _add(tbench, "--large-mib", type=int, default=16, help="size of each large message, in MiB")
    _add(tbench, "--large-count", type=int, default=16, help="large messages per transport (QUIC sends 1/8 as many)")
    _add(tbench, "--json", type=Path, help="append results as one JSON line to this file")

    publish = sub.add_parser("publish", help="regenerate the README's benchmark tables from the committed data in "
                             "benchmarks/ (--check: only say whether they match)")
    _add(publish, "--readme", type=Path, default=Path("README.md"), help="the Markdown file with published blocks")
    _add(publish, "--data", type=Path, default=Path("benchmarks"), help="folder of the JSON-lines data files")
    _add_switch(publish, "--check", help="write nothing; exit 1 when a published block differs from its data")

    report = sub.add_parser("report", help="write a static HTML report (tables, SVG plots) of bench results "
                            "that opens offline")
    report.add_argument("results", type=Path, nargs="+", help="JSON-lines files written by the bench commands")
    _add(report, "--output", short="-o", type=Path, default=Path("report.html"), help="HTML file to write")
    _add(report, "--title", default="mesh benchmark report", help="title of the report")
    return parser


class _NodeIdFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.node = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


def _setup_logging(level: str) -> _NodeIdFilter:
    node_filter = _NodeIdFilter()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(node_filter)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s node=%(node)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level != "debug":  # aioquic logs every connection's negotiation at INFO
        logging.getLogger("quic").setLevel(logging.WARNING)
        # torchao (imported by transformers for some architectures) warns at import about its
        # optional CUDA kernels, which a CPU build lacks by design
        logging.getLogger("torchao").setLevel(logging.ERROR)
    return node_filter


def _run_node(args: argparse.Namespace) -> int:
    from mesh.node.config import NodeConfig
    from mesh.node.node import Node
    from mesh.runtime.batcher import Batching
    from mesh.runtime.request_core import Timeouts

    node_filter = _setup_logging(args.log_level)
    config = NodeConfig(
        host=args.host, port=args.port, api_host=args.api_host, api_port=args.api_port,
        peers=tuple(args.peer if args.peer is not None else args.peer_env or ()), model=args.model, backend=args.backend, transport=args.transport,
        data_dir=args.data_dir, memory_bytes=args.memory_bytes, memory_fraction=args.memory_fraction,
        context=args.context, heartbeat_s=args.heartbeat_s, dead_after_s=args.dead_after_s,
        api_key=args.api_key, device=args.device, dtype=args.dtype, quantize=args.quantize,
        cluster_key=args.cluster_key,
        insecure=args.insecure, discovery=args.discovery == "on", discovery_port=args.discovery_port,
        interface=args.interface, placement=args.placement, objective=args.objective,
        timeouts=Timeouts(recovery_s=args.recovery_s), fault_plan=args.fault_plan, fault_label=args.fault_label,
        clock_offset_s=args.clock_offset_s, kv_replica_bytes=int(args.kv_replica_mb * 2**20),
        role=args.role, remeasure=args.remeasure, tp_address=args.tp_address, drain_s=args.drain_s, replan_margin=args.replan_margin,
        batching=Batching(max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                          prefill_batch=args.prefill_batch, max_running=args.max_running,
                          max_queued=args.max_queued, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20)),
    )
    node = Node(config)
    node_filter.node = node.member_id[:8]
    asyncio.run(node.run())
    return 0


def _run_key(args: argparse.Namespace) -> int:
    from mesh.security import (
        cluster_fingerprint,
        format_cluster_key,
        load_or_create_cluster_key,
    )

    data_dir = args.data_dir.expanduser()
    key = load_or_create_cluster_key(data_dir)
    print(format_cluster_key(key))
    print(f"cluster {cluster_fingerprint(key)}; start other nodes with --cluster-key KEY or MESH_CLUSTER_KEY=KEY "
          f"(keep it secret: it admits a machine to the cluster)", file=sys.stderr)
    return 0


def _run_plugins() -> int:
    from mesh import registry

    rows = registry.discover()
    print(f"{'kind':<10} {'name':<12} {'distribution':<20} {'version':<10} status")
    for p in rows:
        status = f"FAILED: {p.error}" if p.error else f"unavailable: {p.unavailable}" if p.unavailable else "ok"
        print(f"{p.kind:<10} {p.name:<12} {p.distribution:<20} {p.version:<10} {status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "node":
            return _run_node(args)
        if args.command == "plugins":
            return _run_plugins()
        if args.command == "key":
            return _run_key(args)
        if args.command == "plan":
            from mesh.tools.plan_cmd import result_json, run_plan

            try:
                if args.topology is None:
                    raise ConfigError("plan needs --topology FILE.json (devices and links; see `mesh/tools/plan_cmd.py`)")
                return run_plan(args)
            except MeshError as exc:
                if args.json:  # the contract: one object on stdout, bad input included
                    print(json.dumps(result_json(None, str(exc))))
                raise
        if args.command == "gym":
            from mesh.tools.gym_cmd import run_gym

            return run_gym(args)
        if args.command.startswith("bench-"):
            from mesh.tools.benchutil import run_recorded
        if args.command == "bench-tp":
            from mesh.tools.bench_tp import run_tp_bench

            _setup_logging(args.log_level)
            return run_recorded("mesh-bench-tp", args.json, lambda: run_tp_bench(args))
        if args.command == "bench-grammar":
            from mesh.tools.bench_grammar import run_grammar_bench

            _setup_logging(args.log_level)
            return run_recorded("mesh-bench-grammar", args.json, lambda: run_grammar_bench(args))
        if args.command == "bench-batching":
            from mesh.tools.bench_batching import run_batching_bench

            _setup_logging(args.log_level)
            return run_recorded("mesh-bench-batching", args.json, lambda: run_batching_bench(args))
        if args.command == "bench-backends":
            from mesh.tools.bench_backends import run_backends_bench

            _setup_logging(args.log_level)
            return run_recorded("mesh-bench-backends", args.json, lambda: run_backends_bench(args))
        if args.command == "bench":
            from mesh.tools.bench import run_bench

            _setup_logging(args.log_level)
            return run_bench(args)
        if args.command == "bench-transport":
            from mesh.tools.bench_transport import run_transport_bench

            return run_recorded("mesh-bench-transport", args.json, lambda: run_transport_bench(args))
        if args.command == "bench-kernel":
            from mesh.tools.bench_kernel import run_kernel_bench

            return run_recorded("mesh-bench-kernel", args.json, lambda: run_kernel_bench(args))
        if args.command == "faults":
            from mesh.tools.faults.run import run_faults_command
            from mesh.tools.faults.scenarios import SCENARIOS

            unknown = [n for n in args.only or [] if n not in SCENARIOS]
            if unknown:
                print(f"mesh: error: --only {unknown[0]!r} is not a scenario; valid: {', '.join(SCENARIOS)}",
                      file=sys.stderr)
                return 2
            _setup_logging(args.log_level)
            return run_faults_command(quick=args.quick, as_json=args.json, only=args.only, model=args.model,
                                      out=args.out)
        if args.command == "bench-placement" and args.measured:
            from mesh.tools.bench_measured import run_measured_bench

            return run_recorded("mesh-bench-placement-measured", args.json, lambda: run_measured_bench(
                model=args.model, new_tokens=args.new_tokens, repeats=args.repeats, json_path=args.json))
        if args.command == "bench-placement":
            from mesh.tools.bench_placement import run_placement_bench

            return run_recorded("mesh-bench-placement", args.json, lambda: run_placement_bench(args))
        if args.command == "publish":
            from mesh.tools.publish import run_publish

            return run_publish(args)
        if args.command == "report":
            from mesh.tools.report import run_report

            return run_report(args)
    except MeshError as exc:
        print(f"mesh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
