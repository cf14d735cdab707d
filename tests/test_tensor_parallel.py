"""Tensor-parallel torch stages on loopback (spec B18): torch's own tensor parallelism under the
model's transformers plan, members in processes of their own on a gloo group."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh.errors import BackendError
from mesh.testing.cluster import free_port
from mesh.testing.tensor_parallel import PROMPT, greedy, load_whole, member
from mesh.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = tiny_model(kind, tmp_path_factory.mktemp(kind) / kind)
        return made[kind]

    return get


def _group(world: int, model_ref: str, timeout_s: float = 60.0, **kwargs: Any) -> list[tuple[Any, ...]]:
    """Run ``member`` in ``world`` spawned processes (member 1's ``kwargs`` only, when given):
    what each put on the queue, by rank."""
    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=member, args=(rank, world, port, model_ref, queue),
                         kwargs={"timeout_s": timeout_s, **(kwargs if rank == 1 else {})}) for rank in range(world)]
    for p in procs:
        p.start()
    got = []
    try:
        for _ in range(world - (1 if kwargs.get("exit_before_step") else 0)):
            got.append(queue.get(timeout=timeout_s + 120))
    except queue_module.Empty:
        pass
    for p in procs:
        p.join(30)
        if p.is_alive():  # a member left waiting in a collective: the property under test is broken
            p.kill()
            pytest.fail(f"a tensor-parallel member (pid {p.pid}) was still running 30 s after the others")
    return sorted(got)


@pytest.mark.spec("B18")
@pytest.mark.parametrize("kind", ["llama", "phi3", "qwen3_moe"])
def test_two_members_give_the_single_stage_tokens_and_logits(tiny: Any, kind: str) -> None:
    """Each of 2 members of a gloo group on loopback, running the same steps on its slice of
    the stage, gets the whole stage's greedy tokens and logits within 1e-4 (f32)."""
    folder = str(tiny(kind))
    want_tokens, want_logits = greedy(load_whole(folder), PROMPT, 6)
    got = _group(2, folder)
    assert [g[0] for g in got] == [0, 1], got
    for rank, tokens, logits, split, _ in got:
        assert tokens == want_tokens, (rank, tokens, want_tokens)
        assert max(abs(a - b) for a, b in zip(logits, want_logits, strict=True)) < 1e-4
        # every layer's projections (5 layers); qwen3_moe's plan splits attention and its dense MLPs, the
        # experts stay whole on every member
        assert split == {"phi3": 5 * 4, "qwen3_moe": 23}.get(kind, 5 * 7)


@pytest.mark.spec("B18")
def test_a_member_that_dies_fails_the_others_step_within_the_timeout(tiny: Any) -> None:
    """Member 1 leaves its process once the stage is split; member 0's next step fails with an
    error within the collective timeout (gloo sees the closed connection, or times out) and
    its process ends: nothing waits for ever."""
    got = _group(2, str(tiny("llama")), timeout_s=10.0, exit_before_step=True)  # a hang: no answer, or a live process
    assert len(got) == 1 and got[0][0] == 0 and got[0][1] == "error" and got[0][3] == "BackendError", got


@pytest.mark.spec("B18")
def test_a_rendezvous_a_member_never_reaches_is_a_clear_error() -> None:
    """A group of 2 whose second member never comes: ``join_group`` raises BackendError within
    its timeout, naming the address and the member."""
    from backends.torch_tp import join_group

    with pytest.raises(BackendError, match=r"rendezvous at 127\.0\.0\.1:\d+ as member 0 of 2 failed within 2 s"):
        join_group(0, 2, "127.0.0.1", free_port(), timeout_s=2.0)


@pytest.mark.spec("B18")
def test_the_plan_is_the_models_own_and_refusals_say_why(tiny: Any) -> None:
    """The plan comes from the config's base_model_tp_plan, per layer; heads that do not divide,
    styles these stages do not run, and quantized weights are BackendErrors that say why."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from backends.torch_tp import shard_stage, stage_plan

    stage = load_whole(str(tiny("llama")))._model
    plan = stage_plan(stage, 2)
    assert len(plan) == 5 * 7
    assert isinstance(plan["model.layers.3.self_attn.k_proj"], ColwiseParallel)
    assert isinstance(plan["model.layers.3.mlp.down_proj"], RowwiseParallel)
    with pytest.raises(BackendError, match=r"num_attention_heads=4, num_key_value_heads=2, intermediate_size=128 do not divide among 3 "
                                           r"tensor-parallel members; groups of \[2\] do"):
        stage_plan(stage, 3)
    with pytest.raises(BackendError, match="2 or more members"):
        stage_plan(stage, 1)
    mla = load_whole(str(tiny("deepseek_v3")))._model
    with pytest.raises(BackendError, match=r"'deepseek_v3'.*do not run the plan styles \['mla_kv_a_proj'\]"):
        stage_plan(mla, 2)
    with pytest.raises(BackendError, match="float weights.*int4.*--quantize none"):
        shard_stage(SimpleNamespace(weight_format="int4", _model=stage), SimpleNamespace(size=lambda: 2))
