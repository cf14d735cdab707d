"""The request plane's typed messages: every one round-trips through the wire form, and a
malformed one is refused once, naming the field (spec N15); the stage's ledger decides what to
compute, replay or drop (spec FO2, N8)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import FrameError
from mesh.runtime import messages
from mesh.runtime.messages import (
    Forward,
    KvLoad,
    KvLoaded,
    KvPush,
    KvReplica,
    Release,
    Released,
    StepError,
    Token,
)
from mesh.runtime.stage_core import COMPUTE, DROP, Replay, StageLedger
from mesh.wire import Message, WireTensor

ids = st.text(alphabet="abcdef0123456789.", min_size=1, max_size=64)
members = st.text(alphabet="abcdef0123456789", min_size=1, max_size=128)
small = st.integers(min_value=0, max_value=2**31)
BLOCK = WireTensor(dtype="f32", shape=(1, 2, 1, 3, 4), data=bytes(96))


@st.composite
def routes(draw: Any) -> list[list[Any]]:
    n = draw(st.integers(min_value=1, max_value=4))
    return [[draw(members), 4 * i, 4 * i + 4] for i in range(n)]


@st.composite
def forwards(draw: Any) -> Forward:
    route = draw(routes())
    first = draw(st.booleans())
    n = draw(st.integers(1, 8)) if first else 2
    return Forward(req=draw(ids), coord=draw(members), plan_id=draw(st.text(max_size=16)), route=route,
                   idx=draw(st.integers(min_value=0, max_value=len(route) - 1)), step=draw(small), pos=draw(small),
                   tokens=draw(st.lists(small, min_size=n, max_size=n)) if first else None,
                   temperature=draw(st.floats(min_value=0, max_value=2)), top_p=draw(st.floats(0.01, 1.0)),
                   seed=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
                   kv_to=draw(st.none() | routes()), replica=draw(st.booleans()),
                   timing=draw(st.none() | st.lists(st.tuples(members, st.floats(0, 10)).map(list), max_size=4)),
                   hidden=None if first else WireTensor(dtype="f32", shape=(1, 2, 3), data=bytes(24)),
                   split=draw(st.none() | st.just([1] * n)))


records = st.one_of(
    forwards(),
    st.builds(Token, req=ids, step=small, token=small, timing=st.just([["a", 0.5]])),
    st.builds(StepError, req=ids, message=st.text(max_size=50), fatal=st.booleans()),
    st.builds(Release, req=ids), st.builds(Released, req=ids),
    st.builds(KvReplica, req=ids, start=small, layers=st.lists(small, min_size=1, max_size=4), block=st.just(BLOCK)),
    st.builds(KvLoad, req=ids, coord=members, layers=st.lists(small, min_size=1, max_size=4),
              end=st.integers(1, 10**6), block=st.just(BLOCK)),
    st.builds(KvLoaded, req=ids, member=members, end=small, ok=st.booleans(), message=st.text(max_size=20)),
    st.builds(KvPush, req=ids, coord=members, layer=small, end=st.integers(1, 10**6),
              layer_range=st.tuples(small, small), block=st.just(BLOCK)),
)


@pytest.mark.spec("N15")
@given(records)
def test_every_message_round_trips_through_its_wire_form(record: Any) -> None:
    assert messages.decode(record.to_message()) == record


def forward_body(**override: Any) -> dict[str, Any]:
    body = {"req": "r.0", "coord": "c", "plan": "p", "route": [["a", 0, 4]], "idx": 0, "step": 0, "pos": 0,
            "tokens": [1, 2], "sp": {"t": 0.0, "p": 1.0, "seed": 3}}
    body.update(override)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.spec("N15", "FO9")
@pytest.mark.parametrize(("body", "field"), [
    (forward_body(req=""), "req"), (forward_body(req="x" * 65), "req"), (forward_body(coord=7), "coord"),
    (forward_body(route=[]), "route"), (forward_body(route=[["a", 4, 4]]), "route"), (forward_body(idx=1), "idx"),
    (forward_body(step=-1), "step"), (forward_body(pos=True), "pos"), (forward_body(sp=[1]), "sp"),
    (forward_body(sp={"t": float("nan"), "p": 1.0, "seed": 1}), "'t'"), (forward_body(tokens=[]), "tokens"),
    (forward_body(tokens=None), "tokens or hidden"), (forward_body(kv_to=[["b"]]), "kv_to"),
    (forward_body(split=[1, 0]), "split"), (forward_body(split=[True, 1]), "split"),
    (forward_body(split=[1, 2]), "sums to 3, the step has 2"),
])
def test_a_malformed_forward_is_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(FrameError, match=field):
        messages.decode(Message(type="forward", body=body))


@pytest.mark.spec("N15")
def test_other_malformed_messages_are_refused() -> None:
    with pytest.raises(FrameError, match="tensor"):
        messages.decode(Message(type="kv.load", body={"req": "r", "coord": "c", "layers": [0], "end": 3}))
    with pytest.raises(FrameError, match="layers"):
        messages.decode(Message(type="kv.replica", body={"req": "r", "start": 0, "layers": []}, tensor=BLOCK))
    with pytest.raises(FrameError, match="range"):
        messages.decode(Message(type="kv.push", body={"req": "r", "coord": "c", "layer": 0, "end": 1, "range": [0]},
                                tensor=BLOCK))
    with pytest.raises(FrameError, match="token"):
        messages.decode(Message(type="token", body={"req": "r", "step": 0, "token": "x"}))
    with pytest.raises(FrameError, match="not a request-plane message"):
        messages.decode(Message(type="ping", body={}))
    # an oversized timing list only feeds statistics: it is reset, not refused
    assert messages.decode(Message(type="token", body={"req": "r", "step": 0, "token": 1, "t": [[0]] * 99})).timing == []


KV = {"tensor": BLOCK}
REJECTED = [  # (type, body, extra Message fields, what the error names)
    ("token", {"req": "r", "step": -1, "token": 1}, {}, "step"),
    ("token", {"req": "r" * 65, "step": 0, "token": 1}, {}, "req"),
    ("token", {"req": "r", "step": 0, "token": True}, {}, "token"),
    ("error", {"message": "boom", "fatal": True}, {}, "req"),
    ("release", {"req": ""}, {}, "req"),
    ("released", {"req": ["r"]}, {}, "req"),
    ("kv.replica", {"req": "r", "start": 0, "layers": [0]}, {}, "tensor"),
    ("kv.replica", {"req": "r", "start": -1, "layers": [0]}, KV, "start"),
    ("kv.replica", {"req": "r", "start": 0, "layers": [-1]}, KV, "layers"),
    ("kv.load", {"req": "r", "coord": "c" * 129, "layers": [0], "end": 3}, KV, "coord"),
    ("kv.load", {"req": "r", "coord": "c", "layers": [0], "end": 0}, KV, "end"),
    ("kv.load", {"req": "r", "coord": "c", "layers": "0", "end": 3}, KV, "layers"),
    ("kv.loaded", {"req": "r", "member": "", "end": 3, "ok": True}, {}, "member"),
    ("kv.loaded", {"req": "r", "member": "m", "end": "3", "ok": True}, {}, "end"),
    ("kv.push", {"req": "r", "coord": "c", "layer": 0, "end": 1, "range": [0, 1]}, {}, "tensor"),
    ("kv.push", {"req": "r", "coord": "c", "layer": -2, "end": 1, "range": [0, 1]}, KV, "layer"),
    ("kv.push", {"req": "r", "coord": "c", "layer": 0, "end": 1, "range": [0, True]}, KV, "range"),
    ("forward", forward_body(route=[["m" * 129, 0, 4]]), {}, "route"),
    ("forward", forward_body(route=[["a", -1, 4]]), {}, "route"),
    ("forward", forward_body(tokens=[1, False]), {}, "tokens"),
    ("forward", forward_body(sp={"t": 0.0, "p": "1", "seed": 1}), {}, "'p'"),
    ("forward", forward_body(sp={"t": 0.0, "p": 1.0, "seed": 1.5}), {}, "seed"),
]


@pytest.mark.spec("N15")
@pytest.mark.parametrize(("kind", "body", "extra", "field"), REJECTED,
                         ids=[f"{k}-{f}-{i}" for i, (k, _, _, f) in enumerate(REJECTED)])
def test_each_malformed_field_is_refused_naming_it(kind: str, body: dict[str, Any], extra: dict[str, Any],
                                                   field: str) -> None:
    with pytest.raises(FrameError, match=field):
        messages.decode(Message(type=kind, body=body, **extra))


@pytest.mark.spec("N15")
@given(records, st.sampled_from(["req", "coord", "member", "step", "layers", "end", "route", "sp"]))
def test_a_message_missing_a_required_field_is_refused(record: Any, key: str) -> None:
    msg = record.to_message()
    if key not in msg.body or key == "sp" and msg.type != "forward":
        return
    body = {k: v for k, v in msg.body.items() if k != key}
    with pytest.raises(FrameError):
        messages.decode(Message(type=msg.type, body=body, tensor=msg.tensor))


@pytest.mark.spec("FO2")
def test_the_ledger_replays_a_repeated_step_and_drops_a_step_in_flight() -> None:
    ledger = StageLedger()
    assert ledger.step("r.0", 0) == COMPUTE
    assert ledger.step("r.0", 0) == DROP  # being computed: its reply is on the way
    assert ledger.computed("r.0", 0, "b", "out0")
    assert ledger.step("r.0", 0) == Replay("b", "out0")  # sent again: answered from what it sent
    assert ledger.step("r.0", 1) == COMPUTE
    assert ledger.computed("r.0", 1, "c", "out1")
    assert ledger.step("r.0", 0) == DROP  # older than the last answer: stale
    ledger.failed("r.0", 2)
    assert ledger.step("r.0", 2) == COMPUTE  # a failed step may be retried


@pytest.mark.spec("N8", "FO6")
def test_released_requests_drop_late_steps_and_lost_coordinators_free_caches() -> None:
    ledger = StageLedger(released_memory=2)
    ledger.touch("r.0", "c1", now=1.0)
    ledger.touch("r.1", "c2", now=5.0)
    assert ledger.coordinated_by("c1") == ["r.0"] and ledger.idle(now=8.0, idle_s=5.0) == ["r.0"]
    assert ledger.step("r.0", 0) == COMPUTE
    ledger.release("r.0")
    assert not ledger.computed("r.0", 0, "b", "late")  # released while computing: not sent
    assert ledger.step("r.0", 1) == DROP and ledger.started("r.0")
    ledger.release("r.1")
    ledger.release("r.2")
    assert not ledger.is_released("r.0")  # only the last released_memory ids are remembered


cbor_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=80),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=4), max_leaves=12)
keys = st.sampled_from(["req", "coord", "plan", "route", "idx", "step", "pos", "tokens", "sp", "kv_to", "replica",
                        "t", "token", "message", "fatal", "start", "layers", "end", "member", "ok", "layer", "range"])


@pytest.mark.spec("N15")
@given(st.sampled_from(sorted(messages.DECODERS)), st.dictionaries(keys, cbor_values, max_size=12),
       st.none() | st.just(BLOCK))
def test_any_body_decodes_or_is_refused_with_a_frame_error(kind: str, body: dict[str, Any],
                                                            tensor: WireTensor | None) -> None:
    try:
        record = messages.decode(Message(type=kind, body=body, tensor=tensor))
    except FrameError:
        return
    assert messages.decode(record.to_message()) == record  # what is accepted is canonical


@pytest.mark.spec("FO9")
@given(st.integers(1, 6), st.integers(1, 4), st.sampled_from(["f32", "bf16", "u8"]), st.data())
def test_hidden_states_split_by_position_join_back(n: int, width: int, dtype: str, data: Any) -> None:
    size = {"f32": 4, "bf16": 2, "u8": 1}[dtype]
    tensor = WireTensor(dtype=dtype, shape=(1, n, width), data=bytes((i * 7) % 256 for i in range(n * width * size)))
    cut = data.draw(st.integers(0, n))
    parts = [tensor.rows(a, b) for a, b in ((0, cut), (cut, n)) if a < b]
    assert WireTensor.join_rows(parts) == tensor
    with pytest.raises(FrameError, match="positions"):
        tensor.rows(0, n + 1)
    with pytest.raises(FrameError, match="join"):
        WireTensor.join_rows([tensor, WireTensor(dtype=dtype, shape=(1, 1, width + 1), data=bytes((width + 1) * size))])


@pytest.mark.spec("A26")
def test_logprobs_travel_with_the_token_and_bad_ones_are_refused() -> None:
    from mesh.runtime.engine import Sampled

    token = Token(req="r.1", step=3, token=Sampled(7, -0.5, ((7, -0.5), (2, -1.5))), timing=[])
    back = Token.decode(token.to_message())
    assert isinstance(back.token, Sampled) and back.token == 7
    assert back.token.logprob == -0.5 and back.token.top == ((7, -0.5), (2, -1.5))
    plain = Token.decode(Token(req="r.1", step=3, token=7, timing=[]).to_message())
    assert not isinstance(plain.token, Sampled)
    for bad in ([0.5, []], [-0.1, [[1]]], ["x", []], [-0.1, [[-1, -0.2]]], [float("nan"), []], [-0.1, [[1, -1.0]] * 21]):
        body = {"req": "r.1", "step": 3, "token": 7, "t": [], "lp": bad}
        with pytest.raises(FrameError, match="'lp'"):
            Token.decode(Message(type="token", body=body))
