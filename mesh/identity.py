"""This node's persistent identity and the memory it offers.

The node id is derived from the node's identity key, created once in the data dir and kept
across restarts (spec N1, S1). Memory is
read with psutil (available memory x the configured fraction).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

ID_FILE = "node_id"
MEMORY_GRANULE = 64 << 20  # round offered memory down to 64 MiB so equal machines offer equal amounts


def lock_data_dir(data_dir: Path) -> BinaryIO:
    """Take an exclusive lock on ``data_dir`` for the life of this process (keep the returned
    file open). Two processes on one machine must not share a node id or an event log.

    Raises ConfigError naming the process that holds the lock.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / "lock", "a+b")
    except OSError as exc:
        raise ConfigError(f"--data-dir {data_dir}: cannot create it: {exc}") from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().decode(errors="replace").strip() or "?"
        handle.close()
        raise ConfigError(
            f"--data-dir {data_dir} is in use by another node process (pid {holder}); "
            f"give each node on this machine its own --data-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()).encode())
    handle.flush()
    return handle


def host_dir() -> Path:
    """Where the node processes of this user on this host register (one file each, spec N18)."""
    return Path(tempfile.gettempdir()) / f"mesh-nodes-{os.getuid()}"


def register_on_host(directory: Path | None = None) -> tuple[BinaryIO | None, list[int]]:
    """Register this process among the mesh nodes on this host; (the registration, to keep
    open for the life of the process, or None when the directory cannot be written; the pids
    of the other live nodes).

    A registration is a file ``<pid>.node`` locked with ``flock`` while its process lives
    (renamed into place already locked, so no scan sees it unlocked); a file nobody holds is a
    dead node's and is removed. When another node is alive, the CPU thread pools of the
    nodes would share the cores: unless the user chose an OpenMP wait policy
    (``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``) and while torch is not yet loaded, this sets
    ``OMP_WAIT_POLICY=PASSIVE``. An OpenMP worker that spins at a barrier (the default, and
    the fastest for a node alone on its machine) takes the core another process's stage
    needs: measured on 2 cores, two processes computing at once took 86 ms per decode step
    against 23 ms with passive waits (spec N18).
    """
    directory = directory or host_dir()
    handle: BinaryIO | None = None
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        tmp = directory / f".{os.getpid()}.tmp"
        handle = open(tmp, "wb")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, directory / f"{os.getpid()}.node")
    except OSError as exc:  # a registration is an aid: without one, this node keeps the default policy
        if handle is not None:
            handle.close()
        log.debug("cannot register on this host in %s: %s", directory, exc)
        return None, []
    others = []
    for path in directory.glob("*.node"):
        if path.stem == str(os.getpid()):
            continue
        try:
            with open(path, "rb") as other:
                try:
                    fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    others.append(int(path.stem) if path.stem.isdigit() else -1)
                else:
                    path.unlink(missing_ok=True)  # its process is gone
        except OSError:
            continue
    chosen = any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    if others and not chosen and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        log.info("%d other mesh node(s) run on this host (pid %s): CPU worker threads wait passively "
                 "(OMP_WAIT_POLICY=PASSIVE) so the nodes do not spin against each other", len(others),
                 ", ".join(map(str, sorted(others))))
    return handle, others


def load_or_create_node_id(data_dir: Path) -> str:
    """This node's id: derived from its Ed25519 identity key (``mesh.security``), which is
    created in ``data_dir`` on first use. The id is also written to ``data_dir/node_id`` for
    people and scripts to read; the key is what counts.

    Raises ConfigError when the data dir cannot be written or the key file is corrupt.
    """
    from mesh.security import load_or_create_identity, node_id_for

    node_id = node_id_for(load_or_create_identity(data_dir).public_key())
    path = data_dir / ID_FILE
    try:
        if not path.exists() or path.read_text().strip() != node_id:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(node_id + "\n")
            os.replace(tmp, path)  # atomic: a crash never leaves half an id
    except OSError as exc:
        raise ConfigError(f"--data-dir {data_dir}: cannot store the node id: {exc}") from exc
    return node_id


def usable_memory_bytes(fraction: float) -> int:
    """``fraction`` of the memory available now (psutil), rounded down to 64 MiB, in bytes."""
    import psutil

    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--memory-fraction must be in (0, 1], got {fraction}")
    available = int(psutil.virtual_memory().available * fraction)
    return available - available % MEMORY_GRANULE
