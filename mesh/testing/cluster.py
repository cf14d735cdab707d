"""Start real ``python -m mesh node`` processes on 127.0.0.1 and clean them all up.

Used by the end-to-end tests and the benchmark. Every child runs in its own session so
``stop()`` can signal it and whatever it spawned; a child still alive after SIGTERM and a
grace period is SIGKILLed. Use it as a context manager so cleanup runs even on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import MeshError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, *, timeout_s: float = 5.0) -> tuple[int, Any]:
    """GET ``url``; (status, parsed JSON body). Raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except json.JSONDecodeError:
            return exc.code, body.decode(errors="replace")


@dataclass
class NodeProcess:
    """One child node: its ports, data dir, log file and process."""

    index: int
    port: int
    api_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    args: list[str]
    env: dict[str, str]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _spawn(args: list[str], env: dict[str, str], log_path: Path, mode: str) -> subprocess.Popen[bytes]:
    with open(log_path, mode) as log_file:
        return subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def node_env() -> dict[str, str]:
    """This process's environment for a node it starts: without the ``MESH_<FLAG>`` settings (a
    user's own would change the nodes under test), with ``MESH_CACHE_DIR`` (the test session's
    model cache, spec B21)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESH_") or k == "MESH_CACHE_DIR"}


class LocalCluster:
    """``n`` nodes on 127.0.0.1; node i > 0 is started with ``--peer`` to node 0.

    Args:
        n: number of nodes.
        workdir: where data dirs and logs go.
        memory_bytes: memory each node offers (fixed, so the split is deterministic); a list
            gives one value per node.
        extra_args: more flags for every node.
        cluster_key: the cluster key every node gets through ``MESH_CLUSTER_KEY`` (default: a
            fresh random one).
        profile: a ``profile.json`` (``mesh/placement/profile.py``) put in every data dir, so nodes on
            one machine do not measure it at once and get each other's load.
        node_args: more flags per node (node i gets ``node_args[i]``), after ``extra_args``.
        placement: ``--placement`` of every node; ``memory`` by default, unlike a node's
            default, so that n nodes run an n-stage pipeline: what tests and benchmarks of
            pipelines need (the solver would give a model that fits one node to one node).

    Discovery is off (``--discovery off``): tests never announce on the host's networks. With
    two or more nodes, each gets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment chose a
    wait policy, and ``OMP_NUM_THREADS`` = its share of this host's cores (at least 1) unless
    the environment chose one: the nodes share this host's cores (spec N18), and each computes
    as on a machine of its own with that many cores.
    """

    def __init__(self, n: int, workdir: Path, *, model: str = "smollm2-135m",
                 memory_bytes: int | list[int] = 4 << 30, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, cluster_key: str | None = None,
                 profile: Path | None = None, placement: str = "memory",
                 node_args: list[list[str]] | None = None, initial: int | None = None) -> None:
        from mesh.security import format_cluster_key

        self.cluster_key = cluster_key or format_cluster_key(os.urandom(32))
        self.profile = profile
        self.n = n
        self.workdir = workdir
        self.model = model
        self.memory = memory_bytes if isinstance(memory_bytes, list) else [memory_bytes] * n
        self.extra_args = ["--placement", placement, *(extra_args or [])]
        self.env = env or {}
        self.node_args = node_args or [[] for _ in range(n)]
        self.nodes: list[NodeProcess] = []
        self.initial = initial  # how many nodes ``with`` starts (all by default; ``add()`` the rest)

    def start(self, count: int | None = None) -> LocalCluster:
        """Start the first ``count`` nodes (all by default); ``add()`` starts the next one."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(self.n if count is None else count):
            self.add()
        return self

    def add(self) -> NodeProcess:
        """Start the next node of the ``n``, with ``--peer`` the first one (a node joining)."""
        i = len(self.nodes)
        if i >= self.n:
            raise MeshError(f"all {self.n} nodes are started")
        first_port = self.nodes[0].port if self.nodes else None
        port, api_port = free_port(), free_port()
        data_dir = self.workdir / f"node{i}"
        if self.profile is not None:  # nodes on one machine share its profile (measured once, alone)
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "profile.json").write_bytes(self.profile.read_bytes())
        log_path = self.workdir / f"node{i}.log"
        args = [sys.executable, "-m", "mesh", "node", "--host", "127.0.0.1", "--port", str(port),
                "--api-port", str(api_port), "--data-dir", str(data_dir), "--model", self.model,
                "--memory-bytes", str(self.memory[i]), "--discovery", "off", *self.extra_args,
                *self.node_args[i]]
        if first_port is not None:
            args += ["--peer", f"127.0.0.1:{first_port}"]
        env = node_env()
        env["MESH_CLUSTER_KEY"] = self.cluster_key  # not on the command line, where `ps` shows it
        if self.n > 1 and "GOMP_SPINCOUNT" not in env:  # n nodes share this host's cores (spec N18)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.n > 1:  # ... each its share, as on machines of their own (spec N18)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.n)))
        env.update(self.env)
        process = _spawn(args, env, log_path, "wb")
        self.nodes.append(NodeProcess(i, port, api_port, data_dir, log_path, process, args, env))
        return self.nodes[-1]

    def restart(self, index: int) -> None:
        """Start node ``index`` again with the same flags, ports and data dir (log appended)."""
        node = self.nodes[index]
        if node.process.poll() is None:
            raise MeshError(f"node {index} is still running")
        node.process = _spawn(node.args, node.env, node.log_path, "ab")

    def cluster_infos(self) -> dict[int, dict[str, Any] | None]:
        """Each live node's /v1/cluster answer (None when it does not answer)."""
        out: dict[int, dict[str, Any] | None] = {}
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            try:
                _, info = http_json(node.api_url + "/v1/cluster", timeout_s=2.0)
                out[node.index] = info if isinstance(info, dict) and "kernel" in info else None
            except OSError:
                out[node.index] = None
        return out

    def wait_converged(self, timeout_s: float = 60.0) -> tuple[str, list[dict[str, Any]]]:
        """Wait until every live node reports the same kernel state hash; returns it and the
        /v1/cluster answers that agreed on it (read in one pass, so a later event cannot make
        them disagree).

        Raises MeshError when that does not happen within ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        hashes: dict[int, str | None] = {}
        while time.monotonic() < deadline:
            infos = self.cluster_infos()
            hashes = {i: info["kernel"].get("state_hash") if info else None for i, info in infos.items()}
            values = set(hashes.values())
            if len(values) == 1 and None not in values:
                return values.pop(), [info for info in infos.values() if info]  # type: ignore[return-value]
            time.sleep(0.2)
        raise MeshError(f"nodes did not converge within {timeout_s} s: {hashes}")

    def wait_ready(self, timeout_s: float = 180.0, members: int | None = None) -> None:
        """Wait until every live node answers /health 200 and sees ``members`` members.

        Raises MeshError (with the nodes' log tails) when that does not happen in time.
        """
        want = members if members is not None else self.n
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ready(node, want) for node in self.nodes if node.process.poll() is None):
                if any(node.process.poll() is None for node in self.nodes):
                    return
            dead = [n for n in self.nodes if n.process.poll() is not None and n.process.returncode not in (0, -9, -15)]
            if dead:
                raise MeshError(f"node {dead[0].index} exited with {dead[0].process.returncode}:\n{dead[0].log_text()[-3000:]}")
            time.sleep(0.2)
        tails = "\n".join(f"--- node {n.index} ---\n{n.log_text()[-2000:]}" for n in self.nodes)
        raise MeshError(f"cluster not ready within {timeout_s} s\n{tails}")

    @staticmethod
    def _ready(node: NodeProcess, members: int) -> bool:
        try:
            status, _ = http_json(node.api_url + "/health", timeout_s=2.0)
            if status != 200:
                return False
            _, info = http_json(node.api_url + "/v1/cluster", timeout_s=2.0)
        except OSError:
            return False
        return isinstance(info, dict) and len(info.get("members", [])) == members

    def send_signal(self, index: int, sig: int) -> None:
        """Send ``sig`` to node ``index`` (e.g. SIGSTOP, SIGCONT) without waiting for anything."""
        node = self.nodes[index]
        if node.process.poll() is None:
            os.killpg(node.process.pid, sig)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[index]
        if node.process.poll() is None:
            os.killpg(node.process.pid, sig)
            node.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM every node, then SIGKILL what is left after 10 s."""
        for node in self.nodes:
            if node.process.poll() is None:
                try:
                    os.killpg(node.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10.0
        for node in self.nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(node.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.process.wait(timeout=10)

    def __enter__(self) -> LocalCluster:
        return self.start(self.initial)

    def __exit__(self, *exc: object) -> None:
        self.stop()
