"""The coordinator's KV replica and the resumed failover (specs/faults.md FO8)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import BackendError
from mesh.runtime.engine import SamplingParams
from mesh.runtime.kvreplica import ReplicaStore, RequestReplica, pack_kv, unpack_kv
from mesh.testing.minicluster import TIMEOUTS, MiniCluster, reference_tokens, run_request
from mesh.wire import DTYPES, WireTensor

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=11)


def _layer_kv(g: int, start: int, n: int, heads: int = 2, dim: int = 3, dtype: str = "f32") -> tuple[int, WireTensor, WireTensor]:
    """Layer ``g``'s keys and values for positions [start, start + n): each element encodes
    (layer, position, head, channel), so any mix-up shows."""
    pos = np.arange(start, start + n).reshape(1, 1, n, 1)
    head = np.arange(heads).reshape(1, heads, 1, 1)
    ch = np.arange(dim).reshape(1, 1, 1, dim)
    keys = g * 100_000 + pos * 100 + head * 10 + ch  # as raw element bits: nothing reads them as floats
    np_dtype = {"f32": "<u4", "f16": "<u2"}[dtype]
    return (g, WireTensor(dtype=dtype, shape=(1, heads, n, dim), data=keys.astype(np_dtype).tobytes()),
            WireTensor(dtype=dtype, shape=(1, heads, n, dim), data=(keys + 50_000).astype(np_dtype).tobytes()))


@pytest.mark.spec("FO8")
@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 5), heads=st.integers(1, 4), n=st.integers(1, 6), dim=st.integers(1, 5),
       dtype=st.sampled_from(["f32", "f16"]))
def test_pack_and_unpack_are_inverse(layers: int, heads: int, n: int, dim: int, dtype: str) -> None:
    kv = [_layer_kv(g + 3, 0, n, heads, dim, dtype) for g in range(layers)]
    ids, block = pack_kv(kv)
    assert ids == [g + 3 for g in range(layers)]
    assert block.shape == (layers, 2, heads, n, dim) and block.nbytes == 2 * layers * heads * n * dim * DTYPES[dtype][1]
    assert unpack_kv(ids, block) == kv
    with pytest.raises(BackendError, match="does not fit"):
        unpack_kv([*ids, 99], block)
    if layers > 1:
        with pytest.raises(BackendError, match="does not match"):
            pack_kv([kv[0], _layer_kv(9, 0, n + 1, heads, dim, dtype)])


@pytest.mark.spec("FO8")
@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.integers(1, 5), min_size=1, max_size=40), cut=st.integers(0, 60), num_layers=st.integers(2, 6))
def test_a_replica_built_from_steps_of_any_split_gives_each_layer_its_exact_prefix(steps: list[int], cut: int,
                                                                                  num_layers: int) -> None:
    """Blocks arrive per step from two stages; ``block`` for any layer range and prefix is
    what those layers computed, byte for byte, across compaction and a restart."""
    replica = RequestReplica(num_layers)
    split = num_layers // 2
    pos = 0
    for n in steps:
        for lo, hi in ((0, split), (split, num_layers)):
            ids, block = pack_kv([_layer_kv(g, pos, n) for g in range(lo, hi)])
            replica.add(ids, pos, block)
        pos += n
    assert replica.covered() == pos
    end = min(cut, pos)
    if end:
        for lo, hi in ((0, num_layers), (1, num_layers - 1 or 1), (num_layers - 1, num_layers)):
            if lo >= hi:
                continue
            ids, block = replica.block(lo, hi, end)
            assert unpack_kv(ids, block) == [_layer_kv(g, 0, end) for g in range(lo, hi)]
    replica.restart("a.1", end)
    assert replica.covered() == end
    assert replica.nbytes == 2 * num_layers * 2 * end * 3 * 4
    ids, more = pack_kv([_layer_kv(g, end, 2) for g in range(num_layers)])
    replica.add(ids, end, more)
    assert replica.covered() == end + 2
    assert unpack_kv(*replica.block(0, num_layers, end + 2)) == [_layer_kv(g, 0, end + 2) for g in range(num_layers)]


@pytest.mark.spec("FO8")
def test_blocks_out_of_order_wait_their_turn_and_a_gap_stops_a_layers_replica() -> None:
    replica = RequestReplica(2)
    replica.add(*_packed(1, 4, 2))  # came before the block it continues
    for g in (0, 1):
        replica.add(*_packed(g, 0, 4))
    replica.add(*_packed(1, 0, 4))  # a repeat: ignored
    assert replica.layers[1].end == 6
    replica.add(*_packed(0, 5, 1))  # position 4 was lost: layer 0 stays at 4
    assert replica.covered() == 4
    assert unpack_kv(*replica.block(1, 2, 6)) == [_layer_kv(1, 0, 6)]
    before = replica.nbytes
    replica.restart("b", 4)  # the early block of layer 0 and layer 1's positions 4, 5 are dropped
    assert replica.nbytes == before - _packed(0, 5, 1)[2].nbytes - _packed(1, 4, 2)[2].nbytes
    assert not replica.layers[0].early
    with pytest.raises(BackendError, match="does not cover"):
        replica.block(0, 2, 5)
    with pytest.raises(BackendError, match="not a layer"):
        replica.add(*_packed(7, 0, 1))
    assert RequestReplica(3).covered() == 0  # a layer that never arrived: nothing is usable


def _packed(g: int, start: int, n: int) -> tuple[list[int], int, WireTensor]:
    ids, block = pack_kv([_layer_kv(g, start, n)])
    return ids, start, block


@pytest.mark.spec("FO8")
def test_the_store_keeps_its_budget_drops_stale_attempts_and_frees_on_close() -> None:
    store = ReplicaStore(budget_bytes=2 * 2 * 3 * 4 * 10)  # one layer, ten positions
    assert ReplicaStore(0).open("r", 1) is None
    replica = store.open("r", 1)
    assert replica is not None
    store.start_attempt(replica, "r.0", 0)
    ids, start, block = _packed(0, 0, 6)
    store.add("r.0", ids, start, block)
    store.add("r.9", *_packed(0, 6, 1))  # another attempt's block: dropped
    assert store.nbytes == block.nbytes and replica.covered() == 6
    store.start_attempt(replica, "r.1", 4)  # resumed at 4: positions 4, 5 dropped
    store.add("r.0", *_packed(0, 4, 1))  # the failed attempt's late block: dropped
    assert store.nbytes == block.nbytes * 4 // 6 and replica.covered() == 4
    store.add("r.1", *_packed(0, 4, 6))
    assert replica.covered() == 10 and store.nbytes == store.budget_bytes
    store.add("r.1", *_packed(0, 10, 1))  # past the budget: the replica is dropped
    assert replica.broken and replica.covered() == 0 and store.nbytes == 0
    again = store.open("s", 1)
    assert again is not None
    store.start_attempt(again, "s.0", 0)
    store.add("s.0", *_packed(0, 0, 3))
    store.close("s")
    store.close("r")
    assert store.nbytes == 0


def _kill_after_5(params: SamplingParams, victim: str, *, budget: int = 1 << 20, drop: set[str] | None = None,
                  loss: float = 0.0, duplicate: float = 0.0, seed: int = 0,
                  send_s: float = 1.0) -> tuple[list[int], MiniCluster]:
    """Generate on 3 members and kill ``victim`` after the 5th token; ``send_s`` also bounds
    the wait for the stages' ``kv.loaded`` answers before the new attempt re-prefills."""
    async def go() -> tuple[list[int], MiniCluster]:
        cluster = MiniCluster(3, seed=seed, kv_replica_bytes=budget, timeouts=replace(TIMEOUTS, send_s=send_s))
        cluster.faults.drop_types = drop or set()
        cluster.faults.loss, cluster.faults.duplicate = loss, duplicate
        coordinator = "m2" if victim == "m0" else "m0"
        try:
            got = await run_request(cluster, params, coordinator=coordinator, on_token={5: lambda: cluster.kill(victim)})
            await asyncio.sleep(0.3)  # releases travel
            return got, cluster
        finally:
            await cluster.close()
    return asyncio.run(go())


def _computed_after_the_loss(cluster: MiniCluster) -> list[int]:
    """Positions each stage of the new plan ran (its backend was loaded after the kill)."""
    assert cluster.plan is not None
    return [cluster.nodes[s.member_id].worker.backend.tokens_computed  # type: ignore[union-attr]
            for s in cluster.plan.stages]


@pytest.mark.spec("FO8", "FO1")
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("victim", ["m1", "m2", "m0"], ids=["middle", "last", "first"])
def test_a_failover_resumes_from_the_replica_with_the_fault_free_tokens(params: SamplingParams, victim: str) -> None:
    expected = reference_tokens(params)
    # nothing but the victim is lost: a long wait for the KV loads costs nothing, and a 1 s one
    # can run out on a loaded machine (the right tokens, from a re-prefill the counts below reject)
    got, cluster = _kill_after_5(params, victim, send_s=30.0)
    assert got == expected
    # prompt 8 + 5 tokens: the replica covers 12 positions (11 when the last step's block was
    # still on its way at the kill), so the resumed attempt runs 1 (2) positions, then decodes
    # the last 6 tokens: 7 (8) per stage instead of 13 + 6
    computed = _computed_after_the_loss(cluster)
    assert len(computed) == 2 and all(n in (7, 8) for n in computed)
    coordinator = cluster.nodes["m2" if victim == "m0" else "m0"].coordinator
    assert len(coordinator.recovery_times) == 1
    assert coordinator.replicas.nbytes == 0  # freed with the request
    assert all(node.worker.caches == {} for m, node in cluster.nodes.items() if m in cluster.alive)
    assert cluster.messages.get("kv.load") == 2


@pytest.mark.spec("FO8")
@pytest.mark.parametrize("how", ["replica-lost", "load-unanswered", "budget-too-small", "replica-off"])
def test_a_missing_piece_falls_back_to_the_re_prefill_with_the_same_tokens(how: str) -> None:
    expected = reference_tokens(GREEDY)
    kwargs: dict[str, object] = {
        "replica-lost": {"drop": {"kv.replica"}},
        "load-unanswered": {"drop": {"kv.loaded"}},
        "budget-too-small": {"budget": 64},
        "replica-off": {"budget": 0},
    }[how]
    got, cluster = _kill_after_5(GREEDY, "m1", **kwargs)  # type: ignore[arg-type]
    assert got == expected
    assert _computed_after_the_loss(cluster) == [13 + 6, 13 + 6]
    assert all(node.worker.caches == {} for m, node in cluster.nodes.items() if m in cluster.alive)
    assert cluster.nodes["m0"].coordinator.replicas.nbytes == 0
    if how == "replica-off":
        assert "kv.replica" not in cluster.messages


@pytest.mark.spec("FO8")
@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), loss=st.sampled_from([0.0, 0.1, 0.2]), duplicate=st.sampled_from([0.0, 0.3]),
       victim=st.sampled_from(["m1", "m2"]))
def test_a_lossy_network_never_changes_a_resumed_requests_tokens(seed: int, loss: float, duplicate: float,
                                                                 victim: str) -> None:
    """Lost or repeated replica blocks, loads and answers only make the resume shorter or
    turn it into a re-prefill; the tokens stay those of a fault-free run."""
    got, cluster = _kill_after_5(GREEDY, victim, loss=loss, duplicate=duplicate, seed=seed)
    assert got == reference_tokens(GREEDY)
    assert cluster.nodes["m0"].coordinator.replicas.nbytes == 0


@pytest.mark.spec("FO8")
def test_a_backend_whose_export_breaks_its_contract_fails_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica is best effort: an export raising something other than BackendError is
    logged, the request's tokens are unchanged, and a failover re-prefills."""
    from mesh.testing.minicluster import HistoryBackend

    def broken(self: HistoryBackend, cache: object, *, start_pos: int, end_pos: int) -> list[object]:
        raise ValueError("not implemented by this plugin")

    monkeypatch.setattr(HistoryBackend, "export_kv", broken)
    got, cluster = _kill_after_5(GREEDY, "m1")
    assert got == reference_tokens(GREEDY)
    assert cluster.nodes["m0"].coordinator.failed_attempts == 1  # the kill only, no export failure
    assert _computed_after_the_loss(cluster) == [13 + 6, 13 + 6]  # nothing to resume from


@pytest.mark.spec("FO8")
@pytest.mark.parametrize("nodes", [1, 2])
def test_an_attempt_on_the_coordinator_alone_sends_no_replica(nodes: int) -> None:
    """FO8: a replica of stages that all run on the coordinator would die with the only node
    that could load it, so they send none; a pipeline's stages do (the coordinator's own too)."""
    async def go() -> tuple[list[int], dict[str, int]]:
        cluster = MiniCluster(nodes, seed=0, kv_replica_bytes=1 << 20)
        try:
            got = await run_request(cluster, GREEDY, coordinator="m0")
            return got, dict(cluster.messages)
        finally:
            await cluster.close()
    got, messages = asyncio.run(go())
    assert got == reference_tokens(GREEDY)
    if nodes == 1:
        assert "kv.replica" not in messages
    else:
        assert messages.get("kv.replica", 0) >= 2 * (len(got) - 1)  # both stages, each step (the last may be released first)
