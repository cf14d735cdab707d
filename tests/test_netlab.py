"""Real networks on one machine (mesh/testing/netlab.py): node processes in separate network
namespaces on a bridge, finding each other by real multicast discovery with no --peer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mesh.testing import netlab

REASON = netlab.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network lab here: {REASON}")


def _wait(lab: netlab.NetLab, hosts: list[str], members: int, timeout_s: float = 180.0) -> dict[str, dict]:
    """Wait until every host's node answers /health 200 and sees ``members`` members."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline:
        try:
            for host in hosts:
                status, _ = lab.http_json(host, "http://127.0.0.1:8000/health")
                _, seen[host] = lab.http_json(host, "http://127.0.0.1:8000/v1/cluster")
                if status != 200 or len(seen[host].get("members", [])) != members:
                    raise OSError("not yet")
            return seen
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"not {members} ready members within {timeout_s} s: {seen}")


@pytest.mark.spec("D15")
def test_nodes_in_separate_namespaces_find_each_other_by_multicast(tmp_path: Path) -> None:
    """Two hosts on one LAN, each node started with the defaults a user types (every
    interface, discovery on) and no --peer: they discover each other by multicast, link up,
    place the model and serve it from both APIs."""
    from mesh.security import format_cluster_key

    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env |= {"MESH_CLUSTER_KEY": format_cluster_key(os.urandom(32)), "OMP_WAIT_POLICY": "PASSIVE"}
    processes = []
    with netlab.NetLab() as lab:
        lab.network("lan", "10.77.1")
        for name in ("a", "b"):
            lab.host(name, "lan")
        try:
            for name in ("a", "b"):
                with open(tmp_path / f"{name}.log", "wb") as log:
                    processes.append(lab.popen(name, netlab.node_argv(tmp_path, name, extra=["--placement", "memory"]),
                                               env=env, stdout=log, stderr=subprocess.STDOUT))
            seen = _wait(lab, ["a", "b"], 2)
            addresses = {m["address"].rpartition(":")[0] for m in seen["a"]["members"]}
            assert addresses == {lab.hosts["a"].address("lan"), lab.hosts["b"].address("lan")}
            assert "discovery: peer" in (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
            assert sorted((m["layer_start"], m["layer_end"]) for m in seen["b"]["members"]) == [(0, 15), (15, 30)]
            status, reply = lab.http_json("b", "http://127.0.0.1:8000/v1/chat/completions", body={
                "model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello."}],
                "temperature": 0, "max_tokens": 8}, timeout_s=120)
            assert status == 200 and reply["choices"][0]["message"]["content"], reply
        finally:
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in processes:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
