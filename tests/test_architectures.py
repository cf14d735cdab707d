"""Every supported architecture, dense and mixture-of-experts, on each backend whose library
has it: a model split over 1, 2 and 3 stages gives transformers' logits and the same greedy
tokens (spec B4, B12), torch and MLX stages mix in one pipeline, and quantized MLX models
(mlx-lm's own convert) split like float ones (B13)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.base import Backend
from mesh.models import Model, resolve_model
from mesh.testing.pipeline import greedy_generate, step
from mesh.testing.tiny import KINDS, reference, reference_logits, tiny_model

IDS = [5, 17, 42, 99, 7, 250, 3, 64, 11, 180, 23, 77]
# one node; a split that crosses the MoE models' dense layers (deepseek's first, qwen3_moe's
# layer 2) and the sliding/full attention layouts; three stages
SPLITS = [[(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)]]
# 8-bit weights (group 32) against the float model: relative L2 error of the logits (measured
# 0.02-0.19 on these tiny random models; at 4 bits it is 0.35-0.97 on them, since 64-wide random
# layers have no redundancy to absorb it, so 4-bit error is measured on the default model, README
# "Models")
QUANT_TOL = 0.25  # relative L2 error of 8-bit logits vs the float model (README "Models")
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
# mlx-lm builds these with stage-local layer indices in their forward (gemma3_text picks its
# global-attention layers by ``i % sliding_window_pattern``): split only where the index rule
# lines up (README "Models")
MLX_SPLITS: dict[str, list[list[tuple[int, int]]]] = {
    "gemma3_text": [[(0, 5)], [(0, 2), (2, 5)]],
    "gpt_oss": [[(0, 5)], [(0, 2), (2, 5)], [(0, 2), (2, 4), (4, 5)]],
}
# gpt_oss: mlx-lm's sanitize reads OpenAI's MXFP4 release layout (``*_blocks``) or its own, not
# the float layout transformers saves, so the tiny transformers-saved model does not load on MLX
MLX_KINDS = [k for k in KINDS if k != "gpt_oss"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {kind: tiny_model(kind, root / kind) for kind in KINDS}


def _stages(factory, model: Model, split: list[tuple[int, int]]) -> list[Backend]:  # type: ignore[no-untyped-def]
    out = []
    for start, end in split:
        backend = factory()
        backend.load(model, start, end)
        out.append(backend)
    return out


def _check(stages: list[Backend], ref: torch.nn.Module, tol: float) -> None:
    """Prefill and three decode steps, each against a full forward of transformers."""
    caches = [s.new_cache() for s in stages]
    seq = list(IDS)
    logits = step(stages, caches, seq, 0)
    np.testing.assert_allclose(logits, reference_logits(ref, seq), atol=tol, rtol=0)
    for _ in range(3):
        token = int(np.argmax(logits))
        logits = step(stages, caches, [token], len(seq))
        seq.append(token)
        np.testing.assert_allclose(logits, reference_logits(ref, seq), atol=tol, rtol=0)


CASES = [("torch", kind) for kind in KINDS] + [
    pytest.param("mlx", kind, marks=pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed"))
    for kind in MLX_KINDS]


@pytest.mark.spec("B4", "B12", "B14")
@pytest.mark.parametrize(("backend", "kind"), CASES)
def test_every_architecture_split_or_not(backend: str, kind: str, models: dict[str, Path]) -> None:
    ref = reference(models[kind])
    model = Model(resolve_model(str(models[kind])))
    factory = _backend(backend)
    tokens = None
    for split in (MLX_SPLITS.get(kind, SPLITS) if backend == "mlx" else SPLITS):
        stages = _stages(factory, model, split)
        _check(stages, ref, type(stages[0]).logit_tolerance)
        got = greedy_generate(stages, IDS, 8)
        assert tokens is None or got == tokens, f"{backend} {kind} {split}: {got} != {tokens}"
        tokens = got


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.spec("B12")
@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_torch_and_mlx_stages_mix_in_one_pipeline(kind: str, models: dict[str, Path]) -> None:
    from backends.mlx import MlxBackend
    from backends.torch import TorchBackend

    model = Model(resolve_model(str(models[kind])))
    alone = greedy_generate(_stages(lambda: TorchBackend(device="cpu"), model, [(0, 5)]), IDS, 8)
    mixed = [*_stages(lambda: TorchBackend(device="cpu"), model, [(0, 2)]),
             *_stages(lambda: MlxBackend(device="cpu"), model, [(2, 5)])]
    assert greedy_generate(mixed, IDS, 8) == alone


@pytest.fixture(scope="module")
def quantized(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mlx-community style directories made by mlx-lm's own convert (group size 32): every
    architecture MLX runs at 4 bits (qwen3_moe mixed 4/6-bit: mlx-lm's mixed_4_6 recipe, per-layer
    overrides in config.json), and 8-bit qwen3 and qwen3_moe."""
    if not HAS_MLX:
        pytest.skip("mlx and mlx-lm are not installed")
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("q")
    out = {}
    plan = [(kind, 4, "mixed_4_6" if kind == "qwen3_moe" else None) for kind in MLX_KINDS]
    for kind, bits, recipe in [*plan, ("qwen3", 8, None), ("qwen3_moe", 8, None)]:
        source = root / kind
        if not source.exists():  # the same weights as models[kind], with the release-style config
            tiny_model(kind, source, release_names=True)
        out[f"{kind}-{bits}"] = root / f"{kind}-{bits}"
        convert(str(source), str(out[f"{kind}-{bits}"]), quantize=True, q_group_size=32, q_bits=bits,
                quant_predicate=recipe)
    return out


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.spec("B13")
@pytest.mark.parametrize("kind", MLX_KINDS)
def test_mlx_quantized_directory_stays_quantized_and_splits(kind: str, quantized: dict[str, Path]) -> None:
    import json

    from backends.mlx import MlxBackend

    folder = quantized[f"{kind}-4"]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    if kind == "qwen3_moe":  # the mixed recipe keeps some layers at 6 bits: per-layer overrides
        assert any(isinstance(v, dict) and v.get("bits") == 6 for v in config["quantization"].values())
    model = Model(resolve_model(str(folder)))
    whole = _stages(lambda: MlxBackend(device="cpu"), model, [(0, 5)])
    assert whole[0].quantized
    tokens = greedy_generate(whole, IDS, 8)
    for split in MLX_SPLITS.get(kind, SPLITS)[1:]:
        stages = _stages(lambda: MlxBackend(device="cpu"), model, split)
        assert all(s.quantized for s in stages)
        assert greedy_generate(stages, IDS, 8) == tokens, split


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.spec("B13")
@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_mlx_8bit_logits_stay_near_the_float_model(kind: str, models: dict[str, Path],
                                                   quantized: dict[str, Path]) -> None:
    from backends.mlx import MlxBackend

    model = Model(resolve_model(str(quantized[f"{kind}-8"])))
    stages = _stages(lambda: MlxBackend(device="cpu"), model, [(0, 2), (2, 5)])
    ours = step(stages, [s.new_cache() for s in stages], IDS, 0)
    ref = reference_logits(reference(models[kind]), IDS)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= QUANT_TOL


@pytest.mark.spec("B14")
def test_sliced_config_shifts_the_fields_that_name_global_layers() -> None:
    from mesh.errors import ModelError
    from mesh.models import sliced_config
    from mesh.testing.tiny import tiny_config

    deepseek = tiny_config("deepseek_v3", first_k_dense_replace=3)
    assert [sliced_config(deepseek, a, b).first_k_dense_replace for a, b in [(0, 2), (1, 5), (3, 5), (4, 5)]] == \
        [3, 2, 0, 0]
    qwen = tiny_config("qwen3_moe", mlp_only_layers=[0, 2, 4])
    assert sliced_config(qwen, 1, 4).mlp_only_layers == [1]
    assert sliced_config(qwen, 2, 5).mlp_only_layers == [0, 2]
    gemma = tiny_config("gemma3_text")
    assert sliced_config(gemma, 1, 4).layer_types == gemma.layer_types[1:4]
    assert sliced_config(qwen, 0, 5).num_hidden_layers == 5
    stepped = tiny_config("qwen3_moe", decoder_sparse_step=2)
    assert sliced_config(stepped, 2, 5).decoder_sparse_step == 2
    with pytest.raises(ModelError, match="decoder_sparse_step=2.*multiple of 2, not 1"):
        sliced_config(stepped, 1, 5)


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.spec("B14")
def test_mlx_gemma3_refuses_a_split_out_of_its_period(models: dict[str, Path]) -> None:
    from backends.mlx import MlxBackend
    from mesh.errors import ModelError

    model = Model(resolve_model(str(models["gemma3_text"])))
    for start, end in [(1, 3), (4, 5)]:  # out of phase; shorter than one period
        with pytest.raises(ModelError, match="must start at a multiple of 2 layers and hold at least 2"):
            MlxBackend(device="cpu").load(model, start, end)


def _backend(name: str, **options: object):  # type: ignore[no-untyped-def]
    if name == "torch":
        from backends.torch import TorchBackend

        return lambda: TorchBackend(device="cpu", **options)
    from backends.mlx import MlxBackend

    return lambda: MlxBackend(device="cpu", **options)


@pytest.mark.spec("B15")
@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx"))])
@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("how", ["int8", "int4"])
def test_quantize_as_the_stage_loads(how: str, backend: str, kind: str, models: dict[str, Path]) -> None:
    """--quantize int8 / int4 (torchao on torch, on CPU too; mlx's own on MLX): less memory, the
    same tokens whole and split, logits near the float model's."""
    model = Model(resolve_model(str(models[kind])))
    float_stage = _stages(_backend(backend), model, [(0, 5)])[0]
    whole = _stages(_backend(backend, quantize=how), model, [(0, 5)])
    # torchao's weight-only configs quantize nn.Linear layers: transformers' fused expert tensors
    # stay float, so a torch MoE model shrinks less (README "Models")
    limit = 0.8 if (backend, kind) == ("torch", "qwen3_moe") else {"int8": 0.6, "int4": 0.45}[how]
    assert whole[0].weight_bytes < limit * float_stage.weight_bytes
    tokens = greedy_generate(whole, IDS, 8)
    split = _stages(_backend(backend, quantize=how), model, [(0, 2), (2, 5)])
    assert greedy_generate(split, IDS, 8) == tokens
    if how == "int8":
        # 4-bit error on random weights 64 wide is as large as the logits: int4's tolerance is
        # checked on the default model's real weights (tests/test_backend_torch.py)
        ours = step(split, [s.new_cache() for s in split], IDS, 0)
        ref = reference_logits(reference(models[kind]), IDS)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= QUANT_TOL


@pytest.mark.spec("B15")
def test_quantize_choices_are_checked_when_the_backend_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from backends.torch import TorchBackend
    from mesh.errors import BackendError

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # as on a Mac
    with pytest.raises(BackendError, match="int4 on the torch backend runs on cuda and cpu.*not on mps"):
        TorchBackend(device="mps", quantize="int4")
    with pytest.raises(BackendError, match="valid: \\['none', 'int8', 'int4'\\]"):
        TorchBackend(device="cpu", quantize="int3")


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.spec("B15")
def test_mlx_quantize_none_unpacks_a_quantized_directory(quantized: dict[str, Path]) -> None:
    model = Model(resolve_model(str(quantized["qwen3-8"])))
    packed = _stages(_backend("mlx"), model, [(0, 5)])[0]
    unpacked = _stages(_backend("mlx", quantize="none"), model, [(0, 5)])
    assert packed.quantized and not unpacked[0].quantized and unpacked[0].weight_bytes > 2 * packed.weight_bytes
    assert greedy_generate(unpacked, IDS, 8) == greedy_generate([packed], IDS, 8)
