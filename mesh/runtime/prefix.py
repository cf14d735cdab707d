"""The prefix cache: KV caches of prompt prefixes kept at each stage once a request's prompt is
prefilled, and reused by later requests whose prompt starts with the same tokens (specs/node.md
N24). Kept at the prefill, not at the end of the request: the next turn of a chat may arrive
before the previous request's release does.

Only whole prefill chunks are kept: positions ``[0, k x C)`` of a prompt, ``C`` the prefill
chunk (``--prefill-chunk``). A chunked prefill computes those positions in exactly the shapes a
later request's own prefill would (chunks from position 0), so a request that starts from a
cached prefix gets the same KV values, logits and tokens as one that prefills from scratch,
and a failover that recomputes everything stays exact (spec FO9). The next turn of a chat
reuses every whole chunk of the previous turn's prompt, earlier answers included.

Keys are chained hashes: ``key(k) = blake2b(key(k - 1) || chunk k's token ids)``, seeded with
the chunk size, so a key names the exact token prefix. The coordinator offers a first stage
the keys of its prompt's whole chunks, longest first (``prefix_keys``); the first stage takes
the longest it holds and names it to the later stages, which must hold the same one (they
stored it after the same request's prefill; one evicted it: the attempt fails and the request
starts over without the cache). Nothing cluster-wide is kept: the caches live on the
pipeline's stages, which every coordinator's requests share, so every node's requests hit
them (cache-aware routing by construction: the stages a plan routes through are the ones
that hold its prefixes).

Each stage holds its entries as exported KV blocks (``Backend.export_kv``) within a byte
budget (``--prefix-cache-mb``, counted off the memory placement gives the node), evicting the
least recently used; an entry is restored into a request's new cache with
``Backend.import_kv`` (B10), so any backend that moves KV caches takes part.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

PREFIX_CACHE_MB = 256  # --prefix-cache-mb
MAX_KEYS = 512  # prefix keys offered per request (512 chunks of 16: the last 8k tokens of a prompt)


def prefix_keys(tokens: list[int], chunk: int, *, limit: int = MAX_KEYS) -> list[tuple[int, str]]:
    """``(n, key)`` for every whole chunk prefix ``[0, n)`` of ``tokens`` that leaves at least one
    token to compute (``n < len(tokens)``), longest first, at most ``limit``."""
    if chunk < 1:
        return []
    digest = hashlib.blake2b(chunk.to_bytes(4, "little"), digest_size=16).digest()
    keys = []
    for start in range(0, len(tokens) - 1, chunk):
        end = start + chunk
        if end >= len(tokens):
            break
        h = hashlib.blake2b(digest, digest_size=16)
        h.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in tokens[start:end]))
        digest = h.digest()
        keys.append((end, digest.hex()))
    return keys[::-1][:limit]


def keep_key(tokens: list[int], chunk: int) -> tuple[int, str] | None:
    """The longest whole-chunk prefix of a prompt ``tokens`` that the stages keep once it is
    prefilled: ``(n, key)``, or None for a prompt shorter than one chunk."""
    keys = prefix_keys([*tokens, 0], chunk, limit=1)  # a prompt's own last chunk counts too
    return keys[0] if keys else None


@dataclass(frozen=True, slots=True)
class Entry:
    layers: list[Any]  # Backend.export_kv output: (global layer, keys, values) per layer of the stage
    n: int
    nbytes: int


class PrefixStore:
    """One stage's cached prefixes, by (layer range, key); least recently used goes first when
    the bytes exceed ``budget``. Counts ``hits`` and ``stored``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[tuple[int, int], str], Entry] = OrderedDict()
        self.hits = 0
        self.stored = 0

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, layers: tuple[int, int], key: str) -> bool:
        return (layers, key) in self._entries

    def get(self, layers: tuple[int, int], key: str) -> Entry | None:
        """The entry, marked as just used; None when not held."""
        entry = self._entries.get((layers, key))
        if entry is not None:
            self._entries.move_to_end((layers, key))
            self.hits += 1
        return entry

    def put(self, layers: tuple[int, int], key: str, exported: list[Any], n: int) -> None:
        """Keep ``exported`` (``export_kv`` of positions ``[0, n)``) under ``key``; an entry larger
        than the whole budget is not kept."""
        nbytes = sum(len(k.data) + len(v.data) for _, k, v in exported)
        if nbytes > self.budget or (layers, key) in self._entries:
            return
        self._entries[(layers, key)] = Entry(exported, n, nbytes)
        self.nbytes += nbytes
        self.stored += 1
        while self.nbytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def keep_only(self, held: set[tuple[int, int]]) -> None:
        """Drop the entries of stages no longer held (a new plan)."""
        for k in [k for k in self._entries if k[0] not in held]:
            self.nbytes -= self._entries.pop(k).nbytes
