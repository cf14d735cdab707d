"""Tiny random Hugging Face models for backend tests, saved with transformers' own classes:
5 layers, hidden size 64, 4 attention heads over 2 KV heads (GQA), a 300-token vocabulary and a
non-default RoPE theta (31337) written the transformers >= 5 way (``rope_parameters`` only), so
a backend that drops the theta shows it plainly."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_model(kind: str, folder: Path, **overrides: object) -> Path:
    """Save a tiny random model of ``kind`` (llama/qwen2/qwen3) with a non-default RoPE theta;
    ``overrides`` replace config fields (e.g. ``tie_word_embeddings=True``)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 31337.0}, tie_word_embeddings=False,
        initializer_range=0.2,  # larger activations, so a wrong RoPE theta shows plainly
    )
    common.update(overrides)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[kind]
    torch.manual_seed(1234)
    model = model_cls(config_cls(**common))
    with torch.no_grad():  # random init leaves norms at 1; perturb them so they matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
