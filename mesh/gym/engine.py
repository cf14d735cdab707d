"""The gym's training loop, one code path for both engines (specs/gym.md G5-G9).

``Run.train`` drives the nodes this process computes through the steps: rejoins, each live
node's batch, forward and backward, ``Strategy.step``; then every node's (payload, loss) is
gathered through a ``Comm`` and the same code combines them everywhere. Two ``Comm``s:

- ``LocalComm``: every node in this process, in turn (fast, for sweeps);
- ``DistComm``: one process per node on ``torch.distributed`` (gloo on CPU), exchanging
  payloads with ``all_gather_object`` and a rejoining node's state with
  ``broadcast_object_list``.

The all-reduce's mean is summed in node order from the gathered payloads in both, so both
engines compute the same bits for the same seed (a library all-reduce would sum in its own
order). Simulated time (``SimClock``) is computed by every process from the same schedule.
A node's data: its shard's blocks in a fresh permutation each epoch (``numpy`` generator seeded
by the run's seed and the node id).

Failures (``Failure``): node i stops computing at step ``at`` and is left out of the syncs; at
``back`` (if given) it takes the state of the lowest-numbered live node and goes on.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mesh.errors import ConfigError
from mesh.gym import model as gym_model
from mesh.gym.corpus import Data
from mesh.gym.simclock import SimClock
from mesh.gym.strategy import Node, Strategy, tensor_bytes
from mesh.placement.costmodel import Topology

EVAL_BATCH = 16
SCHEDULES = ("constant", "cosine")
MIN_LR_SHARE = 0.1  # where the cosine schedule ends, as a share of lr


@dataclass(frozen=True, slots=True)
class Failure:
    """Node ``node`` is down from step ``at`` (inclusive) until step ``back`` (None: for good)."""

    node: int
    at: int
    back: int | None = None

    def down(self, t: int) -> bool:
        return self.at <= t and (self.back is None or t < self.back)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    nodes: int = 4
    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    model_size: str = "small"
    seed: int = 0
    eval_every: int = 50
    threads: int = 1
    mfu: float = 0.5
    failures: tuple[Failure, ...] = ()
    schedule: str = "constant"
    warmup: int = 0

    def lr_scale(self, t: int) -> float:
        """The node optimizers' learning rate at step ``t`` as a share of ``lr``: 1 (``constant``),
        or (``cosine``) a linear warmup over ``warmup`` steps, then a cosine decay to
        ``MIN_LR_SHARE`` at the last step (Loshchilov & Hutter 2017, "SGDR"; the schedule of
        DiLoCo's inner optimizer)."""
        if self.schedule == "constant":
            return 1.0
        if t < self.warmup:
            return (t + 1) / self.warmup
        span = max(1, self.steps - self.warmup - 1)
        return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - self.warmup) / span)))

    def check(self) -> None:
        """ConfigError naming the field for a value out of range or a schedule that leaves no
        node alive at some step."""
        for name in ("nodes", "steps", "batch", "seq_len", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"--warmup-steps must be in 0..{self.steps - 1}, got {self.warmup}")
        for f in self.failures:
            if not 0 <= f.node < self.nodes or not 0 <= f.at < self.steps or (f.back is not None and f.back <= f.at):
                raise ConfigError(f"--fail {f.node}@{f.at}{'' if f.back is None else f':{f.back}'}: needs a node "
                                  f"in 0..{self.nodes - 1}, a step in 0..{self.steps - 1} and a later return step")
        for a, b in ((a, b) for i, a in enumerate(self.failures) for b in self.failures[i + 1:]):
            if a.node == b.node and a.at < (b.back if b.back is not None else self.steps) \
                    and b.at < (a.back if a.back is not None else self.steps):
                raise ConfigError(f"--fail: node {a.node} has two failures that overlap")
        if self.warmup and self.schedule != "cosine":
            raise ConfigError("--warmup-steps needs --schedule cosine")
        for t in range(self.steps):
            if all(self.down(i, t) for i in range(self.nodes)):
                raise ConfigError(f"--fail: every node is down at step {t}")

    def down(self, node: int, t: int) -> bool:
        return any(f.node == node and f.down(t) for f in self.failures)

    def live(self, t: int) -> list[int]:
        return [i for i in range(self.nodes) if not self.down(i, t)]


class LocalComm:
    """Every node in this process: gathering is the identity."""

    def gather(self, local: dict[int, Any]) -> dict[int, Any]:
        return local

    def broadcast(self, obj: Any, src: int) -> Any:
        return obj


class DistComm:
    """One node per process (its rank) on an initialised ``torch.distributed`` group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.size = dist.get_world_size()

    def gather(self, local: dict[int, Any]) -> dict[int, Any]:
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, local)
        merged: dict[int, Any] = {}
        for part in out:
            merged.update(part)
        return merged

    def broadcast(self, obj: Any, src: int) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=src)
        return box[0]


def combine(collective: str, payloads: list[list[torch.Tensor]]) -> Any:
    """A sync's result from the live nodes' payloads in node order: the mean of each tensor
    (all-reduce; summed in that order) or the payloads themselves (all-gather)."""
    if collective == "all-reduce":
        return [torch.stack(parts).sum(0) / len(payloads) for parts in zip(*payloads, strict=True)]
    return payloads


class Sampler:
    """Batches of a node's shard: ``batch`` blocks at a time from a fresh permutation per epoch."""

    def __init__(self, shard: np.ndarray, batch: int, seed: int, node: int) -> None:
        self.shard, self.batch = shard, min(batch, len(shard))
        self.rng = np.random.default_rng([seed, node])
        self.order, self.pos = self.rng.permutation(len(shard)), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.shard)), 0
        rows = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return torch.from_numpy(self.shard[rows])


@dataclass
class Record:
    """What a run measured (one point per eval, and the totals)."""

    curve: list[dict[str, float]] = field(default_factory=list)
    payload_bytes: int = 0  # sum over syncs and live nodes of the payload tensors' bytes
    wire_bytes: float = 0.0  # what the collectives put on the links, all nodes together
    syncs: int = 0
    tokens: int = 0


class Run:
    """A training run of ``strategy`` on ``data`` over ``topology`` (or several topologies by
    name: the same training, its simulated time kept for each; the first is ``clock``),
    computing ``mine`` (node ids) in this process and exchanging through ``comm``."""

    def __init__(self, config: RunConfig, strategy: Strategy, data: Data, topology: Topology | dict[str, Topology], *,
                 mine: list[int] | None = None, comm: Any = None) -> None:
        config.check()
        self.config, self.strategy, self.data = config, strategy, data
        self.mine = list(range(config.nodes)) if mine is None else mine
        self.comm = comm or LocalComm()
        topologies = topology if isinstance(topology, dict) else {"": topology}
        self.clocks = {name: SimClock(t, config.nodes, mfu=config.mfu) for name, t in topologies.items()}
        self.clock = next(iter(self.clocks.values()))
        base = gym_model.build(config.model_size, vocab_size=data.vocab_size, seq_len=config.seq_len,
                               seed=config.seed)
        self.base = base
        self.n_params = gym_model.count(base)
        self.step_flops = gym_model.train_flops_per_token(base, config.seq_len) * config.batch * config.seq_len
        self.nodes: dict[int, Node] = {}
        for i in self.mine:
            m = copy.deepcopy(base)
            self.nodes[i] = Node(id=i, model=m, params=gym_model.parameters(m), seed=config.seed)
            strategy.setup(self.nodes[i])
        self.samplers = {i: Sampler(data.shards[i], config.batch, config.seed, i) for i in self.mine}
        self.memory = self._check_memory(list(topologies.values()))
        for live in {tuple(config.live(t)) for t in range(config.steps)}:  # every ring the run will use
            for clock in self.clocks.values():
                clock.ring(list(live))
        self.record = Record()

    def _check_memory(self, topologies: list[Topology]) -> dict[str, int]:
        """Bytes one node needs (weights, gradients, activations, the strategy's state measured
        on a throwaway node after one step); ConfigError naming the first device short of it."""
        trial = copy.deepcopy(self.base)
        node = Node(id=0, model=trial, params=gym_model.parameters(trial), seed=self.config.seed)
        self.strategy.setup(node)
        for p in node.params:
            p.grad = torch.zeros_like(p)
        # a whole step up to the first sync, the sync included: some optimizers step in finish,
        # and DiLoCo's outer momentum exists only after its first outer step
        first = next((t for t in range(self.config.steps) if self.strategy.syncs(t)), 0)
        payload = self.strategy.step(node, first)
        if payload is not None:
            self.strategy.finish(node, first, combine(self.strategy.collective, [payload]))
        weights = 4 * self.n_params
        need = {"weights": weights, "gradients": weights, "state": self.strategy.state_bytes(node),
                "activations": gym_model.activation_bytes(self.base, self.config.batch, self.config.seq_len)}
        total = sum(need.values())
        for d in (d for topology in topologies for d in topology.devices[: self.config.nodes]):
            if total > d.memory_bytes:
                raise ConfigError(f"device {d.id} has {d.memory_bytes / 2**20:.1f} MiB; a node of "
                                  f"{self.strategy.name} needs {total / 2**20:.1f} MiB ("
                                  + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in need.items()) + ")")
        return need | {"total": total}

    def _local(self, i: int, t: int) -> tuple[list[torch.Tensor] | None, float]:
        node = self.nodes[i]
        for p in node.params:
            p.grad = None
        loss = gym_model.loss(node.model, self.samplers[i].next())
        loss.backward()
        payload = self.strategy.step(node, t)
        if (payload is not None) != self.strategy.syncs(t):
            raise RuntimeError(f"strategy {self.strategy.name}: step {t} returned "
                               f"{'a payload' if payload is not None else 'none'} but syncs() says "
                               f"{self.strategy.syncs(t)}")
        return payload, float(loss.detach())

    def _rejoins(self, t: int) -> None:
        for f in self.config.failures:
            if f.back != t:
                continue
            # the donor trained through step t-1 (a node coming back at t too holds stale state)
            donors = [i for i in self.config.live(t) if t > 0 and not self.config.down(i, t - 1)]
            if not donors:  # nobody trained through: it resumes from its own last state
                continue
            donor = donors[0]
            exported = self.strategy.export_state(self.nodes[donor]) if donor in self.nodes else None
            exported = self.comm.broadcast(exported, donor)
            if f.node in self.nodes:
                self.strategy.rejoin(self.nodes[f.node], exported)
            nbytes = tensor_bytes(exported)  # parameters, buffers and optimizer states
            for clock in self.clocks.values():
                clock.rejoin(f.node, donor, nbytes)

    def evaluate(self, t: int) -> float | None:
        """Mean eval loss (nats per token) of the mean of the evaluated parameters of the
        nodes live at step ``t``; None in a process that does not hold node 0's record."""
        live = self.config.live(t)
        offered = self.comm.gather({i: self.strategy.evaluated(self.nodes[i]) for i in self.mine if i in live})
        if 0 not in self.mine:
            return None
        mean = combine("all-reduce", [offered[i] for i in sorted(offered)])
        model = copy.deepcopy(self.base)
        with torch.no_grad():
            for p, value in zip(gym_model.parameters(model), mean, strict=True):
                p.copy_(value)
            losses = [float(gym_model.loss(model, torch.from_numpy(self.data.eval[j:j + EVAL_BATCH])))
                      * len(self.data.eval[j:j + EVAL_BATCH]) for j in range(0, len(self.data.eval), EVAL_BATCH)]
        return sum(losses) / len(self.data.eval)

    def train(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> Record:
        """Run every step at ``config.threads`` torch threads (restored after); returns the record."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            return self._train(progress)
        finally:
            torch.set_num_threads(threads)

    def _train(self, progress: Callable[[int, dict[str, float]], None] | None) -> Record:
        cfg, strategy, rec = self.config, self.strategy, self.record
        start = self.evaluate(0)
        if start is not None:
            rec.curve.append({"step": 0, "tokens": 0, "wire_bytes": 0.0, "sim_time_s": 0.0, "eval_loss": start,
                              "train_loss": None})
        for t in range(cfg.steps):
            strategy.scheduled(cfg.lr_scale(t))
            self._rejoins(t)
            live = cfg.live(t)
            local = {i: self._local(i, t) for i in self.mine if i in live}
            gathered = self.comm.gather(local)
            for i in live:
                for clock in self.clocks.values():
                    clock.compute(i, self.step_flops)
            rec.tokens += len(live) * cfg.batch * cfg.seq_len
            if strategy.syncs(t):
                payloads = [gathered[i][0] for i in live]
                nbytes = {sum(x.nbytes for x in p) for p in payloads}
                if len(nbytes) != 1:
                    raise RuntimeError(f"strategy {strategy.name}: payloads of different sizes at step {t}: {nbytes}")
                size = nbytes.pop()
                result = combine(strategy.collective, payloads)
                cost = [clock.sync(strategy.collective, size, live) for clock in self.clocks.values()][0]
                rec.payload_bytes += size * len(live)
                rec.wire_bytes += cost.wire_bytes_per_node * len(live)
                rec.syncs += 1
                for i in live:
                    if i in self.nodes:
                        strategy.finish(self.nodes[i], t, result)
            if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
                loss = self.evaluate(t)
                if loss is not None:
                    point = {"step": t + 1, "tokens": rec.tokens, "wire_bytes": rec.wire_bytes,
                             "sim_time_s": self.clock.now(live), "eval_loss": loss,
                             "sim_times": {name: clock.now(live) for name, clock in self.clocks.items()},
                             "train_loss": float(np.mean([gathered[i][1] for i in live]))}
                    rec.curve.append(point)
                    if progress is not None:
                        progress(t + 1, point)
            elif progress is not None and 0 in self.mine:
                progress(t + 1, {})
        return rec

    def summary(self, wall_s: float, topology: str | None = None) -> dict[str, Any]:
        """The run's results (node 0's process), the simulated times of ``topology`` (a name
        given to ``Run``; default: the first)."""
        name = next(iter(self.clocks)) if topology is None else topology
        clock, rec = self.clocks[name], self.record
        curve = [{k: v for k, v in p.items() if k != "sim_times"} | {"sim_time_s": p.get("sim_times", {}).get(name, 0.0)}
                 for p in rec.curve]
        last = curve[-1]
        return {"final_eval_loss": last["eval_loss"], "initial_eval_loss": curve[0]["eval_loss"],
                "steps": self.config.steps, "tokens": rec.tokens, "params": self.n_params,
                "syncs": rec.syncs, "payload_bytes": rec.payload_bytes, "wire_bytes": rec.wire_bytes,
                "payload_bytes_per_sync": self.strategy.payload_bytes([p.shape for p in gym_model.parameters(self.base)]),
                "sim_time_s": last["sim_time_s"], "sim_hours": last["sim_time_s"] / 3600,
                "comm_s": clock.comm_s, "waited_s": clock.waited_s, "memory_bytes": self.memory,
                "wall_s": wall_s, "curve": curve}


def final_params(run: Run) -> dict[int, list[torch.Tensor]]:
    """Every node's parameters at the end (gathered to every process)."""
    return run.comm.gather({i: [p.detach().clone() for p in run.nodes[i].params] for i in run.mine})


def timed_train(run: Run, progress: Any = None) -> dict[str, dict[str, Any]]:
    """Train, then every topology's summary by name (node 0's process)."""
    start = time.perf_counter()
    run.train(progress)
    wall = time.perf_counter() - start
    return {name: run.summary(wall, name) for name in run.clocks}
