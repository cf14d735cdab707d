"""Tensor-parallel torch stages: a stage's layers split across the members of a
``torch.distributed`` group (spec B18).

Every member loads the same stage (``TorchBackend.load``) from its own copy of the model
files; ``shard_stage`` then hands the stage to torch's own tensor parallelism
(``torch.distributed.tensor.parallel.parallelize_module``, DTensor) with the plan the model's
transformers config declares (``base_model_tp_plan``: query, key and value projections and
the MLP's gate and up projections split by output columns, the attention output and down
projections by input rows, an all-reduce after each of those two). Each member keeps its own
slice (``src_data_rank=None``: nothing is scattered, every member already holds the weights)
and computes its share of the attention heads on its own KV cache. The members must run the
same steps in the same order: a collective waits for every member.

The collectives are gloo's on a CPU (plaintext, unauthenticated TCP: specs/security.md) and
NCCL's on CUDA. Every collective of a group made by ``join_group`` times out after
``timeout_s``, so a member that dies or stops answering makes the others' step fail with an
error instead of waiting for ever.

What is not split: the token embeddings, the final norm and the head are computed whole by
every member (replicated), as transformers' own plans leave them, and so are a mixture of
experts' experts (transformers splits those by expert parallelism, another plan).

Not yet done (issue: tensor parallelism in the runtime): nodes do not form groups or run
these stages; the members' steps, KV caches and failover are the runtime's to drive.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator
from typing import Any

from mesh.errors import BackendError
from mesh.models import tensor_parallel_sizes

# transformers' plan styles (``ALL_PARALLEL_STYLES``) that torch's own styles express for
# inference; "replicated_with_grad_allreduce" only matters for gradients: those modules stay whole
_STYLES = ("colwise", "rowwise", "colwise_gather_output", "rowwise_split_input")
_WHOLE = ("replicated_with_grad_allreduce",)


def plan_styles(stage: Any, world: int) -> dict[str, str]:
    """The plan style (``colwise``, ``rowwise``, ``colwise_gather_output``,
    ``rowwise_split_input``) of every linear module the model's ``base_model_tp_plan`` names in
    ``stage``'s layers (a transformers causal LM whose ``model.layers`` are the stage's,
    numbered from 0), keyed by module name.

    Raises:
        BackendError: the config has no plan, the plan uses a style these stages do not run
            (expert parallel, packed projections, latent attention), or the attention heads,
            KV heads or MLP width do not divide by ``world``.
    """
    config = stage.config.get_text_config() if hasattr(stage.config, "get_text_config") else stage.config
    plan = getattr(config, "base_model_tp_plan", None) or {}
    kind = getattr(config, "model_type", "?")
    if not plan:
        raise BackendError(f"model type {kind!r} declares no tensor-parallel plan (base_model_tp_plan)")
    unknown = sorted({style for style in plan.values() if style not in _STYLES + _WHOLE})
    if unknown:
        raise BackendError(f"model type {kind!r}: tensor-parallel stages do not run the plan styles {unknown} "
                           f"yet (they run {list(_STYLES)})")
    _check_divides(config, world)
    modules = dict(stage.named_modules())
    out: dict[str, str] = {}
    for i in range(len(stage.model.layers)):
        for pattern, style in plan.items():
            name = "model." + pattern.replace("*", str(i))
            if style in _STYLES and name in modules:
                out[name] = style
    return out


def stage_plan(stage: Any, world: int) -> dict[str, Any]:
    """torch's parallel styles (``ColwiseParallel`` / ``RowwiseParallel``) for ``plan_styles``,
    keyed by module name (what ``parallelize_module`` takes). Raises as ``plan_styles``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": lambda: ColwiseParallel(), "rowwise": lambda: RowwiseParallel(),
              "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
              "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate())}
    return {name: styles[style]() for name, style in plan_styles(stage, world).items()}


def _check_divides(config: Any, world: int) -> None:
    """Raises BackendError unless heads, KV heads and the MLP width split evenly in ``world``."""
    if world < 2:
        raise BackendError(f"a tensor-parallel group has 2 or more members, not {world}")
    fields = {"num_attention_heads": getattr(config, "num_attention_heads", None),
              "num_key_value_heads": getattr(config, "num_key_value_heads", None)
              or getattr(config, "num_attention_heads", None),
              "intermediate_size": getattr(config, "intermediate_size", None)}
    bad = {k: v for k, v in fields.items() if isinstance(v, int) and v % world}
    if bad:
        raise BackendError(f"{', '.join(f'{k}={v}' for k, v in bad.items())} do not divide among {world} "
                           f"tensor-parallel members; groups of {list(tensor_parallel_sizes(config))} do")


def join_group(rank: int, world: int, address: str, port: int, *, timeout_s: float, device: str = "cpu",
               store: Any = None) -> Any:
    """Join the ``world``-member group whose member 0 listens on ``address:port`` (TCP
    rendezvous of ``torch.distributed``; or through ``store``, a ``torch.distributed.Store``
    every member already reaches), as member ``rank``: the process's default group,
    gloo on a CPU and NCCL on CUDA, every collective bounded by ``timeout_s`` seconds. Returns
    the group's one-dimensional ``DeviceMesh``.

    Raises:
        BackendError: the rendezvous did not complete in ``timeout_s`` (a member missing), or
            this process is already in a group.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        raise BackendError("this process is already in a tensor-parallel group; leave it first (leave_group)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        where = {"store": store} if store is not None else {"init_method": f"tcp://{address}:{port}"}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s),
                                **where)
    except (RuntimeError, ValueError) as exc:  # DistStoreError and friends derive from RuntimeError
        raise BackendError(f"tensor-parallel rendezvous at {address}:{port} as member {rank} of {world} failed "
                           f"within {timeout_s:g} s: {exc}") from exc
    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))


def leave_group() -> None:
    """Tear this process's group down (``destroy_process_group``); nothing when not in one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# the collectives of split modules that failed in this process (a member gone, a timeout): a
# step's caller sees them wrapped in the step's BackendError, and must know the group is broken
COLLECTIVE_FAILURES: list[BaseException] = []
# [seconds, count] the split modules' collectives took inside steps (waiting for the slowest
# member included): what a collective costs where the steps run it, for the cost model (P10)
COLLECTIVE_TIME = [0.0, 0]


@contextlib.contextmanager
def _noted() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        COLLECTIVE_FAILURES.append(exc)
        raise
    COLLECTIVE_TIME[0] += time.perf_counter() - started
    COLLECTIVE_TIME[1] += 1


def shard_stage(backend: Any, mesh: Any) -> int:
    """Split the stage ``backend`` (a loaded ``TorchBackend``) across ``mesh``'s members with
    torch's ``parallelize_module`` and the model's plan (``stage_plan``), then run it on each
    member's local shards (``_localize``); every member calls it on the same stage, and from
    then on runs the same steps in the same order. Returns the number of modules split.

    Raises:
        BackendError: the stage holds quantized weights (tensor-parallel stages run float
            weights: ``--quantize none``), or ``stage_plan`` refuses the model.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    if backend.weight_format:
        raise BackendError(f"tensor-parallel stages run float weights, and this stage holds "
                           f"{backend.weight_format} ones: load it with --quantize none")
    stage = backend._model
    styles = plan_styles(stage, mesh.size())
    parallelize_module(stage, mesh, stage_plan(stage, mesh.size()), src_data_rank=None)
    _localize(stage, styles, mesh)
    return len(styles)


def _localize(stage: Any, styles: dict[str, str], mesh: Any) -> None:
    """Run the split modules on plain tensors: each module's weights become this member's
    shard of them (``DTensor.to_local``: the layout torch's styles chose), its DTensor input
    and output hooks give way to the one collective its style needs (an all-reduce after a
    row-split module, an all-gather after ``colwise_gather_output``, the input's local slice
    before ``rowwise_split_input``). Why not keep DTensor's own dispatch: on a CPU its
    per-operator bookkeeping cost a decode step of a 12-layer model 300 ms against 50 ms for
    the same member's plain step (AMD EPYC, 2 cores, 2026-12-06); the collectives are the same."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    group, rank, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    modules = dict(stage.named_modules())

    def reduce(_module: Any, _args: Any, out: Any) -> Any:
        with _noted():
            dist.all_reduce(out, group=group)
        return out

    def gather(_module: Any, _args: Any, out: Any) -> Any:
        parts = [torch.empty_like(out) for _ in range(world)]
        with _noted():
            dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    def split(_module: Any, args: Any) -> Any:
        x = args[0]
        width = x.shape[-1] // world
        return (x[..., rank * width:(rank + 1) * width].contiguous(), *args[1:])

    for name, style in styles.items():
        module = modules[name]
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        for pname, param in list(module.named_parameters(recurse=False)):
            local = param.to_local() if isinstance(param, DTensor) else param.data
            if style.startswith("rowwise") and pname == "bias" and rank:
                local = torch.zeros_like(local)  # a replicated bias is added once, by member 0, before the sum
            setattr(module, pname, torch.nn.Parameter(local.contiguous(), requires_grad=False))
        if style.startswith("rowwise"):
            module.register_forward_hook(reduce)
        if style == "rowwise_split_input":
            module.register_forward_pre_hook(split)
        if style == "colwise_gather_output":
            module.register_forward_hook(gather)
