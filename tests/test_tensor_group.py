"""A tensor-parallel stage run by a group of member processes, driven like any backend (spec
B19): the single-stage tokens, whole KV caches out and in, listeners on the group's address
only, and a member that dies or freezes fails the group's steps within the timeout with no
process left behind."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from backends.base import as_float32
from backends.group import GroupSpec
from backends.group_wire import heads_of, join_heads, parse_rendezvous
from backends.mlx_group import MlxGroupBackend, MlxGroupMember
from backends.torch_group import GroupMember, TorchGroupBackend
from mesh.errors import BackendError
from mesh.models import Model, resolve_model
from mesh.testing.tensor_parallel import PROMPT, greedy, load_whole
from mesh.testing.tiny import tiny_model
from mesh.wire import WireTensor


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("tp") / "llama")


LIBRARIES = {"torch": (TorchGroupBackend, GroupMember), "mlx": (MlxGroupBackend, MlxGroupMember)}


def whole_stage(folder: Path, library: str) -> Any:
    """The single-device stage of every layer a group of ``library`` must match (f32, float weights)."""
    if library == "torch":
        return load_whole(str(folder))
    from backends.mlx import MlxBackend

    model = Model(resolve_model(str(folder)))
    backend = MlxBackend(device="cpu", dtype="f32")
    backend.load(model, 0, model.num_layers)
    return backend


class Group:
    """A group of ``world`` members of ``library`` (torch: gloo; mlx: MLX's ring) on loopback:
    the leader's backend here, the other members in processes of their own; ``folder`` a model
    directory or name."""

    def __init__(self, folder: Path | str, timeout_s: float = 10.0, layers: tuple[int, int] | None = None,
                 library: str = "torch", world: int = 2) -> None:
        self.model = Model(resolve_model(str(folder)))
        self.layers = layers or (0, self.model.num_layers)
        self.world = world
        self.followers: list[GroupMember] = []
        self.ready: list[Any] = []
        backend_class, self.member_class = LIBRARIES[library]
        self.backend = backend_class(
            group=GroupSpec(rank=0, world=world, address="127.0.0.1", threads=1, timeout_s=timeout_s,
                            load_timeout_s=120, secret=secrets.token_hex(16)),
            dtype="f32", rendezvous=self._follow, step_timeout_s=60)

    def _follow(self, rendezvous: str) -> None:
        host, port, secret = parse_rendezvous(rendezvous)
        for rank in range(1, self.world):
            member = self.member_class(GroupSpec(rank=rank, world=self.world, address=host, port=port, threads=1,
                                                 timeout_s=10, load_timeout_s=120, secret=secret),
                                       self.model, *self.layers, "f32")
            member.start()
            self.followers.append(member)
            threading.Thread(target=lambda m=member: self.ready.append(m.ready()), daemon=True).start()

    def __enter__(self) -> Group:
        self.backend.load(self.model, *self.layers)
        return self

    def pids(self) -> list[int]:
        return [p.process.pid for p in [self.backend._member, *self.followers] if p is not None]

    def __exit__(self, *exc: object) -> None:
        self.backend.unload()
        for member in self.followers:
            member.process.join(15)
            member.stop()


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.spec("B19", "S7")
@pytest.mark.parametrize("library", ["torch", "mlx"])
def test_a_group_stage_gives_the_single_stage_tokens_and_whole_kv_caches(folder: Path, library: str) -> None:
    """Greedy tokens equal the whole stage's (same library), logits within 1e-4 (f32);
    ``export_kv`` gathers every KV head (what the whole stage exports, within 1e-4), and a cache
    imported from the whole stage continues as it does there; the group's listeners (torch's
    store and gloo; the leader's link and MLX's ring) bind 127.0.0.1 only."""
    whole = whole_stage(folder, library)
    want_tokens, want_logits = greedy(whole, PROMPT, 6)
    with Group(folder, library=library) as group:
        got_tokens, got_logits = greedy(group.backend, PROMPT, 6)
        assert got_tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(got_logits, want_logits, strict=True)) < 1e-4
        assert group.backend.modules_split == 35 and group.ready == [35]

        cache, ref = group.backend.new_cache(), whole.new_cache()
        group.backend.forward(cache, start_pos=0, token_ids=PROMPT)
        whole.forward(ref, start_pos=0, token_ids=PROMPT)
        got, want = (b.export_kv(c, start_pos=3, end_pos=len(PROMPT)) for b, c in ((group.backend, cache), (whole, ref)))
        assert [g for g, _, _ in got] == [g for g, _, _ in want]
        for (_, k, v), (_, wk, wv) in zip(got, want, strict=True):
            assert k.shape == wk.shape == (1, whole.kv_heads, len(PROMPT) - 3, whole.head_dim)
            assert float(np.abs(as_float32(k) - as_float32(wk)).max()) < 1e-4
            assert float(np.abs(as_float32(v) - as_float32(wv)).max()) < 1e-4

        moved = group.backend.new_cache()
        group.backend.import_kv(moved, whole.export_kv(ref, start_pos=0, end_pos=len(PROMPT)))
        step = group.backend.forward(moved, start_pos=len(PROMPT), token_ids=[7])
        assert float(np.abs(step.logits - whole.forward(ref, start_pos=len(PROMPT), token_ids=[7]).logits).max()) < 1e-4
        with pytest.raises(BackendError, match="starts at position 3"):  # B6 checks, as any stage
            group.backend.forward(group.backend.new_cache(), start_pos=3, token_ids=[1])

        sockets = [c.laddr for pid in group.pids() for c in psutil.Process(pid).net_connections("tcp")]
        assert sockets and all(addr.ip.removeprefix("::ffff:") == "127.0.0.1" for addr in sockets), sockets
        pids = group.pids()
    assert _gone(pids, 15), "a member process outlived the group"


@pytest.mark.spec("B19", "B20")
@pytest.mark.parametrize("library", ["mlx", pytest.param("torch", marks=[pytest.mark.full, pytest.mark.skipif(
    os.environ.get("MESH_FULL") != "1", reason="a slow case (about 20 s): set MESH_FULL=1")])])
def test_three_members_on_the_default_model_give_its_single_stage_tokens(library: str) -> None:
    """SmolLM2-135M (9 heads, 3 KV heads: groups of 3) split three ways: the greedy tokens of
    the whole stage of that library, logits within 1e-3. MLX members split the GGUF's Q4_1
    weights as they are (mlx-lm's quantized sharded linears); torch members load float."""
    model = Model(resolve_model("smollm2-135m"))
    if library == "mlx":
        from backends.mlx import MlxBackend

        whole = MlxBackend(device="cpu", dtype="f32")
    else:
        from backends.torch import TorchBackend

        whole = TorchBackend(device="cpu", dtype="f32", quantize="none")
    whole.load(model, 0, model.num_layers)
    want_tokens, want_logits = greedy(whole, PROMPT, 6)
    with Group("smollm2-135m", library=library, world=3, timeout_s=20) as group:
        got_tokens, got_logits = greedy(group.backend, PROMPT, 6)
        assert got_tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(got_logits, want_logits, strict=True)) < 1e-3
        assert group.backend.modules_split == 7 * model.num_layers and sorted(group.ready) == [7 * model.num_layers] * 2


@pytest.mark.spec("B19", "B20")
@pytest.mark.parametrize("library", ["torch", "mlx"])
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_member_that_dies_or_freezes_fails_the_group_and_leaves_no_process(folder: Path, how: str,
                                                                              library: str) -> None:
    """SIGKILL or SIGSTOP of member 1 between steps: the leader's next step raises BackendError
    (gloo or the leader's link sees the closed connection, or the collective times out / the
    link goes silent: bounded by the 10 s timeout), every later call raises the same failure,
    and no member process is left."""
    with Group(folder, library=library) as group:
        cache = group.backend.new_cache()
        group.backend.forward(cache, start_pos=0, token_ids=PROMPT)
        follower = group.followers[0].process.pid
        os.kill(follower, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(BackendError, match="tensor-parallel group failed"):
            group.backend.forward(cache, start_pos=len(PROMPT), token_ids=[1])
        took = time.monotonic() - started
        assert group.backend.failure is not None
        with pytest.raises(BackendError, match="tensor-parallel group failed"):
            group.backend.forward(group.backend.new_cache(), start_pos=0, token_ids=[1])
        leader = group.backend._member.process.pid if group.backend._member else None
        if how == "freeze":  # the node that started it kills it (GroupMember.stop)
            group.followers[0].stop()
        assert _gone([p for p in (leader, follower) if p], 15), "a member process was left waiting"
    assert took < 60, took  # the step's answer wait (60 s) would have ended it anyway: it is gloo's timeout


@pytest.mark.spec("B19")
@pytest.mark.parametrize("library", ["torch", "mlx"])
def test_the_members_stop_when_the_leader_process_dies(folder: Path, library: str) -> None:
    """SIGKILL of the leader's process: member 1's next wait for a command (torch: a ping at
    most timeout / 3 apart; MLX: its link to the leader closes) fails within the 10 s timeout
    and its process ends by itself; the leader's node sees the failure at its next call."""
    with Group(folder, library=library) as group:
        leader = group.backend._member.process.pid
        follower = group.followers[0].process.pid
        os.kill(leader, signal.SIGKILL)
        assert _gone([follower], 30), "member 1 kept waiting for a dead leader"
        with pytest.raises(BackendError, match="tensor-parallel group failed"):
            group.backend.forward(group.backend.new_cache(), start_pos=0, token_ids=[1])


@pytest.mark.spec("B19")
def test_kv_heads_split_and_join_in_rank_order() -> None:
    values = np.arange(1 * 4 * 3 * 2, dtype="<f4").reshape(1, 4, 3, 2)
    whole = WireTensor(dtype="f32", shape=values.shape, data=values.tobytes())
    parts = [heads_of(whole, r, 2) for r in range(2)]
    assert parts[1].shape == (1, 2, 3, 2)
    assert np.array_equal(as_float32(parts[1]), values[:, 2:])
    assert join_heads(parts) == whole


@pytest.mark.spec("B19")
def test_a_group_spec_refuses_bad_places() -> None:
    key = secrets.token_hex(16)
    with pytest.raises(BackendError, match="2 or more members"):
        GroupSpec(rank=0, world=1, address="127.0.0.1", secret=key)
    with pytest.raises(BackendError, match="0 <= rank < world"):
        GroupSpec(rank=2, world=2, address="127.0.0.1", secret=key)
    with pytest.raises(BackendError, match="secret"):
        GroupSpec(rank=0, world=2, address="127.0.0.1", secret="abc")
    with pytest.raises(BackendError, match="leader"):
        TorchGroupBackend(group=GroupSpec(rank=1, world=2, address="127.0.0.1", secret=key))
    assert parse_rendezvous(f"10.0.0.1:7000/{key}") == ("10.0.0.1", 7000, key)
    assert parse_rendezvous(f"[fe80::1]:7000/{key}") == ("fe80::1", 7000, key)
    for bad in ("10.0.0.1:7000", f"host:7000/{key}", f"10.0.0.1:0/{key}", f"10.0.0.1:x/{key}", "10.0.0.1:7/zz"):
        assert parse_rendezvous(bad) is None, bad


@pytest.mark.spec("B19")
@pytest.mark.parametrize(("split", "library"), [((0, 3), "torch"), ((2, 5), "torch"), ((2, 5), "mlx")])
def test_a_group_stage_inside_a_pipeline_gives_the_single_stage_tokens(folder: Path, split: tuple[int, int],
                                                                       library: str) -> None:
    """Tensor parallelism inside a pipeline: a group holding layers [0, 3) (token ids in, hidden
    states out) before a single-device torch stage, or [2, 5) (hidden states in, logits out)
    after one (an MLX group after a torch stage: libraries mixed in one pipeline); the
    pipeline's greedy tokens are the whole stage's."""
    from backends.torch import TorchBackend

    model = Model(resolve_model(str(folder)))
    whole = load_whole(str(folder))
    want, _ = greedy(whole, PROMPT, 5)
    other = TorchBackend(device="cpu", dtype="f32", quantize="none")
    rest = (split[1], model.num_layers) if split[0] == 0 else (0, split[0])
    other.load(model, *rest)
    with Group(folder, layers=split, library=library) as group:
        stages = [group.backend, other] if split[0] == 0 else [other, group.backend]
        caches = [s.new_cache() for s in stages]
        tokens, ids = [], PROMPT
        for _ in range(5):
            start = len(PROMPT) + len(tokens) - len(ids)
            out = stages[0].forward(caches[0], start_pos=start, token_ids=ids)
            out = stages[1].forward(caches[1], start_pos=start, hidden=out.hidden)
            tokens.append(int(out.logits.argmax()))
            ids = [tokens[-1]]
        assert tokens == want


@pytest.mark.spec("B19", "S8")
def test_bytes_without_the_groups_mac_are_never_unpickled() -> None:
    """gloo's connections are plaintext: a command or KV share whose HMAC-SHA256 under the group's
    secret does not match is refused before ``pickle.loads`` sees it."""
    import pickle

    from backends.group_wire import mac as _mac
    from backends.group_wire import unpickle as _unpickle

    spec = GroupSpec(rank=1, world=2, address="127.0.0.1", secret=secrets.token_hex(16))
    data = pickle.dumps(("batch", [], []))
    assert _unpickle(spec, data, _mac(spec, data), "a command") == ("batch", [], [])
    other = GroupSpec(rank=1, world=2, address="127.0.0.1", secret=secrets.token_hex(16))
    with pytest.raises(BackendError, match="failed its authentication"):
        _unpickle(spec, data, _mac(other, data), "a command")
    with pytest.raises(BackendError, match="failed its authentication"):
        _unpickle(spec, pickle.dumps(("stop",)), _mac(spec, data), "a command")


@pytest.mark.spec("B20", "S8")
def test_a_link_frame_forged_replayed_or_oversized_closes_the_link_unread() -> None:
    """MLX groups' commands travel on ``FrameLink``s: a frame under another secret, a frame sent
    again (its sequence number is in its HMAC) or a size beyond the limit closes the link
    without unpickling; heartbeats refresh ``last_seen`` and never reach ``recv``."""
    import pickle
    import socket

    from backends.group_wire import BEAT, MAX_MESSAGE_BYTES, FrameLink, mac

    spec = GroupSpec(rank=0, world=2, address="127.0.0.1", secret=secrets.token_hex(16))

    def pair() -> tuple[FrameLink, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as server:
            theirs = socket.create_connection(server.getsockname(), timeout=5)
            mine, _ = server.accept()
        return FrameLink(mine, spec, "member 1").start(), theirs

    def frame(data: bytes, seq: int, key: GroupSpec = spec) -> bytes:
        return len(data).to_bytes(8, "little") + mac(key, seq.to_bytes(8, "little") + data) + data

    link, raw = pair()
    before = link.last_seen
    time.sleep(0.05)
    raw.sendall(frame(pickle.dumps(BEAT), 0) + frame(pickle.dumps(("stop",)), 1))
    assert link.recv(5, "a command") == ("stop",) and link.last_seen > before
    raw.sendall(frame(pickle.dumps(("stop",)), 1))  # the same frame again
    with pytest.raises(BackendError, match="closed"):
        link.recv(5, "a command")
    assert "authentication" in str(link.closed)

    other = GroupSpec(rank=1, world=2, address="127.0.0.1", secret=secrets.token_hex(16))
    link, raw = pair()
    raw.sendall(frame(pickle.dumps(("stop",)), 0, other))
    with pytest.raises(BackendError, match="authentication"):
        link.recv(5, "a command")

    link, raw = pair()
    raw.sendall((MAX_MESSAGE_BYTES + 1).to_bytes(8, "little") + bytes(32))
    with pytest.raises(BackendError, match="beyond"):
        link.recv(5, "a command")
    with pytest.raises(OSError, match="closed"):
        link.send(("ping",))


@pytest.mark.spec("B19", "B20")
@pytest.mark.parametrize("library", ["torch", "mlx"])
def test_a_retired_group_ends_its_members_with_exit_code_0(folder: Path, library: str) -> None:
    """The leader told to stop (its stage unloaded) ends its members as retired, not failed: exit
    code 0, which a follower's node reads as "nothing failed" (N26)."""
    with Group(folder, library=library) as group:
        greedy(group.backend, PROMPT, 1)
    assert [m.process.exitcode for m in group.followers] == [0]
