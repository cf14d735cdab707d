"""``python -m mesh bench-kernel``: how fast the kernel applies events, catches a fresh node up,
and converges many replicas after a partition heals.

1. apply rate: events/s a replica folds when they arrive one by one from a peer;
2. catch-up: a node whose history holds 150,000 events, 149,000 of them status heartbeats
   (with compaction, as a node runs), answers a fresh node's empty digest; the bytes sent,
   the seconds until the fresh node's state hash equals the old node's, and the peak memory
   of that catch-up next to the size of the live state;
3. convergence: 32 replicas split in two halves that keep working apart, then heal; each
   anti-entropy round every replica syncs with one random peer; rounds and seconds until every
   state hash is equal.

A program, not a test; prints the machine and appends JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc
from typing import Any

import cbor2

from mesh.kernel.replica import Replica, SyncPage
from mesh.tools.benchutil import append_jsonl, machine_profile

START_MS = 1_800_000_000_000


def _pages_to(dst: Replica, src: Replica, now_ms: int) -> int:
    """dst catches up from src over encoded pages; returns the bytes sent."""
    sent = 0
    for page in src.answer_sync(dst.digest(), nonce=1):
        blob = cbor2.dumps(page.to_wire())
        sent += len(blob)
        dst.take_page(src.node_id, SyncPage.from_wire(cbor2.loads(blob)), now_ms=now_ms)
    return sent


def bench_apply(n_events: int) -> dict[str, Any]:
    source = Replica("source", compact_after=n_events + 1)
    events = [source.emit("status.set", f"status/n{i % 50}", {"beat": i}, now_ms=START_MS + i) for i in range(n_events)]
    wires = [e.to_wire() for e in events]
    from mesh.kernel.events import Event

    sink = Replica("sink", compact_after=2000)
    start = time.perf_counter()
    for wire in wires:
        sink.receive(Event.from_wire(wire), now_ms=START_MS + n_events)
        if sink.needs_compaction():
            sink.compact()
    elapsed = time.perf_counter() - start
    assert sink.state.content_hash() == source.state.content_hash()
    return {"events": n_events, "seconds": elapsed, "events_per_s": n_events / elapsed}


def bench_catch_up(total: int = 150_000, heartbeats: int = 149_000, members: int = 20,
                   compact: bool = True) -> dict[str, Any]:
    """With ``compact=False`` the old node keeps every event (the baseline: replaying history)."""
    old = Replica("old", compact_after=2000 if compact else total + 1)
    rng = random.Random(7)
    real = total - heartbeats
    kinds = ["member", "resources", "placement", "request", "kv"]
    beats_left, real_left, t = heartbeats, real, START_MS
    while beats_left or real_left:
        t += 1
        if real_left and (not beats_left or rng.random() < real / total):
            kind = rng.choice(kinds)
            key = "placement" if kind == "placement" else f"{kind}/{rng.randrange(members if kind in ('member', 'resources') else 400)}"
            value = None if kind in ("request", "kv") and rng.random() < 0.5 else {"v": rng.randrange(10**6)}
            old.emit(f"{kind}.set", key, value, now_ms=t)
            real_left -= 1
        else:
            old.emit("status.set", f"status/{rng.randrange(members)}", {"state": "ready", "beat": beats_left}, now_ms=t)
            beats_left -= 1
        if old.needs_compaction():
            old.compact()
    live_bytes = len(cbor2.dumps(old.state.to_wire()))
    fresh = Replica("fresh")
    tracemalloc.start()
    start = time.perf_counter()
    sent = _pages_to(fresh, old, t + 1)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if fresh.state.content_hash() != old.state.content_hash():
        raise RuntimeError("catch-up did not converge")
    return {"history_events": total, "heartbeats": heartbeats, "live_entries": old.state.live_entries(),
            "live_state_bytes": live_bytes, "tail_events": len(old.tail), "bytes_sent": sent,
            "seconds": elapsed, "peak_memory_bytes": peak}


def bench_partition(n: int = 32, events_per_replica: int = 50, seed: int = 3) -> dict[str, Any]:
    rng = random.Random(seed)
    replicas = [Replica(f"r{i:02d}", compact_after=200) for i in range(n)]
    halves = [replicas[: n // 2], replicas[n // 2:]]
    t = START_MS
    for _ in range(events_per_replica):  # work goes on on both sides of the partition
        for half in halves:
            for r in half:
                t += 1
                r.emit("status.set", f"status/{r.node_id}", {"t": t}, now_ms=t)
                if r.needs_compaction():
                    r.compact()
            for r in half:  # gossip within the half
                _pages_to(r, rng.choice(half), t)
    start = time.perf_counter()
    rounds = 0
    while len({r.state.content_hash() for r in replicas}) > 1:
        rounds += 1
        for r in replicas:  # one anti-entropy exchange per replica per round, with a random peer
            peer = rng.choice([p for p in replicas if p is not r])
            _pages_to(r, peer, t)
            _pages_to(peer, r, t)
        if rounds > 100:
            raise RuntimeError("no convergence after 100 rounds")
    return {"replicas": n, "events": n * events_per_replica, "rounds": rounds,
            "compute_seconds": time.perf_counter() - start,
            "seconds_at_1s_rounds": rounds * 1.0}


def run_kernel_bench(args: argparse.Namespace) -> int:
    profile = machine_profile()
    print(f"machine: {profile['cpu']}, {profile['cores']} cores, {profile['memory_bytes'] / 2**30:.1f} GiB; "
          f"commit {profile['commit']}; {profile['date']}")
    results: dict[str, Any] = {"suite": "mesh-bench-kernel", "schema": 2, "machine": profile}
    results["apply"] = bench_apply(args.events)
    print(f"apply: {results['apply']['events_per_s']:.0f} events/s ({args.events} events from a peer)")
    results["catch_up"] = c = bench_catch_up()
    results["catch_up_without_compaction"] = b = bench_catch_up(compact=False)
    print(f"catch-up of a fresh node from a 150,000-event history (149,000 heartbeats): "
          f"{c['bytes_sent']} bytes in {c['seconds']:.3f} s; live state {c['live_entries']} entries, "
          f"{c['live_state_bytes']} bytes; peak memory {c['peak_memory_bytes'] / 2**20:.1f} MiB")
    print(f"  baseline, replaying the whole history: {b['bytes_sent']} bytes in {b['seconds']:.2f} s, "
          f"peak memory {b['peak_memory_bytes'] / 2**20:.1f} MiB "
          f"(compaction: {b['bytes_sent'] / c['bytes_sent']:.0f}x fewer bytes, {b['seconds'] / c['seconds']:.0f}x faster)")
    results["partition"] = p = bench_partition()
    print(f"32 replicas after a partition heals: {p['rounds']} anti-entropy rounds "
          f"({p['compute_seconds']:.2f} s of compute; {p['seconds_at_1s_rounds']:.0f} s at the default 1 s interval)")
    if args.json:
        append_jsonl(args.json, results)
        print(f"appended to {args.json}")
    return 0
