"""The request plane's messages as frozen, typed records, validated once when decoded.

Wire form (a ``mesh.wire.Message``: type, CBOR body, optional tensor), unchanged from the
protocol's first version so nodes interoperate; the short keys are named fields here:

- ``forward``: one step of attempt ``req`` through ``route`` (``[[member, layer_start,
  layer_end], ...]``), at stage ``idx``; ``tokens`` (first stage) or the hidden states as the
  tensor ``[1, n, hidden]``; ``sp`` = sampling {``t`` temperature, ``p`` top-p, ``seed``};
  ``t`` = per-stage timings ``[[member, compute s], ...]`` (spec N12); ``kv_to`` the decode
  route a prefill stage hands its KV to (spec N13); ``replica`` asks for KV replica blocks
  (spec FO8).
- ``token``: the sampled token of step ``step``; ``error``: a failed step (``fatal``: a new
  attempt would fail too); ``release`` / ``released``: free an attempt's KV caches (FO5).
- ``kv.replica`` (stage -> coordinator), ``kv.load`` (coordinator -> stage), ``kv.loaded``
  (the answer), ``kv.push`` (prefill stage -> decode stage, one layer): KV blocks
  ``[layers, 2, kv_heads, n, head_dim]`` with global layer ids (specs/backend.md B10).

``decode(msg)`` raises FrameError naming the field for anything malformed; the plane logs and
drops such a message (a peer's bad message never fails a request it does not belong to).
Spec: specs/node.md N15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mesh.errors import FrameError
from mesh.runtime.engine import MAX_SCHEMA_CHARS, MAX_TOP_LOGPROBS, Sampled
from mesh.runtime.prefix import MAX_KEYS
from mesh.wire import Message, WireTensor

MAX_REQ = 64  # characters of a request (attempt) id
MAX_MEMBER = 128  # characters of a member id
MAX_ROUTE = 256  # stages of a route
MAX_TIMING = 64  # entries of a step's timing list


def _req(body: dict[str, Any], key: str = "req", limit: int = MAX_REQ) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise FrameError(f"field {key!r} must be a string of 1..{limit} characters")
    return value


def _int(body: dict[str, Any], key: str, low: int = 0) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FrameError(f"field {key!r} must be an integer >= {low}")
    return value


def _float(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise FrameError(f"field {key!r} must be a finite number")
    return float(value)


def _route(value: Any, key: str) -> list[list[Any]]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_ROUTE:
        raise FrameError(f"field {key!r} must be a list of 1..{MAX_ROUTE} stages")
    for stage in value:
        if not (isinstance(stage, list) and len(stage) == 3 and isinstance(stage[0], str)
                and 0 < len(stage[0]) <= MAX_MEMBER
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in stage[1:])
                and stage[1] < stage[2]):
            raise FrameError(f"field {key!r}: each stage is [member, layer_start, layer_end] with start < end")
    return [list(stage) for stage in value]


def _ids(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                                             for g in value):
        raise FrameError(f"field {key!r} must be a non-empty list of layer ids")
    return list(value)


def _timing(value: Any) -> list[list[Any]]:
    """A step's timing list; a malformed or oversized one is reset (it only feeds statistics)."""
    return list(value) if isinstance(value, list) and len(value) < MAX_TIMING else []


def _tensor(msg: Message) -> WireTensor:
    if msg.tensor is None:
        raise FrameError(f"a {msg.type} message needs a tensor")
    return msg.tensor


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    req: str
    coord: str
    plan_id: str
    route: list[list[Any]]
    idx: int
    step: int
    pos: int
    tokens: list[int] | None  # the first stage's input; later stages take ``hidden``
    temperature: float
    top_p: float
    seed: int
    kv_to: list[list[Any]] | None = None
    replica: bool = False
    timing: list[list[Any]] | None = None
    hidden: WireTensor | None = None
    split: list[int] | None = None  # spec FO9: sub-steps computed one after the other
    # spec N24: (n, key) of cached prompt prefixes, longest first: the first stage takes the
    # longest it holds; later stages get the one it took (pos is then n)
    prefix: list[list[Any]] | None = None
    keep: list[Any] | None = None  # spec N24: (n, key): once computed, keep positions [0, n) in the prefix cache
    logprobs: int | None = None  # spec A26: the last stage reports logprobs and this many alternatives
    grammar: list[Any] | None = None  # spec A27: [JSON schema text, token ids generated so far]

    def to_message(self) -> Message:
        sp: dict[str, Any] = {"t": self.temperature, "p": self.top_p, "seed": self.seed}
        if self.logprobs is not None:
            sp["lp"] = self.logprobs
        body: dict[str, Any] = {"req": self.req, "coord": self.coord, "plan": self.plan_id, "route": self.route,
                                "idx": self.idx, "step": self.step, "pos": self.pos, "sp": sp}
        if self.tokens is not None:
            body["tokens"] = self.tokens
        if self.kv_to is not None:
            body["kv_to"] = self.kv_to
        if self.replica:
            body["replica"] = True
        if self.timing is not None:
            body["t"] = self.timing
        if self.split is not None:
            body["split"] = self.split
        if self.prefix:
            body["prefix"] = self.prefix
        if self.keep is not None:
            body["keep"] = self.keep
        if self.grammar is not None:
            body["grammar"] = self.grammar
        return Message(type="forward", body=body, tensor=self.hidden)

    @classmethod
    def decode(cls, msg: Message) -> Forward:
        body = msg.body
        route = _route(body.get("route"), "route")
        idx = _int(body, "idx")
        if idx >= len(route):
            raise FrameError(f"field 'idx' {idx} is past the route's {len(route)} stages")
        sp = body.get("sp")
        if not isinstance(sp, dict):
            raise FrameError("field 'sp' must be a map of sampling parameters")
        tokens = body.get("tokens")
        if tokens is not None and not (isinstance(tokens, list) and tokens and all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
            raise FrameError("field 'tokens' must be a non-empty list of token ids")
        if tokens is None and msg.tensor is None:
            raise FrameError("a forward needs tokens or hidden states")
        kv_to = body.get("kv_to")
        plan_id = body.get("plan", "")
        split = body.get("split")
        keep = _prefix([body["keep"]]) if "keep" in body else None
        if split is not None and not (isinstance(split, list) and split and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in split)):
            raise FrameError("field 'split' must be a non-empty list of positive sizes")
        fwd = cls(req=_req(body), coord=_req(body, "coord", MAX_MEMBER), plan_id=str(plan_id)[:MAX_MEMBER],
                   route=route, idx=idx, step=_int(body, "step"), pos=_int(body, "pos"), tokens=tokens,
                   temperature=_float(sp, "t"), top_p=_float(sp, "p"), seed=_int(sp, "seed", -(2**63)),
                   kv_to=_route(kv_to, "kv_to") if kv_to is not None else None, replica=body.get("replica") is True,
                   timing=_timing(body["t"]) if "t" in body else None, hidden=msg.tensor, split=split,
                   prefix=_prefix(body.get("prefix")), keep=keep[0] if keep else None,
                   logprobs=_int(sp, "lp", 0) if "lp" in sp else None,
                   grammar=_grammar(body["grammar"]) if "grammar" in body else None)
        if fwd.logprobs is not None and fwd.logprobs > MAX_TOP_LOGPROBS:
            raise FrameError(f"field 'sp.lp' {fwd.logprobs} is over {MAX_TOP_LOGPROBS}")
        if split is not None and sum(split) != fwd.n_positions:
            raise FrameError(f"field 'split' sums to {sum(split)}, the step has {fwd.n_positions} positions")
        return fwd

    @property
    def n_positions(self) -> int:
        """Positions this step appends to the KV cache."""
        if self.tokens is not None:
            return len(self.tokens)
        return self.hidden.shape[1] if self.hidden is not None and len(self.hidden.shape) > 1 else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    req: str
    step: int
    token: int
    timing: list[list[Any]]
    cached: int = 0  # spec N24: positions the step took from the prefix cache

    def to_message(self) -> Message:
        body: dict[str, Any] = {"req": self.req, "step": self.step, "token": int(self.token), "t": self.timing}
        if self.cached:
            body["cached"] = self.cached
        if isinstance(self.token, Sampled):  # spec A26: [logprob, [[id, logprob], ...]]
            body["lp"] = [self.token.logprob, [list(t) for t in self.token.top]]
        return Message(type="token", body=body)

    @classmethod
    def decode(cls, msg: Message) -> Token:
        body = msg.body
        token = _int(body, "token")
        if "lp" in body:
            token = _sampled(token, body["lp"])
        return cls(req=_req(body), step=_int(body, "step"), token=token, timing=_timing(body.get("t")),
                   cached=_int(body, "cached") if "cached" in body else 0)


def _grammar(value: Any) -> list[Any]:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and len(value[0]) <= MAX_SCHEMA_CHARS and isinstance(value[1], list)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value[1])):
        raise FrameError("field 'grammar' must be [JSON schema text, [token id, ...]]")
    return value


def _sampled(token: int, lp: Any) -> Sampled:
    def number(x: Any) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or x > 0.0:
            raise FrameError("field 'lp' holds a log probability that is not a number <= 0")
        return float(x)

    if not (isinstance(lp, list) and len(lp) == 2 and isinstance(lp[1], list) and len(lp[1]) <= MAX_TOP_LOGPROBS):
        raise FrameError("field 'lp' must be [logprob, [[id, logprob], ...]]")
    top = []
    for pair in lp[1]:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                and not isinstance(pair[0], bool) and pair[0] >= 0):
            raise FrameError("field 'lp' must be [logprob, [[id, logprob], ...]]")
        top.append((pair[0], number(pair[1])))
    return Sampled(token, number(lp[0]), tuple(top))


@dataclass(frozen=True, slots=True, kw_only=True)
class StepError:
    req: str
    message: str
    fatal: bool

    def to_message(self) -> Message:
        return Message(type="error", body={"req": self.req, "message": self.message, "fatal": self.fatal})

    @classmethod
    def decode(cls, msg: Message) -> StepError:
        body = msg.body
        return cls(req=_req(body), message=str(body.get("message"))[:2000], fatal=body.get("fatal") is True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    req: str

    def to_message(self) -> Message:
        return Message(type="release", body={"req": self.req})

    @classmethod
    def decode(cls, msg: Message) -> Release:
        return cls(req=_req(msg.body))


@dataclass(frozen=True, slots=True, kw_only=True)
class Released:
    req: str

    def to_message(self) -> Message:
        return Message(type="released", body={"req": self.req})

    @classmethod
    def decode(cls, msg: Message) -> Released:
        return cls(req=_req(msg.body))


@dataclass(frozen=True, slots=True, kw_only=True)
class KvReplica:
    req: str
    start: int
    layers: list[int]
    block: WireTensor

    def to_message(self) -> Message:
        return Message(type="kv.replica", body={"req": self.req, "start": self.start, "layers": self.layers},
                       tensor=self.block)

    @classmethod
    def decode(cls, msg: Message) -> KvReplica:
        body = msg.body
        return cls(req=_req(body), start=_int(body, "start"), layers=_ids(body.get("layers"), "layers"),
                   block=_tensor(msg))


@dataclass(frozen=True, slots=True, kw_only=True)
class KvLoad:
    req: str
    coord: str
    layers: list[int]
    end: int
    block: WireTensor

    def to_message(self) -> Message:
        return Message(type="kv.load", body={"req": self.req, "coord": self.coord, "layers": self.layers,
                                             "end": self.end}, tensor=self.block)

    @classmethod
    def decode(cls, msg: Message) -> KvLoad:
        body = msg.body
        return cls(req=_req(body), coord=_req(body, "coord", MAX_MEMBER), layers=_ids(body.get("layers"), "layers"),
                   end=_int(body, "end", 1), block=_tensor(msg))


@dataclass(frozen=True, slots=True, kw_only=True)
class KvLoaded:
    req: str
    member: str
    end: int
    ok: bool
    message: str = ""
    gone: bool = False  # not ok because the stage itself failed (a tensor-parallel group lost a member)

    def to_message(self) -> Message:
        body: dict[str, Any] = {"req": self.req, "member": self.member, "end": self.end, "ok": self.ok}
        if self.message:
            body["message"] = self.message
        if self.gone:
            body["gone"] = True
        return Message(type="kv.loaded", body=body)

    @classmethod
    def decode(cls, msg: Message) -> KvLoaded:
        body = msg.body
        return cls(req=_req(body), member=_req(body, "member", MAX_MEMBER), end=_int(body, "end"),
                   ok=body.get("ok") is True, message=str(body.get("message", ""))[:2000], gone=body.get("gone") is True)


@dataclass(frozen=True, slots=True, kw_only=True)
class KvPush:
    req: str
    coord: str
    layer: int
    end: int
    layer_range: tuple[int, int]  # the decode stage's [layer_start, layer_end) it is meant for
    block: WireTensor

    def to_message(self) -> Message:
        return Message(type="kv.push", body={"req": self.req, "coord": self.coord, "layer": self.layer,
                                             "end": self.end, "range": list(self.layer_range)}, tensor=self.block)

    @classmethod
    def decode(cls, msg: Message) -> KvPush:
        body = msg.body
        span = body.get("range")
        if not (isinstance(span, list) and len(span) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise FrameError("field 'range' must be [layer_start, layer_end]")
        return cls(req=_req(body), coord=_req(body, "coord", MAX_MEMBER), layer=_int(body, "layer"),
                   end=_int(body, "end", 1), layer_range=(span[0], span[1]), block=_tensor(msg))


RequestMessage = Forward | Token | StepError | Release | Released | KvReplica | KvLoad | KvLoaded | KvPush

DECODERS: dict[str, Any] = {"forward": Forward.decode, "token": Token.decode, "error": StepError.decode,
                            "release": Release.decode, "released": Released.decode, "kv.replica": KvReplica.decode,
                            "kv.load": KvLoad.decode, "kv.loaded": KvLoaded.decode, "kv.push": KvPush.decode}


def decode(msg: Message) -> RequestMessage:
    """The typed record of a request-plane message. Raises FrameError for an unknown type or
    a malformed body, naming the field."""
    decoder = DECODERS.get(msg.type)
    if decoder is None:
        raise FrameError(f"{msg.type!r} is not a request-plane message")
    record: RequestMessage = decoder(msg)
    return record


def _prefix(value: Any) -> list[list[Any]] | None:
    """Spec N24: a list of ``[n, key]`` (n > 0, key 32 hex digits), at most ``MAX_KEYS``; None when absent."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_KEYS or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool) and p[0] > 0
            and isinstance(p[1], str) and len(p[1]) == 32 and all(c in "0123456789abcdef" for c in p[1])
            for p in value):
        raise FrameError(f"field 'prefix' must be a list of at most {MAX_KEYS} [positions, 32 hex digits] pairs")
    return [list(p) for p in value]

