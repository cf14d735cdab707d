"""Real networks on one machine (mesh/testing/netlab.py): node processes in separate network
namespaces on a bridge, finding each other by real multicast discovery with no --peer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mesh.testing import netlab
from mesh.testing.cluster import node_env

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


@contextmanager
def _nodes(lab: netlab.NetLab, workdir: Path, hosts: list[str], extra: list[str] | None = None
           ) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """A node on each of ``hosts`` with the user's defaults (every interface, discovery on, no
    --peer) and one cluster key from the environment; yields a function that starts one on
    another host; all stopped (SIGTERM, then SIGKILL) after."""
    from mesh.security import format_cluster_key

    env = node_env()
    env |= {"MESH_CLUSTER_KEY": format_cluster_key(os.urandom(32)), "OMP_WAIT_POLICY": "PASSIVE"}
    processes = []

    def start(name: str) -> subprocess.Popen[bytes]:
        with open(workdir / f"{name}.log", "wb") as log:
            processes.append(lab.popen(name, netlab.node_argv(workdir, name, extra=["--placement", "memory",
                                                                                      *(extra or [])]),
                                       env=env, stdout=log, stderr=subprocess.STDOUT))
        return processes[-1]

    try:
        for name in hosts:
            start(name)
        yield start
    finally:
        netlab.stop_all(processes)


@pytest.mark.spec("D15")
def test_nodes_in_separate_namespaces_find_each_other_by_multicast(tmp_path: Path) -> None:
    """Two hosts on one LAN, each node started with the defaults a user types (every
    interface, discovery on) and no --peer: they discover each other by multicast, link up,
    place the model and serve it from both APIs."""
    with netlab.NetLab() as lab:
        lab.network("lan", "10.77.1")
        for name in ("a", "b"):
            lab.host(name, "lan")
        with _nodes(lab, tmp_path, ["a", "b"]):
            seen = _wait(lab, ["a", "b"], 2)
            addresses = {m["address"].rpartition(":")[0] for m in seen["a"]["members"]}
            assert addresses == {lab.hosts["a"].address("lan"), lab.hosts["b"].address("lan")}
            assert "discovery: peer" in (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
            assert sorted((m["layer_start"], m["layer_end"]) for m in seen["b"]["members"]) == [(0, 15), (15, 30)]
            status, reply = lab.http_json("b", "http://127.0.0.1:8000/v1/chat/completions", body={
                "model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello."}],
                "temperature": 0, "max_tokens": 8}, timeout_s=120)
            assert status == 200 and reply["choices"][0]["message"]["content"], reply


def _rates(lab: netlab.NetLab, host: str, pairs: list[frozenset[str]], timeout_s: float = 120.0
           ) -> dict[frozenset[str], float]:
    """The measured probe throughput (bytes/s) of each link in ``/v1/cluster``, once every pair
    of ``pairs`` (member ids) has a figure; what there is after ``timeout_s``."""
    deadline, rates = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        _, info = lab.http_json(host, "http://127.0.0.1:8000/v1/cluster")
        rates = {frozenset((link["from"], link["to"])): link.get("throughput_bytes_per_s")
                 for link in info.get("links", []) if link.get("throughput_bytes_per_s")}
        if set(pairs) <= set(rates):
            break
        time.sleep(1.0)
    return rates


def _ids(lab: netlab.NetLab, seen: dict, network: str) -> dict[str, str]:
    """host name -> member id, from a /v1/cluster answer, by each host's address on ``network``."""
    by_address = {m["address"].rpartition(":")[0]: m["id"] for m in seen["members"]}
    return {name: by_address[h.address(network)] for name, h in lab.hosts.items() if h.address(network) in by_address}


@pytest.mark.spec("D15", "D7", "TB1", "TB2", "TB4", "L1")
def test_two_subnets_a_thunderbolt_cable_beside_a_slow_lan(tmp_path: Path) -> None:
    """a and b sit on the LAN and on a direct cable of their own (a second subnet; its
    interfaces named ``thunderbolt0``, as Linux's thunderbolt-net names them); c on the LAN
    only; every LAN port is limited to 100 Mbit/s. Started with ``--transport tbip`` and no
    --peer, the three find each other by multicast on both subnets, a and b link over the
    cable (measured far above the LAN's rate), c over the LAN (near 100 Mbit/s), and all
    three serve; with the cable pulled, a and b stay linked over the LAN and serve the same
    text; plugged back in, the cable carries their link again."""
    with netlab.NetLab() as lab:
        lab.network("lan", "10.77.4")
        lab.network("tb", "10.77.5")
        for name in ("a", "b"):
            lab.host(name, "lan", "tb", rate_mbit={"lan": 100}, ifnames={"tb": "thunderbolt0"})
        lab.host("c", "lan", rate_mbit={"lan": 100})
        with _nodes(lab, tmp_path, ["a", "b", "c"], extra=["--transport", "tbip"]):
            seen = _wait(lab, ["a", "b", "c"], 3)
            ids = _ids(lab, seen["c"], "lan")
            assert set(ids) == {"a", "b", "c"}, seen["c"]["members"]  # each announces its LAN address to c
            a, b, c = ids["a"], ids["b"], ids["c"]
            rates = _rates(lab, "a", [frozenset((a, b)), frozenset((a, c))])
            cable, lan = rates.get(frozenset((a, b))), rates.get(frozenset((a, c)))
            assert cable is not None and lan is not None, rates
            assert lan < 100e6 / 8 * 1.3 and cable > 2 * lan, (cable, lan)
            logs = "".join((tmp_path / f"{h}.log").read_text() for h in ("a", "b", "c"))
            # a and b may first meet over the LAN (then the cable is added: "adding the preferred
            # path") or over the cable itself (multicast runs on both subnets): the rates above
            # are what shows the cable carries their link
            assert "discovery: peer" in logs
            upgrades = logs.count("adding the preferred path")
            text = _chat(lab, "c", "Say hello.", max_tokens=8)
            assert text
            # the cable pulled: a and b stay linked over the LAN (the spare), nobody leaves
            lab.set_link("a", "tb", up=False)
            time.sleep(6.0)  # twice --dead-after-s: the cable's connection is declared dead
            assert len(_wait(lab, ["a", "b", "c"], 3)["a"]["members"]) == 3
            assert _chat(lab, "c", "Say hello.", max_tokens=8) == text
            assert "left" not in "".join(line for h in ("a", "b") for line in
                                         (tmp_path / f"{h}.log").read_text().splitlines() if "liveness" in line)
            lab.set_link("a", "tb", up=True)  # plugged back in: the cable carries the link again
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                logs = "".join((tmp_path / f"{h}.log").read_text() for h in ("a", "b"))
                if logs.count("adding the preferred path") > upgrades:
                    break
                time.sleep(1.0)
            assert logs.count("adding the preferred path") > upgrades, "the cable was not used again"


@pytest.mark.full
@pytest.mark.skipif(os.environ.get("MESH_FULL") != "1", reason="a slow scenario (about a minute): set MESH_FULL=1")
@pytest.mark.spec("D15", "L1", "L2", "P21", "N20", "N21")
def test_the_solver_moves_the_pipeline_off_a_slow_cable_under_load(tmp_path: Path) -> None:
    """Nodes that hold the model only two together (f32, float weights); c's cable limited to
    8 Mbit/s. a and c start and serve together; b joins on an unlimited cable: with
    ``--placement solver`` the plan moves to a and b, since the measured a-c link would carry
    a long prompt's hidden states many times slower. Then b leaves gracefully (SIGTERM) and
    a and c serve again. A client sends requests to a all along: none fails and every text
    equals the first one (make-before-break and graceful leave, in separate namespaces)."""
    import threading

    # 750 MB each: two members hold the f32 model with its KV cache at 8192 tokens, one does not
    # (`python -m mesh plan` on three such devices: 0.64 GiB used on the fuller one)
    extra = ["--placement", "solver", "--dtype", "f32", "--quantize", "none", "--memory-bytes", "750000000",
             "--prefix-cache-mb", "0"]
    with netlab.NetLab() as lab:
        lab.network("lan", "10.77.6")
        lab.host("a", "lan")
        lab.host("c", "lan", rate_mbit={"lan": 8})
        lab.host("b", "lan")
        with _nodes(lab, tmp_path, ["a", "c"], extra=extra) as start:
            seen = _wait(lab, ["a", "c"], 2)
            ids = _ids(lab, seen["a"], "lan")
            assert all(m["layer_start"] is not None for m in seen["a"]["members"])
            rates = _rates(lab, "a", [frozenset((ids["a"], ids["c"]))])
            assert rates.get(frozenset((ids["a"], ids["c"])), 1e12) < 8e6 / 8 * 1.3, rates
            reference = _chat(lab, "a", "Name a colour.", max_tokens=8)
            texts: list[str] = []
            failures: list[BaseException] = []
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    try:
                        texts.append(_chat(lab, "a", "Name a colour.", max_tokens=8))
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        failures.append(exc)

            client = threading.Thread(target=load)
            client.start()
            try:
                b = start("b")
                assert _placed_on(lab, {"a", "b"}) == {"a", "b"}
                switched = len(texts)
                deadline = time.monotonic() + 60
                while len(texts) < switched + 2 and time.monotonic() < deadline:  # a and b serve a few
                    time.sleep(0.5)
                served_by_ab = len(texts) - switched
                b.send_signal(signal.SIGTERM)  # graceful: the plan moves back before b exits
                assert b.wait(timeout=90) == 0
                assert _placed_on(lab, {"a", "c"}) == {"a", "c"}
                time.sleep(2.0)
            finally:
                stop.set()
                client.join(timeout=150)
            assert not failures, failures[:3]
            assert served_by_ab >= 2 and set(texts) == {reference}, (served_by_ab, set(texts))


def _placed_on(lab: netlab.NetLab, want: set[str], timeout_s: float = 180.0) -> set[str]:
    """The hosts a's /v1/cluster places layers on, once that is ``want`` and the plan serves;
    what it is after ``timeout_s``."""
    deadline, placed = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        _, info = lab.http_json("a", "http://127.0.0.1:8000/v1/cluster")
        ids = _ids(lab, info, "lan")
        placed = {name for m in info["members"] for name, mid in ids.items()
                  if m["id"] == mid and m["layer_start"] is not None}
        if placed == want and info["serving_plan_id"] == info["plan_id"]:
            break
        time.sleep(1.0)
    return placed


def _chat(lab: netlab.NetLab, host: str, prompt: str, max_tokens: int = 48) -> str:
    status, reply = lab.http_json(host, "http://127.0.0.1:8000/v1/chat/completions", body={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": max_tokens}, timeout_s=120)
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"]


@pytest.mark.spec("D15", "FO3", "N21")
def test_a_cable_pulled_mid_request_and_plugged_back(tmp_path: Path) -> None:
    """Two hosts serve a 2-stage pipeline; b's cable is pulled while a request runs through
    both: a declares b dead, serves every layer itself, and the request ends with the text
    the intact pipeline gave; plugged back, b rejoins and the two serve together again with
    the same text."""
    import threading

    prompt = "Count from one to twenty in words."
    with netlab.NetLab() as lab:
        lab.network("lan", "10.77.3")
        for name in ("a", "b"):
            lab.host(name, "lan")
        with _nodes(lab, tmp_path, ["a", "b"]):
            _wait(lab, ["a", "b"], 2)
            reference = _chat(lab, "a", prompt)
            pull = threading.Timer(0.5, lambda: lab.set_link("b", "lan", up=False))
            pull.start()
            try:
                assert _chat(lab, "a", prompt) == reference  # the failover gives the same text
            finally:
                pull.join()
            _, info = lab.http_json("a", "http://127.0.0.1:8000/v1/cluster")
            assert info["local"]["recovery_s"], "the cable was pulled after the request ended"
            seen = _wait(lab, ["a"], 1)
            assert [(m["layer_start"], m["layer_end"]) for m in seen["a"]["members"]] == [(0, 30)]
            lab.set_link("b", "lan", up=True)
            seen = _wait(lab, ["a", "b"], 2)
            assert sorted((m["layer_start"], m["layer_end"]) for m in seen["a"]["members"]) == [(0, 15), (15, 30)]
            assert _chat(lab, "a", prompt) == reference
