"""Mid-request failover of the runtime, in process (specs/faults.md FO1-FO6)."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import RequestFailed
from mesh.runtime.engine import SamplingParams
from mesh.runtime.request_core import Timeouts
from mesh.testing.minicluster import PROMPT, MiniCluster
from mesh.testing.minicluster import reference_tokens as _reference
from mesh.testing.minicluster import run_request as _run

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7)


@pytest.mark.spec("FO1", "FO3")
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("victim", ["m1", "m2", "m0"], ids=["middle", "last", "first-and-coordinator-stage"])
def test_a_stage_killed_after_token_5_gives_the_fault_free_tokens(params: SamplingParams, victim: str) -> None:
    expected = _reference(params)

    async def go() -> tuple[list[int], MiniCluster]:
        cluster = MiniCluster(3)
        coordinator = "m2" if victim == "m0" else "m0"  # the coordinator itself survives here
        try:
            got = await _run(cluster, params, coordinator=coordinator, on_token={5: lambda: cluster.kill(victim)})
            return got, cluster
        finally:
            await cluster.close()

    got, cluster = asyncio.run(go())
    assert got == expected and len(got) == 12
    coordinator = cluster.nodes["m2" if victim == "m0" else "m0"].coordinator
    assert len(coordinator.recovery_times) == 1 and coordinator.recovery_times[0] < cluster.timeouts.recovery_s
    assert cluster.plan is not None and victim not in {s.member_id for s in cluster.plan.stages}


@pytest.mark.spec("FO2", "FO5")
@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), loss=st.sampled_from([0.0, 0.1, 0.2]), duplicate=st.sampled_from([0.0, 0.2, 0.5]))
def test_lost_duplicated_and_delayed_messages_change_no_token_and_no_step_runs_twice(seed: int, loss: float,
                                                                                    duplicate: float) -> None:
    expected = _reference(GREEDY)

    async def go() -> tuple[list[int], MiniCluster]:
        cluster = MiniCluster(3, seed=seed)
        cluster.faults.loss, cluster.faults.duplicate, cluster.faults.jitter_s = loss, duplicate, 0.02
        try:
            got = await _run(cluster, GREEDY)
            await asyncio.sleep(0.2)  # the last releases travel the lossy network
            return got, cluster
        finally:
            await cluster.close()

    got, cluster = asyncio.run(go())
    assert got == expected
    assert all(node.worker.caches == {} for node in cluster.nodes.values())  # spec FO5: releases resent
    if cluster.nodes["m0"].coordinator.failed_attempts == 0:  # (a step may still run out of resends)
        for node in cluster.nodes.values():
            backend = node.worker.backend
            assert backend is not None and backend.steps == 12  # type: ignore[attr-defined]  # each step once


@pytest.mark.spec("FO4")
def test_no_placement_on_the_survivors_ends_the_request_with_a_clear_error_at_once() -> None:
    async def go() -> tuple[list[int], BaseException | None, float, MiniCluster]:
        cluster = MiniCluster(2, num_layers=6)
        cluster.capacity_layers = 3  # each member holds half: one alone cannot
        got: list[int] = []
        started = time.monotonic()
        try:
            async for token in cluster.nodes["m0"].coordinator.generate(PROMPT, GREEDY):
                got.append(token)
                if len(got) == 4:
                    cluster.kill("m1")
        except RequestFailed as exc:
            return got, exc, time.monotonic() - started, cluster
        finally:
            await cluster.close()
        return got, None, time.monotonic() - started, cluster

    got, error, elapsed, cluster = asyncio.run(go())
    assert got == _reference(GREEDY)[:4]
    assert error is not None and "placement failed" in str(error) and "member m1 was lost" in str(error)
    assert elapsed < cluster.timeouts.recovery_s  # it did not wait out the budget
    assert cluster.nodes["m0"].worker.caches == {}


@pytest.mark.spec("FO4", "FO2")
def test_a_stage_that_never_answers_ends_the_request_within_the_budgets() -> None:
    timeouts = Timeouts(prefill_s=1.0, decode_s=0.5, send_s=0.5, recovery_s=1.5, retry_s=0.1)

    async def go() -> tuple[BaseException | None, float, MiniCluster]:
        cluster = MiniCluster(2, timeouts=timeouts)
        cluster.faults.drop_types = {"token"}  # the last stage computes, its answers never arrive
        started = time.monotonic()
        try:
            await _run(cluster, GREEDY)
        except RequestFailed as exc:
            return exc, time.monotonic() - started, cluster
        finally:
            await cluster.close()
        return None, time.monotonic() - started, cluster

    error, elapsed, cluster = asyncio.run(go())
    assert error is not None and "no token within" in str(error)
    # every attempt waits at most the prefill timeout; attempts stop once the recovery budget is spent
    assert elapsed < timeouts.recovery_s + timeouts.prefill_s + 1.0
    assert cluster.messages["forward"] > 2  # the step was sent again before giving up


@pytest.mark.spec("FO5")
def test_every_attempt_frees_its_caches_on_every_stage_whatever_ends_it() -> None:
    async def go() -> MiniCluster:
        cluster = MiniCluster(3)
        try:
            await _run(cluster, GREEDY, on_token={3: lambda: cluster.kill("m1")})  # fails one attempt
            gen = cluster.nodes["m0"].coordinator.generate(PROMPT, GREEDY)
            async for _ in gen:  # and a cancelled one: the client goes away after 2 tokens
                if cluster.nodes["m2"].worker.caches:
                    break
            await gen.aclose()
            await asyncio.sleep(0.1)  # releases travel the network
            return cluster
        finally:
            await cluster.close()

    cluster = asyncio.run(go())
    for member in cluster.alive:
        assert cluster.nodes[member].worker.caches == {}
    events = [state for _, state in cluster.nodes["m0"].events]
    assert events.count("finished") == 1 and events.count("cancelled") == 1


@pytest.mark.spec("FO6")
def test_a_lost_member_fails_only_the_attempts_through_it_and_frees_what_it_coordinated() -> None:
    async def go() -> tuple[list[list[int]], MiniCluster]:
        cluster = MiniCluster(3, step_delay_s=0.002)
        try:
            # m1 coordinates one request; m0 another; m1 dies mid-way through both
            first = asyncio.ensure_future(_run(cluster, GREEDY, coordinator="m0"))
            second = asyncio.ensure_future(_run(cluster, GREEDY, coordinator="m1",
                                                on_token={4: lambda: cluster.kill("m1")}))
            results = await asyncio.gather(first, second, return_exceptions=True)
            await asyncio.sleep(0.1)
            return list(results), cluster  # type: ignore[arg-type]
        finally:
            await cluster.close()

    results, cluster = asyncio.run(go())
    assert results[0] == _reference(GREEDY)  # survived the loss of its middle stage
    for member in cluster.alive:  # nothing of m1's request is left on the survivors
        assert not any(req.startswith(tuple(cluster.nodes["m1"].coordinator._live)) for req in
                       cluster.nodes[member].worker.caches)
        assert cluster.nodes[member].worker.caches == {}


@pytest.mark.spec("FO9")
def test_a_split_step_computes_as_the_original_steps_did_in_bf16(default_model) -> None:
    """A re-fed step (the prompt, then three generated tokens) run through a two-stage bf16
    pipeline with ``split`` gives bit-identical logits to the original one-token steps; the
    same positions in a single call need not (bf16 results depend on the call's shape)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from backends.torch import TorchBackend
    from mesh.runtime.batcher import StepBatcher
    from mesh.runtime.messages import Forward
    from mesh.runtime.stage import run_step

    pool = ThreadPoolExecutor(max_workers=1)

    def _forward(backend, cache, fwd):  # type: ignore[no-untyped-def]
        return asyncio.run(run_step(StepBatcher(pool, lambda b: 1), backend, cache, fwd))[0]

    stages = []
    for start, end in ((0, 15), (15, 30)):
        backend = TorchBackend(device="cpu", dtype="bf16")
        backend.load(default_model, start, end)
        stages.append(backend)
    prompt = default_model.encode_chat([{"role": "user", "content": "List three colours."}])

    def run(caches: list, pos: int, tokens: list[int], split: list[int] | None) -> np.ndarray:
        fwd = Forward(req="r", coord="c", plan_id="p", route=[["a", 0, 15], ["b", 15, 30]], idx=0, step=0, pos=pos,
                      tokens=tokens, temperature=0.0, top_p=1.0, seed=0, split=split)
        hidden = _forward(stages[0], caches[0], fwd).hidden
        assert hidden is not None and hidden.shape[1] == len(tokens)
        last = Forward(req="r", coord="c", plan_id="p", route=fwd.route, idx=1, step=0, pos=pos, tokens=None,
                       temperature=0.0, top_p=1.0, seed=0, hidden=hidden, split=split)
        logits = _forward(stages[1], caches[1], last).logits
        assert logits is not None
        return logits

    caches = [s.new_cache() for s in stages]
    generated = []
    logits = run(caches, 0, prompt, None)
    for _ in range(3):
        generated.append(int(np.argmax(logits)))
        logits = run(caches, len(prompt) + len(generated) - 1, generated[-1:], None)
    replayed = run([s.new_cache() for s in stages], 0, [*prompt, *generated], [len(prompt), 1, 1, 1])
    assert np.array_equal(replayed, logits)
    # the lagging-replica case: [0, len(prompt) + 1) kept, the last two tokens re-fed
    caches = [s.new_cache() for s in stages]
    run(caches, 0, [*prompt, generated[0]], [len(prompt), 1])
    assert np.array_equal(run(caches, len(prompt) + 1, generated[1:], [1, 1]), logits)
