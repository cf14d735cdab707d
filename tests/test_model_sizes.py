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
