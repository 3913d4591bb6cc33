"""GGUF llama tensors and metadata in mlx_lm's terms: the HF-style config, tensor names,
the q/k row order, and (optionally) dequantized float weights."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxd.errors import UnsupportedModelError

from .reader import meta_value

#: Group size of every quantized tensor MLX returns from a GGUF file (Q4_0/Q4_1/Q8_0 blocks).
GROUP_SIZE = 32

SUPPORTED_ARCHITECTURES = ("llama",)

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


def _float32_repr(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as float32,
    which would otherwise surface as 9.999999747378752e-06 in config.json)."""
    target = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == target:
            return candidate
    return float(value)


def llama_config(
    path: Path, metadata: dict[str, Any], tensors: dict[str, mx.array]
) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def required(key: str) -> int:
        value = meta_value(metadata, f"llama.{key}")
        if value is None:
            raise UnsupportedModelError(f"{path}: GGUF metadata lacks 'llama.{key}'")
        return int(value)

    def optional(key: str) -> Any:
        return meta_value(metadata, f"llama.{key}")

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


def llama_weights(
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
    missing = sorted(expected - tensors.keys(), key=natural_key)
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
        unknown.sort(key=natural_key)
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
    for base in sorted(grouped, key=natural_key):
        parts = grouped[base]
        target = _target_name(base, n_layers)
        assert target is not None  # checked above
        kind = base.rpartition(".")[2]
        if kind in heads:
            parts = {k: unpermute(v, heads[kind]) for k, v in parts.items()}
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
                weights[f"{target}.weight"] = dequantize_affine(w, scales, biases, bits, dequantize)
        else:
            w = parts["weight"]
            weights[f"{target}.weight"] = w if dequantize is None else w.astype(dequantize)
    return weights, quantization


def dequantize_affine(
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


def unpermute(array: mx.array, n_heads: int) -> mx.array:
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


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting blk.2 before blk.10, for readable messages."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
