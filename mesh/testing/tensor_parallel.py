"""Tensor-parallel members on loopback for the tests (spec B18): each member is a process of
its own that loads a whole stage, joins a gloo group on 127.0.0.1 and splits the stage with
``backends.torch_tp.shard_stage``; what it computed comes back on a queue."""

from __future__ import annotations

import os
import time
from typing import Any

PROMPT = list(range(5, 25))


def greedy(backend: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens after ``prompt`` on a whole-model stage (one ``forward`` per token,
    then the prompt again through ``forward_batch``), and the first logits of that batch."""
    from backends.base import BatchItem

    cache = backend.new_cache()
    out = backend.forward(cache, start_pos=0, token_ids=prompt)
    tokens = []
    for pos in range(len(prompt), len(prompt) + n):
        tokens.append(int(out.logits.argmax()))
        out = backend.forward(cache, start_pos=pos, token_ids=[tokens[-1]])
    batched = backend.forward_batch([BatchItem(cache=backend.new_cache(), start_pos=0, token_ids=prompt)])[0]
    return tokens, [float(v) for v in batched.logits]


def load_whole(model_ref: str, dtype: str = "f32") -> Any:
    """A ``TorchBackend`` holding every layer of ``model_ref`` (a name or a directory), float weights."""
    from backends.torch import TorchBackend
    from mesh.models import Model, resolve_model

    model = Model(resolve_model(model_ref))
    backend = TorchBackend(device="cpu", dtype=dtype, quantize="none")
    backend.load(model, 0, model.num_layers)
    return backend


def member(rank: int, world: int, port: int, model_ref: str, queue: Any, *, tokens: int = 6,
           timeout_s: float = 30.0, exit_before_step: bool = False) -> None:
    """One member's process: join, shard, then ``greedy`` (or, with ``exit_before_step``, leave
    the process without a word once sharded, as a killed member would). Puts ``(rank,
    tokens, logits, modules split, seconds)`` or ``(rank, "error", message, type name,
    seconds)`` on ``queue``."""
    import torch

    from backends.torch_tp import join_group, leave_group, shard_stage

    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        mesh = join_group(rank, world, "127.0.0.1", port, timeout_s=timeout_s)
        backend = load_whole(model_ref)
        split = shard_stage(backend, mesh)
        if exit_before_step:
            os._exit(0)
        got, logits = greedy(backend, PROMPT, tokens)
        queue.put((rank, got, logits, split, time.monotonic() - started))
        leave_group()
    except Exception as exc:  # noqa: BLE001 - the test reads what failed
        queue.put((rank, "error", str(exc), type(exc).__name__, time.monotonic() - started))
