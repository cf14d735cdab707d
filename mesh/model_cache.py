"""A GGUF file's config and tokenizer, kept on disk as Hugging Face files.

transformers builds both from a GGUF file's metadata by parsing the whole file (its vocabulary
included) and converting the tokenizer: about 6 s for the default model on 2 cores, paid by
every node start and by each process that opens the model. The result is saved here with
transformers' own ``save_pretrained`` (``config.json``; ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) and read back with ``from_pretrained``
(0.3 s). This cache is ours because transformers has none for GGUF conversions.

An entry is keyed by the file's resolved path, size and modification time, the transformers
version and ``FORMAT``: a changed file or library is a miss, never a stale hit. The cache is an
aid: a folder that cannot be written or an entry that cannot be read only costs the parse.

Where: ``$MESH_CACHE_DIR`` (``off`` disables it), else ``$XDG_CACHE_HOME/mesh``, else
``~/.cache/mesh``; entries live under ``gguf-metadata/`` there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored changes
DONE = ".complete"  # written last: an entry without it was cut short
T = TypeVar("T")


def cache_root() -> Path | None:
    """The cache folder (see the module docstring), or None when ``MESH_CACHE_DIR=off``."""
    chosen = os.environ.get("MESH_CACHE_DIR", "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "mesh"


def entry(file: Path, what: str) -> Path | None:
    """The folder holding ``what`` (``"config"`` or ``"tokenizer"``) of GGUF ``file``, present
    or not; None without a cache or when ``file`` cannot be read (stat)."""
    root = cache_root()
    if root is None:
        return None
    try:
        real = file.resolve()
        stat = real.stat()
    except OSError:
        return None
    import transformers

    key = f"{FORMAT}|{real}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return root / "gguf-metadata" / f"{real.stem[:48]}-{digest}" / what


def cached(folder: Path | None, parse: Callable[[], T], load: Callable[[Path], T]) -> T:
    """``load(folder)`` when ``folder`` holds a complete entry, else ``parse()``, saved into
    ``folder`` (the value's ``save_pretrained``) for the next process. Raises only what
    ``parse`` raises: an entry that fails to load is parsed again and replaced."""
    damaged = False
    if folder is not None and (folder / DONE).is_file():
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
    """Write ``value`` into a private folder, then rename it into place: a reader sees a whole
    entry or none. An entry another process completed meanwhile is kept (both hold the same),
    unless ``replace`` (it was found damaged); one left incomplete is replaced."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        value.save_pretrained(str(tmp))
        (tmp / DONE).write_text("")
        if folder.exists():
            if (folder / DONE).is_file() and not replace:
                return  # another process stored it first
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except Exception as exc:  # noqa: BLE001 - a read-only home, a full disk, another writer: no cache
        log.debug("model cache: not stored in %s: %s", folder, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
