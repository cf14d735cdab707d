"""The gym's model: a small Llama-architecture causal LM built from a config by transformers,
with its training FLOPs and memory.

Sizes (``SIZES``), counted at the default 1024-token vocabulary: ``tiny`` (0.06M parameters;
0.03M at the tests' 300 tokens), ``small`` (1.0M: the README's runs on a 2-core machine) and
``base`` (5.4M). The model is transformers'
``LlamaForCausalLM`` (tied embeddings, no dropout), initialised once from the seed and copied
to every node, so all nodes start equal, as every algorithm here assumes.

FLOPs per training token (``train_flops_per_token``): 6 N + 6 n_layer n_ctx d_model, where N
counts every parameter (the tied embedding is also the LM head's matrix): the forward pass's
2 N + 2 n_layer n_ctx d (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", table 1)
and a backward pass of twice that.

Activation memory (``activation_bytes``): s b h (34 + 5 a s / h) bytes per layer in 16-bit
training (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4.1), doubled for float32.
"""

from __future__ import annotations

from typing import Any

import torch

from mesh.errors import ConfigError

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "base": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8),
}


def build(size: str, *, vocab_size: int, seq_len: int, seed: int) -> Any:
    """A float32 ``LlamaForCausalLM`` of ``size`` (``SIZES``), initialised from ``seed``.
    ConfigError for an unknown size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ConfigError(f"--model-size {size!r}; valid: {', '.join(SIZES)}")
    dims = SIZES[size]
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len + 1,
                         num_key_value_heads=dims["num_attention_heads"], tie_word_embeddings=True,
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, **dims)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.config.use_cache = False
    return model


def parameters(model: Any) -> list[torch.nn.Parameter]:
    """The trainable parameters in a fixed order (the tied embedding once)."""
    return [p for p in model.parameters() if p.requires_grad]


def count(model: Any) -> int:
    return sum(p.numel() for p in parameters(model))


def train_flops_per_token(model: Any, seq_len: int) -> float:
    """FLOPs to train on one token (forward and backward), see the module docstring."""
    c = model.config
    return 6.0 * count(model) + 6.0 * c.num_hidden_layers * seq_len * c.hidden_size


def activation_bytes(model: Any, batch: int, seq_len: int) -> int:
    """Bytes of activations kept for the backward pass of one batch in float32."""
    c = model.config
    s, h, a = seq_len, c.hidden_size, c.num_attention_heads
    return int(2 * c.num_hidden_layers * s * batch * h * (34 + 5 * a * s / h))


def loss(model: Any, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over the ``seq_len`` predictions of ``blocks``
    ``[b, seq_len + 1]`` (int64). transformers shifts ``labels`` inside a causal LM (its
    documented convention), so the block is both the input and the labels."""
    return model(input_ids=blocks, labels=blocks, use_cache=False).loss
