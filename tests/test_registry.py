"""Plugins are found through entry points; a broken one is reported and skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh import registry
from mesh.errors import PluginError


def _fake_distribution(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _fake_distribution(tmp_path, "mesh-broken-plugin", "[mesh.backends]\nbroken = mesh_no_such_module_xyz:Backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.spec("R1", "R2")
def test_builtins_are_entry_points() -> None:
    found = {(p.kind, p.name): p for p in registry.discover()}
    assert found[("backend", "torch")].distribution == "mesh-cluster"
    assert found[("transport", "tcp")].target == "transports.tcp:TcpTransport"
    assert all(p.error is None for p in found.values())
    assert registry.load("backend", "torch").__name__ == "TorchBackend"


@pytest.mark.spec("R3")
def test_broken_plugin_is_reported_and_skipped(broken_plugin: Path) -> None:
    found = {p.name: p for p in registry.discover("backend")}
    assert found["broken"].error is not None and "mesh_no_such_module_xyz" in found["broken"].error
    assert found["broken"].distribution == "mesh-broken-plugin" and found["broken"].version == "0.3"
    assert found["torch"].error is None
    with pytest.raises(PluginError, match="failed to load"):
        registry.load("backend", "broken")
    assert registry.load("backend", "torch").name == "torch"


@pytest.mark.spec("R2", "R3")
def test_plugins_command_lists_everything(broken_plugin: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(broken_plugin), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "mesh", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("torch" in line and "mesh-cluster" in line and "0.1.0" in line and line.endswith("ok") for line in lines)
    assert any("tcp" in line and "transport" in line for line in lines)
    assert any("broken" in line and "FAILED" in line and "mesh-broken-plugin" in line for line in lines)


@pytest.mark.spec("R4")
def test_unknown_plugin_names_the_installed_ones() -> None:
    with pytest.raises(PluginError, match=r"no backend named 'nope'; installed: \[.*'torch'.*\]") as raised:
        registry.load("backend", "nope")
    assert "'mlx'" in str(raised.value)  # every registered name, sorted
    with pytest.raises(PluginError, match="unknown plugin kind"):
        registry.load("compiler", "x")


@pytest.fixture
def wrong_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _fake_distribution(tmp_path, "mesh-wrong-plugin",
                       "[mesh.backends]\nnot-a-backend = collections:OrderedDict\n"
                       "not-a-class = os.path:join\n"
                       "[mesh.transports]\ntorch-as-transport = backends.torch:TorchBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.spec("R3")
def test_a_plugin_of_the_wrong_class_names_its_distribution_and_entry_point(wrong_plugins: Path) -> None:
    from backends.base import Backend
    from transports.base import Transport

    with pytest.raises(PluginError, match=r"backend 'not-a-backend' \(entry point collections:OrderedDict in group "
                                          r"mesh\.backends, distribution mesh-wrong-plugin 0\.3\) is OrderedDict; "
                                          r"a backend must subclass backends\.base\.Backend"):
        registry.load("backend", "not-a-backend", expected=Backend)
    with pytest.raises(PluginError, match=r"'not-a-class' .* is a function, not a class"):
        registry.load("backend", "not-a-class", expected=Backend)
    with pytest.raises(PluginError, match=r"mesh-wrong-plugin .* must subclass transports\.base\.Transport"):
        registry.load("transport", "torch-as-transport", expected=Transport)
    assert registry.load("backend", "not-a-backend").__name__ == "OrderedDict"  # nothing expected: no check
    assert registry.load("backend", "torch", expected=Backend).name == "torch"
    assert registry.load("transport", "tcp", expected=Transport).name == "tcp"


@pytest.mark.spec("R5")
def test_a_backend_whose_library_is_missing_is_listed_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The mlx backend imports without mlx (it imports mlx when built): `plugins` must not call
    it ok where mlx or mlx-lm is missing, and says what installs them."""
    import importlib.util

    from mesh.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else real(name, *a))
    found = {p.name: p for p in registry.discover("backend")}
    assert found["mlx"].error is None and found["mlx"].unavailable is not None
    assert "mlx_lm" in found["mlx"].unavailable and "pip install 'mesh-cluster[mlx]'" in found["mlx"].unavailable
    assert found["torch"].unavailable is None
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[1] == "mlx" and "unavailable: needs mlx_lm" in line for line in lines[1:])
    assert any(line.split()[1] == "torch" and line.endswith("ok") for line in lines[1:])
