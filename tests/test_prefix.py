"""The prefix cache (mesh/runtime/prefix.py, specs/node.md N24): keys, the stage's store, and
requests through a 2-member in-process pipeline that start from a cached prefix."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.runtime.batcher import Batching
from mesh.runtime.engine import SamplingParams
from mesh.runtime.prefix import PrefixStore, keep_key, prefix_keys
from mesh.testing.minicluster import MiniCluster, reference_tokens, run_request
from mesh.wire import WireTensor

GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
TURN1 = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]  # 11 tokens: chunks of 2 keep [0, 10)
TURN2 = [*TURN1, 8, 9, 7, 9, 3, 2]


@pytest.mark.spec("N24")
@given(st.lists(st.integers(0, 300), max_size=40), st.integers(1, 8))
def test_prefix_keys_name_whole_chunk_prefixes_longest_first(tokens: list[int], chunk: int) -> None:
    keys = prefix_keys(tokens, chunk)
    ns = [n for n, _ in keys]
    assert ns == sorted(ns, reverse=True) and all(n % chunk == 0 and 0 < n < len(tokens) for n in ns)
    assert len(ns) == max(0, (len(tokens) - 1) // chunk)
    longer = prefix_keys([*tokens, 7, 7, 7], chunk)
    assert set(keys) <= set(longer)  # a key names its prefix, whatever follows
    if keys:
        other = prefix_keys([tokens[0] + 1, *tokens[1:]], chunk)
        assert not set(keys) & set(other)  # any other token: other keys
        assert not set(keys) & set(prefix_keys(tokens, chunk + 1))  # another chunk size: other keys
    kept = keep_key(tokens, chunk)
    assert kept is None if len(tokens) < chunk else kept[0] == len(tokens) // chunk * chunk
    if kept is not None:
        assert kept in prefix_keys([*tokens, 1], chunk)  # the next turn offers what this one kept


@pytest.mark.spec("N24")
def test_the_keys_a_long_prompt_offers_fit_the_forward_message() -> None:
    from mesh.runtime.batcher import PREFILL_CHUNK
    from mesh.runtime.messages import Forward, decode
    from mesh.runtime.prefix import MAX_KEYS

    tokens = list(range(100, 100 + 16384))  # longer than the keys offered cover at the default chunk
    offered = [[n, key] for n, key in prefix_keys(tokens, PREFILL_CHUNK)]
    assert len(offered) == MAX_KEYS and offered[0][0] == 16384 - PREFILL_CHUNK  # the longest ones
    fwd = Forward(req="r.0", coord="c", plan_id="p", route=[["m", 0, 2]], idx=0, step=0, pos=0, tokens=tokens,
                  temperature=0.0, top_p=1.0, seed=1, prefix=offered, keep=list(keep_key(tokens, PREFILL_CHUNK)))
    got = decode(fwd.to_message())
    assert isinstance(got, Forward) and got.prefix == offered


def _block(size: int) -> list:
    """One layer's keys and values of ``size`` bytes each."""
    t = WireTensor(dtype="f32", shape=(1, 1, size // 4, 1), data=bytes(size))
    return [(0, t, t)]


@pytest.mark.spec("N24")
def test_the_store_evicts_the_least_recently_used_within_its_budget() -> None:
    store = PrefixStore(budget_bytes=100)
    store.put((0, 2), "a" * 32, _block(20), 1)  # 40 bytes
    store.put((0, 2), "b" * 32, _block(20), 1)
    assert store.get((0, 2), "a" * 32) is not None  # a is now the most recent
    store.put((0, 2), "c" * 32, _block(20), 1)  # 120 > 100: b goes
    assert store.has((0, 2), "a" * 32) and store.has((0, 2), "c" * 32) and not store.has((0, 2), "b" * 32)
    assert store.nbytes == 80 and len(store) == 2
    store.put((0, 2), "d" * 32, _block(60), 1)  # larger than the whole budget: not kept
    assert not store.has((0, 2), "d" * 32)
    store.keep_only({(2, 4)})  # a new plan: the stage of [0, 2) is gone
    assert len(store) == 0 and store.nbytes == 0


async def _cluster() -> MiniCluster:
    cluster = MiniCluster(2)
    for node in cluster.nodes.values():
        node.coordinator.batching = Batching(prefill_chunk=2)
    await asyncio.wait_for(cluster.nodes["m0"].plans.wait_ready(5), 10)
    return cluster


async def _kept(cluster: MiniCluster, timeout_s: float = 10.0) -> None:
    """Wait until every stage kept a prefix: they keep a prompt's whole chunks once its
    request is released, exported off the event loop, which a loaded machine may delay past
    any fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(len(node.worker.prefixes) for node in cluster.nodes.values()) and loop.time() < deadline:
        await asyncio.sleep(0.05)


@pytest.mark.spec("N24", "N23")
def test_a_later_request_starts_from_the_cached_prefix_with_the_tokens_of_a_cold_run() -> None:
    cold = reference_tokens(GREEDY, prompt=TURN2)

    async def go() -> None:
        cluster = await _cluster()
        try:
            m0, m1 = cluster.nodes["m0"], cluster.nodes["m1"]
            await run_request(cluster, GREEDY, prompt=TURN1)
            await _kept(cluster)
            assert len(m0.worker.prefixes) == len(m1.worker.prefixes) == 1
            computed = m0.worker.stages[(0, 3)].tokens_computed
            assert await run_request(cluster, GREEDY, prompt=TURN2, coordinator="m1") == cold
            # the other member's coordinator used the prefix the stages kept: 10 positions not computed
            assert m0.worker.stages[(0, 3)].tokens_computed - computed == len(TURN2) - 10 + GREEDY.max_tokens - 1
            c = m1.coordinator
            assert (c.prefix_hits, c.prefix_misses, c.prefix_tokens) == (1, 0, 10)
            await run_request(cluster, GREEDY, prompt=[7, 7, 7, 7, 7], coordinator="m1")  # offers keys, none held
            assert c.prefix_misses == 1
        finally:
            await cluster.close()

    asyncio.run(go())


@pytest.mark.spec("N24", "FO3")
def test_a_later_stage_that_lost_the_prefix_fails_the_attempt_and_the_request_starts_over() -> None:
    cold = reference_tokens(GREEDY, prompt=TURN2)

    async def go() -> None:
        cluster = await _cluster()
        try:
            await run_request(cluster, GREEDY, prompt=TURN1)
            await _kept(cluster)
            cluster.nodes["m1"].worker.prefixes.keep_only(set())  # evicted on the second stage only
            assert await run_request(cluster, GREEDY, prompt=TURN2) == cold
            c = cluster.nodes["m0"].coordinator
            assert c.failed_attempts == 1 and c.prefix_hits == 0
        finally:
            await cluster.close()

    asyncio.run(go())
