"""Per-request timings a coordinator keeps for ``GET /v1/cluster`` (the dashboard, and
``python -m mesh bench`` against a running cluster): tokens so far and live tokens/s of the
requests in flight, and for the last finished ones TTFT, TPOT and each stage's compute time
per token, the rest of a step being transfer and queueing.

Each stage adds ``[member, compute seconds]`` to a step's ``t`` list as it passes (spec N12),
so the coordinator sees, per step, what every stage spent computing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RECENT_REQUESTS = 32


@dataclass
class RequestStats:
    """Timings of one request (seconds, monotonic clock)."""

    rid: str
    prompt_tokens: int
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    first_token_at: float = 0.0
    ended_at: float = 0.0
    phase: str = "prefill"  # prefill, decode, recovering, then finished / failed / cancelled
    prefill_compute_s: dict[str, float] = field(default_factory=dict)  # member -> s (last prefill)
    decode_compute_s: dict[str, float] = field(default_factory=dict)  # member -> s, summed over steps
    decode_steps: int = 0
    decode_wall_s: float = 0.0  # coordinator's send -> token, summed over decode steps

    def step(self, timing: Any, wall_s: float, prefill: bool) -> None:
        """Record one step: ``timing`` is the ``t`` list of ``[member, compute s]`` a token
        reply carries (malformed entries are ignored); ``wall_s`` the step's round trip."""
        pairs = []
        for entry in timing if isinstance(timing, list) else []:
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) \
                    and isinstance(entry[1], int | float) and not isinstance(entry[1], bool):
                pairs.append((entry[0], float(entry[1])))
        if prefill:
            self.prefill_compute_s = dict(pairs)
            return
        self.decode_steps += 1
        self.decode_wall_s += wall_s
        for member, seconds in pairs:
            self.decode_compute_s[member] = self.decode_compute_s.get(member, 0.0) + seconds

    def token(self) -> None:
        self.tokens += 1
        if self.tokens == 1:
            self.first_token_at = time.monotonic()
        if self.phase == "prefill" or self.phase == "recovering":
            self.phase = "decode"

    def snapshot(self) -> dict[str, Any]:
        """``{"id", "phase", "prompt_tokens", "tokens", "elapsed_s", "ttft_s", "tokens_per_s",
        "tpot_s", "stages": [{"member", "prefill_compute_s", "decode_compute_s_per_token"}],
        "transfer_s_per_token"}``; rates are None until two tokens have come."""
        now = self.ended_at or time.monotonic()
        decode_s = now - self.first_token_at if self.tokens > 1 else 0.0
        per_token = {m: s / self.decode_steps for m, s in self.decode_compute_s.items()} if self.decode_steps else {}
        compute = sum(per_token.values())
        members = list(dict.fromkeys([*self.prefill_compute_s, *self.decode_compute_s]))
        return {
            "id": self.rid,
            "phase": self.phase,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "elapsed_s": now - self.started,
            "ttft_s": self.first_token_at - self.started if self.tokens else None,
            "tokens_per_s": (self.tokens - 1) / decode_s if decode_s > 0 else None,
            "tpot_s": decode_s / (self.tokens - 1) if decode_s > 0 else None,
            "stages": [{"member": m, "prefill_compute_s": self.prefill_compute_s.get(m),
                        "decode_compute_s_per_token": per_token.get(m)} for m in members],
            "transfer_s_per_token": max(0.0, self.decode_wall_s / self.decode_steps - compute)
            if self.decode_steps else None,
        }


class RequestLog:
    """The requests a coordinator runs now, and the last ``RECENT_REQUESTS`` it finished."""

    def __init__(self) -> None:
        self.active: dict[str, RequestStats] = {}
        self.recent: deque[RequestStats] = deque(maxlen=RECENT_REQUESTS)

    def start(self, rid: str, prompt_tokens: int) -> RequestStats:
        stats = self.active[rid] = RequestStats(rid, prompt_tokens)
        return stats

    def end(self, stats: RequestStats, outcome: str) -> None:
        stats.phase, stats.ended_at = outcome, time.monotonic()
        self.active.pop(stats.rid, None)
        self.recent.append(stats)

    def to_wire(self) -> dict[str, list[dict[str, Any]]]:
        return {"active": [s.snapshot() for s in self.active.values()],
                "recent": [s.snapshot() for s in reversed(self.recent)]}
