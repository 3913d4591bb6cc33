"""Load a resolved model source into memory (runs on the engine thread only).

Also decides the weight precision per backend (``[model] dtype``): on the CPU backend a
small quantized model is dequantized to float32, because MLX's CPU quantized matmuls are far
slower than float32 GEMM through OpenBLAS (SmolLM2-135M on 2 cores: prefill ~11 tok/s 4-bit
vs ~310 tok/s float32); on GPU backends quantized weights are kept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .. import backend
from ..config import ModelSettings
from ..errors import ModelLoadError
from ..models.source import ModelSource, resolve

if TYPE_CHECKING:
    from .distributed import Group

#: 'auto' dequantizes on the CPU only while float32 weights stay under this share of RAM.
_AUTO_DEQUANTIZE_RAM_SHARE = 0.25
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to serve, with what the API reports about it."""

    id: str
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    source: ModelSource
    context_length: int
    dtype: str
    load_seconds: float
    created: int = field(default_factory=lambda: int(time.time()))
    eos_token_ids: frozenset[int] = frozenset()
    #: The engine's load generation of its model entry: a job tokenized for an earlier load
    #: of the same configuration may run on this one (see mlxd.engine.residency).
    revision: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source.kind,
            "path": str(self.source.path),
            "dtype": self.dtype,
            "context_length": self.context_length,
            "load_seconds": round(self.load_seconds, 3),
        }


def load(settings: ModelSettings, group: Group | None = None) -> LoadedModel:
    """Resolve ``settings.path`` and load it; raises ModelLoadError with a clear message.
    In a process group only this rank's shard is kept (before the weights are evaluated)."""
    start = time.perf_counter()
    source = resolve(settings.path)
    target = _target_dtype(settings.dtype)
    try:
        if source.kind in ("bundled", "gguf"):
            from ..models.gguf import load_gguf

            # The GGUF loader dequantizes in float32 itself (faster and more exact than
            # dequantizing afterwards). A 4-bit file grows ~8x as float32.
            fits = source.path.stat().st_size * 8 <= _total_ram() * _AUTO_DEQUANTIZE_RAM_SHARE
            deq = target if (settings.dtype != "auto" or fits) else None
            model, tokenizer, config = load_gguf(source.path, dequantize=deq)
            dtype = _describe(model, _is_quantized(model))
        else:
            from mlx_lm.utils import load as mlx_load

            model, tokenizer, config = mlx_load(
                str(source.path), return_config=True, lazy=group is not None
            )
            dtype = _apply_dtype(model, settings.dtype, target)
        if group is not None:
            from .distributed import shard

            shard(model, group, group.status.sharding)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load model from {source.path}: {exc}") from exc
    mx.eval(model.parameters())
    if group is not None:
        group.loaded()  # every rank holds its shard before the first forward
    ctx = settings.context_length or _context_length(config)
    eos = set(tokenizer.eos_token_ids or ())
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return LoadedModel(
        id=settings.id or source.default_id,
        model=model,
        tokenizer=tokenizer,
        config=config,
        source=source,
        context_length=ctx,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        eos_token_ids=frozenset(eos),
    )


def _target_dtype(setting: str) -> mx.Dtype | None:
    if setting in _DTYPES:
        return _DTYPES[setting]
    if setting == "auto" and backend.device_info()["device"] == "cpu":
        return mx.float32
    return None


def _is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )


def _apply_dtype(model: nn.Module, setting: str, target: mx.Dtype | None) -> str:
    """Dequantize/cast per the setting; returns a description of the precision served."""
    quantized = _is_quantized(model)
    if target is None:
        return _describe(model, quantized)
    if setting == "auto":
        n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        # Quantized weights count ~8 per uint32; estimate the float32 size generously.
        if quantized:
            n_params *= 8
        budget = _total_ram() * _AUTO_DEQUANTIZE_RAM_SHARE
        if n_params * 4 > budget:
            return _describe(model, quantized)
    if quantized:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    model.set_dtype(target)
    return str(target).removeprefix("mlx.core.")


def _describe(model: nn.Module, quantized: bool) -> str:
    if quantized:
        bits = sorted(
            {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
        )
        return "quantized " + "/".join(f"{b}-bit" for b in bits)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    return "/".join(sorted(str(d).removeprefix("mlx.core.") for d in dtypes))


def _context_length(config: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3
