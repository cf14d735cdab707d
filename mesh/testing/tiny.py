"""Tiny random Hugging Face models for backend tests, saved with transformers' own classes.

Every architecture gets 5 layers, hidden size 64, 4 attention heads over 2 KV heads (GQA where
the architecture has it), a 300-token vocabulary and a non-default RoPE theta (31337) written
the transformers >= 5 way (``rope_parameters`` only), so a backend that drops the theta shows it
plainly. Mixture-of-experts architectures get 4 experts with 2 routed per token, and the
layer-index rules their configs carry (dense first layers, MLP-only layers, sliding-window
layouts) are set so that a stage split crosses them. Files are written by ``save_pretrained``,
which stores the checkpoint layout of the original releases (transformers >= 5 reverts its
fused expert tensors on save), so loaders meet the names real checkpoints have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Architectures the backends are tested on (README "Models").
DENSE = ("llama", "qwen2", "qwen3", "phi3", "gemma3_text")
MOE = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")
KINDS = DENSE + MOE

_MOE = dict(num_experts_per_tok=2)
# per-architecture config fields, beyond the common ones
_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    # layers 1 and 3 full attention, the rest sliding (window 8): a split at 2 or 3 crosses it
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 31337.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
                    "layer_types": ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]},
    # layer 2 dense (mlp_only_layers), the rest routed over 4 experts
    "qwen3_moe": {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                  "mlp_only_layers": [2], "norm_topk_prob": True},
    "mixtral": {**_MOE, "num_local_experts": 4},
    "gpt_oss": {**_MOE, "num_local_experts": 4, "head_dim": 16, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
                "rope_parameters": {"rope_type": "default", "rope_theta": 31337.0}},
    # MLA attention (compressed KV latent) and one dense layer before the routed ones
    "deepseek_v3": {**_MOE, "n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 32,
                    "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                    "num_key_value_heads": 4, "rope_interleave": True},
}


def tiny_config(kind: str, **overrides: object) -> Any:
    """The transformers config of the tiny ``kind`` model (see the module docstring).

    Raises:
        KeyError: ``kind`` is not one of ``KINDS``.
    """
    from transformers import AutoConfig

    fields: dict[str, Any] = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 31337.0}, tie_word_embeddings=False,
        initializer_range=0.2,  # larger activations, so a wrong RoPE theta shows plainly
        bos_token_id=1, eos_token_id=2, pad_token_id=0,  # the ids of tiny_tokenizer's special tokens
    )
    fields.update(_FIELDS[kind])
    fields.update(overrides)
    return AutoConfig.for_model(kind, **fields)


def tiny_model(kind: str, folder: Path, *, release_names: bool = False, **overrides: object) -> Path:
    """Save a tiny random model of ``kind`` (one of ``KINDS``) to ``folder`` and return it;
    ``overrides`` replace config fields (e.g. ``tie_word_embeddings=True``). With
    ``release_names`` config.json also carries the names the models' releases use (see
    ``_release_style``; mlx-lm's own convert needs them)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, **overrides)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; perturb them so they matter
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "sinks" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    if release_names:
        _release_style(folder / "config.json", config)
    tiny_tokenizer(folder, vocab_size=int(config.vocab_size))
    return folder


def _release_style(path: Path, config: Any) -> None:
    """Add to a transformers >= 5 config.json the names the models' own releases use beside
    transformers' (``num_experts`` for ``num_local_experts``, an explicit ``head_dim``, a
    top-level ``rope_theta``), as the configs on the Hub have them: transformers reads both,
    other libraries (mlx-lm) only the release names."""
    import json

    data = json.loads(path.read_text())
    for alias in getattr(type(config), "attribute_map", {}) or {}:
        value = getattr(config, alias, None)
        if alias not in data and isinstance(value, (int, float, str, bool)):
            data[alias] = value
    if data.get("head_dim") is None:
        data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
    params = data.get("rope_parameters") or {}
    if "rope_theta" in params and "rope_theta" not in data:
        data["rope_theta"] = params["rope_theta"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ("The quick brown fox jumps over the lazy dog. A cluster of small machines serves one model. "
           "Hello, how are you today? Tell me a story about mountains, rivers and the sea.") * 4


def tiny_tokenizer(folder: Path, *, vocab_size: int = 300) -> Any:
    """Save a byte-level BPE tokenizer of at most ``vocab_size`` ids (256 bytes, a few merges
    learnt from a fixed English text, and ``<|im_start|>`` / ``<|im_end|>`` with a ChatML chat
    template) beside a tiny model, so ``python -m mesh node --model folder`` can serve it.
    Built with the ``tokenizers`` library's own trainer; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, chat_template=CHATML)
    fast.save_pretrained(folder)
    return fast


def reference(folder: Path) -> Any:
    """transformers' own model of a saved directory, float32, in eval mode (the reference the
    backends are held to)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_logits(model: Any, ids: list[int]) -> Any:
    """The reference model's float32 logits at the last position of ``ids`` (numpy ``[vocab]``)."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()
