"""The scenario catalogue of ``python -m mesh faults``: ``SCENARIOS`` by name and the ``QUICK``
set. It stands on the harness (``mesh/tools/faults/harness.py``: requests, classification,
``Tally``); the runner (``mesh/tools/faults/run.py``) imports it, never the other way round.

Each scenario starts a fresh cluster (3 nodes unless it says otherwise: a 3-stage pipeline,
layers split by memory), sends greedy streaming requests and injects one fault, marking when it
struck (``Tally.mark_fault``). A scenario body counts into a ``Tally`` the runner made
(``run_scenario``), and declares the clean failures it expects and its recovery target (spec
F18): ``STAGE_KILL_TARGET_S`` for stage SIGKILLs and a restart, ``pause_target_s(pause)`` for a
stage silent for ``pause`` seconds (SIGSTOP, partitions), none for the others. ``QUICK`` is the
set CI runs under pytest; the rest run on demand. Spec: specs/faults.md F16-F18.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mesh.tools.faults.harness import (
    LONG_PROMPT,
    PROMPTS,
    STAGE_KILL_TARGET_S,
    Context,
    ScenarioResult,
    Tally,
    pause_target_s,
    request,
    run_scenario,
    set_faults,
    stream_chat,
)

KILL_AT = 5  # tokens streamed before the fault
SETTLE_S = 60.0  # how long a cluster may take to be ready again after a fault


Body = Callable[[Context, Tally], None]
PAUSE_S = 6.0  # how long SIGSTOP and the partitions keep the middle stage silent


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    body: Body
    expect_failed_clean: int = 0
    recovery_target_s: float | None = None  # spec F18; None: no target
    refusals_fail: bool = False  # a 503 fails the row (membership changes, spec N21)

    def run(self, ctx: Context) -> ScenarioResult:
        """Run it on a fresh cluster; never raises (a crash is a failed row that keeps its tally)."""
        return run_scenario(ctx, self.name, self.body, expect_failed_clean=self.expect_failed_clean,
                            recovery_target_s=self.recovery_target_s, refusals_fail=self.refusals_fail)


SCENARIOS: dict[str, Scenario] = {}
# loss-10pct (45 s) left the CI set for the network lab; message loss stays in CI through tests/test_failover.py
# and tests/test_kvreplica.py (lost, duplicated and delayed messages change no token), and in the full set
QUICK = ("kill-middle-stage", "kill-first-stage", "no-fit-after-loss", "client-disconnect-x20", "join-under-load")


def scenario(name: str, description: str, *, expect_failed_clean: int = 0,
             recovery_target_s: float | None = None, refusals_fail: bool = False) -> Callable[[Body], Body]:
    def register(fn: Body) -> Body:
        SCENARIOS[name] = Scenario(name, description, fn, expect_failed_clean, recovery_target_s, refusals_fail)
        return fn
    return register


def _once(action: Callable[[], None], tally: Tally, at: int = KILL_AT) -> Callable[[int], None]:
    """An ``on_chunk`` callback that marks the fault and runs ``action`` once, after the
    ``at``-th chunk."""
    fired = threading.Event()

    def on_chunk(n: int) -> None:
        if n >= at and not fired.is_set():
            fired.set()
            tally.mark_fault()
            action()
    return on_chunk


def _after_fault(ctx: Context, tally: Tally, cluster: Any, url: str, members: int | None = None) -> None:
    """Once the cluster is ready again, every prompt once more: it must serve as before."""
    cluster.wait_ready(timeout_s=SETTLE_S, members=members)
    for prompt in PROMPTS:
        tally.add(request(url, prompt, model=ctx.model), prompt)


def _check_no_leaks(tally: Tally, cluster: Any, timeout_s: float = 15.0) -> None:
    """Every live node ends with no KV cache and no request in flight (spec N8, FO5)."""
    from mesh.testing.cluster import http_json

    deadline = time.monotonic() + timeout_s
    left: dict[int, Any] = {}
    while time.monotonic() < deadline:
        left = {}
        for node in cluster.nodes:
            if node.process.poll() is not None:
                continue
            _, info = http_json(node.api_url + "/v1/cluster", timeout_s=5.0)
            local = info.get("local", {}) if isinstance(info, dict) else {}
            if local.get("kv_caches") or local.get("coordinating"):
                left[node.index] = (local.get("kv_caches"), local.get("coordinating"))
        if not left:
            return
        time.sleep(0.5)
    tally.lose(f"resources left behind (node: (kv caches, requests)): {left}")


def _fault_during_stream(ctx: Context, tally: Tally, fault: Callable[[Any], None], *, via: int = 0,
                         members_after: int = 2, settle_s: float = 0.0) -> None:
    """One stream through node ``via``; ``fault(cluster)`` after its 5th token; then, after
    ``settle_s``, every prompt again once ``members_after`` members are ready."""
    with ctx.cluster(tally.result.name) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[via].api_url
        tally.add(stream_chat(url, PROMPTS[0], model=ctx.model, on_chunk=_once(lambda: fault(cluster), tally)),
                  PROMPTS[0], hit=True)
        time.sleep(settle_s)
        _after_fault(ctx, tally, cluster, url, members=members_after)
        _check_no_leaks(tally, cluster)
        _check_survivors_kept(tally, cluster)


def _check_survivors_kept(tally: Tally, cluster: Any) -> None:
    """No member that stayed up was declared dead, though the survivors were busy loading
    layers after the fault (spec FO6: heartbeats go on while a node loads)."""
    from mesh.testing.cluster import http_json

    for node in cluster.nodes:
        if node.process.poll() is not None:
            continue
        _, info = http_json(node.api_url + "/v1/cluster", timeout_s=5.0)
        member = info.get("local", {}).get("id") if isinstance(info, dict) else None
        if not member:
            continue
        for other in cluster.nodes:
            if other is not node and node.process.poll() is None and f"member {member} left" in other.log_text():
                if node.index not in getattr(cluster, "restarted", ()):
                    tally.lose(f"node {node.index} ({member[:8]}) stayed up but node {other.index} declared it dead")


@scenario("kill-middle-stage", "SIGKILL the middle stage after token 5", recovery_target_s=STAGE_KILL_TARGET_S)
def kill_middle_stage(ctx: Context, tally: Tally) -> None:
    _fault_during_stream(ctx, tally, lambda cluster: cluster.kill(1))


@scenario("kill-first-stage", "SIGKILL the first stage after token 5 (the client talks to the last)",
          recovery_target_s=STAGE_KILL_TARGET_S)
def kill_first_stage(ctx: Context, tally: Tally) -> None:
    _fault_during_stream(ctx, tally, lambda cluster: cluster.kill(0), via=2)


@scenario("kill-http-node", "SIGKILL the node holding the client's connection; the client retries elsewhere",
          expect_failed_clean=1, recovery_target_s=STAGE_KILL_TARGET_S)
def kill_http_node(ctx: Context, tally: Tally) -> None:
    with ctx.cluster("kill-http-node") as cluster:
        cluster.wait_ready()
        prompt = PROMPTS[0]
        cut = stream_chat(cluster.nodes[1].api_url, prompt, model=ctx.model,
                          on_chunk=_once(lambda: cluster.kill(1), tally))
        tally.add(cut, prompt, cut_is_clean=True)  # the client sees its connection cut: explicit
        # the client retries elsewhere, as clients do (503 while the survivors re-place): its wait
        # from the first attempt to its first token is this scenario's recovery (ttft after fault)
        retry = request(cluster.nodes[0].api_url, prompt, model=ctx.model)
        tally.add(retry, prompt)
        _after_fault(ctx, tally, cluster, cluster.nodes[0].api_url, members=2)
        _check_no_leaks(tally, cluster)


@scenario("sigstop-past-deadline", f"SIGSTOP the middle stage for {PAUSE_S:.0f} s (past --dead-after-s), then SIGCONT",
          recovery_target_s=pause_target_s(PAUSE_S))
def sigstop(ctx: Context, tally: Tally) -> None:
    def stop_then_continue(cluster: Any) -> None:
        cluster.restarted = (1,)  # silent past the deadline: rightly declared dead
        cluster.send_signal(1, signal.SIGSTOP)
        threading.Timer(PAUSE_S, lambda: cluster.send_signal(1, signal.SIGCONT)).start()

    _fault_during_stream(ctx, tally, stop_then_continue, members_after=3, settle_s=PAUSE_S + 1.0)


def _link_fault(ctx: Context, tally: Tally, plans: dict[int, dict[str, Any]], *, heal_after_s: float | None,
                from_start: bool = False, reset_node: int | None = None, prompts: int = 3) -> None:
    """Apply ``plans`` (node -> fault plan) after token 5 of the first stream (or before any
    request), heal after ``heal_after_s``; every prompt runs, then again after healing."""
    with ctx.cluster(tally.result.name) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url

        def inject() -> None:
            tally.mark_fault()
            for index, plan in plans.items():
                set_faults(cluster, index, plan)
            if reset_node is not None:
                set_faults(cluster, reset_node, {}, reset=1)
            if heal_after_s is not None:
                def heal() -> None:
                    for index in plans:
                        set_faults(cluster, index, {}, reset=1 if index == reset_node else 0)
                threading.Timer(heal_after_s, heal).start()

        if from_start:
            inject()
            time.sleep(0.5)
        for i, prompt in enumerate(PROMPTS[:prompts]):
            hook = _once(inject, tally) if i == 0 and not from_start else None
            tally.add(request(url, prompt, model=ctx.model, on_chunk=hook), prompt, hit=i == 0)
        if heal_after_s is not None:
            time.sleep(max(0.0, heal_after_s))
        elif from_start:
            for index in plans:
                set_faults(cluster, index, {})
        _after_fault(ctx, tally, cluster, url)
        _check_no_leaks(tally, cluster)


@scenario("link-reset", "reset every link of the middle stage after token 5; they reconnect")
def link_reset(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {}, heal_after_s=None, reset_node=1)


@scenario("partition-two-way", f"cut the middle stage off both ways for {PAUSE_S:.0f} s, then heal",
          recovery_target_s=pause_target_s(PAUSE_S))
def partition_two_way(ctx: Context, tally: Tally) -> None:
    cut = [["n1", "n0"], ["n0", "n1"], ["n1", "n2"], ["n2", "n1"]]
    _link_fault(ctx, tally, {i: {"partition": cut} for i in range(3)}, heal_after_s=PAUSE_S)


@scenario("partition-one-way", f"the middle stage's messages to the others are lost for {PAUSE_S:.0f} s; "
          "theirs arrive", recovery_target_s=pause_target_s(PAUSE_S))
def partition_one_way(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {1: {"partition": [["n1", "n0"], ["n1", "n2"]]}}, heal_after_s=PAUSE_S)


@scenario("loss-10pct", "10 % of messages on every link are lost")
def loss(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {i: {"loss": 0.1} for i in range(3)}, heal_after_s=None, from_start=True)


@scenario("duplication", "20 % of messages on every link arrive twice")
def duplication(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {i: {"duplicate": 0.2} for i in range(3)}, heal_after_s=None, from_start=True)


@scenario("reordering", "20 % of messages are held back behind the next one on their link")
def reordering(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {i: {"reorder": 0.2} for i in range(3)}, heal_after_s=None, from_start=True)


@scenario("jitter-200ms", "every message is delayed by 0-200 ms")
def jitter(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {i: {"jitter_s": 0.2} for i in range(3)}, heal_after_s=None, from_start=True,
                prompts=1)


@scenario("corrupted-frames", "1 % of the middle stage's frames get one bit flipped")
def corrupted(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {1: {"corrupt": 0.01}}, heal_after_s=None, from_start=True)


@scenario("slow-node", "the middle stage's links are capped at 1 MB/s")
def slow_node(ctx: Context, tally: Tally) -> None:
    _link_fault(ctx, tally, {1: {"bandwidth_bytes_per_s": 1e6}}, heal_after_s=None, from_start=True)


@scenario("restart-with-data-dir", "SIGKILL the middle stage after token 5 and start it again at once",
          recovery_target_s=STAGE_KILL_TARGET_S)
def restart(ctx: Context, tally: Tally) -> None:
    def kill_and_restart(cluster: Any) -> None:
        cluster.kill(1)
        cluster.restart(1)
        cluster.restarted = (1,)  # it was dead, and rightly declared so

    _fault_during_stream(ctx, tally, kill_and_restart, members_after=3)


@scenario("client-disconnect-x20", "20 clients leave mid-stream; no KV cache or request is left behind")
def client_disconnect(ctx: Context, tally: Tally) -> None:
    with ctx.cluster("client-disconnect-x20") as cluster:
        cluster.wait_ready()
        tally.mark_fault()  # the fault is the clients leaving: every request from here on counts
        for i in range(20):
            prompt = PROMPTS[i % len(PROMPTS)]
            url = cluster.nodes[i % 3].api_url
            tally.add(stream_chat(url, prompt, model=ctx.model, stop_after=3), prompt)  # abandoned
        _check_no_leaks(tally, cluster)
        _after_fault(ctx, tally, cluster, cluster.nodes[0].api_url)


@scenario("32-streams-during-kill", "32 concurrent streams; the middle stage is killed during them",
          recovery_target_s=STAGE_KILL_TARGET_S)
def concurrent_kill(ctx: Context, tally: Tally) -> None:
    with ctx.cluster("32-streams-during-kill") as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url
        kill = _once(lambda: cluster.kill(1), tally, at=3)

        def one(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            tally.add(stream_chat(url, prompt, max_tokens=12, model=ctx.model, on_chunk=kill if i == 0 else None),
                      prompt, max_tokens=12, hit=True)

        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(one, range(32)))
        _after_fault(ctx, tally, cluster, url, members=2)
        _check_no_leaks(tally, cluster)


@scenario("no-fit-after-loss", "2 nodes that hold the model only together; one dies: a clear error, "
          "the survivor stays up", expect_failed_clean=2)
def no_fit(ctx: Context, tally: Tally) -> None:
    from mesh.testing.cluster import http_json

    memory = _half_fit_memory(ctx.model)
    # f32 and float weights: what _half_fit_memory sizes (a node sizes the model as it loads it, P20)
    with ctx.cluster("no-fit-after-loss", n=2, memory_bytes=memory, extra_args=[
            "--dtype", "f32", "--quantize", "none", "--prefix-cache-mb", "0"]) as cluster:  # memory as sized
        cluster.wait_ready()
        url = cluster.nodes[0].api_url
        tally.add(stream_chat(url, PROMPTS[0], model=ctx.model, on_chunk=_once(lambda: cluster.kill(1), tally)),
                  PROMPTS[0])
        tally.add(stream_chat(url, PROMPTS[1], model=ctx.model), PROMPTS[1])  # refused while it cannot serve
        status, health = http_json(url + "/health", timeout_s=5.0)
        if status != 503 or "placement failed" not in str(health):
            tally.lose(f"the survivor's /health is {status} {health}, not 503 naming the placement failure")
        _check_no_leaks(tally, cluster)


def _half_fit_memory(model: str) -> int:
    """Memory per node such that two nodes hold ``model`` (layers + KV at its context) and
    one does not, in f32 with float weights (nodes given ``--dtype f32 --quantize none``)."""
    from mesh.errors import PlacementError
    from mesh.models import Model, resolve_model
    from mesh.placement.pipeline import Capacity, model_size, place_pipeline

    m = Model(resolve_model(model))
    size, context = model_size(m), m.context_length

    def fits(n: int, memory: int) -> bool:
        try:
            place_pipeline([Capacity(member_id=f"m{i}", usable_bytes=memory) for i in range(n)], size,
                           context_tokens=context)
            return True
        except PlacementError:
            return False

    low, high = 1 << 20, 64 << 30  # the smallest memory two nodes fit in, to 1 MiB
    while high - low > 1 << 20:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(2, mid) else (mid, high)
    memory = high + (16 << 20)
    if fits(1, memory):
        raise RuntimeError(f"{model}: no memory size fits two nodes but not one")
    return memory


@scenario("clock-24h-ahead", "one node's clock runs 24 h ahead: the others keep serving, it refuses clearly",
          expect_failed_clean=1)
def clock_ahead(ctx: Context, tally: Tally) -> None:
    """Spec FO7: the skewed node reports not ready naming its clock, so its request must be
    refused with a 503 that names the clock (1 clean failure, whatever the outcome); the other
    nodes' requests must complete."""
    with ctx.cluster("clock-24h-ahead", node_args={2: ["--clock-offset-s", "86400"]}) as cluster:
        tally.mark_fault()  # skewed from the start: every request is sent during the fault
        _wait_healthy(cluster, [0, 1])  # the skewed node never becomes a member of theirs
        for i, prompt in enumerate(PROMPTS):
            tally.add(stream_chat(cluster.nodes[i % 2].api_url, prompt, model=ctx.model), prompt)
        skewed = stream_chat(cluster.nodes[2].api_url, PROMPTS[0], model=ctx.model)
        tally.add(skewed, PROMPTS[0])
        if skewed.kind == "completed":
            tally.lose("the skewed node served a request; spec FO7: it must refuse with a 503 naming its clock")
        elif not ((skewed.error or "").startswith("HTTP 503") and "clock" in (skewed.error or "")):
            tally.lose(f"the skewed node's answer is not a 503 naming its clock: {skewed.error}")
        _check_no_leaks(tally, cluster)


def _wait_healthy(cluster: Any, indexes: list[int], timeout_s: float = 2 * SETTLE_S) -> None:
    from mesh.testing.cluster import http_json

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(http_json(cluster.nodes[i].api_url + "/health", timeout_s=2.0)[0] == 200 for i in indexes):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"nodes {indexes} not healthy within {timeout_s:.0f} s")


@scenario("kill-middle-long-prompt", "SIGKILL the middle stage after token 5 of a ~1.7k-token prompt: the new "
          "attempt resumes from the coordinator's KV replica (spec FO8) instead of re-prefilling the prompt",
          recovery_target_s=STAGE_KILL_TARGET_S)
def kill_middle_long(ctx: Context, tally: Tally) -> None:
    _kill_middle_long(ctx, tally, [])


@scenario("kill-middle-long-prompt-no-replica", "the same with the KV replica off (--kv-replica-mb 0): the new "
          "attempt re-prefills prompt + tokens on the survivors", recovery_target_s=STAGE_KILL_TARGET_S)
def kill_middle_long_no_replica(ctx: Context, tally: Tally) -> None:
    _kill_middle_long(ctx, tally, ["--kv-replica-mb", "0"])


def _kill_middle_long(ctx: Context, tally: Tally, extra_args: list[str]) -> None:
    """A fault-free stream, then a hit one, of LONG_PROMPT on the same 3-node cluster; both are
    compared with the single-node reference like every request (spec F17). The 3-node
    fault-free TTFT (a prefill of the prompt on 3 stages) is reported as a note."""
    with ctx.cluster(tally.result.name, extra_args=extra_args) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url
        baseline = stream_chat(url, LONG_PROMPT, max_tokens=12, model=ctx.model)  # fault-free, same cluster
        ttft = (baseline.stamps[0] - baseline.started) if baseline.stamps else None
        hit = stream_chat(url, LONG_PROMPT, max_tokens=12, model=ctx.model,
                          on_chunk=_once(lambda: cluster.kill(1), tally))
        for out in (baseline, hit):
            tally.add(out, LONG_PROMPT, max_tokens=12, hit=out is hit)
        if ttft is not None:
            tally.result.notes.append(f"3-node fault-free TTFT {ttft:.2f} s (a prefill of the prompt on 3 stages); "
                                      f"hit stream's recovery {hit.longest_gap_s:.2f} s")
        if hit.kind == "completed" and baseline.kind == "completed" and hit.text != baseline.text:
            tally.result.notes.append("the hit stream differs from the 3-node fault-free one")
        # the same text comes from a resume and from a silent fallback to the re-prefill: the
        # coordinator's own counter says which ran (spec F19, FO8)
        resumes = _counter(url, "mesh_kv_resumes_total", "outcome")
        tally.result.notes.append(f"coordinator's mesh_kv_resumes_total: {resumes or 'none'}")
        replica_on = "--kv-replica-mb" not in extra_args
        if replica_on and resumes.get("resumed") != 1.0:
            tally.lose(f"the failover did not resume from the KV replica (FO8): {resumes}")
        if not replica_on and resumes.get("resumed"):
            tally.lose(f"a resume was counted with the replica off: {resumes}")
        _check_no_leaks(tally, cluster)


def _counter(url: str, sample: str, label: str) -> dict[str, float]:
    """The values of a Prometheus counter sample in the node's ``/metrics``, by ``label``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(timeout=10.0) as client:
        text = client.get(url + "/metrics").text
    return {s.labels.get(label, ""): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == sample}


# -- membership changes under a steady stream of requests (spec N20, N21) ---------------------
STEADY_AFTER_S = 3.0  # the stream goes on this long after a change settled


class _Steady:
    """A steady stream of requests: ``clients`` threads each sending greedy streaming chats
    to ``url`` one after another (a 503 is retried and counted, ``request``) until ``stop``."""

    def __init__(self, ctx: Context, tally: Tally, url: str, clients: int = 2) -> None:
        self.ctx, self.tally, self.url = ctx, tally, url
        self.done = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=clients)
        self.futures = [self.pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        n = i
        while not self.done.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            self.tally.add(request(self.url, prompt, model=self.ctx.model), prompt, hit=self.tally.fault_at is not None)
            n += 1

    def stop(self) -> None:
        self.done.set()
        for future in self.futures:
            future.result(timeout=300)
        self.pool.shutdown()


def _membership(ctx: Context, tally: Tally, *, n: int, start: int, change: Callable[[Any], None],
                members_after: int) -> None:
    """``start`` of ``n`` nodes serve; a steady stream through node 0 runs while ``change``
    happens (marked as the fault), until ``members_after`` members serve and
    ``STEADY_AFTER_S`` more; every text must equal the fault-free run's, with no 503."""
    with ctx.cluster(tally.result.name, n=n, initial=start) as cluster:
        cluster.wait_ready(members=start)
        steady = _Steady(ctx, tally, cluster.nodes[0].api_url)
        try:
            time.sleep(2.0)
            tally.mark_fault()
            change(cluster)
            cluster.wait_ready(timeout_s=SETTLE_S, members=members_after)
            time.sleep(STEADY_AFTER_S)
        finally:
            steady.stop()
        tally.result.notes.append(f"{tally.result.sent} requests during the change")
        _check_no_leaks(tally, cluster)


def _graceful_stop(cluster: Any, index: int, timeout_s: float = 60.0) -> None:
    """SIGTERM node ``index`` and wait for it to exit (it hands its layers over first)."""
    cluster.send_signal(index, signal.SIGTERM)
    cluster.nodes[index].process.wait(timeout=timeout_s)


@scenario("join-under-load", "a second node joins a serving node under a steady stream", refusals_fail=True)
def join_under_load(ctx: Context, tally: Tally) -> None:
    _membership(ctx, tally, n=2, start=1, change=lambda cluster: cluster.add(), members_after=2)


@scenario("two-joins-under-load", "two nodes join a serving node at once under a steady stream",
          refusals_fail=True)
def two_joins_under_load(ctx: Context, tally: Tally) -> None:
    _membership(ctx, tally, n=3, start=1, change=lambda cluster: (cluster.add(), cluster.add()), members_after=3)


@scenario("leave-under-load", "one of two nodes stops gracefully (SIGTERM) under a steady stream",
          refusals_fail=True)
def leave_under_load(ctx: Context, tally: Tally) -> None:
    def leave(cluster: Any) -> None:
        _graceful_stop(cluster, 1)
        cluster.restarted = (1,)

    _membership(ctx, tally, n=2, start=2, change=leave, members_after=1)


@scenario("restart-under-load", "one of two nodes restarts for an upgrade (SIGTERM, start again) under a "
          "steady stream", refusals_fail=True)
def restart_under_load(ctx: Context, tally: Tally) -> None:
    def restart(cluster: Any) -> None:
        _graceful_stop(cluster, 1)
        cluster.restart(1)
        cluster.restarted = (1,)

    _membership(ctx, tally, n=2, start=2, change=restart, members_after=2)
