"""This node's persistent identity and the memory it offers.

The node id is created once in the data dir and kept across restarts (spec N1). Memory is
read with psutil (available memory x the configured fraction).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mesh.errors import ConfigError

ID_FILE = "node_id"
MEMORY_GRANULE = 64 << 20  # round offered memory down to 64 MiB so equal machines offer equal amounts


def load_or_create_node_id(data_dir: Path) -> str:
    """The node id stored in ``data_dir/node_id``; created (16 random bytes, hex) on first use.

    Raises ConfigError when the data dir cannot be created or the file is corrupt.
    """
    path = data_dir / ID_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            node_id = path.read_text().strip()
            if len(node_id) != 32 or any(c not in "0123456789abcdef" for c in node_id):
                raise ConfigError(f"{path} is corrupt (expected 32 hex digits); delete it to make a new id")
            return node_id
        node_id = secrets.token_hex(16)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(node_id + "\n")
        os.replace(tmp, path)  # atomic: a crash never leaves half an id
        return node_id
    except OSError as exc:
        raise ConfigError(f"--data-dir {data_dir}: cannot store the node id: {exc}") from exc


def usable_memory_bytes(fraction: float) -> int:
    """``fraction`` of the memory available now (psutil), rounded down to 64 MiB, in bytes."""
    import psutil

    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--memory-fraction must be in (0, 1], got {fraction}")
    available = int(psutil.virtual_memory().available * fraction)
    return available - available % MEMORY_GRANULE
