"""The scenarios of ``python -m mesh faults`` (runner and classification: ``mesh/faults_suite.py``).

Each scenario starts a fresh cluster (3 nodes unless it says otherwise: a 3-stage pipeline,
layers split by memory), sends greedy streaming requests and injects one fault. ``QUICK`` is
the set CI runs under pytest; the rest run on demand. Spec: specs/faults.md F16.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mesh.faults_suite import (
    PROMPTS,
    Context,
    ScenarioResult,
    Tally,
    request,
    set_faults,
    stream_chat,
)

KILL_AT = 5  # tokens streamed before the fault
SETTLE_S = 60.0  # how long a cluster may take to be ready again after a fault


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: Callable[[Context], ScenarioResult]


SCENARIOS: dict[str, Scenario] = {}
QUICK = ("kill-middle-stage", "kill-first-stage", "loss-10pct", "no-fit-after-loss", "client-disconnect-x20")


def scenario(name: str, description: str) -> Callable[[Callable[[Context], ScenarioResult]], Callable[[Context], ScenarioResult]]:
    def register(fn: Callable[[Context], ScenarioResult]) -> Callable[[Context], ScenarioResult]:
        SCENARIOS[name] = Scenario(name, description, fn)
        return fn
    return register


def _once(action: Callable[[], None], at: int = KILL_AT) -> Callable[[int], None]:
    """An ``on_chunk`` callback that runs ``action`` once, after the ``at``-th chunk."""
    fired = threading.Event()

    def on_chunk(n: int) -> None:
        if n >= at and not fired.is_set():
            fired.set()
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


def _fault_during_stream(ctx: Context, name: str, fault: Callable[[Any], None], *, via: int = 0,
                         members_after: int = 2, settle_s: float = 0.0) -> ScenarioResult:
    """One stream through node ``via``; ``fault(cluster)`` after its 5th token; then, after
    ``settle_s``, every prompt again once ``members_after`` members are ready."""
    started = time.monotonic()
    tally = Tally(ctx, name)
    with ctx.cluster(name) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[via].api_url
        tally.add(stream_chat(url, PROMPTS[0], model=ctx.model, on_chunk=_once(lambda: fault(cluster))), PROMPTS[0],
                  hit=True)
        time.sleep(settle_s)
        _after_fault(ctx, tally, cluster, url, members=members_after)
        _check_no_leaks(tally, cluster)
        _check_survivors_kept(tally, cluster)
    return tally.finish(started)


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


@scenario("kill-middle-stage", "SIGKILL the middle stage after token 5")
def kill_middle_stage(ctx: Context) -> ScenarioResult:
    return _fault_during_stream(ctx, "kill-middle-stage", lambda cluster: cluster.kill(1))


@scenario("kill-first-stage", "SIGKILL the first stage after token 5 (the client talks to the last)")
def kill_first_stage(ctx: Context) -> ScenarioResult:
    return _fault_during_stream(ctx, "kill-first-stage", lambda cluster: cluster.kill(0), via=2)


@scenario("kill-http-node", "SIGKILL the node holding the client's connection; the client retries elsewhere")
def kill_http_node(ctx: Context) -> ScenarioResult:
    started = time.monotonic()
    tally = Tally(ctx, "kill-http-node")
    with ctx.cluster("kill-http-node") as cluster:
        cluster.wait_ready()
        prompt = PROMPTS[0]
        cut = stream_chat(cluster.nodes[1].api_url, prompt, model=ctx.model,
                          on_chunk=_once(lambda: cluster.kill(1)))
        tally.add(cut, prompt, cut_is_clean=True)  # the client sees its connection cut: explicit
        # the client retries elsewhere, as clients do (503 while the survivors re-place)
        retry = request(cluster.nodes[0].api_url, prompt, model=ctx.model)
        tally.add(retry, prompt)
        _after_fault(ctx, tally, cluster, cluster.nodes[0].api_url, members=2)
        _check_no_leaks(tally, cluster)
    return tally.finish(started, expect_failed_clean=1)


@scenario("sigstop-past-deadline", "SIGSTOP the middle stage for 6 s (past --dead-after-s), then SIGCONT")
def sigstop(ctx: Context) -> ScenarioResult:
    def stop_then_continue(cluster: Any) -> None:
        cluster.restarted = (1,)  # silent past the deadline: rightly declared dead
        cluster.send_signal(1, signal.SIGSTOP)
        threading.Timer(6.0, lambda: cluster.send_signal(1, signal.SIGCONT)).start()

    return _fault_during_stream(ctx, "sigstop-past-deadline", stop_then_continue, members_after=3, settle_s=7.0)


def _link_fault(ctx: Context, name: str, plans: dict[int, dict[str, Any]], *, heal_after_s: float | None,
                from_start: bool = False, reset_node: int | None = None, prompts: int = 3) -> ScenarioResult:
    """Apply ``plans`` (node -> fault plan) after token 5 of the first stream (or before any
    request), heal after ``heal_after_s``; every prompt runs, then again after healing."""
    started = time.monotonic()
    tally = Tally(ctx, name)
    with ctx.cluster(name) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url

        def inject() -> None:
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
            hook = _once(inject) if i == 0 and not from_start else None
            tally.add(request(url, prompt, model=ctx.model, on_chunk=hook), prompt, hit=i == 0)
        if heal_after_s is not None:
            time.sleep(max(0.0, heal_after_s))
        elif from_start:
            for index in plans:
                set_faults(cluster, index, {})
        _after_fault(ctx, tally, cluster, url)
        _check_no_leaks(tally, cluster)
    return tally.finish(started)


@scenario("link-reset", "reset every link of the middle stage after token 5; they reconnect")
def link_reset(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "link-reset", {}, heal_after_s=None, reset_node=1)


@scenario("partition-two-way", "cut the middle stage off both ways for 6 s, then heal")
def partition_two_way(ctx: Context) -> ScenarioResult:
    cut = [["n1", "n0"], ["n0", "n1"], ["n1", "n2"], ["n2", "n1"]]
    return _link_fault(ctx, "partition-two-way", {i: {"partition": cut} for i in range(3)}, heal_after_s=6.0)


@scenario("partition-one-way", "the middle stage's messages to the others are lost for 6 s; theirs arrive")
def partition_one_way(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "partition-one-way", {1: {"partition": [["n1", "n0"], ["n1", "n2"]]}}, heal_after_s=6.0)


@scenario("loss-10pct", "10 % of messages on every link are lost")
def loss(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "loss-10pct", {i: {"loss": 0.1} for i in range(3)}, heal_after_s=None, from_start=True)


@scenario("duplication", "20 % of messages on every link arrive twice")
def duplication(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "duplication", {i: {"duplicate": 0.2} for i in range(3)}, heal_after_s=None,
                       from_start=True)


@scenario("reordering", "20 % of messages are held back behind the next one on their link")
def reordering(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "reordering", {i: {"reorder": 0.2} for i in range(3)}, heal_after_s=None,
                       from_start=True)


@scenario("jitter-200ms", "every message is delayed by 0-200 ms")
def jitter(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "jitter-200ms", {i: {"jitter_s": 0.2} for i in range(3)}, heal_after_s=None,
                       from_start=True, prompts=1)


@scenario("corrupted-frames", "1 % of the middle stage's frames get one bit flipped")
def corrupted(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "corrupted-frames", {1: {"corrupt": 0.01}}, heal_after_s=None, from_start=True)


@scenario("slow-node", "the middle stage's links are capped at 1 MB/s")
def slow_node(ctx: Context) -> ScenarioResult:
    return _link_fault(ctx, "slow-node", {1: {"bandwidth_bytes_per_s": 1e6}}, heal_after_s=None, from_start=True)


@scenario("restart-with-data-dir", "SIGKILL the middle stage after token 5 and start it again at once")
def restart(ctx: Context) -> ScenarioResult:
    def kill_and_restart(cluster: Any) -> None:
        cluster.kill(1)
        cluster.restart(1)
        cluster.restarted = (1,)  # it was dead, and rightly declared so

    return _fault_during_stream(ctx, "restart-with-data-dir", kill_and_restart, members_after=3)


@scenario("client-disconnect-x20", "20 clients leave mid-stream; no KV cache or request is left behind")
def client_disconnect(ctx: Context) -> ScenarioResult:
    started = time.monotonic()
    tally = Tally(ctx, "client-disconnect-x20")
    with ctx.cluster("client-disconnect") as cluster:
        cluster.wait_ready()
        for i in range(20):
            prompt = PROMPTS[i % len(PROMPTS)]
            url = cluster.nodes[i % 3].api_url
            tally.add(stream_chat(url, prompt, model=ctx.model, stop_after=3), prompt, partial=True)
        _check_no_leaks(tally, cluster)
        _after_fault(ctx, tally, cluster, cluster.nodes[0].api_url)
    return tally.finish(started)


@scenario("32-streams-during-kill", "32 concurrent streams; the middle stage is killed during them")
def concurrent_kill(ctx: Context) -> ScenarioResult:
    started = time.monotonic()
    tally = Tally(ctx, "32-streams-during-kill")
    with ctx.cluster("concurrent") as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url
        kill = _once(lambda: cluster.kill(1), at=3)

        def one(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            tally.add(stream_chat(url, prompt, max_tokens=12, model=ctx.model, on_chunk=kill if i == 0 else None),
                      prompt, max_tokens=12, hit=True)

        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(one, range(32)))
        _after_fault(ctx, tally, cluster, url, members=2)
        _check_no_leaks(tally, cluster)
    return tally.finish(started)


@scenario("no-fit-after-loss", "2 nodes that hold the model only together; one dies: a clear error, "
          "the survivor stays up")
def no_fit(ctx: Context) -> ScenarioResult:
    from mesh.testing.cluster import http_json

    started = time.monotonic()
    tally = Tally(ctx, "no-fit-after-loss")
    memory = _half_fit_memory(ctx.model)
    with ctx.cluster("no-fit", n=2, memory_bytes=memory) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url
        tally.add(stream_chat(url, PROMPTS[0], model=ctx.model, on_chunk=_once(lambda: cluster.kill(1))), PROMPTS[0])
        tally.add(stream_chat(url, PROMPTS[1], model=ctx.model), PROMPTS[1])  # refused while it cannot serve
        status, health = http_json(url + "/health", timeout_s=5.0)
        if status != 503 or "placement failed" not in str(health):
            tally.lose(f"the survivor's /health is {status} {health}, not 503 naming the placement failure")
        _check_no_leaks(tally, cluster)
    return tally.finish(started, expect_failed_clean=2)


def _half_fit_memory(model: str) -> int:
    """Memory per node such that two nodes hold ``model`` (layers + KV at its context) and
    one does not."""
    from mesh.errors import PlacementError
    from mesh.models import Model, model_size, resolve_model
    from mesh.placement import Capacity, place_pipeline

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


@scenario("clock-24h-ahead", "one node's clock runs 24 h ahead: the others keep serving, it refuses clearly")
def clock_ahead(ctx: Context) -> ScenarioResult:
    started = time.monotonic()
    tally = Tally(ctx, "clock-24h-ahead")
    with ctx.cluster("clock", node_args={2: ["--clock-offset-s", "86400"]}) as cluster:
        _wait_healthy(cluster, [0, 1])  # the skewed node never becomes a member of theirs
        for i, prompt in enumerate(PROMPTS):
            tally.add(stream_chat(cluster.nodes[i % 2].api_url, prompt, model=ctx.model), prompt)
        skewed = stream_chat(cluster.nodes[2].api_url, PROMPTS[0], model=ctx.model)
        tally.add(skewed, PROMPTS[0])
        if skewed.kind != "completed" and "clock" not in (skewed.error or ""):
            tally.lose(f"the skewed node's answer does not name its clock: {skewed.error}")
        _check_no_leaks(tally, cluster)
    return tally.finish(started, expect_failed_clean=0 if skewed.kind == "completed" else 1)


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


LONG_PROMPT = ("Summarise the following notes in one sentence. " +
               "The river rises in the hills, runs past the mill and the old bridge, and reaches the sea "
               "after two days; farmers along it grow wheat, barley and apples, and trade at the market "
               "town each week. " * 40)


@scenario("kill-middle-long-prompt", "SIGKILL the middle stage after token 5 of a ~1.7k-token prompt: the new "
          "attempt resumes from the coordinator's KV replica (spec FO8) instead of re-prefilling the prompt")
def kill_middle_long(ctx: Context) -> ScenarioResult:
    return _kill_middle_long(ctx, "kill-middle-long-prompt", [])


@scenario("kill-middle-long-prompt-no-replica", "the same with the KV replica off (--kv-replica-mb 0): the new "
          "attempt re-prefills prompt + tokens on the survivors")
def kill_middle_long_no_replica(ctx: Context) -> ScenarioResult:
    return _kill_middle_long(ctx, "kill-middle-long-prompt-no-replica", ["--kv-replica-mb", "0"])


def _kill_middle_long(ctx: Context, name: str, extra_args: list[str]) -> ScenarioResult:
    started = time.monotonic()
    tally = Tally(ctx, name)
    with ctx.cluster(name, extra_args=extra_args) as cluster:
        cluster.wait_ready()
        url = cluster.nodes[0].api_url
        baseline = stream_chat(url, LONG_PROMPT, max_tokens=12, model=ctx.model)  # fault-free, same cluster
        ttft = (baseline.stamps[0] - baseline.started) if baseline.stamps else None
        hit = stream_chat(url, LONG_PROMPT, max_tokens=12, model=ctx.model, on_chunk=_once(lambda: cluster.kill(1)))
        for out in (baseline, hit):
            tally.add(out, LONG_PROMPT, max_tokens=12, hit=out is hit)
        if hit.kind == "completed" and baseline.kind == "completed":
            if hit.text != baseline.text:
                tally.result.mismatches += 1
                tally.result.notes.append("the hit stream differs from the fault-free one")
            tally.result.notes.append(f"fault-free TTFT {ttft:.2f} s (a prefill of the prompt on 3 stages); "
                                      f"recovery {hit.longest_gap_s:.2f} s")
        _check_no_leaks(tally, cluster)
    return tally.finish(started)
