"""The backend conformance suite (mesh/testing/conformance.py, specs/backend.md B11/B12) on
every backend registered under the ``mesh.backends`` entry-point group: torch, mlx (when
installed) and any installed plugin, such as the example in examples/mesh-backend-timed."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import Backend
from mesh import registry
from mesh.errors import BackendError, PluginError
from mesh.testing.conformance import (
    CHECKS,
    Fixture,
    NotSupported,
    Subject,
    make_fixture,
)

BACKENDS = sorted(registry.names("backend"))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return make_fixture(Path(tmp_path_factory.mktemp("conformance")))


def _subject(name: str) -> Subject:
    try:
        cls = registry.load("backend", name, expected=Backend)
        cls(device="cpu", dtype="f32")  # a missing optional dependency shows here
    except (PluginError, BackendError, ImportError) as exc:
        pytest.skip(f"backend {name!r} is not usable here: {exc}")
    return Subject(name, lambda: cls(device="cpu", dtype="f32"), tolerance=float(getattr(cls, "logit_tolerance", 1e-3)))


def test_the_built_in_backends_are_registered() -> None:
    assert "torch" in BACKENDS and "mlx" in BACKENDS


@pytest.mark.spec("B11", "B12", "B16", "B17")
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_conforms(name: str, check, fixture: Fixture) -> None:  # type: ignore[no-untyped-def]
    subject = _subject(name)
    try:
        check(subject, fixture)
    except NotSupported as exc:
        pytest.skip(f"{name} does not support this optional feature: {exc}")
