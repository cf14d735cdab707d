"""The fault-injection scenarios of ``python -m mesh faults`` under pytest (specs/faults.md
F16-F18): the quick set always (CI), the rest with ``MESH_FAULTS_FULL=1``. A row passes only
with nothing lost or mismatched, no crash, its declared clean failures and its recovery target
met."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.tools.faults.harness import Context
from mesh.tools.faults.run import format_row
from mesh.tools.faults.scenarios import QUICK, SCENARIOS

pytestmark = pytest.mark.slow
FULL = os.environ.get("MESH_FAULTS_FULL") == "1"


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    ctx = Context(Path(tmp_path_factory.mktemp("faults")))
    ctx.prepare()
    yield ctx


def _params() -> list[object]:
    params: list[object] = []
    for name in SCENARIOS:
        if name == "clock-24h-ahead":
            continue  # its own test below, always run
        marks = [] if name in QUICK else [pytest.mark.faults_full,
                                          pytest.mark.skipif(not FULL, reason="set MESH_FAULTS_FULL=1")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.spec("F16", "F17", "F18", "F19", "FO1", "FO2", "FO3", "FO4", "FO5", "FO6")
@pytest.mark.parametrize("name", _params())
def test_scenario_loses_nothing_and_changes_no_token(context: Context, name: str) -> None:
    result = SCENARIOS[name].run(context)
    assert result.sent > 0 and result.attempts == result.sent + result.refused, format_row(result)
    assert not result.crashed, format_row(result) + "\n" + "\n".join(result.notes)
    assert result.lost == 0 and result.mismatches == 0, format_row(result) + "\n" + "\n".join(result.notes)
    assert result.target_met is not False, format_row(result) + "\n" + "\n".join(result.notes)
    assert result.passed, format_row(result) + "\n" + "\n".join(result.notes)


@pytest.mark.spec("FO7")
def test_a_node_whose_clock_is_refused_says_so(context: Context) -> None:
    result = SCENARIOS["clock-24h-ahead"].run(context)
    assert result.passed and result.failed_clean == 1, format_row(result) + "\n" + "\n".join(result.notes)
