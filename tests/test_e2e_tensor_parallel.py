"""End to end: real node processes on 127.0.0.1 run a tensor-parallel plan (specs/node.md N26):
``--placement tensor`` puts the members that offer ``--tp-address`` in one group; the text
equals a single node's; a member killed mid-stream is replaced and the request finishes with
the same tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mesh.testing.cluster import LocalCluster, http_json, node_env
from mesh.testing.tiny import tiny_model

pytestmark = pytest.mark.slow

TP = ["--placement", "tensor", "--tp-address", "127.0.0.1", "--dtype", "f32"]


def _stream(url: str, model: str, max_tokens: int = 16, on_token: object = None) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello, tell me a story"}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    text = []
    with httpx.Client(timeout=180) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
                if callable(on_token):
                    on_token(len(text))
    return "".join(text)


def _wait_group(cluster: LocalCluster, size: int, timeout_s: float = 180.0) -> dict:
    """The body of /v1/cluster once every node serves a plan whose one stage is a group of ``size``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = []
        for node in cluster.nodes:
            if node.process.poll() is None:
                try:
                    infos.append(http_json(node.api_url + "/v1/cluster")[1])
                except OSError:
                    infos.append({})
        if infos and all(i.get("ready") and i.get("plan") and i["serving_plan_id"] == i["plan_id"]
                         and len(i["plan"]["stages"]) == 1 and len(i["plan"]["stages"][0]) == 4
                         and len(i["plan"]["stages"][0][3]) == size - 1 for i in infos):
            return infos[0]
        time.sleep(0.3)
    tails = "\n".join(f"--- node {n.index} ---\n{n.log_text()[-3000:]}" for n in cluster.nodes)
    raise AssertionError(f"no tensor-parallel group of {size} served within {timeout_s} s\n{tails}")


def _children(pid: int) -> list[psutil.Process]:
    """The group member processes node ``pid`` started (spawned: ``spawn_main``; not
    multiprocessing's resource tracker)."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("tp") / "llama")


@pytest.mark.spec("N26", "S8")
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_nodes_in_one_tensor_parallel_group_give_the_single_node_text(folder: Path, tmp_path: Path,
                                                                          backend: str) -> None:
    """Two nodes of one library (torch: gloo; MLX: MLX's ring) in one group give the text of a
    single node of that library, from either node."""
    library = ["--backend", backend]
    with LocalCluster(1, tmp_path / "one", model=str(folder), memory_bytes=1 << 30,
                      extra_args=["--dtype", "f32", *library]) as one:
        one.wait_ready(timeout_s=120)
        expected = _stream(one.nodes[0].api_url, folder.name)
    with LocalCluster(2, tmp_path / "tp", model=str(folder), memory_bytes=1 << 30, extra_args=TP + library) as cluster:
        cluster.wait_ready(timeout_s=180)
        info = _wait_group(cluster, 2)
        ranks = sorted((m["tensor_parallel"]["rank"], m["layer_start"], m["layer_end"]) for m in info["members"])
        assert ranks == [(0, 0, 5), (1, 0, 5)]
        for node in cluster.nodes:
            assert _stream(node.api_url, folder.name) == expected
            assert len(_children(node.process.pid)) >= 1  # its member process of the group


FULL = pytest.mark.skipif(os.environ.get("MESH_FULL") != "1", reason="a slow scenario (about 30 s): set MESH_FULL=1")


def _slow_memory_profile(path: Path, backend: str) -> Path:
    """A device profile whose memory reads at 5 MB/s (what the solver prices decode by), so that
    splitting the test model's small layers over two members pays even where the loopback's
    round trip takes milliseconds (a busy 2-core host: 1.4 ms measured)."""
    from mesh.placement.profile import DeviceProfile, software

    profile = DeviceProfile(memory_total_bytes=8 << 30, memory_usable_bytes=4 << 30, flops={"f32": 1e10},
                            memory_bandwidth_bytes_per_s=5e6, backend=backend, device="cpu",
                            measured_at_ms=int(time.time() * 1000), software=software(backend))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_wire()))
    return path


@pytest.mark.spec("N26", "P17")
# torch's group is the one the other tests of this file run most; its variant of this one goes
# to the full set to keep CI short (about 20 s), MLX's stays
@pytest.mark.parametrize("backend", [pytest.param("torch", marks=[FULL, pytest.mark.full]), "mlx"])
def test_the_solver_chooses_a_tensor_parallel_group_that_runs_with_the_single_node_text(
        folder: Path, tmp_path: Path, backend: str) -> None:
    """``--placement solver`` (the default) with two members offering ``--tp-address``: once
    their link is measured, the solver's cost model finds a group of both faster than either
    alone (memory at 5 MB/s: the decode step reads half the weights per member) and the
    cluster serves that plan, with the single-node text, on torch and on MLX."""
    library = ["--backend", backend, "--dtype", "f32"]
    with LocalCluster(1, tmp_path / "one", model=str(folder), memory_bytes=1 << 30, extra_args=library) as one:
        one.wait_ready(timeout_s=120)
        expected = _stream(one.nodes[0].api_url, folder.name)
    profile = _slow_memory_profile(tmp_path / "profile" / "profile.json", backend)
    with LocalCluster(2, tmp_path / "tp", model=str(folder), memory_bytes=1 << 30, placement="solver",
                      profile=profile, extra_args=["--tp-address", "127.0.0.1", *library]) as cluster:
        cluster.wait_ready(timeout_s=180)
        info = _wait_group(cluster, 2)
        assert sorted(m["tensor_parallel"]["rank"] for m in info["members"]) == [0, 1]
        for node in cluster.nodes:
            assert _stream(node.api_url, folder.name) == expected


@pytest.mark.spec("N26", "FO8")
@pytest.mark.parametrize(("fault", "backend"), [
    ("kill-member", "torch"), *(pytest.param(f, "torch", marks=[pytest.mark.full, FULL]) for f in ("stop-member",
                                                                                                 "kill-leader")),
    ("kill-member", "mlx"), *(pytest.param(f, "mlx", marks=[pytest.mark.full, FULL]) for f in ("stop-member",
                                                                                               "kill-leader"))])
def test_a_group_member_lost_mid_stream_gives_the_same_tokens(folder: Path, tmp_path: Path, fault: str,
                                                              backend: str) -> None:
    """SIGKILL or SIGSTOP of the group's member 1 (its node and the node's member process), or
    SIGKILL of the leader, after a few tokens of a stream coordinated by a node that lives: the
    group's step fails within --dead-after-s, the lost node is declared dead, the survivor
    serves alone and the stream ends with the single-node text (of that library); no process of
    the group is left waiting; a stopped member that comes back rejoins and the group forms
    again. Torch groups (gloo) and MLX groups (MLX's ring, supervised by the leader's link)."""
    library = ["--backend", backend]
    with LocalCluster(1, tmp_path / "one", model=str(folder), memory_bytes=1 << 30,
                      extra_args=["--dtype", "f32", *library]) as one:
        one.wait_ready(timeout_s=120)
        expected = _stream(one.nodes[0].api_url, folder.name, max_tokens=48)
    with LocalCluster(2, tmp_path / "tp", model=str(folder), memory_bytes=1 << 30, extra_args=TP + library) as cluster:
        cluster.wait_ready(timeout_s=180)
        info = _wait_group(cluster, 2)
        leader = next(i for i, n in enumerate(cluster.nodes) if any(
            m["self"] and m["tensor_parallel"]["rank"] == 0 for m in http_json(n.api_url + "/v1/cluster")[1]["members"]))
        lost = leader if fault == "kill-leader" else 1 - leader
        survivor = cluster.nodes[1 - lost]
        group_processes = [p for n in cluster.nodes for p in _children(n.process.pid)]
        lost_children = {p.pid for p in _children(cluster.nodes[lost].process.pid)}
        assert len(group_processes) >= 2, info
        fired = threading.Event()

        def on_token(count: int) -> None:
            if count >= 4 and not fired.is_set():
                fired.set()
                cluster.send_signal(lost, signal.SIGSTOP if fault == "stop-member" else signal.SIGKILL)

        assert _stream(survivor.api_url, folder.name, max_tokens=48, on_token=on_token) == expected
        assert fired.is_set()
        assert "resumed from the KV replica" in survivor.log_text()  # not a new prefill (FO8)
        survivors = [p for p in group_processes if p.pid not in lost_children]
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in survivors) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in survivors), \
            "the surviving node's group process was left running"
        if fault == "stop-member":  # back again: it rejoins, and the group forms anew
            cluster.send_signal(lost, signal.SIGCONT)
            _wait_group(cluster, 2)
            assert _stream(survivor.api_url, folder.name, max_tokens=48) == expected


def _lab_chat(lab: Any, host: str, model: str) -> str:
    status, reply = lab.http_json(host, "http://127.0.0.1:8000/v1/chat/completions", body={
        "model": model, "messages": [{"role": "user", "content": "Hello, tell me a story"}], "temperature": 0,
        "max_tokens": 48, "ignore_eos": True}, timeout_s=180)
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"]


def _lab_plan(lab: Any, hosts: list[str], want_group: bool, timeout_s: float = 180.0) -> None:
    """Wait until every host serves a plan with (or without) a tensor-parallel group."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            infos = [lab.http_json(h, "http://127.0.0.1:8000/v1/cluster")[1] for h in hosts]
        except OSError:
            infos = []
        if infos and all(i.get("ready") and i.get("plan") and i["serving_plan_id"] == i["plan_id"]
                         and any(len(s) == 4 for s in i["plan"]["stages"]) == want_group for i in infos):
            return
        time.sleep(0.5)
    raise AssertionError(f"no plan {'with' if want_group else 'without'} a group within {timeout_s} s")


@FULL
@pytest.mark.full
@pytest.mark.spec("N26", "S7")
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_group_link_pulled_mid_request_and_plugged_back(folder: Path, tmp_path: Path, backend: str) -> None:
    """Two hosts on a LAN (the mesh link) and a cable of their own (``--tp-address``) form a
    group (torch: gloo; MLX: MLX's ring and the leader's link, both on the cable); the cable
    is pulled while a request runs: the group fails within --dead-after-s with both nodes
    alive, the request ends with the group's text on a plan without the group (its members
    stay out of groups a while), and with the cable back the group forms again."""
    from mesh.security import format_cluster_key
    from mesh.testing import netlab

    if (why := netlab.available()) is not None:
        pytest.skip(f"no network lab here: {why}")
    env = node_env()
    env |= {"MESH_CLUSTER_KEY": format_cluster_key(os.urandom(32)), "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1"}
    processes = []
    with netlab.NetLab() as lab:
        lab.network("lan", "10.77.8")
        lab.network("cable", "10.77.9")
        for name in ("a", "b"):
            lab.host(name, "lan", "cable")
        try:
            for name in ("a", "b"):
                argv = netlab.node_argv(tmp_path, name, model=str(folder), memory_bytes=1 << 30, extra=[
                    "--placement", "tensor", "--tp-address", lab.hosts[name].address("cable"), "--dtype", "f32",
                    "--interface", "eth0", "--backend", backend])
                with open(tmp_path / f"{name}.log", "wb") as log:
                    processes.append(lab.popen(name, argv, env=env, stdout=log, stderr=subprocess.STDOUT))
            _lab_plan(lab, ["a", "b"], want_group=True)
            reference = _lab_chat(lab, "a", folder.name)
            pull = threading.Timer(0.5, lambda: lab.set_link("b", "cable", up=False))
            pull.start()
            try:
                assert _lab_chat(lab, "a", folder.name) == reference
            finally:
                pull.join()
            _lab_plan(lab, ["a", "b"], want_group=False)  # both alive, linked over the LAN, not grouped
            assert _lab_chat(lab, "b", folder.name) == reference
            lab.set_link("b", "cable", up=True)
            _lab_plan(lab, ["a", "b"], want_group=True)
            assert _lab_chat(lab, "b", folder.name) == reference
        finally:
            netlab.stop_all(processes)
