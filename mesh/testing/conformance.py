"""The backend conformance suite: what every ``mesh.backends`` plugin must do (specs/backend.md
B11), as plain check functions a test runner calls.

Each check takes a ``Subject`` (how to build fresh, unloaded instances of the backend under test,
and its logit tolerance) and a ``Fixture`` (a tiny random Llama saved by transformers, with
transformers' own logits for it), and raises ``AssertionError`` naming what broke, or
``NotSupported`` for an optional feature the backend declines with a ``BackendError`` (KV
export/import). ``tests/test_backend_conformance.py`` runs every check on every backend
registered under the ``mesh.backends`` entry-point group, the example plugin's included; a
plugin's own test suite can do the same:

    from mesh.testing.conformance import CHECKS, Subject, make_fixture
    fixture = make_fixture(tmp_path)
    for check in CHECKS:
        check(Subject("mine", MyBackend), fixture)

Tolerances (B11): logits are compared by max absolute difference with transformers' reference
(f32 on CPU); the torch backend is held to 1e-4, other backends to their subject's
``tolerance`` (1e-3 by default: another library's kernels sum in another order).
Greedy tokens of the 8-step continuation must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import Backend, BatchItem
from mesh.errors import BackendError
from mesh.models import Model, resolve_model
from mesh.wire import WireTensor

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 11, 2]
SPLITS = ([(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)])
STEPS = 8  # greedy continuation compared token for token


class NotSupported(Exception):  # noqa: N818 - a verdict, not a failure
    """The backend declines an optional feature (with a BackendError saying so)."""


@dataclass
class Subject:
    """The backend under test: ``factory()`` gives a fresh, unloaded instance (CPU, f32)."""

    name: str
    factory: Callable[[], Backend]
    tolerance: float = 1e-3


@dataclass
class Fixture:
    """A tiny model and transformers' greedy run of it: ``tokens`` (STEPS greedy tokens after
    PROMPT) and ``logits[i]`` (float32 ``[vocab]``) before token i."""

    model: Model
    tokens: list[int]
    logits: list[np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


def make_fixture(folder: Path) -> Fixture:
    """Save the tiny Llama under ``folder`` and run transformers' own model on it."""
    import torch
    from transformers import AutoModelForCausalLM

    from mesh.testing.tiny import tiny_model

    path = tiny_model("llama", folder / "tiny-llama")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids, tokens, logits = list(PROMPT), [], []
    with torch.inference_mode():
        for _ in range(STEPS):
            row = ref(torch.tensor([ids])).logits[0, -1].float().numpy()
            logits.append(row)
            tokens.append(int(np.argmax(row)))
            ids.append(tokens[-1])
    return Fixture(model=Model(resolve_model(str(path))), tokens=tokens, logits=logits)


# -- helpers -----------------------------------------------------------------------------
def _stages(subject: Subject, model: Model, split: list[tuple[int, int]]) -> list[Backend]:
    stages = []
    for start, end in split:
        backend = subject.factory()
        backend.load(model, start, end)
        stages.append(backend)
    return stages


def _step(stages: list[Backend], caches: list[Any], ids: list[int], pos: int) -> np.ndarray:
    hidden: WireTensor | None = None
    for i, (stage, cache) in enumerate(zip(stages, caches, strict=True)):
        out = stage.forward(cache, start_pos=pos, token_ids=ids if i == 0 else None, hidden=hidden)
        if i + 1 < len(stages):
            assert out.hidden is not None and out.logits is None, f"stage {i} must return hidden states only"
            hidden = out.hidden
        else:
            assert out.logits is not None and out.hidden is None, "the last stage must return logits only"
            return out.logits
    raise AssertionError("no stages")


def _greedy(stages: list[Backend], fixture: Fixture) -> tuple[list[int], list[np.ndarray]]:
    caches = [s.new_cache() for s in stages]
    ids, pos, tokens, logits = list(PROMPT), 0, [], []
    for _ in range(STEPS):
        row = _step(stages, caches, ids, pos)
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        pos += len(ids)
        ids = [tokens[-1]]
    return tokens, logits


def _close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))
    assert err <= tol, f"{what}: logits differ from transformers' by {err:.2e} (tolerance {tol:.0e})"


def _raises(fn: Callable[[], Any], what: str) -> None:
    try:
        fn()
    except BackendError:
        return
    except Exception as exc:  # noqa: BLE001 - the point is that it is the wrong type
        raise AssertionError(f"{what}: raised {type(exc).__name__} ({exc}), not BackendError") from exc
    raise AssertionError(f"{what}: no error")


# -- the checks ----------------------------------------------------------------------------
def check_matches_transformers_whole_and_split(subject: Subject, fixture: Fixture) -> None:
    """B3/B4: whole and split in 2 or 3 stages, the greedy tokens equal transformers' and the
    logits are within the subject's tolerance, at every one of STEPS steps."""
    for split in SPLITS:
        tokens, logits = _greedy(_stages(subject, fixture.model, split), fixture)
        assert tokens == fixture.tokens, f"split {split}: greedy tokens {tokens} != transformers' {fixture.tokens}"
        for i, (got, want) in enumerate(zip(logits, fixture.logits, strict=True)):
            _close(got, want, subject.tolerance, f"split {split}, step {i}")


def check_wire_formats(subject: Subject, fixture: Fixture) -> None:
    """B11: hidden states are ``[1, n, hidden]`` f32/f16/bf16 WireTensors of finite values;
    logits are float32 ``[vocab]``."""
    config = fixture.model.config
    first, last = _stages(subject, fixture.model, [(0, 2), (2, 5)])
    out = first.forward(first.new_cache(), start_pos=0, token_ids=PROMPT)
    h = out.hidden
    assert isinstance(h, WireTensor) and h.dtype in ("f32", "f16", "bf16"), f"hidden states: {h!r}"
    assert h.shape == (1, len(PROMPT), int(config.hidden_size)), f"hidden shape {h.shape}"
    if h.dtype == "f32":
        assert np.isfinite(np.frombuffer(h.data, dtype="<f4")).all(), "hidden states hold NaN/inf"
    logits = last.forward(last.new_cache(), start_pos=0, hidden=h).logits
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (int(config.vocab_size),)


def check_deterministic(subject: Subject, fixture: Fixture) -> None:
    """B11: the same input on fresh caches gives bit-identical logits; a second request's
    cache is independent of the first's (B5)."""
    (stage,) = _stages(subject, fixture.model, [(0, 5)])
    a, b = stage.new_cache(), stage.new_cache()
    one = stage.forward(a, start_pos=0, token_ids=PROMPT).logits
    stage.forward(b, start_pos=0, token_ids=PROMPT[:3])  # another request in between
    two = stage.forward(stage.new_cache(), start_pos=0, token_ids=PROMPT).logits
    assert one is not None and two is not None and np.array_equal(one, two), "same input, different logits"
    nxt = stage.forward(a, start_pos=len(PROMPT), token_ids=[fixture.tokens[0]]).logits
    _close(nxt, fixture.logits[1], subject.tolerance, "decode after an interleaved request")


def check_bad_input_is_a_backend_error(subject: Subject, fixture: Fixture) -> None:
    """B6: bad ranges, inputs of the wrong kind or shape, ids outside the vocabulary,
    positions past the context window, compute before load or after unload: BackendError."""
    config = fixture.model.config
    _raises(lambda: subject.factory().load(fixture.model, 3, 2), "layer range [3, 2)")
    _raises(lambda: subject.factory().load(fixture.model, 0, 6), "layer range [0, 6) of 5 layers")
    first, last = _stages(subject, fixture.model, [(0, 2), (2, 5)])
    hidden = first.forward(first.new_cache(), start_pos=0, token_ids=PROMPT).hidden
    assert hidden is not None
    _raises(lambda: first.forward(first.new_cache(), start_pos=0, hidden=hidden), "hidden states to the first stage")
    _raises(lambda: last.forward(last.new_cache(), start_pos=0, token_ids=PROMPT), "token ids to a later stage")
    bad = WireTensor(dtype="f32", shape=(1, 2, 3), data=bytes(24))
    _raises(lambda: last.forward(last.new_cache(), start_pos=0, hidden=bad), "hidden states of the wrong shape")
    _raises(lambda: first.forward(first.new_cache(), start_pos=0, token_ids=[int(config.vocab_size)]),
            "a token id outside the vocabulary")
    context = int(config.max_position_embeddings)
    _raises(lambda: first.forward(first.new_cache(), start_pos=context, token_ids=[1]), "a position past the context")
    _raises(lambda: subject.factory().forward(None, start_pos=0, token_ids=[1]), "forward before load")
    first.unload()
    _raises(lambda: first.forward(first.new_cache(), start_pos=0, token_ids=[1]), "forward after unload")


def check_kv_export_import(subject: Subject, fixture: Fixture) -> None:
    """B10: KV exported from a 2-stage split and imported into fresh caches of another split
    decodes on with transformers' logits. Refused with a BackendError: an export of positions
    the cache does not hold or of an empty range; an import of another stage's layers, of a
    part of this stage's layers, or of keys and values that do not fit ``[1, kv_heads, n,
    head_dim]`` (values shorter than keys, another head count). A refused import appends
    nothing: the same cache then takes the right layers and decodes on with the reference
    logits."""
    split = _stages(subject, fixture.model, [(0, 2), (2, 5)])
    caches = [s.new_cache() for s in split]
    _step(split, caches, PROMPT, 0)
    try:
        exported = [s.export_kv(c, start_pos=0, end_pos=len(PROMPT)) for s, c in zip(split, caches, strict=True)]
    except BackendError as exc:
        raise NotSupported(str(exc)) from exc
    layers = exported[0] + exported[1]
    assert [g for g, _, _ in layers] == [0, 1, 2, 3, 4], f"exported layers {[g for g, _, _ in layers]}"
    for g, keys, values in layers:
        assert keys.shape == values.shape and len(keys.shape) == 4 and keys.shape[0] == 1 \
            and keys.shape[2] == len(PROMPT), f"layer {g}: keys {keys.shape}, values {values.shape}"
    tail = split[0].export_kv(caches[0], start_pos=4, end_pos=len(PROMPT))
    assert [k.shape[2] for _, k, _ in tail] == [len(PROMPT) - 4] * 2, "export of positions [4, n): wrong length"
    _raises(lambda: split[0].export_kv(caches[0], start_pos=0, end_pos=len(PROMPT) + 1),
            "exporting positions the cache does not hold")
    _raises(lambda: split[0].export_kv(caches[0], start_pos=3, end_pos=3), "exporting an empty range")
    _raises(lambda: split[0].export_kv(caches[0], start_pos=-1, end_pos=2), "exporting a negative position")

    other = _stages(subject, fixture.model, [(0, 3), (3, 5)])
    fresh = [s.new_cache() for s in other]
    last = other[1]
    _raises(lambda: last.import_kv(fresh[1], layers[:2]), "importing another stage's layers")
    _raises(lambda: last.import_kv(fresh[1], layers[3:4]), "importing part of this stage's layers")
    g, keys, _ = layers[4]
    short = tail[1][2]  # values of fewer positions than the keys
    _raises(lambda: last.import_kv(fresh[1], [layers[3], (g, keys, short)]), "importing values shorter than keys")
    heads = keys.shape[1]
    wide = WireTensor(dtype=keys.dtype, shape=(1, heads + 1, *keys.shape[2:]),
                      data=keys.data + keys.data[: len(keys.data) // heads])
    _raises(lambda: last.import_kv(fresh[1], [layers[3], (g, wide, wide)]), "importing another head count")
    # the refusals above appended nothing: the same caches take the right layers and decode on
    other[0].import_kv(fresh[0], layers[:3])
    other[1].import_kv(fresh[1], layers[3:])
    logits = _step(other, fresh, [fixture.tokens[0]], len(PROMPT))
    _close(logits, fixture.logits[1], subject.tolerance, "decode on an imported KV cache")


def check_mixes_with_torch(subject: Subject, fixture: Fixture) -> None:
    """B12: hidden states cross between this backend and the torch backend both ways; the
    mixed pipeline gives transformers' tokens (within the looser of the two tolerances)."""
    from backends.torch import TorchBackend

    torch_subject = Subject("torch", lambda: TorchBackend(device="cpu", dtype="f32"), tolerance=1e-4)
    for a, b in ((subject, torch_subject), (torch_subject, subject)):
        stages = _stages(a, fixture.model, [(0, 2)]) + _stages(b, fixture.model, [(2, 5)])
        tokens, logits = _greedy(stages, fixture)
        assert tokens == fixture.tokens, f"{a.name} -> {b.name}: tokens {tokens} != {fixture.tokens}"
        for i, (got, want) in enumerate(zip(logits, fixture.logits, strict=True)):
            _close(got, want, max(a.tolerance, b.tolerance), f"{a.name} -> {b.name}, step {i}")


def _batched(stages: list[Backend], steps: list[tuple[list[Any], int, list[int]]]) -> list[np.ndarray]:
    """One batched step through ``stages``: each of ``steps`` is (a request's caches, its first
    position, its new token ids); returns each request's logits."""
    hidden: list[WireTensor | None] = [None] * len(steps)
    for i, stage in enumerate(stages):
        items = [BatchItem(cache=caches[i], start_pos=pos, token_ids=ids if i == 0 else None,
                           hidden=hidden[k] if i else None) for k, (caches, pos, ids) in enumerate(steps)]
        outs = stage.forward_batch(items)
        assert len(outs) == len(items), f"stage {i}: {len(outs)} results for {len(items)} items"
        for k, out in enumerate(outs):
            assert not isinstance(out, Exception), f"stage {i}, request {k}: {out}"
        hidden = [out.hidden for out in outs]  # type: ignore[union-attr]
    rows = [out.logits for out in outs]  # type: ignore[union-attr]
    assert all(isinstance(r, np.ndarray) and r.dtype == np.float32 for r in rows), "batched logits: float32 rows"
    return rows  # type: ignore[return-value]


def check_batched_steps(subject: Subject, fixture: Fixture) -> None:
    """B16: ``forward_batch`` runs several requests' steps at once, whole and split in two
    stages: three requests prefill together (prompts of 10, 4 and 7 tokens), then decode
    together while the third's prompt goes on in a chunk of 3 (a chunk after a cached prefix);
    every request's greedy tokens equal transformers' (the first) or its run alone, logits
    within the tolerance. A prompt's consecutive chunks in one batch (one cache given twice, in
    order) compute what they compute in batches of their own. A bad item (a token id outside
    the vocabulary) and a step that does not continue its cache's step before it in the batch
    are that item's BackendError; the other items are computed."""
    prompts = [list(PROMPT), PROMPT[:4], PROMPT[2:9]]
    for split in ([(0, 5)], [(0, 2), (2, 5)]):
        stages = _stages(subject, fixture.model, split)
        alone: list[list[np.ndarray]] = []
        for prompt in prompts:  # each request alone: prefill (the third in 4 + 3), then 4 decodes
            caches = [s.new_cache() for s in stages]
            chunks = [prompt] if prompt is not prompts[2] else [prompt[:4], prompt[4:]]
            rows, pos = [], 0
            for chunk in chunks:
                rows.append(_step(stages, caches, chunk, pos))
                pos += len(chunk)
            for _ in range(4):
                rows.append(_step(stages, caches, [int(np.argmax(rows[-1]))], pos))
                pos += 1
            alone.append(rows)
        caches3 = [[s.new_cache() for s in stages] for _ in prompts]
        first = _batched(stages, [(caches3[0], 0, prompts[0]), (caches3[1], 0, prompts[1]),
                                  (caches3[2], 0, prompts[2][:4])])
        mixed = _batched(stages, [(caches3[0], len(prompts[0]), [int(np.argmax(first[0]))]),
                                  (caches3[1], len(prompts[1]), [int(np.argmax(first[1]))]),
                                  (caches3[2], 4, prompts[2][4:])])
        got = [[first[0], mixed[0]], [first[1], mixed[1]], [mixed[2]]]
        pos = [len(prompts[0]) + 1, len(prompts[1]) + 1, len(prompts[2])]
        for _ in range(3):
            rows = _batched(stages, [(caches3[k], pos[k], [int(np.argmax(got[k][-1]))]) for k in range(3)])
            for k in range(3):
                got[k].append(rows[k])
                pos[k] += 1
        want = [alone[0][:5], alone[1][:5], alone[2][1:5]]
        for k in range(3):
            tokens = [int(np.argmax(r)) for r in got[k]]
            assert tokens == [int(np.argmax(r)) for r in want[k]], f"split {split}, request {k}: batched tokens differ"
            for i, (g, w) in enumerate(zip(got[k], want[k], strict=True)):
                _close(g, w, subject.tolerance, f"split {split}, request {k}, batched step {i}")
        assert [int(np.argmax(r)) for r in got[0]] == fixture.tokens[:5], "batched greedy tokens != transformers'"
    (stage,) = _stages(subject, fixture.model, [(0, 5)])
    good, other = stage.new_cache(), stage.new_cache()
    vocab = int(fixture.model.config.vocab_size)
    outs = stage.forward_batch([BatchItem(cache=other, start_pos=0, token_ids=[vocab]),
                                BatchItem(cache=good, start_pos=0, token_ids=PROMPT),
                                BatchItem(cache=good, start_pos=0, token_ids=PROMPT)])
    assert isinstance(outs[0], BackendError), f"a token id outside the vocabulary in a batch: {outs[0]!r}"
    assert isinstance(outs[2], BackendError), f"a second step of a cache that does not continue the first: {outs[2]!r}"
    assert not isinstance(outs[1], Exception) and outs[1].logits is not None, f"the good item: {outs[1]!r}"
    _close(outs[1].logits, fixture.logits[0], subject.tolerance, "the good item of a batch with bad ones")
    nxt = stage.forward(good, start_pos=len(PROMPT), token_ids=[fixture.tokens[0]]).logits
    _close(nxt, fixture.logits[1], subject.tolerance, "decode after a batch with bad items")
    chunked, beside = stage.new_cache(), stage.new_cache()
    stage.forward(beside, start_pos=0, token_ids=PROMPT[:3])
    outs = stage.forward_batch([BatchItem(cache=chunked, start_pos=0, token_ids=PROMPT[:3]),
                                BatchItem(cache=beside, start_pos=3, token_ids=[PROMPT[3]]),
                                BatchItem(cache=chunked, start_pos=3, token_ids=PROMPT[3:6]),
                                BatchItem(cache=chunked, start_pos=6, token_ids=PROMPT[6:])])
    assert not any(isinstance(o, Exception) for o in outs), f"a prompt's chunks in one batch: {outs!r}"
    apart = stage.new_cache()  # the same chunks, each in a batch of its own
    for at, end in ((0, 3), (3, 6), (6, len(PROMPT))):
        last = stage.forward(apart, start_pos=at, token_ids=PROMPT[at:end]).logits
    _close(outs[3].logits, last, subject.tolerance, "a prompt's chunks in one batch against one batch each")
    nxt = stage.forward(chunked, start_pos=len(PROMPT), token_ids=[fixture.tokens[0]]).logits
    want = stage.forward(apart, start_pos=len(PROMPT), token_ids=[fixture.tokens[0]]).logits
    _close(nxt, want, subject.tolerance, "decode after a prompt's chunks in one batch")


def check_concurrent_steps(subject: Subject, fixture: Fixture) -> None:
    """B17: a backend that says its steps may run at once (``concurrent_steps``) computes a
    prompt's chunks on one thread while another thread decodes a second request, each told
    that two lanes share the cores (``share_threads(2)``, the prompt's thread as the lane), 20
    rounds: every result within the tolerance of the same steps run one after another, the greedy tokens the same. A backend
    that does not say so declines (its steps run one at a time)."""
    import threading

    (stage,) = _stages(subject, fixture.model, [(0, 5)])
    if not stage.concurrent_steps:
        raise NotSupported("its steps run one at a time (concurrent_steps is False)")
    cuts = [(0, 3), (3, 6), (6, 9), (9, len(PROMPT))]  # the last one position long: it attends as a decode row

    def prompt(cache: Any) -> list[np.ndarray]:
        return [_logits(stage.forward_batch([BatchItem(cache=cache, start_pos=a, token_ids=PROMPT[a:b])])[0])
                for a, b in cuts]

    def decode(cache: Any, n: int) -> list[np.ndarray]:
        rows, token = [], fixture.tokens[0]
        for pos in range(len(PROMPT), len(PROMPT) + n):
            rows.append(_logits(stage.forward_batch([BatchItem(cache=cache, start_pos=pos, token_ids=[token])])[0]))
            token = int(np.argmax(rows[-1]))
        return rows

    def primed() -> Any:
        cache = stage.new_cache()
        stage.forward(cache, start_pos=0, token_ids=PROMPT)
        return cache

    want_prompt, want_decode = prompt(stage.new_cache()), decode(primed(), 6)
    for _ in range(20):
        got: dict[str, list[np.ndarray]] = {}
        errors: list[BaseException] = []

        def run(name: str, fn: Callable[[], list[np.ndarray]]) -> None:
            try:
                stage.share_threads(2, lane=name == "prompt")
                got[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported below, on the test's thread
                errors.append(exc)

        cache_p, cache_d = stage.new_cache(), primed()
        threads = [threading.Thread(target=run, args=("prompt", lambda: prompt(cache_p))),
                   threading.Thread(target=run, args=("decode", lambda: decode(cache_d, 6)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stage.share_threads(1)
        assert not errors, f"steps on two threads at once: {errors[0]!r}"
        assert not any(t.is_alive() for t in threads), "steps on two threads at once did not finish in 60 s"
        for name, want in (("prompt", want_prompt), ("decode", want_decode)):
            assert [int(np.argmax(r)) for r in got[name]] == [int(np.argmax(r)) for r in want], f"{name}: tokens"
            for i, (g, w) in enumerate(zip(got[name], want, strict=True)):
                _close(g, w, subject.tolerance, f"{name} step {i} beside another thread's steps")


def _logits(out: Any) -> np.ndarray:
    if isinstance(out, BaseException):
        raise out
    return np.asarray(out.logits)


CHECKS: tuple[Callable[[Subject, Fixture], None], ...] = (
    check_matches_transformers_whole_and_split,
    check_wire_formats,
    check_deterministic,
    check_bad_input_is_a_backend_error,
    check_kv_export_import,
    check_mixes_with_torch,
    check_batched_steps,
    check_concurrent_steps,
)
