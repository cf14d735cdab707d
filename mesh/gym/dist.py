"""The gym's process engine: one process per simulated node on ``torch.distributed`` (gloo).

``run_processes`` spawns ``config.nodes`` processes (``torch.multiprocessing``, spawn start
method), each joining a gloo group at a free port of 127.0.0.1 (a TCP store; nothing listens
on another address), running ``Run.train`` for its own node with ``DistComm``, and the process
of node 0 writing the summary and every node's final parameters to a file the parent reads.
Every wait has a bound: the group's ``timeout`` and the parent's join ``timeout_s``; a process
that fails makes the parent raise ``RuntimeError`` with its error, and the others are ended.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mesh.gym.corpus import Data
from mesh.gym.engine import DistComm, Run, RunConfig, final_params
from mesh.gym.strategy import Strategy
from mesh.placement.costmodel import Topology

GROUP_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, config: RunConfig, strategy: Strategy, data: Data, topology: Any, port: int,
            out: str) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=config.nodes, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        run = Run(config, strategy, data, topology, mine=[rank], comm=DistComm())
        start = time.perf_counter()
        run.train()
        wall = time.perf_counter() - start
        summaries = {name: run.summary(wall, name) for name in run.clocks} if rank == 0 else None
        params = final_params(run)
        if rank == 0:
            torch.save({"summaries": summaries, "params": params}, out)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(f"{out}.error{rank}").write_text(traceback.format_exc())
        raise


def run_processes(config: RunConfig, strategy: Strategy, data: Data, topology: Topology | dict[str, Topology], *,
                  timeout_s: float = 3600.0) -> tuple[dict[str, dict[str, Any]], dict[int, list[torch.Tensor]]]:
    """(each topology's summary by name, every node's final parameters) of a run with one
    process per node (``topology`` as ``Run`` takes it; a single one is named "").
    RuntimeError naming the failed process and its error, or a run past ``timeout_s``."""
    import torch.multiprocessing as mp

    data = replace(data, tokenizer=None)  # the workers need only the token blocks
    with tempfile.TemporaryDirectory(prefix="mesh-gym-") as tmp:
        out = os.path.join(tmp, "result.pt")
        ctx = mp.start_processes(_worker, args=(config, strategy, data, topology, _free_port(), out),
                                 nprocs=config.nodes, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gym's processes ran past {timeout_s:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            # every failed process's last line, the cause first: the others fail with gloo's
            # "Connection closed by peer" once the failed one is gone
            lines = [(f.name.removeprefix("result.pt.error"), f.read_text().strip().splitlines()[-1])
                     for f in sorted(Path(tmp).glob("result.pt.error*"))]
            lines.sort(key=lambda item: "Connection closed" in item[1])
            detail = "; ".join(f"node {rank}: {line}" for rank, line in lines) or str(exc)
            raise RuntimeError(f"a gym process failed: {detail}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=10)
        result = torch.load(out, weights_only=False)
    return result["summaries"], result["params"]
