"""The prompt cache's disk tier with small fake KV caches (real MLX arrays, no model)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, load_prompt_cache

from mlxd.engine import diskcache
from mlxd.engine.diskcache import DiskCache, DiskView
from mlxd.engine.promptcache import PromptCache, materialize

MODEL_A = {"source": "gguf:/a", "weights": "aa", "dtype": "bfloat16", "mlx": "1", "mlx_lm": "1"}
MODEL_B = {**MODEL_A, "weights": "bb"}
LAYERS, HEADS, DIM = 3, 2, 8


def kv(tokens: list[int], dtype: Any = mx.bfloat16) -> list[Any]:
    """A KV cache whose values are a function of the tokens, so a wrong entry shows."""
    n = len(tokens)
    base = mx.array(tokens, dtype=mx.float32).reshape(1, 1, n, 1)
    out = []
    for layer in range(LAYERS):
        c = KVCache()
        keys = mx.broadcast_to(base + layer, (1, HEADS, n, DIM)).astype(dtype)
        c.state = (keys, -keys, n)
        out.append(c)
    return materialize(out, n)


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 5000) for _ in range(n)]


def files(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{diskcache.SUFFIX}"))


def stored(view: DiskView, toks: list[int]) -> None:
    view.put(toks, kv(toks))
    assert view.disk.flush(30)


def same(a: list[Any], b: list[Any]) -> bool:
    return all(
        mx.array_equal(x.keys, y.keys).item() and mx.array_equal(x.values, y.values).item()
        for x, y in zip(a, b, strict=True)
    )


def test_an_entry_survives_a_restart_and_serves_a_longer_prompt(tmp_path: Path) -> None:
    """Written in the background, found by a new DiskCache on the same directory (a restart)
    through the block index, and read back equal; mlx-lm's own loader reads the file too."""
    first = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    toks = tokens(200)
    stored(first, toks)
    first.disk.close()
    (path,) = files(tmp_path)
    assert load_prompt_cache(str(path))[0].keys.shape == (1, HEADS, 200, DIM)

    again = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    prompt = toks + tokens(30, seed=1)
    assert again.longer_than(prompt, 0)
    assert not again.longer_than(prompt, 200)  # RAM already has all of it
    loaded = again.load(prompt)
    assert loaded is not None
    assert loaded[0] == toks and same(loaded[1], kv(toks))


def test_a_prompt_sharing_only_some_blocks_finds_the_entry(tmp_path: Path) -> None:
    """A prompt that diverges inside block 3 reuses the entry's first 150 tokens; of two
    entries sharing those blocks, the one matching further is read."""
    view = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    toks = tokens(300)
    stored(view, toks)
    stored(view, toks[:140] + tokens(160, seed=6))  # shares the same two whole blocks
    prompt = toks[:150] + tokens(100, seed=2)
    assert view.longer_than(prompt, 149)
    assert not view.longer_than(prompt, 150)
    loaded = view.load(prompt)
    assert loaded is not None and loaded[0] == toks
    assert view.load(prompt) is not None
    assert view.load(tokens(300, seed=3)) is None


def write_other_files(folder: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    bad = {
        "truncated": folder / f"{'1' * 32}.safetensors",
        "random": folder / f"{'2' * 32}.safetensors",
        "empty": folder / f"{'3' * 32}.safetensors",
    }
    bad["truncated"].write_bytes(raw[: len(raw) // 2])
    bad["random"].write_bytes(os.urandom(4096))
    bad["empty"].write_bytes(b"")
    return bad


def test_truncated_random_foreign_and_other_model_files_are_deleted(tmp_path: Path) -> None:
    """Files that are not this model's valid entries are deleted when the directory is
    indexed; a lookup then misses instead of serving them."""
    a = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    b = a.disk.view(MODEL_B)
    toks = tokens(130)
    stored(a, toks)
    stored(b, toks)
    a.disk.close()
    (a_file,) = files(tmp_path / a.key)
    (b_file,) = files(tmp_path / b.key)
    bad = write_other_files(a_file.parent, a_file)
    # The other model's file, moved into A's directory under A's name for these tokens.
    a_file.unlink()
    b_file.rename(a_file)
    newer = {**MODEL_A, "mlx_lm": "2"}
    assert diskcache.model_key(newer) != a.key  # another version never shares a directory

    again = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    assert not again.longer_than([*toks, 1], 0)
    assert again.load([*toks, 1]) is None
    assert not any(p.exists() for p in bad.values())
    assert not a_file.exists()


def test_corrupt_data_is_detected_when_read_and_the_file_deleted(tmp_path: Path) -> None:
    """A flipped byte inside the tensors (header intact, size right) fails the checksum."""
    view = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    toks = tokens(100)
    stored(view, toks)
    (path,) = files(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert view.longer_than([*toks, 1], 0)  # the index still has it ...
    assert view.load([*toks, 1]) is None  # ... but it is never served
    assert not path.exists()


def test_the_directory_stays_under_its_budget_least_recently_used_out(tmp_path: Path) -> None:
    """Through many distinct entries, all models together stay under the budget; an entry
    just used is kept over older ones."""
    view = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    stored(view, tokens(100, seed=100))
    one = files(tmp_path)[0].stat().st_size
    budget = 3 * one + one // 2
    view.disk.configure(tmp_path, budget)
    other = view.disk.view(MODEL_B)
    keep = tokens(100, seed=100)
    for i in range(12):
        stored(other if i % 2 else view, tokens(100, seed=i))
        assert sum(p.stat().st_size for p in files(tmp_path)) <= budget
        assert view.load([*keep, 1]) is not None  # touched: most recently used
    assert len(files(tmp_path)) == 3
    assert view.disk.usage()["bytes"] <= budget


def test_a_longer_entry_replaces_the_one_it_extends(tmp_path: Path) -> None:
    """A conversation's next turn subsumes its previous entry: one file, not one per turn."""
    view = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    toks = tokens(300)
    stored(view, toks[:100])
    stored(view, toks[:200])
    stored(view, toks)
    stored(view, toks)  # the same tokens again: touched, not rewritten
    assert len(files(tmp_path)) == 1
    assert view.disk.writes == 3


def test_on_cuda_the_writer_reads_its_own_copy_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where MLX's memory is CUDA's (forced here), the writer gets copies of the arrays, not
    the RAM tier's own, and they are bit-exact: negative zeros and NaNs come back as they
    were, and the entry reads back equal (its checksum matches)."""
    monkeypatch.setattr(diskcache, "_cuda_managed", lambda: True)
    toks = tokens(100)
    cache = kv(toks)
    odd = mx.array([-0.0, float("nan"), 1.0], dtype=mx.bfloat16)
    cache[0].keys[0, 0, :3, 0] = odd  # type: ignore[index]
    mx.eval(cache[0].keys)
    arrays = diskcache.writer_arrays(cache)
    for c, (k, v) in zip(cache, arrays, strict=True):
        assert k is not c.keys and v is not c.values
        assert mx.array_equal(mx.view(k, mx.uint16), mx.view(c.keys, mx.uint16)).item()
    view = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    view.put(toks, cache)
    assert view.disk.flush(30) and view.disk.writes == 1
    again = DiskCache(tmp_path, 1 << 30).view(MODEL_A).load([*toks, 1])
    assert again is not None
    got = again[1][0].keys
    assert mx.array_equal(mx.view(got, mx.uint16), mx.view(cache[0].keys, mx.uint16)).item()


def test_disk_full_skips_the_entry_and_serving_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No free space, or a write failing midway (ENOSPC), leaves no file and no temp file;
    the RAM tier above still serves."""
    view = DiskCache(tmp_path, 1 << 30).view(MODEL_A)
    monkeypatch.setattr(diskcache, "_free_bytes", lambda path: 0)
    stored(view, tokens(100))
    assert view.disk.write_failures == 1
    monkeypatch.undo()

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diskcache.os, "fsync", no_space)
    ram = PromptCache(1 << 30, disk=view)
    toks = tokens(100, seed=5)
    ram.store(toks, kv(toks))
    assert view.disk.flush(30)
    monkeypatch.undo()
    assert view.disk.write_failures == 2
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    cache, n = ram.lookup([*toks, 7])
    assert cache is not None and n == 100


def test_a_disk_hit_becomes_a_ram_entry_and_is_counted(tmp_path: Path) -> None:
    """RAM first, then disk: after a restart the first lookup hits disk, the next one RAM."""
    toks = tokens(150)
    before = PromptCache(1 << 30, disk=DiskCache(tmp_path, 1 << 30).view(MODEL_A))
    before.store(toks, kv(toks))
    assert before.disk is not None and before.disk.disk.flush(30)

    after = PromptCache(1 << 30, disk=DiskCache(tmp_path, 1 << 30).view(MODEL_A))
    cache, n = after.lookup([*toks, 9, 9])
    assert n == 150 and cache is not None and same(cache, kv(toks))
    assert (after.stats.disk_hits, after.stats.ram_misses) == (1, 1)
    _, n = after.lookup([*toks, 9, 8])
    assert n == 150 and after.stats.ram_hits == 1 and after.stats.disk_hits == 1
    _, n = after.lookup(tokens(150, seed=4))
    assert n == 0 and (after.stats.ram_misses, after.stats.disk_misses) == (2, 1)


def test_stored_entries_hold_only_their_own_memory() -> None:
    """The RAM budget bounds real memory: an entry taken from a large (batch) buffer keeps
    none of it alive once the buffer is dropped."""
    mx.eval(mx.zeros(1))
    big = mx.zeros((8, HEADS, 4096, 256), dtype=mx.float32)
    mx.eval(big)
    start = mx.get_active_memory()
    lazy = []
    for _ in range(LAYERS):
        c = KVCache()
        # What mlx-lm's extract() hands back: a lazy contiguous slice of the batch buffer.
        part = mx.contiguous(big[2:3, :, 100:400])
        c.state = (part, part, 300)
        lazy.append(c)
    ram = PromptCache(1 << 30)
    ram.store(list(range(1, 301)), lazy)
    del big, lazy, part, c
    held = mx.get_active_memory() - (start - 8 * HEADS * 4096 * 256 * 4)
    assert held <= ram.nbytes * 1.05 + 4096, (held, ram.nbytes)
    assert ram.nbytes == LAYERS * 2 * HEADS * 300 * 256 * 4
