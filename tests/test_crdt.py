"""ClusterState (mesh/kernel/crdt.py): convergence (K1), idempotence (K3), no resurrection (K6).

Histories are simulated with replicas that each keep a log of the events they delivered, in
delivery order. ``sync(a, b)`` delivers to ``a``, in ``b``'s order, every event ``a`` has not
seen: ``b``'s log is a causal order, so this is causal delivery. ``merge_state(a, b)`` joins
the states instead and appends the new events to ``a``'s log in ``b``'s order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mesh.errors import KernelError
from mesh.kernel.crdt import ClusterState, Dot
from mesh.kernel.hlc import Timestamp

KEYS = ["member/a", "member/b", "request/r1"]
LIFECYCLE = ["created", "running", "finished", "cancelled", "failed"]


@dataclass(frozen=True)
class Op:
    dot: Dot
    hlc: Timestamp
    key: str
    value: Any
    replaces: tuple[Dot, ...]


def apply_op(state: ClusterState, op: Op) -> None:
    state.apply(dot=op.dot, hlc=op.hlc, key=op.key, value=op.value, replaces=op.replaces)


def fold(ops: list[Op]) -> ClusterState:
    state = ClusterState()
    for op in ops:
        apply_op(state, op)
    return state


@dataclass
class Replica:
    name: str
    state: ClusterState = field(default_factory=ClusterState)
    log: list[Op] = field(default_factory=list)  # delivery order: a causal order
    seen: set[Dot] = field(default_factory=set)
    seq: int = 0
    removed: set[Dot] = field(default_factory=set)  # dots this replica saw removed (K6)

    def issue(self, key: str, value: Any, ms: int) -> Op:
        self.seq += 1
        op = Op((self.name, self.seq), Timestamp(physical_ms=ms, counter=0), key, value,
                tuple(self.state.observed(key)))
        self.deliver(op)
        return op

    def deliver(self, op: Op) -> None:
        before = {(k, d) for k in self.state.keys() for d in self.state.observed(k)}
        apply_op(self.state, op)
        self.log.append(op)
        self.seen.add(op.dot)
        self.note_removed(before)

    def sync_from(self, other: Replica) -> None:
        for op in list(other.log):
            if op.dot not in self.seen:
                self.deliver(op)

    def merge_from(self, other: Replica) -> None:
        before = {(k, d) for k in self.state.keys() for d in self.state.observed(k)}
        self.state = self.state.merge(other.state)
        for op in other.log:
            if op.dot not in self.seen:
                self.log.append(op)
                self.seen.add(op.dot)
        self.note_removed(before)

    def restart(self) -> None:
        self.state = ClusterState.from_wire(self.state.to_wire())

    def live(self) -> set[Dot]:
        return {d for k in self.state.keys() for d in self.state.observed(k)}

    def note_removed(self, before: set[tuple[str, Dot]]) -> None:
        live = self.live()
        self.removed |= {d for _, d in before if d not in live}
        # spec K6: a dot this replica saw removed never comes back
        assert not (self.removed & live), f"resurrected: {self.removed & live}"


# -- random histories --------------------------------------------------------------------

replica_ix = st.integers(0, 3)
step = st.one_of(
    st.tuples(st.just("write"), replica_ix, st.sampled_from(KEYS), st.sampled_from(LIFECYCLE), st.integers(0, 3)),
    st.tuples(st.just("remove"), replica_ix, st.sampled_from(KEYS)),
    st.tuples(st.just("sync"), replica_ix, replica_ix),
    st.tuples(st.just("merge"), replica_ix, replica_ix),
    st.tuples(st.just("restart"), replica_ix),
)
histories = st.tuples(st.integers(2, 4), st.lists(step, max_size=40))


def run(history: tuple[int, list[tuple[Any, ...]]]) -> tuple[list[Replica], list[Op]]:
    n, steps = history
    replicas = [Replica(f"node-{i}") for i in range(n)]
    issued: list[Op] = []
    for s in steps:
        kind, a = s[0], replicas[s[1] % n]
        if kind == "write":
            issued.append(a.issue(s[2], s[3], s[4]))
        elif kind == "remove":
            issued.append(a.issue(s[2], None, 0))
        elif kind == "sync":
            a.sync_from(replicas[s[2] % n])
        elif kind == "merge":
            a.merge_from(replicas[s[2] % n])
        else:
            a.restart()
    return replicas, issued


def full_sync(replicas: list[Replica]) -> None:
    for _ in range(2):
        for a in replicas:
            for b in replicas:
                a.sync_from(b)


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.spec("K1")
@FAST
@given(histories)
def test_full_sync_converges_to_the_fold_of_all_events(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, issued = run(history)
    for r in replicas:  # each replica is exactly the fold of what it delivered
        assert r.state.content_hash() == fold(r.log).content_hash()
    full_sync(replicas)
    model = fold(issued).content_hash()  # issue order is a causal order
    assert {r.state.content_hash() for r in replicas} == {model}


@pytest.mark.spec("K1")
@FAST
@given(histories)
def test_merge_equals_fold_of_the_union(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, _ = run(history)
    for a in replicas:
        for b in replicas:
            union = list(a.log) + [op for op in b.log if op.dot not in a.seen]
            assert a.state.merge(b.state).content_hash() == fold(union).content_hash()


@pytest.mark.spec("K1", "K3")
@FAST
@given(histories, st.data())
def test_merge_laws(history: tuple[int, list[tuple[Any, ...]]], data: st.DataObject) -> None:
    replicas, _ = run(history)
    pick = st.sampled_from(replicas)
    x, y, z = (data.draw(pick).state for _ in range(3))
    h = ClusterState.content_hash
    before = (h(x), h(y), h(z))
    assert h(x.merge(y)) == h(y.merge(x))
    assert h(x.merge(y).merge(z)) == h(x.merge(y.merge(z)))
    assert h(x.merge(x)) == h(x)
    assert h(x.merge(y).merge(y)) == h(x.merge(y))
    assert (h(x), h(y), h(z)) == before  # merge does not touch its inputs


@pytest.mark.spec("K3")
@FAST
@given(histories)
def test_applying_an_event_twice_changes_nothing(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, _ = run(history)
    for r in replicas:
        snapshot = r.state.content_hash()
        for op in r.log:
            apply_op(r.state, op)
        assert r.state.content_hash() == snapshot
        restarted = ClusterState.from_wire(r.state.to_wire())  # K6 after restart, too
        for op in r.log:
            apply_op(restarted, op)
        assert restarted.content_hash() == snapshot


@pytest.mark.spec("K1")
@FAST
@given(histories)
def test_content_hash_ignores_insertion_order(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, _ = run(history)
    for r in replicas:
        wire = r.state.to_wire()
        shuffled = {"context": wire["context"],
                    "entries": [[k, list(reversed(es))] for k, es in reversed(wire["entries"])]}
        assert ClusterState.from_wire(shuffled).content_hash() == r.state.content_hash()


@pytest.mark.spec("K1")
def test_content_hash_ignores_map_key_order_inside_values() -> None:
    def state(value: dict[str, Any]) -> ClusterState:
        return ClusterState.from_wire({"entries": [["k", [["a", 1, [1, 0], value]]]], "context": {"a": 1}})

    assert state({"x": 1, "yy": [2], "z": {"p": 1, "q": 2}}).content_hash() == \
        state({"z": {"q": 2, "p": 1}, "yy": [2], "x": 1}).content_hash()


@pytest.mark.spec("K1")
@FAST
@given(histories)
def test_views_are_consistent(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, _ = run(history)
    for r in replicas:
        for key in KEYS:
            vals = r.state.values(key)
            assert r.state.get(key) == (vals[-1] if vals else None)
            assert (key in r.state.keys()) == bool(vals) == bool(r.state.observed(key))
            expected = max(vals, key=LIFECYCLE.index) if vals else None
            assert r.state.lifecycle(key, LIFECYCLE) == expected
        assert r.state.live_entries() == sum(len(r.state.observed(k)) for k in r.state.keys())


# -- views -------------------------------------------------------------------------------

def ts(ms: int, counter: int = 0) -> Timestamp:
    return Timestamp(physical_ms=ms, counter=counter)


@pytest.mark.spec("K1")
def test_lww_view_picks_max_hlc_then_dot() -> None:
    s = ClusterState()
    s.apply(dot=("b", 1), hlc=ts(5), key="placement", value="plan-b", replaces=[])
    s.apply(dot=("a", 1), hlc=ts(7), key="placement", value="plan-a", replaces=[])
    assert s.get("placement") == "plan-a"  # higher hlc wins
    s.apply(dot=("c", 1), hlc=ts(7), key="placement", value="plan-c", replaces=[])
    assert s.get("placement") == "plan-c"  # hlc tie: greater dot wins
    assert s.values("placement") == ["plan-b", "plan-a", "plan-c"]
    s.apply(dot=("a", 2), hlc=ts(8), key="placement", value="plan-a2", replaces=s.observed("placement"))
    assert s.values("placement") == ["plan-a2"] and s.get("placement") == "plan-a2"
    assert s.get("absent") is None and s.values("absent") == []


@pytest.mark.spec("K1")
def test_lifecycle_view_picks_the_highest_ranked_concurrent_state() -> None:
    a, b = Replica("a"), Replica("b")
    a.issue("request/r1", "created", 1)
    b.sync_from(a)
    a.issue("request/r1", "finished", 3)  # a finishes ...
    b.issue("request/r1", "running", 9)   # ... while b, concurrently and later by hlc, says running
    full_sync([a, b])
    for r in (a, b):
        assert r.state.get("request/r1") == "running"  # LWW would regress
        assert r.state.lifecycle("request/r1", LIFECYCLE) == "finished"  # the monotone view does not
    s = ClusterState()
    s.apply(dot=("x", 1), hlc=ts(1), key="request/r2", value={"not": "a state"}, replaces=[])
    assert s.lifecycle("request/r2", LIFECYCLE) is None  # unknown values are ignored
    assert s.lifecycle("request/none", LIFECYCLE) is None


def test_keys_by_prefix() -> None:
    s = ClusterState()
    for i, key in enumerate(["member/b", "member/a", "status/a", "placement"], start=1):
        s.apply(dot=("n", i), hlc=ts(i), key=key, value=i, replaces=[])
    assert s.keys() == ["member/a", "member/b", "placement", "status/a"]
    assert s.keys("member/") == ["member/a", "member/b"]
    s.apply(dot=("n", 5), hlc=ts(5), key="member/a", value=None, replaces=s.observed("member/a"))
    assert s.keys("member/") == ["member/b"] and s.live_entries() == 3


# -- no resurrection ---------------------------------------------------------------------

@pytest.mark.spec("K6")
def test_removed_entry_stays_removed() -> None:
    r1, r2 = Replica("n1"), Replica("n2")
    write = r1.issue("member/x", {"addr": "10.0.0.1"}, 1)
    r2.sync_from(r1)  # r2 now holds member/x and goes stale
    r1.issue("member/x", None, 2)
    assert r1.state.get("member/x") is None and r1.state.keys() == []
    stale = r2.state
    for merged in (r1.state.merge(stale), stale.merge(r1.state)):
        assert merged.get("member/x") is None and merged.live_entries() == 0
    apply_op(r1.state, write)  # a late duplicate of the write
    assert r1.state.get("member/x") is None
    restarted = ClusterState.from_wire(r1.state.to_wire())  # after a restart
    apply_op(restarted, write)
    assert restarted.merge(stale).get("member/x") is None
    r2.sync_from(r1)
    assert r2.state.get("member/x") is None


@pytest.mark.spec("K6")
def test_concurrent_write_survives_a_remove_add_wins() -> None:
    """A remove deletes only what its writer observed: a concurrent write survives (add wins)."""
    r1, r2 = Replica("n1"), Replica("n2")
    r1.issue("member/x", "v1", 1)
    r2.sync_from(r1)
    r1.issue("member/x", None, 2)  # removes v1
    r2.issue("member/x", "v2", 3)  # concurrent rewrite, replaces v1 too
    full_sync([r1, r2])
    assert r1.state.values("member/x") == r2.state.values("member/x") == ["v2"]


@pytest.mark.spec("K6")
@FAST
@given(histories)
def test_no_resurrection_in_random_histories(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, _ = run(history)  # Replica.note_removed asserts K6 after every step
    full_sync(replicas)
    for r in replicas:
        assert not (r.removed & r.live())


# -- validation and wire -----------------------------------------------------------------

@pytest.mark.spec("K6")
@FAST
@given(histories)
def test_wire_round_trip(history: tuple[int, list[tuple[Any, ...]]]) -> None:
    replicas, _ = run(history)
    for r in replicas:
        back = ClusterState.from_wire(r.state.to_wire())
        assert back.to_wire() == r.state.to_wire()
        assert back.content_hash() == r.state.content_hash()
        assert back.context == r.state.context


def valid_wire() -> dict[str, Any]:
    s = ClusterState()
    s.apply(dot=("a", 1), hlc=ts(1), key="member/a", value={"x": [1, 2.5, b"b"]}, replaces=[])
    s.apply(dot=("b", 1), hlc=ts(2, 3), key="placement", value="p", replaces=[])
    return s.to_wire()


MALFORMED: list[Any] = [
    None, [], "state", {}, {"entries": []}, {"context": {}},
    {"entries": [], "context": {}, "extra": 1},
    {"entries": {}, "context": {}},
    {"entries": [], "context": []},
    {"entries": [], "context": {"a": -1}},
    {"entries": [["k"]], "context": {"a": 1}},
    {"entries": [["k", []]], "context": {"a": 1}},
    {"entries": [["", [["a", 1, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k" * 257, [["a", 1, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [[7, [["a", 1, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1, 0]]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 0, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", True, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["", 1, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 2, [1, 0], 1]]]], "context": {"a": 1}},  # dot not in context
    {"entries": [["k", [["a", 1, [1, 0], None]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1, 0], {1: 2}]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1, 0], {1, 2}]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [-1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, "ts", 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1, 0], 1], ["a", 1, [1, 0], 2]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1, 0], 1]]], ["j", [["a", 1, [1, 0], 1]]]], "context": {"a": 1}},
    {"entries": [["k", [["a", 1, [1, 0], 1]]], ["k", [["a", 2, [1, 0], 1]]]], "context": {"a": 2}},
]


@pytest.mark.parametrize("wire", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_wire_raises_kernel_error(wire: Any) -> None:
    with pytest.raises(KernelError):
        ClusterState.from_wire(wire)


def test_deeply_nested_value_is_rejected() -> None:
    value: Any = 1
    for _ in range(100):
        value = [value]
    with pytest.raises(KernelError):
        ClusterState.from_wire({"entries": [["k", [["a", 1, [1, 0], value]]]], "context": {"a": 1}})


cbor_like = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=3) | st.binary(max_size=2),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@FAST
@given(cbor_like, st.data())
def test_from_wire_never_raises_anything_but_kernel_error(junk: Any, data: st.DataObject) -> None:
    wire = valid_wire()
    target = data.draw(st.sampled_from(["all", "entries", "context", "entry", "field"]))
    if target == "all":
        wire = junk
    elif target in ("entries", "context"):
        wire[target] = junk
    elif target == "entry":
        wire["entries"][0] = junk
    else:
        wire["entries"][0][1][0][data.draw(st.integers(0, 3))] = junk
    try:
        ClusterState.from_wire(wire)
    except KernelError:
        pass


def test_apply_validates_and_refuses_causal_gaps() -> None:
    s = ClusterState()
    s.apply(dot=("a", 1), hlc=ts(1), key="k", value=1, replaces=[])
    before = s.content_hash()
    bad: list[dict[str, Any]] = [
        {"dot": ("b", 1), "hlc": ts(2), "key": "k", "value": 2, "replaces": [("c", 1)]},  # unseen replace
        {"dot": ("b", 0), "hlc": ts(2), "key": "k", "value": 2, "replaces": []},
        {"dot": ("", 1), "hlc": ts(2), "key": "k", "value": 2, "replaces": []},
        {"dot": ["b", 1], "hlc": ts(2), "key": "k", "value": 2, "replaces": []},
        {"dot": ("b", 1), "hlc": (2, 0), "key": "k", "value": 2, "replaces": []},
        {"dot": ("b", 1), "hlc": ts(2), "key": "", "value": 2, "replaces": []},
        {"dot": ("b", 1), "hlc": ts(2), "key": "k", "value": 2, "replaces": [("a",)]},
    ]
    for kwargs in bad:
        with pytest.raises(KernelError):
            s.apply(**kwargs)
        assert s.content_hash() == before


def test_merge_rejects_a_dot_with_two_hlcs() -> None:
    a, b = ClusterState(), ClusterState()
    a.apply(dot=("n", 1), hlc=ts(1), key="k", value=1, replaces=[])
    b.apply(dot=("n", 1), hlc=ts(2), key="k", value=1, replaces=[])
    with pytest.raises(KernelError):
        a.merge(b)


def test_large_state_merges_and_round_trips() -> None:
    a, b = ClusterState(), ClusterState()
    for i in range(1, 5001):
        a.apply(dot=("a", i), hlc=ts(i), key=f"kv/{i % 500}", value=i, replaces=[])
        b.apply(dot=("b", i), hlc=ts(i), key=f"kv/{i % 700}", value=-i, replaces=b.observed(f"kv/{i % 700}"))
    merged = a.merge(b)
    assert merged.live_entries() == 5000 + 700
    assert ClusterState.from_wire(merged.to_wire()).content_hash() == merged.content_hash()


# -- stateful ----------------------------------------------------------------------------

class ReplicatedState(RuleBasedStateMachine):
    """Three replicas against the model: the fold of every issued event in issue order."""

    def __init__(self) -> None:
        super().__init__()
        self.replicas = [Replica(f"node-{i}") for i in range(3)]
        self.issued: list[Op] = []

    @rule(r=st.integers(0, 2), key=st.sampled_from(KEYS), value=st.sampled_from(LIFECYCLE), ms=st.integers(0, 5))
    def write(self, r: int, key: str, value: str, ms: int) -> None:
        self.issued.append(self.replicas[r].issue(key, value, ms))

    @rule(r=st.integers(0, 2), key=st.sampled_from(KEYS))
    def remove(self, r: int, key: str) -> None:
        self.issued.append(self.replicas[r].issue(key, None, 0))

    @rule(a=st.integers(0, 2), b=st.integers(0, 2))
    def sync(self, a: int, b: int) -> None:
        self.replicas[a].sync_from(self.replicas[b])

    @rule(a=st.integers(0, 2), b=st.integers(0, 2))
    def merge_state(self, a: int, b: int) -> None:
        self.replicas[a].merge_from(self.replicas[b])

    @rule(a=st.integers(0, 2))
    def restart(self, a: int) -> None:
        before = self.replicas[a].state.content_hash()
        self.replicas[a].restart()
        assert self.replicas[a].state.content_hash() == before

    @invariant()
    def each_replica_is_the_fold_of_its_log(self) -> None:
        for r in self.replicas:
            assert r.state.content_hash() == fold(r.log).content_hash()

    @invariant()
    def fully_synced_replicas_equal_the_model(self) -> None:
        model = fold(self.issued).content_hash()
        joined = functools.reduce(ClusterState.merge, (r.state for r in self.replicas))
        assert joined.content_hash() == model
        for r in self.replicas:  # delivering everything to each replica, on copies
            copy = ClusterState.from_wire(r.state.to_wire())
            delivered = set(r.seen)
            for op in self.issued:
                if op.dot not in delivered:
                    apply_op(copy, op)
            assert copy.content_hash() == model


ReplicatedState.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_replicated_state = pytest.mark.spec("K1", "K3", "K6")(ReplicatedState.TestCase)
