"""A GGUF file's config and tokenizer, kept on disk as Hugging Face files.

transformers builds both from a GGUF file's metadata by parsing the whole file (its vocabulary
included) and converting the tokenizer: about 6 s for the default model on 2 cores, paid by
every node start and by each process that opens the model. The result is saved here with
transformers' own ``save_pretrained`` (``config.json``; ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) and read back with ``from_pretrained``
(0.3 s). This cache is ours because transformers has none for GGUF conversions.

An entry is keyed by the GGUF file's resolved path, size and modification time, those of the
files beside it that transformers also reads when it loads a GGUF's tokenizer or config
(``SIBLINGS``: a ``tokenizer.json`` there wins over the GGUF's vocabulary), the versions of
transformers, tokenizers and gguf, and ``FORMAT``: a changed file or library is a miss. The
cache is an aid: a folder that cannot be read or written only costs the parse.

Where: ``$MESH_CACHE_DIR`` (``off`` disables it), else ``$XDG_CACHE_HOME/mesh``, else
``~/.cache/mesh``; entries live under ``gguf-metadata/`` there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored changes
DONE = ".complete"  # written last: an entry without it was cut short
STALE_S = 3600.0  # a folder left aside this long ago was a writer's that died (a killed node)
# files in a GGUF's folder that transformers' AutoConfig / AutoTokenizer read beside the GGUF
SIBLINGS = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
            "vocab.json", "merges.txt", "additional_chat_templates")
T = TypeVar("T")


def cache_root() -> Path | None:
    """The cache folder (see the module docstring), or None when ``MESH_CACHE_DIR=off`` or no
    home folder can be found."""
    chosen = os.environ.get("MESH_CACHE_DIR", "").strip()
    if chosen.lower() == "off":
        return None
    try:
        if chosen:
            return Path(chosen).expanduser()
        base = os.environ.get("XDG_CACHE_HOME", "").strip()
        return (Path(base) if base else Path.home() / ".cache") / "mesh"
    except RuntimeError:  # no HOME and no passwd entry
        return None


def _signature(path: Path) -> str:
    """Size and modification time of ``path`` (and of the files of a folder), or "-"."""
    try:
        stat = path.stat()
        if path.is_dir():
            return ",".join(f"{p.name}:{_signature(p)}" for p in sorted(path.iterdir()))
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        return "-"


def entry(file: Path, what: str) -> Path | None:
    """The folder holding ``what`` (``"config"`` or ``"tokenizer"``) of GGUF ``file``, present
    or not; None without a cache or when ``file`` cannot be read (stat)."""
    root = cache_root()
    if root is None:
        return None
    try:
        real = file.resolve()
        stat = real.stat()
    except (OSError, RuntimeError):
        return None
    versions = [_version(name) for name in ("transformers", "tokenizers", "gguf")]
    beside = [f"{name}={_signature(file.parent / name)}" for name in SIBLINGS]
    key = "|".join([str(FORMAT), str(real), str(stat.st_size), str(stat.st_mtime_ns), *versions, *beside])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return root / "gguf-metadata" / f"{real.stem[:48]}-{digest}" / what


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _complete(folder: Path) -> bool:
    try:
        return (folder / DONE).is_file()
    except OSError:  # a cache folder this user may not read
        return False


def cached(folder: Path | None, parse: Callable[[], T], load: Callable[[Path], T]) -> T:
    """``load(folder)`` when ``folder`` holds a complete entry, else ``parse()``, saved into
    ``folder`` (the value's ``save_pretrained``) for the next process. Raises only what
    ``parse`` raises: an entry that fails to load is parsed again and replaced."""
    damaged = False
    if folder is not None and _complete(folder):
        try:
            return load(folder)
        except Exception as exc:  # noqa: BLE001 - a damaged entry: transformers may raise anything
            log.info("model cache: %s cannot be read (%s); parsing the GGUF file again", folder, exc)
            damaged = True
    value = parse()
    if folder is not None:
        _store(folder, value, replace=damaged)
    return value


def _store(folder: Path, value: Any, *, replace: bool) -> None:
    """Write ``value`` into a folder of its own beside ``folder``, then rename it into place: a
    reader sees a whole entry or none (an entry being replaced is first renamed away, then
    removed). An entry another process completed meanwhile is kept (both hold the same),
    unless ``replace`` (it was found damaged); one left incomplete is replaced. Folders left
    aside by writers that died are removed after ``STALE_S``."""
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        value.save_pretrained(str(tmp))
        (tmp / DONE).write_text("")
        if folder.exists():
            if _complete(folder) and not replace:
                return  # another process stored it first
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, folder)
        tmp = None
    except Exception as exc:  # noqa: BLE001 - a read-only home, a full disk, another writer: no cache
        log.debug("model cache: not stored in %s: %s", folder, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(parent: Path) -> None:
    now = time.time()
    for path in parent.glob(".*"):
        try:
            if path.suffix in (".tmp", ".old") and now - path.stat().st_mtime > STALE_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
