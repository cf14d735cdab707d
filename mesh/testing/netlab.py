"""A network lab on one machine: Linux network namespaces joined by veth pairs to bridges.

Each host is a network namespace with one veth interface per network it is on; each network is
a bridge inside a namespace of its own, so nothing is added to the machine's own namespace and
every packet the nodes send (multicast discovery included) stays inside the lab. Links can be
rate-limited with ``tc``'s token bucket filter (``tbf``: netem is not available everywhere, so
delay and loss stay with the transport fault wrapper, ``transports/faults.py``) and taken down
and up. Needs root (CAP_NET_ADMIN) and iproute2; ``available()`` says why not where it cannot
run. Used by tests/test_netlab.py; spec: specs/discovery.md.

The lab is plumbing around ``ip`` and ``tc`` (iproute2), the tools that own these kernel
objects; there is no Python library for namespaces in the dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import MeshError

IP_TIMEOUT_S = 10.0


def _run(*argv: str) -> str:
    """Run one iproute2 command; MeshError with its stderr when it fails or hangs."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MeshError(f"{' '.join(argv)}: {exc}") from exc
    if out.returncode != 0:
        raise MeshError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def available() -> str | None:
    """None where a lab can be built here, else the reason (not root, no ``ip``/``tc``, or the
    kernel refuses a namespace)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    name = f"meshprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
    except MeshError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run("ip", "netns", "del", name)
    except MeshError:
        pass
    return None


@dataclass
class Host:
    """A namespace (``ns``) and its interfaces: ``{network name: (interface, address)}``."""

    name: str
    ns: str
    interfaces: dict[str, tuple[str, str]] = field(default_factory=dict)

    def address(self, network: str) -> str:
        """This host's IPv4 address on ``network`` (without the prefix length)."""
        return self.interfaces[network][1]


class NetLab:
    """Build with ``network()`` and ``host()``, run processes with ``popen()``; ``close()``
    (or the context manager) deletes every namespace, which removes its interfaces too.

    Names are prefixed with ``mesh<pid>`` so that labs of concurrent test processes do not
    collide; interface names stay within Linux's 15 characters.
    """

    def __init__(self) -> None:
        self.prefix = f"m{os.getpid() % 100000}"
        self.networks: dict[str, tuple[str, str, int]] = {}  # name -> (bridge namespace, subnet prefix, next host)
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._veths = 0
        self._outside: dict[tuple[str, str], str] = {}  # (host, network) -> the bridge's end of its veth

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _namespace(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        _run("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def network(self, name: str, subnet: str) -> None:
        """A bridge named ``name`` for the /24 ``subnet`` (e.g. ``"10.77.1"``)."""
        ns = self._namespace(f"br{len(self.networks)}")
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "link", "set", "br0", "up")
        self.networks[name] = (ns, subnet, 2)

    def host(self, name: str, *networks: str, rate_mbit: dict[str, float] | None = None,
             ifnames: dict[str, str] | None = None) -> Host:
        """A namespace on each of ``networks`` (an address from each subnet in turn), its link to
        a network rate-limited to ``rate_mbit[network]`` Mbit/s each way where given (``tbf``),
        its interface there named ``ifnames[network]`` where given (e.g. ``thunderbolt0``, the
        name Linux's thunderbolt-net gives, so that a node takes it for a Thunderbolt link;
        else ``eth<i>``)."""
        host = Host(name, self._namespace(f"h{len(self.hosts)}"))
        for network in networks:
            bridge_ns, subnet, n = self.networks[network]
            self.networks[network] = (bridge_ns, subnet, n + 1)
            self._veths += 1
            inside = (ifnames or {}).get(network, f"eth{len(host.interfaces)}")
            outside = f"{self.prefix}v{self._veths}"
            # made inside the bridge's namespace, its peer straight in the host's: the machine's
            # own namespace never holds either end
            _run("ip", "-n", bridge_ns, "link", "add", outside, "type", "veth", "peer", "name", inside,
                 "netns", host.ns)
            _run("ip", "-n", bridge_ns, "link", "set", outside, "master", "br0")
            _run("ip", "-n", bridge_ns, "link", "set", outside, "up")
            address = f"{subnet}.{n}"
            _run("ip", "-n", host.ns, "addr", "add", f"{address}/24", "dev", inside)
            _run("ip", "-n", host.ns, "link", "set", inside, "up")
            host.interfaces[network] = (inside, address)
            self._outside[(name, network)] = outside
        self.hosts[name] = host
        for network, rate in (rate_mbit or {}).items():
            self.set_rate(name, network, rate)  # both directions
        return host

    def set_rate(self, host: str, network: str, rate_mbit: float | None) -> None:
        """Limit ``host``'s link to ``network`` to ``rate_mbit`` Mbit/s each way (``tbf``), or
        lift the limit (None)."""
        h = self.hosts[host]
        bridge_ns = self.networks[network][0]
        inside = h.interfaces[network][0]
        outside = self._outside[(host, network)]
        for ns, dev in ((h.ns, inside), (bridge_ns, outside)):
            if rate_mbit is None:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")
            else:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                     "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "200ms")

    def set_link(self, host: str, network: str, up: bool) -> None:
        """Take ``host``'s interface on ``network`` down (a pulled cable) or up again."""
        h = self.hosts[host]
        _run("ip", "-n", h.ns, "link", "set", h.interfaces[network][0], "up" if up else "down")

    def popen(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``argv`` started inside ``host``'s namespace (its own process group)."""
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[host].ns, *argv], start_new_session=True,
                                **kwargs)

    def http_json(self, host: str, url: str, body: Any = None, timeout_s: float = 5.0) -> tuple[int, Any]:
        """GET ``url`` (POST ``body`` as JSON where given) from inside ``host``, whose API listens
        on the namespace's loopback: (status, parsed JSON body); OSError when nothing answers."""
        code = ("import json,sys,urllib.request,urllib.error\n"
                "data=sys.argv[3].encode() if sys.argv[3] else None\n"
                "req=urllib.request.Request(sys.argv[1],data=data,headers={'content-type':'application/json'})\n"
                "try:\n r=urllib.request.urlopen(req,timeout=float(sys.argv[2])); s=r.status; b=r.read()\n"
                "except urllib.error.HTTPError as e:\n s=e.code; b=e.read()\n"
                "print(json.dumps([s, json.loads(b or b'null')]))")
        argv = ["ip", "netns", "exec", self.hosts[host].ns, sys.executable, "-c", code, url, str(timeout_s),
                "" if body is None else json.dumps(body)]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 10)
        except subprocess.TimeoutExpired as exc:
            raise OSError(f"{url} from {host}: no answer") from exc
        if out.returncode != 0:
            raise OSError(f"{url} from {host}: {out.stderr.strip()[-300:]}")
        status, parsed = json.loads(out.stdout)
        return int(status), parsed

    def close(self) -> None:
        """Delete every namespace of the lab (their interfaces and qdiscs go with them)."""
        for ns in reversed(self._namespaces):
            try:
                _run("ip", "netns", "del", ns)
            except MeshError:
                pass
        self._namespaces.clear()


def node_argv(workdir: Path, name: str, *, model: str = "smollm2-135m", memory_bytes: int = 4 << 30,
              extra: list[str] | None = None) -> list[str]:
    """The command line of a node for a lab host: every interface (``--host 0.0.0.0``, so it
    announces itself by multicast on the lab's networks only), no ``--peer``."""
    return [sys.executable, "-m", "mesh", "node", "--host", "0.0.0.0", "--api-host", "127.0.0.1",
            "--data-dir", str(workdir / name), "--model", model, "--memory-bytes", str(memory_bytes),
            *(extra or [])]


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process group of ``processes`` still running, then SIGKILL those that do
    not end within 20 s."""
    import signal

    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
