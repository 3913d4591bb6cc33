"""The prompt cache's disk tier: KV caches that survive restarts, unloads and model switches.

Layout: ``<prompt_cache_dir>/<model key>/<entry>.safetensors``. The model key hashes the
model's identity (source, weights fingerprint, dtype, MLX and mlx-lm versions), so entries of
every model live side by side and a model loaded again finds its own. An entry's name hashes
its tokens. Each file is in mlx-lm's prompt-cache format (``mlx_lm.models.cache.
load_prompt_cache`` reads it); its safetensors header also carries the format, the identity
JSON, the tokens and a checksum of the data.

Finding the longest stored prefix without reading every file: when a model's directory is
first used, only the headers are read (tokens, sizes) and each entry is indexed by the chained
hashes of its 64-token blocks. A lookup hashes the prompt's blocks and walks the index to the
deepest block any entry shares; among those entries (their tokens are kept in memory, 4 bytes
a token) the longest exact match wins, and only that entry's file is read.

Threads: writes run on one background writer thread. It never calls MLX: the engine thread
hands it ``memoryview``s of arrays that are already evaluated (and never mutated: entries are
immutable), and the writer produces the safetensors bytes itself (temp file, fsync, rename).
Reading a file into MLX arrays happens on the engine thread (``load``), as every MLX call must.
On CUDA the writer gets a copy of its own, made on the GPU (:func:`writer_arrays`): MLX's
memory there is managed by CUDA, the CPU reading it moves its pages to the host, and the next
prompt that reuses a prefix of the same entry from the RAM tier would fault them back.

Safe by construction: a file whose header does not parse, whose size does not match its
header (truncated), whose checksum fails, whose format is another version or whose identity is
another model's is deleted with a warning and treated as a miss. A failed write (disk full)
is logged and skipped; serving goes on. Before each write, least recently used files (mtime,
touched on every hit, so the order survives restarts) are deleted until the whole directory,
all models together, fits in ``engine.prompt_cache_disk_bytes``.

One piece: the file format, its index and its writer must agree byte for byte, and the
checks on read mirror the write path line by line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import shutil
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logs import get_logger

if TYPE_CHECKING:
    from .loader import LoadedModel

log = get_logger("mlxd.engine.diskcache")

FORMAT = "mlxd-prompt-cache/1"
#: Prefix granularity of the index; a disk hit reuses at least one block.
BLOCK_TOKENS = 64
SUFFIX = ".safetensors"
#: Bytes of KV caches waiting for the writer; beyond it new entries are not written (they
#: would keep memory alive beyond the RAM budget). One entry is always accepted.
MAX_PENDING_BYTES = 512 * 1024 * 1024
#: A header larger than this is not ours (tokens of a 1M-token context are ~5.6 MB).
_MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Free space left on the file system after a write.
_FREE_MARGIN_BYTES = 64 * 1024 * 1024
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32"}
#: ``memoryview.format`` of MLX arrays -> dtype name (MLX exports bfloat16 by name).
_BUFFER_FORMATS = {"f": "float32", "e": "float16", "i": "int32", "<i": "int32"}


class _Invalid(Exception):
    """A file that is not a usable entry for this model (the message says why)."""


# -- identity and hashing ------------------------------------------------------------------
def model_identity(lm: LoadedModel) -> dict[str, str]:
    """What a KV cache depends on: the weights, their precision, the code that computed it."""
    from importlib.metadata import version

    return {
        "source": f"{lm.source.kind}:{lm.source.path}",
        "weights": weights_fingerprint(lm.source.path),
        "dtype": lm.dtype,
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
    }


def weights_fingerprint(path: Path) -> str:
    """Names, sizes and the first and last MiB of every weight and config file: cheap for
    100 GB models, and a changed file changes it (mtimes are not used: a copy keeps the hit)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".gguf", ".npz", ".json")
        )
    digest = hashlib.blake2b(digest_size=16)
    for p in files:
        size = p.stat().st_size
        digest.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read(1 << 20))
    return digest.hexdigest()


def model_key(identity: dict[str, str]) -> str:
    return hashlib.blake2b(_identity_json(identity).encode(), digest_size=10).hexdigest()


def _identity_json(identity: dict[str, str]) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def _token_bytes(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


def entry_name(tokens: list[int]) -> str:
    return hashlib.blake2b(_token_bytes(tokens), digest_size=16).hexdigest()


def block_chain(tokens: list[int]) -> list[bytes]:
    """Hash of each full block chained with all blocks before it: equal hash at block j means
    equal tokens up to (j + 1) * BLOCK_TOKENS."""
    raw = _token_bytes(tokens)
    size = BLOCK_TOKENS * 4
    out: list[bytes] = []
    h = b""
    for i in range(len(tokens) // BLOCK_TOKENS):
        h = hashlib.blake2b(h + raw[i * size : (i + 1) * size], digest_size=16).digest()
        out.append(h)
    return out


# -- the file format -----------------------------------------------------------------------
def writer_arrays(cache: list[Any]) -> list[tuple[Any, Any]]:
    """Per layer, the (keys, values) arrays the writer reads: the cache's own, or on CUDA
    bit-exact copies made on the GPU (a copy of a 4k-token entry of a 1B model, 136 MB, takes
    well under a millisecond there), so the CPU's reads move the copies' pages to the host and
    not those of the RAM tier's entry, which later prompts read on the GPU. Measured on an
    H200 with a prefix of each prompt reused from the previous one's entry: the prompt's
    chunks took ~5 ms longer with the disk tier on than off. A copy lives until its entry is
    written (all of them together at most :data:`MAX_PENDING_BYTES`). Engine thread only."""
    import mlx.core as mx

    pairs = [(c.keys, c.values) for c in cache]
    if not _cuda_managed():
        return pairs
    bits = {2: mx.uint16, 4: mx.uint32}

    def copy(a: Any) -> Any:  # through integers: every bit kept (-0.0, NaN payloads)
        return mx.view(mx.view(a, bits[a.itemsize]) + 0, a.dtype)

    copies = [(copy(k), copy(v)) for k, v in pairs]
    mx.eval(copies)
    return copies


def _cuda_managed() -> bool:
    """MLX runs on CUDA (its arrays live in CUDA managed memory)."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu and not mx.metal.is_available()


def kv_checksum(arrays: list[Any]) -> int:
    """Sum of the arrays' 16-bit words, mod 2**32, computed by MLX (engine thread only).

    Catches flipped bits and zeroed or overwritten blocks; truncation is caught earlier by
    the size check. Computed where the data already is (on a GPU, a reduction of
    microseconds), so a disk hit costs a file read and not a CPU pass over the whole file.
    """
    import mlx.core as mx

    total = mx.array(0, dtype=mx.uint32)
    for a in arrays:
        total = total + mx.sum(mx.view(a, mx.uint16).astype(mx.uint32))
    value = total.item()
    assert isinstance(value, int)
    return value


def encode(
    tokens: list[int],
    layers: list[tuple[Any, Any]],
    identity: dict[str, str],
    checksum: int = 0,
) -> tuple[bytes, list[Any], int]:
    """The header bytes, the data buffers in order and the total file size of an entry.

    ``layers`` holds, per layer, the (keys, values) buffers as ``memoryview``s of evaluated
    MLX arrays, shaped ``(1, heads, len(tokens), dim)``. Key names and metadata follow
    ``mlx_lm.models.cache.save_prompt_cache``: tensors ``"<layer>.0"`` (keys), ``".1"``
    (values), ``".2"`` (the offset, an int32 scalar), metadata ``"0.*"`` (ours), ``"1.<layer>"``
    (the cache class), ``"2.*"`` (which entries are scalars). ``checksum`` is
    :func:`kv_checksum` of the keys and values.
    """
    offset = struct.pack("<i", len(tokens))
    tensors: dict[str, Any] = {}
    buffers: list[Any] = []
    pos = 0
    for i, (keys, values) in enumerate(layers):
        scalar = memoryview(offset)
        for j, buf, fmt in (
            (0, keys, _BUFFER_FORMATS.get(keys.format, keys.format)),
            (1, values, _BUFFER_FORMATS.get(values.format, values.format)),
            (2, scalar, "int32"),
        ):
            if fmt not in _DTYPES:
                raise ValueError(f"cannot store a KV cache of dtype {fmt}")
            shape = [] if j == 2 else list(buf.shape or ())
            tensors[f"{i}.{j}"] = {
                "dtype": _DTYPES[fmt],
                "shape": shape,
                "data_offsets": [pos, pos + buf.nbytes],
            }
            pos += buf.nbytes
            buffers.append(buf)
    meta: dict[str, str] = {
        "0.format": FORMAT,
        "0.model": _identity_json(identity),
        "0.tokens": base64.b64encode(_token_bytes(tokens)).decode(),
        "0.sum16": str(checksum),
        "2.0": "",
    }
    for i in range(len(layers)):
        meta[f"1.{i}"] = "KVCache"
        meta[f"2.{i + 1}.0"] = f"{i}.2"
        meta[f"2.{i + 1}.1"] = "scalar"
    header = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header, buffers, 8 + len(header) + pos


@dataclass
class _Header:
    meta: dict[str, str]
    tensors: dict[str, Any]
    data_start: int
    data_end: int
    tokens: list[int]


def parse_header(raw: bytes, file_size: int, identity: dict[str, str]) -> _Header:
    """The checked header of an entry file; raises _Invalid with the reason."""
    if len(raw) < 8:
        raise _Invalid("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(raw):
        raise _Invalid("header length out of range (not a safetensors file, or truncated)")
    try:
        header = json.loads(raw[8 : 8 + n])
        meta = header.pop("__metadata__")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise _Invalid(f"header does not parse: {exc}") from None
    if not isinstance(meta, dict) or meta.get("0.format") != FORMAT:
        raise _Invalid(f"format {meta.get('0.format') if isinstance(meta, dict) else None!r}")
    if meta.get("0.model") != _identity_json(identity):
        raise _Invalid("written for another model or another MLX/mlx-lm version")
    try:
        ends = [int(t["data_offsets"][1]) for t in header.values()]
        tokens = array("i", base64.b64decode(meta["0.tokens"], validate=True)).tolist()
        int(meta["0.sum16"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise _Invalid(f"header fields are malformed: {exc}") from None
    data_end = 8 + n + max(ends, default=0)
    if data_end != file_size:
        raise _Invalid(f"size {file_size} does not match its header ({data_end}): truncated")
    return _Header(meta, header, 8 + n, data_end, tokens)


def _read_header(path: Path, identity: dict[str, str]) -> _Header:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, _MAX_HEADER_BYTES))
    return parse_header(head, size, identity)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# -- the index -----------------------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    path: Path
    tokens: array[int]  # 4 bytes a token: the index picks the best candidate exactly
    chain: list[bytes]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _shared(a: array[int], b: array[int]) -> int:
    """Length of the common prefix of two token arrays (slices compare in C)."""
    n = min(len(a), len(b))
    lo = 0
    step = 1024
    while lo + step <= n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


@dataclass
class _ModelIndex:
    key: str
    identity: dict[str, str]
    entries: dict[str, _Entry] = field(default_factory=dict)
    by_block: dict[bytes, set[str]] = field(default_factory=dict)

    def add(self, entry: _Entry) -> None:
        self.entries[entry.name] = entry
        for h in entry.chain:
            self.by_block.setdefault(h, set()).add(entry.name)

    def remove(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is None:
            return
        for h in entry.chain:
            names = self.by_block.get(h)
            if names is not None:
                names.discard(name)
                if not names:
                    del self.by_block[h]

    def best(self, prompt: list[int]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with ``prompt`` (all but its last token) and
        that length. The block index narrows the candidates to those sharing the most whole
        blocks; their tokens decide between them."""
        found: set[str] = set()
        for h in block_chain(prompt[: len(prompt) - 1]):
            names = self.by_block.get(h)
            if not names:
                break
            found = names
        want = array("i", prompt[: len(prompt) - 1])
        best: _Entry | None = None
        best_n = 0
        for name in found:
            entry = self.entries[name]
            n = _shared(entry.tokens, want)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n


@dataclass
class _Write:
    key: str
    name: str
    tokens: list[int]
    layers: list[tuple[Any, Any]]  # memoryviews; they keep the MLX arrays alive
    nbytes: int
    checksum: int


class DiskCache:
    """The disk tier of one daemon: a directory shared by all models, one writer thread.

    Thread-safe: the engine thread calls ``view``/``configure`` and the ``DiskView`` methods;
    the writer thread writes and evicts. One lock guards the index and the size table.
    """

    def __init__(self, root: Path | None, budget_bytes: int) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self.root: Path | None = None
        self.budget = 0
        self._files: dict[Path, tuple[int, float]] = {}  # every entry file: size, last use
        self._models: dict[str, _ModelIndex] = {}
        self.writes = 0
        self.write_failures = 0
        self.configure(root, budget_bytes)

    # -- configuration ------------------------------------------------------------------
    def configure(self, root: Path | None, budget_bytes: int) -> None:
        """Apply ``prompt_cache_dir`` / ``prompt_cache_disk_bytes`` (start and hot reload)."""
        with self._lock:
            if root != self.root:
                self.root = root
                self._models.clear()
                self._files = self._scan_sizes() if root is not None else {}
            self.budget = budget_bytes
            self._evict(0)

    @property
    def enabled(self) -> bool:
        return self.root is not None and self.budget > 0

    def _scan_sizes(self) -> dict[Path, tuple[int, float]]:
        assert self.root is not None
        files: dict[Path, tuple[int, float]] = {}
        if not self.root.is_dir():
            return files
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for p in sub.iterdir():
                with contextlib.suppress(OSError):
                    if p.suffix == SUFFIX:
                        st = p.stat()
                        files[p] = (st.st_size, st.st_mtime)
                    elif p.name.endswith(".tmp") and f".{os.getpid()}." not in p.name:
                        p.unlink()  # left by a crash mid-write
        return files

    def usage(self) -> dict[str, Any]:
        with self._lock:
            return {
                "dir": str(self.root) if self.root is not None else None,
                "budget_bytes": self.budget if self.root is not None else 0,
                "bytes": sum(size for size, _ in self._files.values()),
                "entries": len(self._files),
                "writes": self.writes,
                "write_failures": self.write_failures,
            }

    def view(self, identity: dict[str, str]) -> DiskView:
        """The tier as one model sees it; indexes the model's directory now (headers only)."""
        view = DiskView(self, identity)
        self._index(view.key, identity)
        return view

    def _index(self, key: str, identity: dict[str, str]) -> _ModelIndex | None:
        with self._lock:
            if self.root is None:
                return None
            index = self._models.get(key)
            if index is not None:
                return index
            index = self._models[key] = _ModelIndex(key, identity)
            folder = self.root / key
            paths = sorted(p for p in self._files if p.parent == folder)
        for path in paths:
            try:
                header = _read_header(path, identity)
                if path.stem != entry_name(header.tokens):
                    raise _Invalid("its name does not match its tokens")
            except _Invalid as exc:
                self._discard(path, str(exc))
                continue
            except OSError:
                continue
            tokens = array("i", header.tokens)
            entry = _Entry(path.stem, path, tokens, block_chain(header.tokens))
            with self._lock:
                index.add(entry)
        return index

    def _discard(self, path: Path, reason: str) -> None:
        log.warning("prompt_cache.disk_entry_invalid", path=str(path), reason=reason)
        self._delete(path)

    def _delete(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()
        with self._lock:
            self._files.pop(path, None)
            index = self._models.get(path.parent.name)
            if index is not None:
                index.remove(path.stem)

    def _evict(self, extra: int) -> None:
        """Delete least recently used files until ``extra`` more bytes fit (lock held)."""
        used = sum(size for size, _ in self._files.values())
        for path, (size, _) in sorted(self._files.items(), key=lambda kv: kv[1][1]):
            if used + extra <= self.budget:
                break
            with contextlib.suppress(OSError):
                path.unlink()
            del self._files[path]
            index = self._models.get(path.parent.name)
            if index is not None:
                index.remove(path.stem)
            used -= size

    # -- the writer thread ----------------------------------------------------------------
    def put(self, identity: dict[str, str], key: str, tokens: list[int], cache: list[Any]) -> None:
        """Queue ``cache`` (covering exactly ``tokens``, evaluated) for writing. Engine thread."""
        if not self.enabled or len(tokens) < BLOCK_TOKENS:
            return
        index = self._index(key, identity)
        if index is None:
            return
        name = entry_name(tokens)
        nbytes = sum(int(c.keys.nbytes) + int(c.values.nbytes) for c in cache)
        with self._lock:
            known = index.entries.get(name)
            if known is not None:
                self._touch(known.path)
                return
            backlog = self._pending and self._pending + nbytes > MAX_PENDING_BYTES
            if nbytes > self.budget or backlog:
                return
            self._pending += nbytes
        # Taken here, on the engine thread: the arrays are evaluated, so this is a view of
        # their memory; the writer reads it without calling MLX.
        arrays = writer_arrays(cache)
        layers = [(memoryview(k), memoryview(v)) for k, v in arrays]
        checksum = kv_checksum([a for pair in arrays for a in pair])
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._writer, name="mlxd-prompt-cache-writer", daemon=True
            )
            self._thread.start()
        self._jobs.put(_Write(key, name, list(tokens), layers, nbytes, checksum))

    def flush(self, timeout: float) -> bool:
        """Wait until queued writes are done (or ``timeout``); True when none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued writes within ``timeout`` and end the writer thread."""
        self.flush(timeout)
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(1.0)

    def _writer(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write(job)
            except Exception as exc:  # never let one entry end the writer
                self.write_failures += 1
                log.warning("prompt_cache.disk_write_failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._pending -= job.nbytes

    def _write(self, job: _Write) -> None:
        with self._lock:
            root = self.root
            index = self._models.get(job.key)
        if root is None or index is None:
            return
        header, buffers, size = encode(job.tokens, job.layers, index.identity, job.checksum)
        folder = root / job.key
        final = folder / f"{job.name}{SUFFIX}"
        with self._lock:
            if size > self.budget:
                return
            self._evict(size)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _free_bytes(folder) < size + _FREE_MARGIN_BYTES:
            self.write_failures += 1
            log.warning("prompt_cache.disk_full", path=str(folder), needed_bytes=size)
            return
        tmp = folder / f".{job.name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                for buf in buffers:
                    f.write(buf)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.write_failures += 1
            log.warning("prompt_cache.disk_write_failed", path=str(final), error=str(exc))
            return
        chain = block_chain(job.tokens)
        with self._lock:
            self.writes += 1
            self._files[final] = (size, time.time())
            if self._models.get(job.key) is not index:
                return  # reconfigured meanwhile
            # An entry whose tokens are a prefix of the new one is subsumed by it.
            for old in list(index.entries.values()):
                if (
                    old.n_tokens <= len(job.tokens)
                    and old.chain == chain[: len(old.chain)]
                    and old.name == entry_name(job.tokens[: old.n_tokens])
                ):
                    index.remove(old.name)
                    self._files.pop(old.path, None)
                    with contextlib.suppress(OSError):
                        old.path.unlink()
            index.add(_Entry(job.name, final, array("i", job.tokens), chain))
            self._evict(0)

    def _touch(self, path: Path) -> None:
        """Mark ``path`` used now (lock held); the mtime carries the order across restarts."""
        if path in self._files:
            self._files[path] = (self._files[path][0], time.time())
        with contextlib.suppress(OSError):
            os.utime(path)

    # -- lookups (engine thread) ------------------------------------------------------------
    def longer_than(self, identity: dict[str, str], key: str, prompt: list[int], n: int) -> bool:
        index = self._index(key, identity) if self.root is not None else None
        if index is None:
            return False
        with self._lock:
            _, shared = index.best(prompt)
        return shared > n

    def load(
        self, identity: dict[str, str], key: str, prompt: list[int]
    ) -> tuple[list[int], list[Any]] | None:
        """The stored entry sharing the longest prefix with ``prompt``, read into MLX."""
        index = self._index(key, identity) if self.root is not None else None
        if index is None:
            return None
        for _ in range(4):  # a few invalid files in a row are deleted, then give up
            with self._lock:
                entry, shared = index.best(prompt)
            if entry is None:
                return None
            try:
                tokens, cache = _read_entry(entry.path, identity)
            except _Invalid as exc:
                self._discard(entry.path, str(exc))
                continue
            except OSError as exc:  # vanished or unreadable: forget it
                log.warning("prompt_cache.disk_read_failed", path=str(entry.path), error=str(exc))
                self._delete(entry.path)
                continue
            if tokens[:shared] != prompt[:shared]:
                return None  # the file is not what the index said; never serve it
            with self._lock:
                self._touch(entry.path)
            return tokens, cache
        return None


def _read_entry(path: Path, identity: dict[str, str]) -> tuple[list[int], list[Any]]:
    """Read and check one file and build its KV caches (engine thread: calls MLX)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    header = _read_header(path, identity)
    try:
        arrays = mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as exc:
        raise _Invalid(f"MLX cannot read it: {exc}") from None
    assert isinstance(arrays, dict)
    n = len(header.tokens)
    cache = []
    for i in range(sum(1 for k in header.meta if k.startswith("1."))):
        keys, values = arrays.get(f"{i}.0"), arrays.get(f"{i}.1")
        if keys is None or values is None or keys.ndim != 4 or keys.shape[2] != n:
            raise _Invalid(f"layer {i} does not cover its {n} tokens")
        c = KVCache()
        c.state = (keys, values, n)
        cache.append(c)
    if not cache:
        raise _Invalid("no layers")
    mx.eval([(c.keys, c.values) for c in cache])
    if kv_checksum([a for c in cache for a in (c.keys, c.values)]) != int(header.meta["0.sum16"]):
        raise _Invalid("data does not match its checksum (corrupt)")
    return header.tokens, cache


class DiskView:
    """The disk tier bound to one model identity: the narrow interface PromptCache uses."""

    def __init__(self, disk: DiskCache, identity: dict[str, str]) -> None:
        self.disk = disk
        self.identity = identity
        self.key = model_key(identity)

    def longer_than(self, prompt: list[int], n: int) -> bool:
        """Whether a stored entry shares more than ``n`` tokens with ``prompt`` (index only)."""
        return self.disk.enabled and self.disk.longer_than(self.identity, self.key, prompt, n)

    def load(self, prompt: list[int]) -> tuple[list[int], list[Any]] | None:
        return self.disk.load(self.identity, self.key, prompt)

    def put(self, tokens: list[int], cache: list[Any]) -> None:
        self.disk.put(self.identity, self.key, tokens, cache)
