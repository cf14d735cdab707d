"""The backend base class checks input for every subclass (specs/backend.md B6, B10): a null
backend that only records what reaches its ``_forward`` / ``_export_kv`` / ``_import_kv``
gets the same refusals, with the same messages, as the torch and MLX backends."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from backends.base import (
    Backend,
    StepOutput,
    as_float32,
    check_hidden_values,
    source_has,
)
from mesh.errors import BackendError
from mesh.wire import WireTensor

HIDDEN, VOCAB, CONTEXT, HEADS, HEAD_DIM = 4, 10, 16, 2, 3


class _Config:
    vocab_size, hidden_size, max_position_embeddings = VOCAB, HIDDEN, CONTEXT
    num_attention_heads, num_key_value_heads, head_dim = 4, HEADS, HEAD_DIM


class NullBackend(Backend):
    """Records calls; a cache is a list of positions."""

    name = "null"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def load(self, model: Any, layer_start: int, layer_end: int, progress: Any = None) -> None:
        self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, 4
        self.set_dimensions(_Config())

    def new_cache(self) -> list[int]:
        return []

    def _forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                 hidden: WireTensor | None = None) -> StepOutput:
        self.calls.append(("forward", (start_pos, token_ids, hidden)))
        n = len(token_ids) if token_ids is not None else hidden.shape[1]  # type: ignore[union-attr]
        cache.extend(range(start_pos, start_pos + n))
        return StepOutput(logits=np.zeros(VOCAB, dtype=np.float32))

    def _cached_positions(self, cache: Any) -> int:
        return len(cache)

    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        self.calls.append(("export", (start_pos, end_pos)))
        return [(g, _kv(end_pos - start_pos), _kv(end_pos - start_pos)) for g in range(self.layer_start, self.layer_end)]

    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        self.calls.append(("import", [g for g, _, _ in layers]))


class Minimal(Backend):
    """Only what is abstract: no KV moves, no dimensions."""

    def load(self, model: Any, layer_start: int, layer_end: int, progress: Any = None) -> None:
        self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, 4

    def new_cache(self) -> list[int]:
        return []

    def _forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                 hidden: WireTensor | None = None) -> StepOutput:
        return StepOutput()


def _kv(n: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> WireTensor:
    return WireTensor(dtype="f32", shape=(1, heads, n, head_dim), data=bytes(4 * heads * n * head_dim))


def _hidden(values: np.ndarray, dtype: str = "f32") -> WireTensor:
    if dtype == "bf16":
        data = (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    else:
        data = np.asarray(values, dtype="<f4" if dtype == "f32" else "<f2").tobytes()
    return WireTensor(dtype=dtype, shape=values.shape, data=data)


def _stage(start: int, end: int) -> NullBackend:
    backend = NullBackend()
    backend.load(None, start, end)
    return backend


@pytest.mark.spec("B6")
def test_forward_refuses_bad_input_before_the_subclass_sees_it() -> None:
    first, later = _stage(0, 2), _stage(2, 4)
    ok = _hidden(np.zeros((1, 2, HIDDEN)))
    with pytest.raises(BackendError, match="no layers loaded"):
        NullBackend().forward([], start_pos=0, token_ids=[1])
    with pytest.raises(BackendError, match="takes token ids"):
        first.forward([], start_pos=0, hidden=ok)
    with pytest.raises(BackendError, match="takes token ids"):
        first.forward([], start_pos=0, token_ids=[1], hidden=ok)
    for bad_ids in ([-1], [VOCAB], [1.0], [True], [], [np.int64(1)]):
        with pytest.raises(BackendError, match=r"token ids must be integers in \[0, 10\)|takes token ids"):
            first.forward([], start_pos=0, token_ids=bad_ids)  # type: ignore[arg-type]
    with pytest.raises(BackendError, match="takes hidden states"):
        later.forward([], start_pos=0, token_ids=[1])
    for shape in [(1, 2, HIDDEN + 1), (2, 1, HIDDEN), (1, 2 * HIDDEN)]:
        with pytest.raises(BackendError, match=r"hidden states must be \[1, n, 4\]"):
            later.forward([], start_pos=0, hidden=_hidden(np.zeros(shape)))
    with pytest.raises(BackendError, match="must be f32, f16 or bf16, got i32"):
        later.forward([], start_pos=0, hidden=WireTensor(dtype="i32", shape=(1, 1, HIDDEN), data=bytes(16)))
    for dtype in ("f32", "f16", "bf16"):
        for value in (np.nan, np.inf, -np.inf):
            with pytest.raises(BackendError, match="NaN or infinite"):
                later.forward([], start_pos=0, hidden=_hidden(np.full((1, 1, HIDDEN), value), dtype))
    with pytest.raises(BackendError, match=r"positions 15\.\.16 are outside the context window"):
        first.forward([], start_pos=CONTEXT - 1, token_ids=[1, 2])
    with pytest.raises(BackendError, match="outside the context window"):
        first.forward([], start_pos=-1, token_ids=[1])
    assert first.calls == [] and later.calls == []  # nothing reached the subclass
    first.forward([], start_pos=CONTEXT - 2, token_ids=[0, VOCAB - 1])
    later.forward([], start_pos=0, hidden=_hidden(np.full((1, 3, HIDDEN), -1e30)))
    assert len(first.calls) == len(later.calls) == 1
    first.unload()
    with pytest.raises(BackendError, match="no layers loaded"):
        first.forward([], start_pos=0, token_ids=[1])


@pytest.mark.spec("B6")
def test_hidden_states_that_overflow_the_compute_dtype_are_refused() -> None:
    """A stage computing in f16 or bf16 refuses f32 hidden states that would become
    infinite once cast; exactly at the rounding boundary of each format."""
    check_hidden_values(_hidden(np.full((1, 1, 2), 65519.0)), "f16")
    with pytest.raises(BackendError, match="once cast to f16"):
        check_hidden_values(_hidden(np.full((1, 1, 2), -65520.0)), "f16")
    check_hidden_values(_hidden(np.full((1, 1, 2), 65520.0)), "f32")
    check_hidden_values(_hidden(np.full((1, 1, 2), 3.38e38)), "bf16")
    with pytest.raises(BackendError, match="once cast to bf16"):
        check_hidden_values(_hidden(np.full((1, 1, 2), 3.4e38)), "bf16")
    later = _stage(2, 4)
    later.compute_dtype = "f16"
    with pytest.raises(BackendError, match="NaN or infinite values once cast to f16"):
        later.forward([], start_pos=0, hidden=_hidden(np.full((1, 1, HIDDEN), 1e5)))


def test_as_float32_reads_every_float_format() -> None:
    values = np.array([[[0.0, -1.5, 2.0, 65280.0]]], dtype=np.float32)  # exact in all three
    for dtype in ("f32", "f16", "bf16"):
        np.testing.assert_array_equal(as_float32(_hidden(values, dtype)), values)
    with pytest.raises(BackendError, match="f32, f16 or bf16"):
        as_float32(WireTensor(dtype="u8", shape=(1,), data=b"\0"))


@pytest.mark.spec("B10")
def test_export_kv_checks_the_range_against_the_cache() -> None:
    stage = _stage(0, 2)
    cache = stage.new_cache()
    stage.forward(cache, start_pos=0, token_ids=[1, 2, 3])
    for start, end in [(0, 4), (2, 2), (3, 1), (-1, 2)]:
        with pytest.raises(BackendError, match=rf"positions \[{start}, {end}\) are not in the cache "
                                               r"\(it holds \[0, 3\)\)"):
            stage.export_kv(cache, start_pos=start, end_pos=end)
    assert [g for g, _, _ in stage.export_kv(cache, start_pos=1, end_pos=3)] == [0, 1]
    assert stage.calls[-1] == ("export", (1, 3))
    with pytest.raises(BackendError, match="no layers loaded"):
        NullBackend().export_kv([], start_pos=0, end_pos=1)


@pytest.mark.spec("B10")
def test_import_kv_checks_layers_and_shapes_before_the_subclass_appends() -> None:
    stage = _stage(2, 4)
    good = [(2, _kv(3), _kv(3)), (3, _kv(3), _kv(3))]
    with pytest.raises(BackendError, match=r"KV for layers \[0, 1\] given; this stage needs \[2, 3\]"):
        stage.import_kv([], [(0, _kv(3), _kv(3)), (1, _kv(3), _kv(3))])
    with pytest.raises(BackendError, match="this stage needs"):
        stage.import_kv([], good[:1])
    with pytest.raises(BackendError, match="this stage needs"):
        stage.import_kv([], good[::-1])
    for keys, values in [(_kv(3), _kv(2)), (_kv(3, heads=HEADS + 1), _kv(3, heads=HEADS + 1)),
                         (_kv(3, head_dim=HEAD_DIM + 1), _kv(3, head_dim=HEAD_DIM + 1)),
                         (WireTensor(dtype="f32", shape=(2, HEADS, 1, HEAD_DIM), data=bytes(48)),) * 2]:
        with pytest.raises(BackendError, match=r"layer 3: .* do not fit \[1, 2, n, 3\]"):
            stage.import_kv([], [good[0], (3, keys, values)])
    assert stage.calls == []  # nothing reached the subclass
    stage.import_kv([], good)
    assert stage.calls == [("import", [2, 3])]


@pytest.mark.spec("B10")
def test_a_backend_without_kv_moves_says_so_and_unknown_dimensions_are_not_checked() -> None:
    stage = Minimal()
    with pytest.raises(BackendError, match="the Minimal backend cannot export KV caches"):
        stage.export_kv([], start_pos=0, end_pos=1)
    with pytest.raises(BackendError, match="cannot import KV caches"):
        stage.import_kv([], [])
    stage.load(None, 0, 2)
    stage.forward([], start_pos=10**6, token_ids=[10**9])  # no vocabulary or context known
    with pytest.raises(BackendError, match=r"token ids must be integers in \[0, vocab\)"):
        stage.forward([], start_pos=0, token_ids=[-1])
    stage.load(None, 2, 4)
    stage.forward([], start_pos=0, hidden=_hidden(np.zeros((1, 2, 7))))
    with pytest.raises(BackendError, match=r"\[1, n, hidden\]"):
        stage.forward([], start_pos=0, hidden=_hidden(np.zeros((2, 7))))


def test_set_dimensions_reads_a_transformers_config() -> None:
    class Plain:
        vocab_size, hidden_size, num_attention_heads = 10, 8, 4

    stage = Minimal()
    stage.set_dimensions(Plain())
    assert (stage.vocab_size, stage.hidden_size, stage.context_length, stage.kv_heads, stage.head_dim) == \
        (10, 8, None, 4, 2)
    stage.set_dimensions(_Config())
    assert (stage.context_length, stage.kv_heads, stage.head_dim) == (CONTEXT, HEADS, HEAD_DIM)


def test_source_has_uses_has_or_names() -> None:
    class WithHas:
        def has(self, name: str) -> bool:
            return name == "a"

    class WithNames:
        def names(self) -> list[str]:
            return ["a"]

    assert source_has(WithHas(), "a") and not source_has(WithHas(), "b")
    assert source_has(WithNames(), "a") and not source_has(WithNames(), "b")
