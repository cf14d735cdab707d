"""Model checking of the kernel's causal delivery and anti-entropy with spin (spec K11, K2).

``specs/kernel.pml`` must verify with no errors, and each deliberately broken variant compiled
from the same source must be rejected, so the check cannot pass vacuously:
``-DBROKEN_DEPS`` delivers an event without its dependencies on other origins (a K2
violation), ``-DBROKEN_AE`` answers a digest with the newest missing event instead of the
oldest (replicas never converge). Each run: ``spin -a``, ``gcc``, ``./pan`` in a temporary
directory, then the ``errors: N`` line of pan's report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "specs" / "kernel.pml"
TIMEOUT_S = 600


def require_spin() -> None:
    """Skip without spin (and a C compiler), or fail when running in CI, which must check it."""
    missing = [tool for tool in ("spin", "gcc") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed: apt-get install -y spin gcc"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the model checker (spec K11): {reason}")
        pytest.skip(reason)


def verify(workdir: Path, *defines: str) -> tuple[int, str]:
    """Run spin on the model with ``defines``; return (errors, pan's report)."""

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT_S)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(cmd)} exited with {done.returncode}:\n{output[-4000:]}"
        return output

    run("spin", *defines, "-a", str(MODEL))
    # SAFETY: assertions only (no cycle detection); COLLAPSE: exact state compression
    run("gcc", "-O2", "-DSAFETY", "-DCOLLAPSE", "-o", "pan", "pan.c")
    report = run("./pan", "-m10000")
    found = re.search(r"errors: (\d+)", report)
    assert found, f"no 'errors: N' line in pan's report:\n{report[-4000:]}"
    return int(found.group(1)), report


@pytest.mark.spec("K11", "K2")
def test_kernel_model_verifies(tmp_path: Path) -> None:
    require_spin()
    errors, report = verify(tmp_path)
    assert errors == 0, f"spin found a violation in specs/kernel.pml:\n{report[-4000:]}"
    # the search must have been exhaustive, not cut off at the depth bound
    assert "max search depth too small" not in report, report[-4000:]
    stored = re.search(r"(\d+) states, stored", report)
    assert stored and int(stored.group(1)) > 100_000, f"suspiciously small state space:\n{report[-4000:]}"


@pytest.mark.spec("K11", "K2")
@pytest.mark.parametrize(
    ("define", "violation"),
    [
        ("-DBROKEN_DEPS", "assertion violated ((past["),  # the K2 assertion at delivery
        ("-DBROKEN_AE", "assertion violated (((vv["),  # the convergence assertion at the end
    ],
)
def test_broken_kernel_model_is_rejected(tmp_path: Path, define: str, violation: str) -> None:
    require_spin()
    errors, report = verify(tmp_path, define)
    assert errors > 0, f"spin accepted the broken variant {define}; the model checks nothing:\n{report[-4000:]}"
    assert violation in report, f"{define} failed for another reason than intended:\n{report[-4000:]}"
