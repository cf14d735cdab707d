"""The torch backend against transformers' reference, and sharded against unsharded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.base import check_range
from backends.torch import TorchBackend, tensor_to_wire, wire_to_tensor
from mesh.errors import BackendError
from mesh.models import Model, resolve_model
from mesh.testing.pipeline import greedy_generate, step
from mesh.testing.tiny import tiny_model as _tiny
from tests.conftest import PROMPTS

TOL = 1e-4


def _reference_logits(ref: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return ref(torch.tensor([ids])).logits[0, -1].float().numpy()


def _check_parity(model: Model, ref: torch.nn.Module, splits: list[tuple[int, int]], ids: list[int]) -> None:
    stages = []
    for start, end in splits:
        backend = TorchBackend(device="cpu")
        backend.load(model, start, end)
        stages.append(backend)
    caches = [s.new_cache() for s in stages]
    seq = list(ids)
    logits = step(stages, caches, seq, 0)  # prefill
    np.testing.assert_allclose(logits, _reference_logits(ref, seq), atol=TOL, rtol=0)
    for _ in range(3):  # decode steps against a full forward of the longer sequence
        token = int(np.argmax(logits))
        logits = step(stages, caches, [token], len(seq))
        seq.append(token)
        np.testing.assert_allclose(logits, _reference_logits(ref, seq), atol=TOL, rtol=0)


@pytest.mark.spec("B4")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_model_logits_match_transformers(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = _tiny(kind, tmp_path / kind)
    saved = json.loads((folder / "config.json").read_text())
    # transformers >= 5 writes rope_parameters and no top-level rope_theta: the loader must honour it.
    assert saved.get("rope_parameters", {}).get("rope_theta") == 31337.0
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = Model(resolve_model(str(folder)))
    ids = [5, 17, 42, 99, 7, 250, 3, 64]
    _check_parity(model, ref, [(0, 5)], ids)
    _check_parity(model, ref, [(0, 2), (2, 5)], ids)


@pytest.mark.spec("B4")
def test_rope_theta_is_honoured(tmp_path: Path) -> None:
    """The same weights with the default theta give different logits: theta is not ignored."""
    from transformers import AutoModelForCausalLM

    folder = _tiny("llama", tmp_path / "llama")
    model = Model(resolve_model(str(folder)))
    assert model.config.rope_parameters["rope_theta"] == 31337.0
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config=ref.config)
    backend = TorchBackend(device="cpu")
    backend.load(model, 0, 5)
    ids = list(range(1, 40))
    ours = step([backend], [backend.new_cache()], ids, 0)
    assert np.abs(ours - _reference_logits(ref, ids)).max() > 100 * TOL


@pytest.fixture(scope="module")
def gguf_reference(default_model: Model) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(default_model.ref.path), gguf_file=default_model.ref.gguf_file, dtype=torch.float32
    )
    return ref.eval()


@pytest.mark.slow
@pytest.mark.spec("B4")
def test_default_model_logits_match_transformers(default_model: Model, gguf_reference: torch.nn.Module) -> None:
    ids = default_model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    _check_parity(default_model, gguf_reference, [(0, 30)], ids)
    _check_parity(default_model, gguf_reference, [(0, 13), (13, 30)], ids)


@pytest.mark.slow
@pytest.mark.spec("B15")
@pytest.mark.parametrize(("dtype", "tol", "size"), [("f32", 1e-4, 0.4), ("bf16", 0.1, 0.3)])
def test_int4_on_the_cpu_holds_the_gguf_grid(default_model: Model, stage_cache, dtype: str, tol: float,
                                             size: float) -> None:
    """--quantize int4 runs on a CPU (torchao's CPU int4 packing) and, in groups of 32, holds the
    default GGUF's Q4_1 grid exactly: f32 logits equal the dequantized f32 stage's; bf16 compute
    adds only bf16's own error (README "Models") at under a quarter of the f32 weight bytes."""
    ids = default_model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    float_stage = stage_cache(0, 30)
    ref = step([float_stage], [float_stage.new_cache()], ids, 0)
    backend = TorchBackend(device="cpu", dtype=dtype, quantize="int4")
    backend.load(default_model, 0, 30)
    assert backend.weight_bytes < size * float_stage.weight_bytes
    ours = step([backend], [backend.new_cache()], ids, 0).astype(np.float32)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= tol


@pytest.mark.spec("B15")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("how", ["int8", "int4"])
def test_the_cpu_quantized_linears_compute_what_torchaos_own_dispatch_computes(how: str, dtype: torch.dtype) -> None:
    """On a CPU the quantized linears call aten's kernels directly (torchao's dispatch costs
    22 us of Python per call; its int8 linear dequantizes the whole matrix), int8 in bf16 only:
    same weights, same results as torchao's own path, for 2-D and 3-D inputs, with a bias."""
    from torchao.quantization import quantize_

    from backends.torch_quant import _Int4CpuLinear, _Int8CpuLinear, _quantize

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(128, 96, bias=True)).to(dtype)
    theirs = torch.nn.Sequential(torch.nn.Linear(128, 96, bias=True)).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    _quantize(ours, how)
    direct = _Int4CpuLinear if how == "int4" else _Int8CpuLinear if dtype == torch.bfloat16 else torch.nn.Linear
    assert type(ours[0]) is direct  # f32 int8 keeps torchao's dispatch: aten's kernel is slow to prefill
    config = _torchao_config(how)
    quantize_(theirs, config)
    assert type(theirs[0]) is torch.nn.Linear  # torchao's dispatch, for reference
    for shape in [(3, 128), (2, 5, 128)]:
        x = torch.randn(*shape, dtype=dtype)
        with torch.inference_mode():
            got, want = ours(x), theirs(x)
        assert got.shape == want.shape == (*shape[:-1], 96) and got.dtype == dtype
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err <= (2e-2 if dtype == torch.bfloat16 else 1e-5), err  # bf16: rounding order only


def _torchao_config(how: str):
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from backends.torch import INT4_GROUP

    return Int8WeightOnlyConfig() if how == "int8" else PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP)


@pytest.mark.slow
@pytest.mark.spec("B15")
def test_default_quantize_keeps_the_gguf_q4_and_q8_weights_in_bf16_only(default_model: Model, stage_cache,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Left unset, --quantize keeps what the GGUF holds where torch runs it fast: its Q4_1
    matrices become int4 and its Q8_0 head (tied to the embeddings) per-row int8 (the same stage
    as --quantize int4) when computing in bf16 on a CPU; in f32 they are dequantized, as the
    quantized kernels are slower than f32 there, and the log says what that costs. A stage that
    reuses quantized layers or the int8 head from its donor does not quantize them again (nor
    looks embeddings up in the int8 head)."""
    ids = default_model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    assert stage_cache(0, 30).weight_format == ""  # f32: dequantized
    explicit = TorchBackend(device="cpu", dtype="bf16", quantize="int4")
    explicit.load(default_model, 0, 30)
    with caplog.at_level(logging.INFO, logger="backends.torch"):
        kept = TorchBackend(device="cpu", dtype="bf16")
        kept.load(default_model, 0, 30)
    assert kept.weight_format == explicit.weight_format == "int4+int8" and kept.weight_bytes == explicit.weight_bytes
    assert "GGUF Q8_0 tensors dequantized to bf16" in caplog.text  # the embeddings (lookup): no Q4_1 left float
    want = step([explicit], [explicit.new_cache()], ids, 0)
    assert np.array_equal(step([kept], [kept.new_cache()], ids, 0), want)
    unpacked = TorchBackend(device="cpu", dtype="bf16", quantize="none")
    unpacked.load(default_model, 0, 30)
    assert unpacked.weight_format == "" and unpacked.weight_bytes > 1.7 * kept.weight_bytes
    first = TorchBackend(device="cpu", dtype="bf16")
    first.adopt_from(kept)
    first.load(default_model, 0, 12)
    assert first.reused_layers == 12 and first.weight_format == "int4"
    rest = TorchBackend(device="cpu", dtype="bf16")
    rest.load(default_model, 12, 30)
    split = step([first, rest], [first.new_cache(), rest.new_cache()], ids, 0)
    ref = want.astype(np.float32)
    assert np.linalg.norm(split.astype(np.float32) - ref) / np.linalg.norm(ref) <= 1e-2
    whole = TorchBackend(device="cpu", dtype="bf16")  # takes the int8 head from a last stage
    whole.adopt_from(rest)
    whole.load(default_model, 0, 30)
    assert whole.reused_layers == 18 and whole.weight_format == "int4+int8"
    assert whole._model.model.embed_tokens.weight.dtype == torch.bfloat16  # read again for the lookup
    np.testing.assert_array_equal(step([whole], [whole.new_cache()], ids, 0), want)


SPLITS = [
    [(0, 30)],
    [(0, 15), (15, 30)],
    [(0, 4), (4, 30)],
    [(0, 10), (10, 20), (20, 30)],
    [(0, 1), (1, 27), (27, 30)],
]


@pytest.fixture(scope="module")
def single_stage_tokens(default_model: Model, stage_cache) -> list[list[int]]:
    return [
        greedy_generate([stage_cache(0, 30)], default_model.encode_chat([{"role": "user", "content": p}]), 12)
        for p in PROMPTS
    ]


@pytest.mark.slow
@pytest.mark.spec("B3")
@pytest.mark.parametrize("splits", SPLITS[1:], ids=lambda s: "+".join(f"{a}-{b}" for a, b in s))
def test_sharded_equals_unsharded(default_model: Model, stage_cache, single_stage_tokens, splits) -> None:
    stages = [stage_cache(a, b) for a, b in splits]
    for prompt, expected in zip(PROMPTS, single_stage_tokens):
        ids = default_model.encode_chat([{"role": "user", "content": prompt}])
        assert greedy_generate(stages, ids, 12) == expected
    assert any(len(t) == 12 and len(set(t)) > 3 for t in single_stage_tokens)  # real text, not one token


@pytest.mark.slow
@pytest.mark.spec("B5")
def test_interleaved_requests_keep_separate_caches(default_model: Model, stage_cache, single_stage_tokens) -> None:
    stages = [stage_cache(0, 15), stage_cache(15, 30)]
    prompts = [default_model.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    caches = [[s.new_cache() for s in stages] for _ in prompts]
    state = [(list(ids), 0) for ids in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(12):
        for i, (tokens, pos) in enumerate(state):  # round-robin: one step of each request
            token = int(np.argmax(step(stages, caches[i], tokens, pos)))
            outputs[i].append(token)
            state[i] = ([token], pos + len(tokens))
    assert outputs == single_stage_tokens


@pytest.mark.slow
@pytest.mark.spec("B2")
def test_stage_reads_only_its_tensors(default_model: Model) -> None:
    seen: list[str] = []
    source = default_model.tensor_source()
    original = source.load

    def spy(names, on_tensor=None):
        names = list(names)
        seen.extend(names)
        return original(names, on_tensor)

    source.load = spy  # type: ignore[method-assign]
    default_model.tensor_source = lambda: source  # type: ignore[method-assign]
    try:
        TorchBackend(device="cpu").load(default_model, 10, 20)
        middle = set(seen)
        assert {int(n.split(".")[2]) for n in middle} == set(range(10, 20))
        assert all(n.startswith("model.layers.") for n in middle)
        seen.clear()
        TorchBackend(device="cpu").load(default_model, 20, 30)
        last = {n for n in seen if not n.startswith("model.layers.")}
        assert last == {"model.norm.weight", "model.embed_tokens.weight"}  # tied LM head
    finally:
        del default_model.tensor_source  # back to the class method


@pytest.mark.slow
@pytest.mark.spec("B6")
def test_bad_input_raises_backend_error(stage_cache) -> None:
    first, later = stage_cache(0, 15), stage_cache(15, 30)
    hidden = tensor_to_wire(torch.zeros(1, 2, 576))
    with pytest.raises(BackendError):
        first.forward(first.new_cache(), start_pos=0, hidden=hidden)
    with pytest.raises(BackendError):
        later.forward(later.new_cache(), start_pos=0, token_ids=[1, 2])
    with pytest.raises(BackendError, match="hidden states must be"):
        later.forward(later.new_cache(), start_pos=0, hidden=tensor_to_wire(torch.zeros(1, 2, 99)))
    with pytest.raises(BackendError, match="NaN or infinite"):
        later.forward(later.new_cache(), start_pos=0, hidden=tensor_to_wire(torch.full((1, 2, 576), float("nan"))))
    with pytest.raises(BackendError, match="context window"):
        first.forward(first.new_cache(), start_pos=8192, token_ids=[1])
    for bad in [(-1, 3), (3, 3), (0, 31)]:
        with pytest.raises(BackendError):
            check_range(*bad, 30)
    with pytest.raises(BackendError):
        TorchBackend(device="cpu", dtype="f8")


@pytest.mark.spec("B6")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_state_wire_round_trip(dtype: torch.dtype) -> None:
    t = torch.randn(1, 3, 8).to(dtype)
    back = wire_to_tensor(tensor_to_wire(t))
    assert back.dtype == dtype and torch.equal(back, t)


@pytest.mark.slow
@pytest.mark.spec("B6")
def test_token_ids_outside_the_vocabulary_are_rejected(stage_cache) -> None:
    first = stage_cache(0, 15)
    for bad in ([-1], [49152], [1.5], [True]):
        with pytest.raises(BackendError, match="token ids"):
            first.forward(first.new_cache(), start_pos=0, token_ids=bad)


def _greedy_with_logits(stages, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    caches = [s.new_cache() for s in stages]
    tokens, pos, out, logits_seen = list(ids), 0, [], []
    for _ in range(n):
        logits = step(stages, caches, tokens, pos)
        logits_seen.append(logits)
        out.append(int(np.argmax(logits)))
        pos += len(tokens)
        tokens = [out[-1]]
    return out, logits_seen


def _pipeline(stage_cache, middle: TorchBackend, start: int, end: int) -> list:
    """``middle`` for [start, end), with session-cached fresh stages around it to cover [0, 30)."""
    return [*([stage_cache(0, start)] if start > 0 else []), middle, *([stage_cache(end, 30)] if end < 30 else [])]


def _load_spied(backend: TorchBackend, model: Model, start: int, end: int) -> tuple[set[str], list[tuple[int, int]]]:
    """Load ``backend`` and return the tensor names read from the files and the progress calls."""
    read: list[str] = []
    calls: list[tuple[int, int]] = []
    source = model.tensor_source()
    original = source.load

    def spy(names, on_tensor=None):
        names = list(names)
        read.extend(names)
        return original(names, on_tensor)

    source.load = spy  # type: ignore[method-assign]
    model.tensor_source = lambda: source  # type: ignore[method-assign]
    try:
        backend.load(model, start, end, lambda done, total: calls.append((done, total)))
    finally:
        del model.tensor_source  # back to the class method
    return set(read), calls


@pytest.mark.slow
@pytest.mark.spec("B9")
@pytest.mark.parametrize(("donor_range", "new_range", "edges_read"), [
    ((0, 15), (0, 30), {"model.norm.weight"}),  # embeddings reused; the tied head shares them
    ((15, 30), (0, 30), set()),  # reused layers move from local 0..14 to 15..29: layer_idx renumbered
    ((0, 30), (15, 30), set()),  # shrinking: layers 15..29 become local 0..14
], ids=["grow-after", "grow-before", "shrink"])
def test_adopted_layers_are_reused_not_read(default_model: Model, stage_cache, caplog, donor_range, new_range,
                                            edges_read) -> None:
    donor = TorchBackend(device="cpu")
    donor.load(default_model, *donor_range)
    backend = TorchBackend(device="cpu")
    backend.adopt_from(donor)
    with caplog.at_level(logging.INFO, logger="backends.torch"):
        read, calls = _load_spied(backend, default_model, *new_range)
    new_layers = set(range(*new_range)) - set(range(*donor_range))
    assert backend.reused_layers == 15
    assert f"backend: loaded layers [{new_range[0]}, {new_range[1]}) of 30 on cpu (15 reused, {len(new_layers)} read)" \
        in caplog.text
    assert {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")} == new_layers
    assert {n for n in read if not n.startswith("model.layers.")} == edges_read
    assert len(calls) == len(read) and all(total == len(read) for _, total in calls)  # progress: reads only
    ids = default_model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    tokens, logits = _greedy_with_logits(_pipeline(stage_cache, backend, *new_range), ids, 8)
    want_tokens, want_logits = _greedy_with_logits(
        _pipeline(stage_cache, stage_cache(*new_range), *new_range), ids, 8)
    assert tokens == want_tokens and len(set(tokens)) > 2
    for got, want in zip(logits, want_logits):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # make-before-break: the donor keeps serving with its own numbering, the weights held once
    assert donor.loaded
    donor_tokens, donor_logits = _greedy_with_logits(_pipeline(stage_cache, donor, *donor_range), ids, 8)
    fresh_tokens, fresh_logits = _greedy_with_logits(
        _pipeline(stage_cache, stage_cache(*donor_range), *donor_range), ids, 8)
    assert donor_tokens == fresh_tokens
    for got, want in zip(donor_logits, fresh_logits):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    g = max(donor_range[0], new_range[0])  # a layer both hold: one weight tensor, two modules
    mine, theirs = backend._model.model.layers[g - new_range[0]], donor._model.model.layers[g - donor_range[0]]
    assert mine is not theirs
    assert all(a is b for a, b in zip(mine.parameters(), theirs.parameters()))


@pytest.mark.slow
@pytest.mark.spec("B9")
def test_adopting_an_incompatible_backend_reuses_nothing(default_model: Model, stage_cache, tmp_path: Path) -> None:
    donor = TorchBackend(device="cpu", dtype="bf16")  # another dtype: nothing to share
    donor.load(default_model, 0, 15)
    backend = TorchBackend(device="cpu")
    backend.adopt_from(donor)
    read, _ = _load_spied(backend, default_model, 0, 30)
    assert backend.reused_layers == 0
    assert {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")} == set(range(30))
    ids = default_model.encode_chat([{"role": "user", "content": PROMPTS[1]}])
    tokens, logits = _greedy_with_logits([backend], ids, 8)
    want_tokens, want_logits = _greedy_with_logits([stage_cache(0, 30)], ids, 8)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert donor.loaded  # an offer that was refused leaves the donor serving
    donor.forward(donor.new_cache(), start_pos=0, token_ids=[1, 2])
    # another model of the same dtype and device: nothing is shared either
    other = TorchBackend(device="cpu")
    other.load(Model(resolve_model(str(_tiny("llama", tmp_path / "llama")))), 0, 5)
    backend = TorchBackend(device="cpu")
    backend.adopt_from(other)
    backend.load(default_model, 25, 30)
    assert backend.reused_layers == 0 and other.loaded


@pytest.mark.spec("B10")
def test_kv_cache_exported_and_imported_continues_the_same_decode(tmp_path: Path) -> None:
    """KV for positions [0, 8) leaves two stages [0, 2) + [2, 5) and enters fresh caches of
    the same split and of one whole stage [0, 5): decoding on goes on with the same logits
    as the cache that computed it. Bad exports and imports are checked for every backend by
    the conformance kit (mesh/testing/conformance.py, check_kv_export_import)."""
    model = Model(resolve_model(str(_tiny("llama", tmp_path / "llama"))))
    split = [TorchBackend(device="cpu") for _ in range(2)]
    split[0].load(model, 0, 2)
    split[1].load(model, 2, 5)
    whole = TorchBackend(device="cpu")
    whole.load(model, 0, 5)
    caches = [b.new_cache() for b in split]
    ids = [5, 17, 42, 99, 7, 250, 3, 64]
    logits = step(split, caches, ids, 0)
    exported = [b.export_kv(c, start_pos=0, end_pos=len(ids)) for b, c in zip(split, caches, strict=True)]
    assert [g for g, _, _ in exported[0] + exported[1]] == [0, 1, 2, 3, 4]
    copies = [b.new_cache() for b in split]
    for b, c, kv in zip(split, copies, exported, strict=True):
        b.import_kv(c, kv)
    one = whole.new_cache()
    whole.import_kv(one, exported[0] + exported[1])
    token, pos = int(np.argmax(logits)), len(ids)
    for _ in range(3):
        a = step(split, caches, [token], pos)
        b = step(split, copies, [token], pos)
        c = step([whole], [one], [token], pos)
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
        np.testing.assert_allclose(c, a, atol=TOL, rtol=0)
        token, pos = int(np.argmax(a)), pos + 1


@pytest.mark.spec("B16")
@pytest.mark.parametrize(("kind", "dtype", "packs"), [("llama", "bf16", True), ("qwen3_moe", "f32", True),
                                                      ("gemma3_text", "bf16", False), ("deepseek_v3", "f32", False)])
def test_a_batched_step_equals_the_lone_steps(kind: str, dtype: str, packs: bool, tmp_path: Path) -> None:
    """B16: a batch of two decode steps and a prefill chunk after a cached prefix gives each
    request the logits of its lone step: bit-identical in bf16, within 1e-4 in f32 (MKL's
    one-row kernels); so do a prompt's chunks given together on one cache. Sliding-window (gemma3)
    and latent-attention (deepseek) stages do not pack
    (their caches are not plain per-layer keys and values); they run the items in turn."""
    import copy

    from backends.base import BatchItem

    model = Model(resolve_model(str(_tiny(kind, tmp_path / kind))))
    stage = TorchBackend(device="cpu", dtype=dtype)
    stage.load(model, 0, model.num_layers)
    assert stage._packs is packs
    prompts = [[5, 17, 42, 99, 7], [3, 64], [11, 2, 250, 8, 9, 10]]
    caches = [stage.new_cache() for _ in prompts]
    for cache, prompt in zip(caches, prompts, strict=True):
        stage.forward(cache, start_pos=0, token_ids=prompt[:3] if len(prompt) > 3 else prompt)
    steps = [(3, prompts[0][3:4]), (2, [4]), (3, prompts[2][3:])]  # two decode steps, a 3-token chunk
    lone = []
    for cache, (pos, ids) in zip(copy.deepcopy(caches), steps, strict=True):
        lone.append(stage.forward(cache, start_pos=pos, token_ids=ids).logits)
    outs = stage.forward_batch([BatchItem(cache=c, start_pos=pos, token_ids=ids)
                                for c, (pos, ids) in zip(caches, steps, strict=True)])

    def same(outs: list, wanted: list) -> None:  # bit-identical in bf16, within 1e-4 in f32
        for out, want in zip(outs, wanted, strict=True):
            assert not isinstance(out, Exception)
            if dtype == "bf16":
                assert np.array_equal(out.logits, want)
            else:
                assert float(np.abs(out.logits - want).max()) <= 1e-4

    same(outs, lone)
    late = stage.forward_batch([BatchItem(cache=caches[1], start_pos=7, token_ids=[1]),
                                BatchItem(cache=caches[0], start_pos=4, token_ids=[1])])
    assert isinstance(late[0], BackendError) and not isinstance(late[1], Exception)  # a step that skips positions
    chunked, apart = stage.new_cache(), stage.new_cache()  # a prompt's chunks in one batch and one batch each
    parts = [(0, prompts[2][:2]), (2, prompts[2][2:5]), (5, prompts[2][5:])]
    want = [stage.forward(apart, start_pos=pos, token_ids=ids).logits for pos, ids in parts]
    same(stage.forward_batch([BatchItem(cache=chunked, start_pos=pos, token_ids=ids) for pos, ids in parts]), want)


@pytest.mark.spec("B16")
def test_decode_rows_attend_alike_alone_or_batched_around_the_short_key_bound(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """B16: decode steps over caches shorter and longer than ``SHORT_KEYS`` (the short ones
    attend in one call over padded caches, the long ones one call each) give every request the
    logits of its lone step, bit-identical in bf16, in any order and batch, also after a row of
    the padded buffers held a longer cache; in f32 they match transformers' own forward of the
    whole sequence."""
    import copy

    from backends import torch_batch
    from backends.base import BatchItem

    SHORT_KEYS = 32  # the tiny model's window is shorter than the default bound
    monkeypatch.setattr(torch_batch, "SHORT_KEYS", SHORT_KEYS)
    model = Model(resolve_model(str(_tiny("llama", tmp_path / "llama"))))
    rng = np.random.default_rng(7)
    lengths = [5, SHORT_KEYS - 6, SHORT_KEYS - 1, SHORT_KEYS + 40]  # the third reaches SHORT_KEYS exactly
    prompts = [[int(t) for t in rng.integers(1, 290, n)] for n in lengths]
    for dtype in ("bf16", "f32"):
        stage = TorchBackend(device="cpu", dtype=dtype)
        stage.load(model, 0, model.num_layers)
        caches = [stage.new_cache() for _ in prompts]
        for cache, prompt in zip(caches, prompts, strict=True):
            stage.forward(cache, start_pos=0, token_ids=prompt)
        for order in ([0, 1, 2, 3], [3, 2, 0], [1, 0]):  # rows change places and lengths between batches
            lone = {i: stage.forward(copy.deepcopy(caches[i]), start_pos=len(prompts[i]), token_ids=[9]).logits
                    for i in order}
            outs = stage.forward_batch([BatchItem(cache=caches[i], start_pos=len(prompts[i]), token_ids=[9])
                                        for i in order])
            for i, out in zip(order, outs, strict=True):
                assert not isinstance(out, Exception)
                if dtype == "bf16":
                    assert np.array_equal(out.logits, lone[i]), (order, i)
                else:
                    assert float(np.abs(out.logits - lone[i]).max()) <= TOL
                    with torch.no_grad():
                        whole = stage._model(torch.tensor([prompts[i] + [9]])).logits[0, -1].float().numpy()
                    assert float(np.abs(out.logits - whole).max()) <= 1e-3, (order, i)
                prompts[i] = prompts[i] + [9]
