"""Specs are contracts: every invariant id in specs/*.md is cited by a test, and every
cited id exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INVARIANT = re.compile(r"^- \*\*([A-Z]+\d+)\*\*", re.MULTILINE)


def spec_ids() -> dict[str, str]:
    ids: dict[str, str] = {}
    for spec in sorted((ROOT / "specs").glob("*.md")):
        for found in INVARIANT.findall(spec.read_text()):
            assert found not in ids, f"{found} is defined in both {ids[found]} and {spec.name}"
            ids[found] = spec.name
    return ids


def cited_ids() -> dict[str, set[str]]:
    """id -> test files citing it via ``pytest.mark.spec("ID", ...)``: tests/ and the suites
    shipped in mesh/testing/ (which tests/ runs)."""
    cited: dict[str, set[str]] = {}
    for path in [*sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "mesh" / "testing").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "spec"
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "mark"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        cited.setdefault(arg.value, set()).add(path.name)
    return cited


def test_specs_define_invariants() -> None:
    ids = spec_ids()
    assert {"transport.md", "backend.md", "placement.md", "node.md", "registry.md", "api.md"} <= set(ids.values())


def test_every_invariant_has_a_test() -> None:
    missing = sorted(set(spec_ids()) - set(cited_ids()))
    assert not missing, f"spec invariants with no test citing them: {missing}"


def test_every_cited_id_exists() -> None:
    unknown = {k: v for k, v in cited_ids().items() if k not in spec_ids()}
    assert not unknown, f"tests cite ids that no spec defines: {unknown}"
