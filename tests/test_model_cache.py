"""The on-disk cache of a GGUF model's config and tokenizer (spec B21)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mesh import model_cache
from mesh.models import Model, resolve_model

TEXTS = ["Hello world, this is a test.", "\n\n  spaces 123 \u00fcn\u00efcode \U0001f680 <|im_start|>", "<|im_end|>x", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there \u00e9"}]


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each GGUF parse transformers is asked for (``gguf_file=``), by what it builds."""
    from transformers import AutoConfig, AutoTokenizer

    calls: list[str] = []
    for cls, what in ((AutoConfig, "config"), (AutoTokenizer, "tokenizer")):
        original = cls.from_pretrained

        def wrapped(*args: Any, _original: Any = original, _what: str = what, **kwargs: Any) -> Any:
            if kwargs.get("gguf_file"):
                calls.append(_what)
            return _original(*args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", wrapped)
    return calls


def _facts(model: Model) -> dict[str, Any]:
    """What a node uses of a model's config and tokenizer."""
    tok = model.tokenizer
    return {
        "config": model.config.to_dict(), "eos": sorted(model.eos_token_ids), "chat": model.encode_chat(CHAT),
        "texts": [tok(t)["input_ids"] for t in TEXTS], "decoded": tok.decode(list(range(0, len(tok), 97))),
        "special": tok.all_special_tokens, "template": tok.chat_template, "size": len(tok),
        "ids": (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), "name": tok.name_or_path,
    }


@pytest.mark.spec("B21")
def test_a_cached_config_and_tokenizer_are_the_parsed_ones_and_a_damaged_entry_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_CACHE_DIR", str(tmp_path / "cache"))
    parses = _parses(monkeypatch)
    ref = resolve_model("smollm2-135m")
    cold = _facts(Model(ref))
    assert sorted(parses) == ["config", "tokenizer"]
    folder = model_cache.entry(ref.path / str(ref.gguf_file), "tokenizer")
    assert folder is not None and (folder / model_cache.DONE).is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # nothing left aside

    warm = _facts(Model(ref))
    assert len(parses) == 2  # read back, not parsed
    assert warm == cold

    (folder / "tokenizer.json").write_text("{not json")  # damaged: parsed again and replaced
    assert _facts(Model(ref)) == cold and len(parses) == 3 and parses[-1] == "tokenizer"
    assert _facts(Model(ref)) == cold and len(parses) == 3


@pytest.mark.spec("B21")
def test_an_entry_belongs_to_one_file_and_one_library_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_CACHE_DIR", str(tmp_path / "cache"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" + bytes(60))
    first = model_cache.entry(file, "config")
    assert first is not None and first.is_relative_to(tmp_path / "cache") and first.name == "config"
    assert model_cache.entry(file, "config") == first and model_cache.entry(file, "tokenizer") != first
    link = tmp_path / "link.gguf"
    link.symlink_to(file)
    assert model_cache.entry(link, "config") == first  # the same file by another name
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_cache.entry(file, "config") != first  # rewritten
    second = model_cache.entry(file, "config")
    file.write_bytes(b"GGUF" + bytes(61))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_cache.entry(file, "config") not in (first, second)  # another size
    third = model_cache.entry(file, "config")
    (tmp_path / "tokenizer.json").write_text("{}")  # transformers would take it over the GGUF's vocabulary
    fourth = model_cache.entry(file, "config")
    assert fourth not in (first, second, third)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("x")
    assert model_cache.entry(file, "config") not in (first, second, third, fourth)
    monkeypatch.setattr(model_cache, "_version", lambda name: "0.0.1" if name == "gguf" else "5")
    assert model_cache.entry(file, "config") not in (first, second, third, fourth)
    assert model_cache.entry(tmp_path / "missing.gguf", "config") is None


@pytest.mark.spec("B21")
def test_where_the_cache_lives_and_that_a_cache_that_cannot_be_written_costs_only_the_parse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.cache_root() == tmp_path / "xdg" / "mesh"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert model_cache.cache_root() == Path.home() / ".cache" / "mesh"
    monkeypatch.setenv("MESH_CACHE_DIR", "off")
    assert model_cache.cache_root() is None and model_cache.entry(tmp_path, "config") is None

    class Value:
        saved = 0

        def save_pretrained(self, folder: str) -> None:
            Value.saved += 1
            Path(folder, "value.json").write_text("1")

    real_is_file = Path.is_file

    def unreadable(path: Path) -> bool:
        if "locked" in path.parts:
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)
    monkeypatch.setattr(Path, "is_file", unreadable)  # a cache folder of another user (root reads every folder)
    assert model_cache.cached(tmp_path / "locked" / "config", lambda: "parsed", lambda f: pytest.fail("unreadable")) \
        == "parsed"
    monkeypatch.setattr(Path, "is_file", real_is_file)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = blocker / "entry" / "config"  # under a file: mkdir fails
    value = Value()
    assert model_cache.cached(unwritable, lambda: value, lambda folder: pytest.fail("nothing to read")) is value
    assert not unwritable.exists()

    folder = tmp_path / "ok" / "config"
    assert model_cache.cached(folder, lambda: value, lambda f: pytest.fail("nothing to read yet")) is value
    assert (folder / "value.json").read_text() == "1" and (folder / model_cache.DONE).is_file()
    assert model_cache.cached(folder, lambda: pytest.fail("must be read back"), lambda f: f) == folder
    (folder / model_cache.DONE).unlink()  # cut short: not an entry
    assert model_cache.cached(folder, lambda: value, lambda f: pytest.fail("incomplete")) is value
    assert Value.saved == 2 and (folder / model_cache.DONE).is_file()
    stale = folder.parent / ".config.dead.tmp"  # left by a writer that was killed, long ago
    stale.mkdir()
    os.utime(stale, (0, 0))
    fresh = folder.parent / ".config.busy.tmp"  # another writer at work
    fresh.mkdir()
    (folder / model_cache.DONE).unlink()
    model_cache.cached(folder, lambda: value, lambda f: pytest.fail("incomplete"))
    assert sorted(p.name for p in folder.parent.iterdir()) == [".config.busy.tmp", "config"]


@pytest.mark.spec("B21")
def test_an_entry_another_process_completed_meanwhile_is_kept(tmp_path: Path) -> None:
    class Value:
        def __init__(self, text: str) -> None:
            self.text = text

        def save_pretrained(self, folder: str) -> None:
            Path(folder, "value.json").write_text(self.text)

    folder = tmp_path / "entry" / "config"

    def parse_while_another_stores() -> Value:  # another process completes the entry meanwhile
        assert model_cache.cached(folder, lambda: Value("first"), lambda f: pytest.fail("empty")).text == "first"
        return Value("second")

    assert model_cache.cached(folder, parse_while_another_stores, lambda f: pytest.fail("empty")).text == "second"
    assert (folder / "value.json").read_text() == "first"  # kept: the same value in real use
    assert sorted(p.name for p in folder.parent.iterdir()) == ["config"]  # nothing left aside
    # found damaged (its read fails): replaced
    assert model_cache.cached(folder, lambda: Value("third"), lambda f: 1 / 0).text == "third"
    assert (folder / "value.json").read_text() == "third"
