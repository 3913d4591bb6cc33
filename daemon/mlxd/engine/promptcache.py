"""Reuse the KV cache of earlier requests for prompts that share a prefix with them.

Agent clients and chat windows resend the whole conversation every turn, and a
``previous_response_id`` chain rebuilds it from the store; either way the new prompt starts
with tokens the engine has already processed. When a generation ends, its KV cache and the
tokens it covers are kept here (within ``engine.prompt_cache_bytes``, least recently used out
first); a new prompt takes a copy of the longest matching prefix and only the rest is
prefilled. The number of reused tokens is reported as ``cached_tokens``.

Entries are never mutated: a hit gets new cache objects that share the stored arrays up to
the prefix (MLX slices are cheap views), so two branches of one conversation can both reuse
their common history. Runs on the engine thread only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

#: Shorter common prefixes are not worth a cache copy (the chat template's header alone).
MIN_REUSE_TOKENS = 8


@dataclass
class _Entry:
    tokens: list[int]
    cache: list[Any]
    nbytes: int
    used: float = field(default_factory=time.monotonic)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts are long and mostly equal.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _trimmable(cache: list[Any]) -> bool:
    from mlx_lm.models.cache import KVCache

    return bool(cache) and all(type(c) is KVCache for c in cache)


def _prefix_copy(cache: list[Any], n: int) -> list[Any]:
    """New KVCache objects holding the first ``n`` positions of ``cache``."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        keys, values, _ = c.state
        fresh = KVCache()
        fresh.state = (keys[..., :n, :], values[..., :n, :], n)
        out.append(fresh)
    return out


class PromptCache:
    """LRU store of (tokens, KV cache) pairs bounded by a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: list[_Entry] = []

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def resize(self, budget_bytes: int) -> None:
        """Apply a new budget (config reload), evicting least recently used entries."""
        self.budget = budget_bytes
        self._evict()

    def _evict(self) -> None:
        self._entries.sort(key=lambda e: e.used)
        while self._entries and self.nbytes > self.budget:
            self._entries.pop(0)

    def lookup(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """A cache covering the longest stored prefix of ``prompt`` and its length.

        At least one prompt token is always left to prefill: the model must see it to produce
        the logits of the first new token.
        """
        best: _Entry | None = None
        best_n = 0
        for entry in self._entries:
            n = _common_prefix(entry.tokens, prompt)
            if n > best_n:
                best, best_n = entry, n
        best_n = min(best_n, len(prompt) - 1)
        if best is None or best_n < MIN_REUSE_TOKENS:
            return None, 0
        best.used = time.monotonic()
        return _prefix_copy(best.cache, best_n), best_n

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a finished generation's cache (covering exactly ``tokens``) if it fits."""
        if len(tokens) < MIN_REUSE_TOKENS or not _trimmable(cache):
            return
        if any(c.offset != len(tokens) for c in cache):
            return  # the cache does not cover exactly these tokens; never guess
        nbytes = sum(int(c.nbytes) for c in cache)
        if nbytes > self.budget:
            self._evict()
            return
        # An entry whose tokens are a prefix of the new one is subsumed by it.
        self._entries = [
            e
            for e in self._entries
            if not (len(e.tokens) <= len(tokens) and tokens[: len(e.tokens)] == e.tokens)
        ]
        self._entries.append(_Entry(list(tokens), cache, nbytes))
        self._evict()
