"""A GGUF file as an mlx_lm llama model: config, weights and tokenizer together."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

# mlx.nn re-exports these with a star import, which mypy's strict mode does not see through.
from mlx.nn.layers.base import Module
from mlx.nn.layers.quantized import quantize

from mlxd.errors import UnsupportedModelError

from .reader import read_gguf
from .tokenizer import TokenizerSpec, tokenizer_spec, wrap_tokenizer
from .weights import GROUP_SIZE, llama_config, llama_weights

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass
class Converted:
    """A GGUF file in mlx_lm terms: weights by module path, config, per-layer quantization."""

    weights: dict[str, mx.array]
    config: dict[str, Any]
    quantization: dict[str, dict[str, Any]]
    tokenizer: TokenizerSpec


def convert(path: Path, dequantize: mx.Dtype | None) -> Converted:
    if dequantize is not None and dequantize not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"dequantize must be float32, float16 or bfloat16, not {dequantize}")
    tensors, metadata = read_gguf(path)
    config = llama_config(path, metadata, tensors)
    weights, quantization = llama_weights(path, tensors, config, dequantize)
    spec = tokenizer_spec(path, metadata, config)
    config["bos_token_id"] = spec.bos_token_id
    config["eos_token_id"] = spec.eos_token_ids
    if spec.pad_token_id is not None:
        config["pad_token_id"] = spec.pad_token_id
    if quantization:
        bits = Counter(q["bits"] for q in quantization.values()).most_common(1)[0][0]
        default = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        config["quantization"] = {**default, **quantization}
        config["quantization_config"] = config["quantization"]
    return Converted(weights, config, quantization, spec)


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
    converted = convert(path, dequantize)
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
    tokenizer = wrap_tokenizer(converted.tokenizer)
    return model, tokenizer, config
