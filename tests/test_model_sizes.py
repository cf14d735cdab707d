"""One size for a model (spec P9): the cost model built from the bytes ``model_size`` counts on
the model's own transformers class, so the solver and the memory-proportional split
(``place_pipeline``) decide alike whether a model fits. Configs are built from dicts (nothing
is downloaded); the classes are instantiated on the meta device (no weights)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from mesh.errors import PlacementError
from mesh.placement.costmodel import (
    ACTIVATION_BUFFERS,
    ACTIVATION_MARGIN,
    Device,
    ModelSpec,
    PlacementPlan,
    StagePlan,
    Topology,
    memory_needed,
)
from mesh.placement.pipeline import (
    Capacity,
    ModelSize,
    model_size_from_config,
    place_pipeline,
)
from mesh.placement.solver import Request, solve

# the default model, smollm2-135m (its config.json, as transformers reads it)
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# a non-gated MLP with biases everywhere (Phi-2's layout, scaled down): the formula's gated
# three-matrix MLP overcounts it by a third
PHI = {"architectures": ["PhiForCausalLM"], "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
       "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 4096, "max_position_embeddings": 2048,
       "partial_rotary_factor": 0.5, "tie_word_embeddings": False}
CONTEXT, PROMPT = 2048, 512
REQUEST = Request(context_tokens=CONTEXT, prompt_tokens=PROMPT, new_tokens=128)


def config(fields: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, PhiConfig

    cls = {"LlamaForCausalLM": LlamaConfig, "PhiForCausalLM": PhiConfig}[fields["architectures"][0]]
    return cls(**fields)


def memory_split_fits(size: ModelSize, memory_bytes: int) -> bool:
    try:
        place_pipeline([Capacity(member_id="a", usable_bytes=memory_bytes)], size, context_tokens=CONTEXT)
    except PlacementError:
        return False
    return True


def solver_fits(spec: ModelSpec, memory_bytes: int) -> bool:
    device = Device(id="a", memory_bytes=memory_bytes, flops=1e12, memory_bandwidth_bytes_per_s=1e11)
    try:
        solve(Topology(devices=(device,)), spec, REQUEST)
    except PlacementError:
        return False
    return True


def needs(size: ModelSize, spec: ModelSpec) -> tuple[int, int, int]:
    """(bytes place_pipeline needs on one member, bytes the solver needs on one device, the
    solver's headroom: its margin on the weights and the prompt's hidden-state buffers)."""
    split = size.edge_bytes + size.num_layers * (size.layer_bytes + size.kv_bytes_per_token_per_layer * CONTEXT)
    alone = PlacementPlan(stages=(StagePlan(devices=("a",), layer_start=0, layer_end=spec.num_layers),))
    solver = memory_needed(alone, spec, context_tokens=CONTEXT, prompt_tokens=PROMPT)["a"]
    weights = spec.num_layers * spec.layer_bytes + spec.embed_bytes + spec.head_bytes
    headroom = math.ceil(weights * ACTIVATION_MARGIN + ACTIVATION_BUFFERS * PROMPT * spec.hidden_bytes)
    return split, solver, headroom


@pytest.mark.spec("P9")
def test_a_spec_from_the_measured_size_takes_its_bytes_and_keeps_the_formulas_flops() -> None:
    for fields in (SMOLLM2, PHI):
        cfg = config(fields)
        size = model_size_from_config(cfg, 2)
        formula = ModelSpec.from_config(cfg, name="m@f16", dtype_bytes=2)
        spec = ModelSpec.from_config(cfg, name="m@f16", dtype_bytes=2, size=size)
        assert (spec.num_layers, spec.layer_bytes) == (size.num_layers, size.layer_bytes)
        assert spec.kv_bytes_per_token_per_layer == size.kv_bytes_per_token_per_layer
        assert spec.embed_bytes + spec.head_bytes == size.edge_bytes  # first + last stage: the whole edge
        assert spec.embed_bytes == formula.embed_bytes  # the embedding table is the first stage's
        assert (spec.layer_flops_per_token, spec.attn_flops_per_position, spec.head_flops_per_token) == (
            formula.layer_flops_per_token, formula.attn_flops_per_position, formula.head_flops_per_token)
    # the default model has the formula's layout: both ways of sizing it agree
    cfg = config(SMOLLM2)
    assert ModelSpec.from_config(cfg, name="m", dtype_bytes=4, size=model_size_from_config(cfg, 4)) == \
        ModelSpec.from_config(cfg, name="m", dtype_bytes=4)


@pytest.mark.spec("P9", "P3", "P11")
@pytest.mark.parametrize("fields", [SMOLLM2, PHI], ids=["default-model", "non-gated-mlp-with-biases"])
def test_the_solver_and_the_memory_split_agree_on_whether_a_model_fits(fields: dict[str, Any]) -> None:
    cfg = config(fields)
    size = model_size_from_config(cfg, 4)
    spec = ModelSpec.from_config(cfg, name="m@f32", dtype_bytes=4, size=size)
    split, solver, headroom = needs(size, spec)
    # the same bytes: the only difference is the headroom the solver keeps on top
    assert solver - split == headroom
    for memory in (split // 2, split - 1, solver, solver + 1, 2 * solver):
        assert memory_split_fits(size, memory) == solver_fits(spec, memory), memory
    assert not solver_fits(spec, solver - 1) and memory_split_fits(size, split)


@pytest.mark.spec("P9")
def test_the_formula_alone_misjudges_a_non_gated_mlp_and_the_measured_size_does_not() -> None:
    cfg = config(PHI)
    size = model_size_from_config(cfg, 4)
    formula = ModelSpec.from_config(cfg, name="phi@f32", dtype_bytes=4)
    measured = ModelSpec.from_config(cfg, name="phi@f32", dtype_bytes=4, size=size)
    assert formula.layer_bytes > 1.2 * size.layer_bytes  # three MLP matrices counted, two exist
    split, solver, _ = needs(size, measured)
    assert memory_split_fits(size, solver) and solver_fits(measured, solver)
    assert not solver_fits(formula, solver)  # the disagreement the measured bytes remove


@pytest.mark.spec("P9")
def test_a_size_of_another_model_or_dtype_is_refused() -> None:
    cfg = config(SMOLLM2)
    with pytest.raises(PlacementError, match="compute dtype"):
        ModelSpec.from_config(cfg, name="m@f32", dtype_bytes=4, size=model_size_from_config(cfg, 2))
    other = ModelSize(num_layers=29, layer_bytes=1, edge_bytes=1, kv_bytes_per_token_per_layer=1)
    with pytest.raises(PlacementError, match="29 layers"):
        ModelSpec.from_config(cfg, name="m@f32", dtype_bytes=4, size=other)
    size = model_size_from_config(cfg, 4)
    tiny_edges = ModelSize(num_layers=size.num_layers, layer_bytes=size.layer_bytes, edge_bytes=1,
                           kv_bytes_per_token_per_layer=size.kv_bytes_per_token_per_layer)
    with pytest.raises(PlacementError, match="embedding table"):
        ModelSpec.from_config(cfg, name="m@f32", dtype_bytes=4, size=tiny_edges)


# Qwen3-30B-A3B's config.json as published (the fields that size it): 30.5 B parameters,
# 3.3 B active per token
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                 "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
                 "rope_theta": 1000000.0, "norm_topk_prob": True}


@pytest.mark.spec("P20")
def test_a_moe_model_is_sized_from_its_config_alone(tmp_path: Any) -> None:
    import json

    from mesh.placement.pipeline import layer_counts
    from mesh.tools.plan_cmd import model_spec

    folder = tmp_path / "Qwen3-30B-A3B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_30B_A3B))  # no weights at all
    spec = model_spec(str(folder), "bf16")
    total = spec.num_layers * spec.layer_bytes + spec.embed_bytes + spec.head_bytes
    assert 30.4e9 < total / 2 < 30.7e9  # bf16: 2 bytes per parameter
    active = spec.num_layers * spec.layer_flops_per_token / 2 + 2 * 151936 * 2048
    assert 3.2e9 < active < 3.4e9
    assert spec.read_bytes < spec.layer_bytes / 8  # a decode token reads 8 of 128 experts
    assert spec.kv_bytes_per_token_per_layer == 2 * 4 * 128 * 2
    four = model_spec(str(folder), "bf16", bits=4.5)  # 4-bit, groups of 64
    assert 0.27 < four.layer_bytes / spec.layer_bytes < 0.29
    # an MLX-quantized directory's config declares its bits
    (folder / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "quantization": {"group_size": 64, "bits": 4}}))
    assert model_spec(str(folder), "bf16").layer_bytes == four.layer_bytes
    counts = layer_counts(config_of(QWEN3_30B_A3B))
    assert counts.num_layers == 48 and counts.resident_matrices > 10 * counts.active / 2


@pytest.mark.spec("P20")
def test_dense_first_layers_and_latent_attention_are_counted_as_they_are() -> None:
    from mesh.placement.pipeline import kv_bytes_per_token, layer_counts, model_size_from_config
    from mesh.testing.tiny import tiny_config

    config = tiny_config("deepseek_v3")  # layer 0 dense, layers 1-4 routed over 4 experts (2 per token)
    counts = layer_counts(config)
    size = model_size_from_config(config, 4)
    assert size.layer_bytes == 4 * (counts.resident_matrices + counts.resident_other)  # the largest (a MoE) layer
    assert kv_bytes_per_token(config, 2) == (16 + 8) * 2  # kv_lora_rank + qk_rope_head_dim, not 2 x heads x dim
    assert counts.active < counts.resident_matrices  # half the experts per token
    assert model_size_from_config(config, 4, weight_bits=8).layer_bytes < size.layer_bytes / 3


def config_of(fields: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(fields["model_type"], **{k: v for k, v in fields.items() if k != "model_type"})


@pytest.mark.spec("P20")
def test_a_gguf_is_sized_at_the_bits_the_backend_keeps_it_at(default_model: Any) -> None:
    """The default model is a Q4_1 GGUF: MLX reads Q4_1 natively (groups of 32 with a float16
    scale and bias: 5 bits), torch keeps it as int4 in groups of 32 where it computes in bf16
    on a CPU (5 bits) and dequantizes it in f32; a plugin backend keeps nothing; --quantize
    overrides the file. The node sizes its memory split with these bits in its compute dtype."""
    from backends.base import Backend
    from backends.mlx import MlxBackend
    from backends.torch import TorchBackend
    from mesh.placement.pipeline import model_size
    from mesh.placement.planner import DTYPE_BYTES, loaded_weight_bits

    assert default_model.tensor_source().layer_matrix_types() == {"Q4_1": 30 * (3 * 576 * 1536 + 2 * 576 * 576
                                                                               + 2 * 576 * 192)}
    assert loaded_weight_bits(default_model, None, TorchBackend, "bf16", "cpu") == 5.0
    assert loaded_weight_bits(default_model, None, TorchBackend, "f32", "cpu") is None
    assert loaded_weight_bits(default_model, None, MlxBackend, "f32", "cpu") == 5.0
    assert loaded_weight_bits(default_model, None, Backend, "f32", None) is None  # a plugin: float
    assert loaded_weight_bits(default_model, "int8", TorchBackend, "bf16", "cpu") == 8.5
    assert loaded_weight_bits(default_model, "none", MlxBackend, "f32", "cpu") is None
    kept = model_size(default_model, DTYPE_BYTES["bf16"], weight_bits=5.0)
    f32 = model_size(default_model, DTYPE_BYTES["f32"])
    assert 0.15 < kept.layer_bytes / f32.layer_bytes < 0.17  # 5 of 32 bits, norms in bf16
    assert kept.kv_bytes_per_token_per_layer * 2 == f32.kv_bytes_per_token_per_layer
