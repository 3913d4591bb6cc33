"""Reuse the KV cache of earlier requests for prompts that share a prefix with them.

Agent clients and chat windows resend the whole conversation every turn, and a
``previous_response_id`` chain rebuilds it from the store; either way the new prompt starts
with tokens the engine has already processed. When a generation ends, its KV cache and the
tokens it covers are kept here (within ``engine.prompt_cache_bytes``, least recently used out
first); a new prompt takes a copy of the longest matching prefix and only the rest is
prefilled. The number of reused tokens is reported as ``cached_tokens``.

Two tiers: this RAM tier, and optionally a disk tier (:mod:`.diskcache`) that survives
restarts, unloads and model switches. A lookup asks RAM first, then disk; a disk hit is
loaded into RAM. Every stored entry is also handed to the disk tier, which writes it in the
background.

The budget bounds real memory. The caches mlx-lm hands back when a sequence ends are lazy
slices of the whole batch's KV buffers; kept as they are, each one would keep the batch's
buffers alive (measured: the count rose 38 MB a round while MLX's active memory rose 400 MB).
So ``store`` copies every layer into arrays of exactly the entry's size and evaluates them
at once; ``nbytes`` is then what is really held.

Entries are never mutated: a hit gets new cache objects that share the stored arrays up to
the prefix (MLX slices are cheap views), so two branches of one conversation can both reuse
their common history. Runs on the engine thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .diskcache import DiskView

#: Shorter common prefixes are not worth a cache copy (the chat template's header alone).
MIN_REUSE_TOKENS = 8


@dataclass
class CacheStats:
    """Lookups per tier, for /health and /metrics. One per engine, shared by its caches.

    A lookup is a RAM hit when RAM serves it; otherwise a RAM miss, and then a disk hit or a
    disk miss when a disk tier is configured.
    """

    ram_hits: int = 0
    ram_misses: int = 0
    disk_hits: int = 0
    disk_misses: int = 0


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


def materialize(cache: list[Any], n: int) -> list[Any]:
    """KVCache objects owning exactly the first ``n`` positions of ``cache``, evaluated.

    ``mx.contiguous`` of a slice copies it into a buffer of its own size; evaluating at once
    cuts the graph, so nothing keeps the source buffers (a batch's, or a longer entry's) alive.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        keys, values, _ = c.state
        fresh = KVCache()
        fresh.state = (
            mx.contiguous(keys[..., :n, :]),
            mx.contiguous(values[..., :n, :]),
            n,
        )
        out.append(fresh)
    mx.eval([(c.keys, c.values) for c in out])
    return out


class PromptCache:
    """LRU store of (tokens, KV cache) pairs bounded by a byte budget, over an optional disk
    tier."""

    def __init__(
        self,
        budget_bytes: int,
        disk: DiskView | None = None,
        stats: CacheStats | None = None,
    ) -> None:
        self.budget = budget_bytes
        self.disk = disk
        self.stats = stats if stats is not None else CacheStats()
        self._entries: list[_Entry] = []
        #: An entry's weight against the budget: its bytes unless set. A process group sets
        #: one every rank computes alike (see :func:`mlxd.engine.distributed.kv_weight`).
        self.weigh: Callable[[list[int], list[Any]], int] | None = None

    def _size(self, tokens: list[int], cache: list[Any]) -> int:
        if self.weigh is not None:
            return self.weigh(tokens, cache)
        return sum(int(c.nbytes) for c in cache)

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

    def _best(self, prompt: list[int]) -> tuple[_Entry | None, int]:
        best: _Entry | None = None
        best_n = 0
        for entry in self._entries:
            n = _common_prefix(entry.tokens, prompt)
            if n > best_n:
                best, best_n = entry, n
        return best, min(best_n, len(prompt) - 1)

    def lookup(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """A cache covering the longest stored prefix of ``prompt`` and its length.

        At least one prompt token is always left to prefill: the model must see it to produce
        the logits of the first new token. The disk tier is read only when it holds a longer
        prefix than RAM; what it returns is kept in RAM from then on.
        """
        best, best_n = self._best(prompt)
        ram_n = best_n if best is not None and best_n >= MIN_REUSE_TOKENS else 0
        if self.disk is not None and self.disk.longer_than(prompt, ram_n):
            loaded = self.disk.load(prompt)
            if loaded is not None:
                tokens, cache = loaded
                n = min(_common_prefix(tokens, prompt), len(prompt) - 1)
                self._insert(tokens, cache, self._size(tokens, cache))
                self.stats.ram_misses += 1
                self.stats.disk_hits += 1
                return _prefix_copy(cache, n), n
            if not ram_n:
                self.stats.disk_misses += 1
        elif not ram_n and self.disk is not None:
            self.stats.disk_misses += 1
        if best is None or not ram_n:
            self.stats.ram_misses += 1
            return None, 0
        self.stats.ram_hits += 1
        best.used = time.monotonic()
        return _prefix_copy(best.cache, ram_n), ram_n

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a finished generation's cache (covering exactly ``tokens``) if it fits, and
        hand it to the disk tier."""
        if len(tokens) < MIN_REUSE_TOKENS or not _trimmable(cache):
            return
        if any(c.offset != len(tokens) for c in cache):
            return  # the cache does not cover exactly these tokens; never guess
        owned = materialize(cache, len(tokens))
        nbytes = self._size(tokens, owned)
        if self.disk is not None:
            self.disk.put(tokens, owned)
        self._insert(tokens, owned, nbytes)

    def _insert(self, tokens: list[int], cache: list[Any], nbytes: int) -> None:
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
