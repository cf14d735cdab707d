"""Regression (review): secret key files can be written world-readable (spec S1).

``mesh.security._write_private`` writes ``identity.key`` / ``cluster.key`` through a fixed
temporary name (``identity.tmp`` / ``cluster.tmp``) opened with ``O_CREAT`` but without
``O_EXCL``: the 0o600 mode only applies when the file is *created*. If a temporary file of
that name is already there (left by an interrupted write, a backup/sync tool, or planted as a
symlink), its existing mode (here 0o644) is kept and the secret is renamed into place
readable by every local user. S1 requires the keys to be "readable by the owner only".
Fix: create the temp file with ``tempfile.mkstemp(dir=...)`` (O_EXCL, 0o600) or
``os.fchmod(fd, 0o600)`` after opening, and refuse symlinks (O_NOFOLLOW).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mesh.security import load_or_create_cluster_key, load_or_create_identity


@pytest.mark.spec("S1")
def test_key_files_are_owner_only_even_when_a_stale_temp_file_exists(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    for name in ("cluster.tmp", "identity.tmp"):
        (data / name).write_bytes(b"")
        (data / name).chmod(0o644)
    load_or_create_cluster_key(data)
    load_or_create_identity(data)
    for name in ("cluster.key", "identity.key"):
        mode = stat.S_IMODE((data / name).stat().st_mode)
        assert mode == 0o600, f"{name} is mode {oct(mode)}: readable by other users"
